"""Ablate stage: a grid of head configs on one store, many heads per read pass.

Points of the grid that share a store and a batch schedule (same head, seed, epochs and
batch size) form a group. A group is trained in one read pass: every head of the group
runs its own, unchanged `fit_head` in a thread, but the threads take turns (one runs at a
time, switching whenever one asks for its next batch) and read through one shared view of
the store, so each batch is read once and handed to every head that asks for it, in the
spirit of DINOv2's linear evaluation that trains many classifiers on one pass.

Each thread keeps its own torch / numpy / Python random state, swapped in whenever it runs,
so a head trained in a group gets exactly the weights it gets when trained alone with the
same seed. Groups are independent and run in parallel on a dask cluster when one is given.
Finished points (a run folder with metrics.json for the same config) are skipped, so an
interrupted sweep resumes where it stopped.

Configs are ranked by validation accuracy (each fit holds out `val_fraction` of the train
split, see pipeline/fit.py), averaged over seeds; the test accuracy reported for the sweep
is the one of the config that validation chose, never the best test accuracy.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from protocache.stores import FeatureStore
from protocache.stores import runs as run_files
from protocache.stores.errors import ProtocacheError

from .config import build_config, check_keys, read_yaml_mapping
from .runtime import dask_client

# Config keys that change the batch schedule; points differing only in other keys share a pass.
SCHEDULE_KEYS = ("epochs", "batch_size")


@dataclass
class AblatePoint:
    head: str
    config: dict[str, Any]
    seed: int

    @property
    def name(self) -> str:
        parts = [self.head] + [f"{k}={_fmt(v)}" for k, v in sorted(self.config.items())] + [f"seed={self.seed}"]
        return re.sub(r"[^A-Za-z0-9=._-]+", "_", "-".join(parts))


@dataclass
class AblateConfig:
    """A sweep of head configs on one store."""

    store: str
    """The feature store every point trains on."""
    grid_file: str
    """YAML grid file: head, grid (key -> values) and/or configs, seeds, fit."""
    out: str
    """Sweep folder: one run folder per point, results.parquet, summary.png."""
    seeds: list[int] | None = None
    """Seeds of every config; overrides the grid file's."""
    workers: int | None = None
    """Train groups in parallel on a local dask cluster of this many worker processes."""
    scheduler: str | None = None
    """Train groups on an existing dask cluster (tcp://HOST:PORT)."""
    device: str = "cpu"
    """cpu | cuda | auto."""
    threads: int | None = None
    """Torch threads per process."""
    evaluate: bool | None = None
    """Also compute interpretability metrics per point; None: when the store has part keypoints."""
    fit_options: dict[str, Any] = field(default_factory=dict)
    """Fit options (FitConfig fields) for every point, over the grid file's `fit:`."""


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def read_grid(path: str | Path, seeds: Sequence[int] | None = None) -> tuple[list[AblatePoint], dict[str, Any]]:
    """Points of a grid file: `head`, then `grid` (key -> list of values, cartesian product)
    and/or `configs` (a list of explicit configs), optional `seeds` and `fit` options."""
    p = Path(path).expanduser()
    data = read_yaml_mapping(p, "grid file")
    if "head" not in data:
        raise ProtocacheError(f"grid file {p} needs a `head:` and a `grid:` mapping or a `configs:` list")
    unknown = sorted(set(data) - {"head", "grid", "configs", "seeds", "fit"})
    if unknown:
        raise ProtocacheError(f"grid file {p}: unknown top-level key(s) {unknown}; use head, grid, configs, seeds, fit")
    head = str(data["head"])
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise ProtocacheError(f"grid file {p}: `grid` maps each config key to a non-empty list of values")
    configs: list[dict[str, Any]] = []
    if grid:
        keys = sorted(grid)
        configs += [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    for c in data.get("configs") or []:
        if not isinstance(c, dict):
            raise ProtocacheError(f"grid file {p}: every entry of `configs` is a mapping")
        configs.append(dict(c))
    if not configs:
        configs = [{}]
    seed_list = list(seeds) if seeds else list(data.get("seeds") or [0])
    points = [AblatePoint(head, c, int(s)) for c in configs for s in seed_list]
    # Validate every config (keys and types) and the fit options before any training starts.
    from .fit import FitConfig
    from .heads import head_class

    config_class = head_class(head).config_class
    for point in points:
        build_config(config_class, point.config, f"head {head!r} (grid file {p})")
    fit = data.get("fit") or {}
    if not isinstance(fit, dict):
        raise ProtocacheError(f"grid file {p}: `fit:` must be a mapping of fit options")
    check_keys(fit, [f.name for f in dataclasses.fields(FitConfig)], f"`fit:` (grid file {p})")
    return points, dict(fit)


def group_points(points: Sequence[AblatePoint]) -> list[list[AblatePoint]]:
    """Points sharing a batch schedule: same head, seed and schedule keys."""
    groups: dict[tuple, list[AblatePoint]] = {}
    for p in points:
        key = (p.head, p.seed) + tuple(_fmt(p.config.get(k)) for k in SCHEDULE_KEYS)
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def point_done(run_dir: Path, point: AblatePoint) -> bool:
    try:
        config, _ = run_files.read_run(run_dir)
    except ProtocacheError:
        return False
    recorded = config.get("ablate_point") or {}
    return recorded == {"head": point.head, "config": point.config, "seed": point.seed}


# ----------------------------------------------------------------------------- one read pass


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
              evaluate: bool = False) -> list[dict[str, Any]]:
    """Train a group of points in one read pass; returns one result row per point."""
    from .fit import FitConfig, fit_head

    store = FeatureStore.open(store_path)
    baton = _Baton(len(points))
    shared = SharedStore(store, baton)
    results: list[dict[str, Any] | None] = [None] * len(points)
    heads: list[Any] = [None] * len(points)
    errors: list[BaseException | None] = [None] * len(points)

    def work(member: int) -> None:
        baton.enter(member)
        try:
            point = points[member]
            fit = FitConfig(**{**fit_options, "seed": point.seed, "progress": False})
            started = time.perf_counter()
            result = fit_head(point.head, store_path, Path(out) / point.name, point.config, fit, store=shared,
                              extra_config={"ablate_point": {"head": point.head, "config": point.config,
                                                             "seed": point.seed}})
            results[member] = {"fit_seconds": time.perf_counter() - started, **result.metrics}
            heads[member] = result.model
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


