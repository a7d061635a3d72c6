"""Ablate's one read pass: a group of points sharing a batch schedule trained with each batch read once.

Every head of the group runs its own, unchanged `fit_head` in a thread, but the threads
take turns (one runs at a time, switching whenever one asks for its next batch) and read
through one shared view of the store, so each batch is read once and handed to every head
that asks for it. Each thread keeps its own torch / numpy / Python random state, swapped
in whenever it runs, so a head trained in a group gets exactly its lone-fit weights.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from protocache.stores import FeatureStore

if TYPE_CHECKING:
    from .ablate import AblatePoint


class _Baton:
    """Lets exactly one of a group's threads run at a time, round robin, with its own RNG state."""

    def __init__(self, members: int):
        self.cond = threading.Condition()
        self.turn = 0
        self.alive = list(range(members))
        self.states: dict[int, tuple] = {}
        self.local = threading.local()

    def _save(self, member: int) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.states[member] = (torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda)

    def _restore(self, member: int) -> None:
        if member in self.states:
            t, n, r, cuda = self.states[member]
            torch.set_rng_state(t)
            np.random.set_state(n)
            random.setstate(r)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    def enter(self, member: int) -> None:
        self.local.member = member
        with self.cond:
            self.cond.wait_for(lambda: self.turn == member)
            self._restore(member)

    def switch(self) -> None:
        """Hand the turn to the next live member and wait for ours to come back."""
        member = self.local.member
        with self.cond:
            self._save(member)
            i = self.alive.index(member)
            self.turn = self.alive[(i + 1) % len(self.alive)]
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == member)
            self._restore(member)

    def leave(self) -> None:
        member = self.local.member
        with self.cond:
            i = self.alive.index(member)
            self.alive.remove(member)
            if self.alive:
                self.turn = self.alive[i % len(self.alive)]
            self.cond.notify_all()


class SharedStore:
    """A FeatureStore seen by several heads: identical batch streams are read once.

    `iter_batches` calls with the same arguments share one underlying read; each batch is
    kept until every head that opened that stream has taken it. `with_splits` (the fit's
    validation carve-out) gives a view that shares the streams of views with the same
    splits. Everything else is delegated to the real store.
    """

    def __init__(self, store: FeatureStore, baton: _Baton, buffer_mb: float = 1024, *,
                 _streams: dict | None = None, _counts: dict | None = None, _splits: str = ""):
        self._store, self._baton = store, baton
        self._streams: dict[tuple, dict[str, Any]] = {} if _streams is None else _streams
        self._buffer_bytes = buffer_mb * 2**20
        # batches read from the real store (for tests and the benchmark) and handed to heads
        self._counts = {"reads": 0, "served": 0} if _counts is None else _counts
        self._splits = _splits  # which split assignment this view reads ("" = the store's own)

    @property
    def reads(self) -> int:
        return self._counts["reads"]

    @property
    def served(self) -> int:
        return self._counts["served"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def with_splits(self, splits: Sequence[str] | np.ndarray) -> "SharedStore":
        import hashlib

        digest = hashlib.sha256("\n".join(str(x) for x in splits).encode()).hexdigest()
        return SharedStore(self._store.with_splits(splits), self._baton, self._buffer_bytes / 2**20,
                           _streams=self._streams, _counts=self._counts, _splits=digest)

    def iter_batches(self, *args, **kwargs) -> Iterator[dict[str, Any]]:
        key = (self._splits, args,
               tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())))
        member = self._baton.local.member
        stream = self._streams.get(key)
        if stream is None or member not in stream["waiting"]:
            # A new stream, or one this head already went through (or gave up on): read anew.
            # Every live head of the group is expected to ask for the same stream.
            stream = {"source": self._store.iter_batches(*args, **kwargs), "buffer": [], "dropped": 0,
                      "cursor": {}, "waiting": set(self._baton.alive) - {member}, "done": False, "bytes": 0}
            self._streams[key] = stream
        else:
            stream["waiting"].discard(member)
        stream["cursor"][member] = stream["dropped"] if stream["dropped"] else 0
        return self._consume(stream, member)

    def _consume(self, stream: dict[str, Any], member: int) -> Iterator[dict[str, Any]]:
        try:
            while True:
                i = stream["cursor"][member]
                if i - stream["dropped"] >= len(stream["buffer"]):
                    if stream["done"]:
                        return
                    try:
                        batch = next(stream["source"])
                    except StopIteration:
                        stream["done"] = True
                        return
                    stream["buffer"].append(batch)
                    stream["bytes"] += sum(getattr(v, "nbytes", 0) for v in batch.values())
                    self._counts["reads"] += 1
                batch = stream["buffer"][i - stream["dropped"]]
                stream["cursor"][member] = i + 1
                self._trim(stream)
                self._counts["served"] += 1
                yield batch
                self._baton.switch()
        finally:
            stream["cursor"].pop(member, None)
            self._trim(stream)

    def _trim(self, stream: dict[str, Any]) -> None:
        """Drop batches that every head reading or expected to read the stream has passed."""
        stream["waiting"] &= set(self._baton.alive)
        if stream["bytes"] > self._buffer_bytes:
            stream["waiting"].clear()  # heads that never came read the stream themselves later
        low = 0 if stream["waiting"] else min(stream["cursor"].values(), default=stream["dropped"] + len(stream["buffer"]))
        while stream["dropped"] < low and stream["buffer"]:
            old = stream["buffer"].pop(0)
            stream["bytes"] -= sum(getattr(v, "nbytes", 0) for v in old.values())
            stream["dropped"] += 1


def run_group(store_path: str, points: Sequence[AblatePoint], out: str, fit_options: dict[str, Any],
              evaluate: bool = False, on_point_done: Callable[[AblatePoint, dict], None] | None = None
              ) -> list[dict[str, Any]]:
    """Train a group of points in one read pass; returns one result row per point.
    `on_point_done(point, metrics)` is called as each point's fit finishes (progress lines)."""
    from .fit import fit_head

    store = FeatureStore.open(store_path)
    baton = _Baton(len(points))
    shared = SharedStore(store, baton)
    results: list[dict[str, Any] | None] = [None] * len(points)
    heads: list[Any] = [None] * len(points)
    errors: list[BaseException | None] = [None] * len(points)

    from .ablate import point_fit  # (ablate imports this module)

    def work(member: int) -> None:
        baton.enter(member)
        try:
            point = points[member]
            fit = point_fit(point, fit_options)
            started = time.perf_counter()
            result = fit_head(point.head, store_path, Path(out) / point.name, point.config, fit, store=shared,
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

    threads = [threading.Thread(target=work, args=(m,), daemon=True) for m in range(len(points))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exc in errors:
        if exc is not None:
            raise exc
    rows = []
    for point, metrics, head in zip(points, results, heads):
        row = _result_row(point, Path(out) / point.name, metrics)
        row["group_reads"] = shared.reads  # batches read from the store for the whole group
        row["group_served"] = shared.served  # batches handed to the group's heads
        row["group_size"] = len(points)
        if evaluate:  # the fitted head in hand: no reload from the run folder
            row.update(_eval_row(Path(out) / point.name, head))
        rows.append(row)
    return rows


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
