"""Ablate's one read pass: a group of points sharing a batch schedule, each batch read once for all.

Every head of the group runs its own, unchanged `fit_head` in a thread, but the threads take
turns (`_Baton`: one runs at a time) and read through one shared view of the store
(`SharedStore`), so a batch or block that several heads ask for is read once. Training loops
(`FitContext.train`) are handed to the group's trainer (pipeline/ablate_vectorised.py): when
every head waits at one, the thread that started the pass (where a lone fit would run) runs
the loops of all heads together: one read of each batch, and heads of one kind with equal
shapes trained as one vectorised module.

Each thread keeps its own torch / numpy / Python random state, swapped in when it takes the
turn. Turns change only when a head parks at a training loop, finishes, or has read ahead of
the others by `switch_mb` of batches. (The schedule this replaces switched threads after every
batch, saving and restoring numpy's and Python's random states each time, ~0.4 ms, and ran the
heads' steps in N threads in turn, each with its own OpenMP team: 8 InfoDisent configs took
1/0.63 the time of 8 separate fits.) What the store delivered is counted (`ReadMeter`): array
bytes, batches and the seconds spent reading.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from protocache.stores import FeatureStore
from protocache.stores.layout import ARRAY_NAMES

if TYPE_CHECKING:
    from .ablate import AblatePoint


def array_bytes(batch: dict[str, Any]) -> int:
    """Bytes of the store arrays (tokens, pooled, logits) in a batch."""
    return sum(int(getattr(v, "nbytes", 0)) for k, v in batch.items() if k in ARRAY_NAMES)


class ReadMeter:
    """A FeatureStore that counts what is read from it: array bytes, batches, and seconds spent reading
    (waiting for `iter_batches` and `read` to deliver). Views made by `with_splits` share the counts."""

    def __init__(self, store: Any, counts: dict[str, float] | None = None):
        self._store = store
        self.counts = {"bytes": 0, "batches": 0, "seconds": 0.0} if counts is None else counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def with_splits(self, splits: Sequence[str] | np.ndarray) -> "ReadMeter":
        return ReadMeter(self._store.with_splits(splits), self.counts)

    def iter_batches(self, *args, **kwargs) -> Iterator[dict[str, Any]]:
        source = self._store.iter_batches(*args, **kwargs)
        try:
            while True:
                started = time.perf_counter()
                try:
                    batch = next(source)
                finally:
                    self.counts["seconds"] += time.perf_counter() - started
                self.counts["bytes"] += array_bytes(batch)
                self.counts["batches"] += 1
                yield batch
        except StopIteration:
            return
        finally:
            source.close()

    def _timed(self, fn: Callable[[], np.ndarray]) -> np.ndarray:
        started = time.perf_counter()
        try:
            block = fn()
        finally:
            self.counts["seconds"] += time.perf_counter() - started
        self.counts["bytes"] += int(block.nbytes)
        return block

    def read(self, *args, **kwargs) -> np.ndarray:
        return self._timed(lambda: self._store.read(*args, **kwargs))

    def read_rows(self, *args, **kwargs) -> np.ndarray:
        return self._timed(lambda: self._store.read_rows(*args, **kwargs))


class _Baton:
    """Lets exactly one of a group's threads run at a time, round robin, each with its own RNG state.

    A thread parks at a training loop (`park`); when every live thread is parked, the thread
    that started the pass (`serve`, the caller of run_group, where a lone fit would run) runs
    `resolve(requests)` for all of them, with reads in solo mode (not shared between threads:
    the trainer reads each batch once for all), and hands the turn back.
    """

    def __init__(self, members: int):
        self.events = [threading.Event() for _ in range(members)]
        self.alive = list(range(members))
        self.parked: dict[int, Any] = {}
        self.states: dict[int, tuple] = {}
        self.local = threading.local()
        self.solo = False
        self.call = threading.Event()  # wakes the serving thread: everyone left is parked, or nobody is left
        self.last = 0  # the member that called it (it takes the turn back)
        self.events[0].set()

    @property
    def member(self) -> int:
        return self.local.member

    # random states -------------------------------------------------------------------
    def swap_out(self, member: int) -> None:
        """Keep the running random state (torch, numpy, Python) as `member`'s."""
        self.states[member] = (self._torch_state(), np.random.get_state(), random.getstate())

    def swap_in(self, member: int) -> None:
        if member in self.states:
            torch_state, numpy_state, python_state = self.states[member]
            self._set_torch_state(torch_state)
            np.random.set_state(numpy_state)
            random.setstate(python_state)

    def use_torch_rng(self, member: int) -> None:
        """Install `member`'s torch random state only (a step's draws come from torch)."""
        if member in self.states:
            self._set_torch_state(self.states[member][0])

    def keep_torch_rng(self, member: int) -> None:
        if member in self.states:
            self.states[member] = (self._torch_state(),) + self.states[member][1:]

    @staticmethod
    def _torch_state() -> tuple:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    @staticmethod
    def _set_torch_state(state: tuple) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    # turns ---------------------------------------------------------------------------
    def enter(self, member: int) -> None:
        self.local.member = member
        self.events[member].wait()
        self.swap_in(member)

    def _next(self, after: int) -> int | None:
        """The next live, unparked member after `after` in round-robin order (None: nobody)."""
        ring = sorted(set(self.alive) | {after})
        start = ring.index(after)
        for k in range(1, len(ring) + 1):
            m = ring[(start + k) % len(ring)]
            if m in self.alive and m not in self.parked and m != after:
                return m
        return None

    def _wait_turn(self, member: int, wake: threading.Event) -> None:
        """Save our random state, wake `wake`, and wait for our turn to come back."""
        self.swap_out(member)
        self.events[member].clear()
        self.last = member
        wake.set()
        self.events[member].wait()
        self.swap_in(member)

    def switch(self) -> None:
        """Let the next member run, if there is one, and wait for our turn to come back."""
        member = self.member
        nxt = self._next(member)
        if nxt is not None:
            self._wait_turn(member, self.events[nxt])

    def park(self, request: Any) -> None:
        """Wait at a training loop until every live member is at one and the loops have run."""
        member = self.member
        self.parked[member] = request
        nxt = self._next(member)
        self._wait_turn(member, self.call if nxt is None else self.events[nxt])

    def leave(self) -> None:
        member = self.member
        self.alive.remove(member)
        self.parked.pop(member, None)
        nxt = self._next(member)
        self.last = member
        (self.call if nxt is None else self.events[nxt]).set()

    def serve(self, resolve: Callable[[list[Any]], None]) -> None:
        """In the thread that started the pass: run the parked loops whenever all live members are
        parked, until nobody is left."""
        while True:
            self.call.wait()
            self.call.clear()
            if not self.alive:
                return
            requests = [self.parked[m] for m in self.alive]
            self.solo = True
            try:
                resolve(requests)
            except BaseException as exc:  # noqa: BLE001 - never leave a parked thread waiting
                for r in requests:
                    r.error = r.error or exc
            finally:
                self.solo = False
                self.parked.clear()
            self.events[self.last if self.last in self.alive else self.alive[0]].set()