def run_ablate(cfg: AblateConfig) -> dict[str, Any]:
    """Run (or resume) a sweep; writes OUT/results.parquet and OUT/summary.png."""
    points, file_fit = read_grid(cfg.grid_file, cfg.seeds)
    store = FeatureStore.open(cfg.store)
    missing = store.missing_shards()
    if missing:
        raise ProtocacheError(f"{cfg.store}: shards {missing} are not written; complete the store first.")
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    fit_options = {**file_fit, **cfg.fit_options, "device": cfg.device}
    if cfg.threads:
        fit_options["threads"] = cfg.threads
    evaluate = cfg.evaluate if cfg.evaluate is not None else "parts_input" in store.metadata().column_names
    todo = [p for p in points if not point_done(out / p.name, p)]
    skipped = len(points) - len(todo)
    if skipped:
        print(f"{skipped} of {len(points)} points already finished; training the other {len(todo)}.",
              file=sys.stderr, flush=True)
    groups = group_points(todo)
    store_path = str(Path(store.path).resolve()) if store.is_local else store.location
    if groups and (cfg.workers or cfg.scheduler):
        with dask_client(cfg.scheduler, cfg.workers) as client:
            futures = [client.submit(run_group, store_path, g, str(out.resolve()), fit_options, evaluate,
                                     pure=False, retries=1) for g in groups]
            trained = [row for f in futures for row in f.result()]
    else:
        trained = [row for g in groups for row in run_group(store_path, g, str(out), fit_options, evaluate)]
    evaluated = {row["run"]: {k: row[k] for k in EVAL_KEYS} for row in trained if evaluate}
    rows = []
    for p in points:  # every point, finished now or before, from its run folder
        config, metrics = run_files.read_run(out / p.name)
        row = _result_row(p, out / p.name, metrics)
        if evaluate:  # points trained now were evaluated with their head in hand
            row.update(evaluated.get(p.name) or _eval_row(out / p.name))
        rows.append(row)
    chosen = rank_by_val(points, rows)
    write_results(rows, out / "results.parquet")
    swept = sorted({k for p in points for k in p.config})
    plot = summary_plot(rows, swept, out / "summary.png", chosen)
    return {"points": len(points), "trained": len(todo), "skipped": skipped, "groups": len(groups),
            "results": str(out / "results.parquet"), "summary": plot, "chosen": chosen}