class SharedStore:
    """A FeatureStore seen by several heads: identical batch streams and blocks are read once.

    `iter_batches` calls with the same arguments share one underlying read, and `read` calls
    of the same rows one block; each is kept until every other live, unparked head has taken
    it (at most `buffer_mb` per stream, and of blocks: the oldest go first). A head that has
    read `switch_mb` ahead of the others
    hands the turn on. `with_splits` (the fit's validation carve-out) gives a view sharing
    the streams of views with the same splits. In solo mode (the trainer's loops) reads go
    straight to the store. Batches and blocks handed to several heads are the same arrays.
    """

    def __init__(self, store: FeatureStore | ReadMeter, baton: _Baton, buffer_mb: float = 256, switch_mb: float = 32,
                 *, _shared: dict | None = None, _splits: str = ""):
        self._meter = store if isinstance(store, ReadMeter) else ReadMeter(store)
        self._baton = baton
        self._shared = _shared if _shared is not None else {
            "streams": {}, "blocks": {}, "held": 0, "served": 0,
            "buffer": buffer_mb * 2**20, "switch": switch_mb * 2**20}
        self._splits = _splits  # which split assignment this view reads ("" = the store's own)

    @property
    def reads(self) -> int:
        """Batches read from the store."""
        return int(self._meter.counts["batches"])

    @property
    def served(self) -> int:
        """Batches handed to heads."""
        return int(self._shared["served"])

    @property
    def bytes_read(self) -> int:
        """Array bytes read from the store (tokens, pooled, logits)."""
        return int(self._meter.counts["bytes"])

    @property
    def read_seconds(self) -> float:
        return float(self._meter.counts["seconds"])

    @property
    def view_key(self) -> tuple:
        """Equal for views of one group with the same splits: they read the same batches."""
        return id(self._shared), self._splits

    def count_served(self, n: int) -> None:
        self._shared["served"] += n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._meter, name)

    def with_splits(self, splits: Sequence[str] | np.ndarray) -> "SharedStore":
        digest = hashlib.sha256("\n".join(str(x) for x in splits).encode()).hexdigest()
        return SharedStore(self._meter.with_splits(splits), self._baton, _shared=self._shared, _splits=digest)

    def _others(self, member: int) -> set[int]:
        return set(self._baton.alive) - {member} - set(self._baton.parked)

    def read(self, name: str, start: int, stop: int, *args, **kwargs) -> np.ndarray:
        if self._baton.solo:
            return self._meter.read(name, start, stop, *args, **kwargs)
        key = (name, start, stop, args, tuple(sorted(kwargs.items())))
        member, blocks = self._baton.member, self._shared["blocks"]
        entry = blocks.get(key)
        if entry is not None and member in entry["waiting"]:
            entry["waiting"].discard(member)
            if not entry["waiting"] & set(self._baton.alive):
                del blocks[key]
                self._shared["held"] -= entry["block"].nbytes
            return entry["block"]
        block = self._meter.read(name, start, stop, *args, **kwargs)
        waiting = self._others(member)
        if waiting and block.nbytes <= self._shared["buffer"]:
            while blocks and self._shared["held"] + block.nbytes > self._shared["buffer"]:
                self._shared["held"] -= blocks.pop(next(iter(blocks)))["block"].nbytes  # its heads read it anew
            blocks[key] = {"block": block, "waiting": waiting}
            self._shared["held"] += block.nbytes
        if self._shared["held"] >= self._shared["switch"]:
            self._baton.switch()
        return block

    def iter_batches(self, *args, **kwargs) -> Iterator[dict[str, Any]]:
        if self._baton.solo:
            return self._solo(self._meter.iter_batches(*args, **kwargs))
        key = (self._splits, args,
               tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())))
        member = self._baton.member
        streams = self._shared["streams"].setdefault(key, [])
        streams[:] = [s for s in streams if s["waiting"] or s["cursor"]]  # forget streams nobody reads any more
        stream = next((s for s in streams if member in s["waiting"]), None)  # the oldest we are expected at
        if stream is None:
            # A new stream: every other live head of the group is expected to ask for it too (a head
            # may read the same stream twice in a row, e.g. two passes over its train split).
            stream = {"source": self._meter.iter_batches(*args, **kwargs), "buffer": [], "dropped": 0,
                      "cursor": {}, "waiting": self._others(member), "done": False, "bytes": 0}
            streams.append(stream)
        else:
            stream["waiting"].discard(member)
        stream["cursor"][member] = stream["dropped"]
        return self._consume(stream, member)

    def _solo(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in source:
            self._shared["served"] += 1
            yield batch

    def _consume(self, stream: dict[str, Any], member: int) -> Iterator[dict[str, Any]]:
        try:
            while True:
                i = stream["cursor"][member]
                fresh = i - stream["dropped"] >= len(stream["buffer"])
                if fresh:
                    if stream["done"]:
                        return
                    try:
                        batch = next(stream["source"])
                    except StopIteration:
                        stream["done"] = True
                        return
                    stream["buffer"].append(batch)
                    stream["bytes"] += sum(getattr(v, "nbytes", 0) for v in batch.values())
                batch = stream["buffer"][i - stream["dropped"]]
                stream["cursor"][member] = i + 1
                self._trim(stream)
                self._shared["served"] += 1
                yield batch
                if fresh and stream["bytes"] >= self._shared["switch"]:
                    self._baton.switch()  # read ahead far enough: let the others catch up
        finally:
            stream["cursor"].pop(member, None)
            self._trim(stream)

    def _trim(self, stream: dict[str, Any]) -> None:
        """Drop batches that every head reading or expected to read the stream has passed."""
        stream["waiting"] &= set(self._baton.alive)
        if stream["bytes"] > self._shared["buffer"]:
            stream["waiting"].clear()  # heads that never came read the stream themselves later
        end = stream["dropped"] + len(stream["buffer"])
        low = 0 if stream["waiting"] else min(stream["cursor"].values(), default=end)
        while stream["dropped"] < low and stream["buffer"]:
            old = stream["buffer"].pop(0)
            stream["bytes"] -= sum(getattr(v, "nbytes", 0) for v in old.values())
            stream["dropped"] += 1


def run_group(store_path: str, points: Sequence[AblatePoint], out: str, fit_options: dict[str, Any],
              evaluate: bool = False, on_point_done: Callable[[AblatePoint, dict], None] | None = None
              ) -> list[dict[str, Any]]:
    """Train a group of points in one read pass; returns one result row per point.
    `on_point_done(point, metrics)` is called as each point's fit finishes (progress lines)."""
    from .ablate import point_fit  # (ablate imports this module)
    from .ablate_vectorised import GroupTrainer
    from .fit import fit_head
    from .runtime import fit_settings
    from .sources import with_backbone_labels

    trainer = GroupTrainer()
    baton = _Baton(len(points))
    base = FeatureStore.open(store_path)
    if points[0].config.get("target") == "backbone":  # (a group is one target: ablate.group_points)
        base = with_backbone_labels(base)  # every head of the group explains the backbone's own top-1
    shared = SharedStore(base, baton)
    trainer.bind(baton, shared)
    results: list[dict[str, Any] | None] = [None] * len(points)
    heads: list[Any] = [None] * len(points)
    errors: list[BaseException | None] = [None] * len(points)

    def work(member: int) -> None:
        baton.enter(member)
        try:
            point = points[member]
            started = time.perf_counter()
            result = fit_head(point.head, store_path, Path(out) / point.name, point.config,
                              point_fit(point, fit_options), store=shared, group=trainer,
                              extra_config={"ablate_point": {"head": point.head, "config": point.config,
                                                             "seed": point.seed}},
                              replace=True)  # a stale run of this point (another store) is replaced
            results[member] = {"fit_seconds": time.perf_counter() - started, **result.metrics}
            heads[member] = result.model
            if on_point_done is not None:
                on_point_done(point, results[member])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors[member] = exc
        finally:
            baton.leave()

    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(m,), daemon=True) for m in range(len(points))]
    with fit_settings(point_fit(points[0], fit_options).threads):  # the loops run here, as a lone fit's would
        for t in threads:
            t.start()
        baton.serve(trainer.resolve)
        for t in threads:
            t.join()
    seconds = time.perf_counter() - started
    for exc in errors:
        if exc is not None:
            raise exc
    rows = []
    for member, (point, metrics, head) in enumerate(zip(points, results, heads)):
        row = _result_row(point, Path(out) / point.name, metrics)
        row.update(pass_figures(shared, len(points), seconds))
        row["train_loops"] = "; ".join(trainer.loops.get(member, []))  # how each of its loops ran
        if evaluate:  # the fitted head in hand: no reload from the run folder
            row.update(_eval_row(Path(out) / point.name, head))
        rows.append(row)
    return rows


PASS_KEYS = ("group_size", "group_reads", "group_served", "group_bytes_read", "bytes_read_per_head",
             "group_read_seconds", "group_seconds", "train_loops")
"""The columns results.parquet gets from a point's read pass (null for points finished in an earlier run
that left no results.parquet)."""


def pass_figures(shared: SharedStore, size: int, seconds: float) -> dict[str, Any]:
    """What one read pass cost: batches read and handed out, array bytes read (in all and per head)."""
    return {"group_size": size, "group_reads": shared.reads, "group_served": shared.served,
            "group_bytes_read": shared.bytes_read, "bytes_read_per_head": shared.bytes_read / size,
            "group_read_seconds": shared.read_seconds, "group_seconds": seconds}


def _result_row(point: AblatePoint, run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    from .ablate import _fmt

    return {"run": point.name, "run_dir": str(run_dir), "head": point.head, "seed": point.seed,
            **{f"config.{k}": _fmt(v) if isinstance(v, (list, dict)) else v for k, v in point.config.items()},
            "train_accuracy": metrics.get("train_accuracy"), "val_accuracy": metrics.get("val_accuracy"),
            "test_accuracy": metrics.get("test_accuracy"),
            "prototype_count": metrics.get("prototype_count"),
            "fit_seconds": metrics.get("fit_seconds", metrics.get("seconds"))}


EVAL_KEYS = ("consistency", "stability", "purity", "drift")


def _eval_row(run_dir: Path, head: Any = None) -> dict[str, Any]:
    from .evaluate import EvaluateConfig, evaluate_run

    res = evaluate_run(run_dir, EvaluateConfig(confusion_png=False), head=head)
    return {k: (res[k].get("value") if isinstance(res[k], dict) else res[k]) for k in EVAL_KEYS}