def rank_by_val(points: Sequence[AblatePoint], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rank the configs by mean validation accuracy over seeds; mark the rows of the best.

    Adds `val_rank` (1 = best; shared by a config's seeds; None for a config without val
    figures) and `chosen` to every row, and returns the chosen config with its mean val and
    test accuracy (None when no point has a validation split, i.e. val_fraction 0). Ties go
    to the config listed first in the grid.
    """
    keys = [json.dumps(p.config, sort_keys=True) for p in points]
    val: dict[str, list[float]] = {}
    for key, row in zip(keys, rows):
        val.setdefault(key, [])
        if row.get("val_accuracy") is not None:
            val[key].append(float(row["val_accuracy"]))
    ranked = sorted((k for k in val if val[k]), key=lambda k: -float(np.mean(val[k])))  # stable: grid order on ties
    rank = {k: i + 1 for i, k in enumerate(ranked)}
    for key, row in zip(keys, rows):
        row["val_rank"] = rank.get(key)
        row["chosen"] = rank.get(key) == 1
    if not ranked:
        return None
    best = [(p, r) for p, k, r in zip(points, keys, rows) if k == ranked[0]]
    tests = [float(r["test_accuracy"]) for _, r in best if r.get("test_accuracy") is not None]
    return {"config": best[0][0].config, "runs": [r["run"] for _, r in best], "seeds": [p.seed for p, _ in best],
            "val_accuracy": float(np.mean(val[ranked[0]])),
            "test_accuracy": float(np.mean(tests)) if tests else None, "configs_ranked": len(ranked)}


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def summary_plot(rows: list[dict[str, Any]], keys: Sequence[str], path: Path,
                 chosen: dict[str, Any] | None = None) -> str | None:
    """One panel per swept key: each metric's mean over the other keys and seeds, ± the spread over seeds;
    the title names the config validation chose and its test accuracy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics = [m for m in ("val_accuracy", "test_accuracy", "consistency", "purity")
               if any(r.get(m) is not None for r in rows)]
    keys = list(keys) or ["seed"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        col = key if key == "seed" else f"config.{key}"
        values = sorted({r.get(col) for r in rows}, key=lambda v: (isinstance(v, str), v))
        xs = np.arange(len(values))
        for metric in metrics:
            means, spreads = [], []
            for v in values:
                per_seed: dict[int, list[float]] = {}
                for r in rows:
                    if r.get(col) == v and r.get(metric) is not None:
                        per_seed.setdefault(r["seed"], []).append(float(r[metric]))
                seed_means = [np.mean(x) for x in per_seed.values()]
                means.append(np.mean(seed_means) if seed_means else np.nan)
                spreads.append(np.std(seed_means) if len(seed_means) > 1 else 0.0)
            ax.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=metric)
        ax.set_xticks(xs, [str(v) for v in values])
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("value (mean ± std over seeds)")
    axes[0][-1].legend(fontsize=8)
    if chosen is not None:
        test = "n/a" if chosen["test_accuracy"] is None else f"{chosen['test_accuracy']:.4f}"
        fig.suptitle(f"chosen by val: {json.dumps(chosen['config'], sort_keys=True)} "
                     f"(val {chosen['val_accuracy']:.4f}, test {test})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
