"""Ablate stage: a grid of head configs on one store, many heads per read pass.

Points of the grid that share a store and a batch schedule (same head, seed, epochs and
batch size) form a group. A group is trained in one read pass (pipeline/ablate_pass.py): every
head of the group runs its own, unchanged `fit_head` in a thread, the threads take turns and
read through one shared view of the store, and their training loops run together
(pipeline/ablate_vectorised.py): each batch is read once for all heads, and heads of one kind
whose shapes agree train as one vectorised module, in the spirit of DINOv2's linear evaluation
that trains many classifiers on one pass. The store bytes each pass read are counted and
reported per point (`group_bytes_read`, `bytes_read_per_head`).

Each head keeps its own random state and optimiser, so a head trained in a group gets the
weights it gets when trained alone with the same seed (exactly on the CPU with one torch
thread, to float rounding otherwise). Groups are independent and run in parallel on a dask
cluster when one is given.
A point is finished when its run folder holds a complete run of the same head, config and
seed, fitted with the same fit options on a store with the same fingerprint; finished
points are skipped, so an interrupted sweep resumes where it stopped. A run that differs
in any of these is trained again (`--resume strict` refuses instead). The sweep folder is
marked as ours by sweep.json; results.parquet and summary.png are written by rename.

Configs are ranked by validation accuracy (each fit holds out `val_fraction` of the train
split, see pipeline/fit.py), averaged over seeds; the test accuracy reported for the sweep
is the one of the config that validation chose, never the best test accuracy.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from protocache.stores import FeatureStore
from protocache.stores import owned
from protocache.stores import runs as run_files
from protocache.stores.errors import ProtocacheError

from .config import build_config, check_keys, check_values, read_yaml_mapping
from .ablate_pass import EVAL_KEYS, PASS_KEYS, _eval_row, _result_row, run_group
from .runtime import check_scheduler, dask_client, resolve_device

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
    resume: str = "retrain"
    """retrain: a point whose run in --out was fitted with another config, seed, fit options or store
    fingerprint is trained again | strict: such a point is an error, and nothing is trained."""
    progress: bool = True
    """Show a line on stderr per read pass and per finished point (done/total, its config, an ETA)."""

    def validate(self) -> None:
        """Every number in its range (pipeline/config.py's rules) and the seeds, before any work."""
        check_values(self, "ablate", flags=True)
        if self.seeds is not None:
            parse_seeds(self.seeds, "--seeds")


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
    listed = data.get("configs") or []
    if not isinstance(listed, list):
        raise ProtocacheError(f"grid file {p}: `configs` is a list of config mappings, not {listed!r}")
    for c in listed:
        if not isinstance(c, dict):
            raise ProtocacheError(f"grid file {p}: every entry of `configs` is a mapping")
        configs.append(dict(c))
    if not configs:
        configs = [{}]
    seed_list = parse_seeds(seeds, "--seeds") if seeds else parse_seeds(
        [0] if data.get("seeds") is None else data["seeds"], f"grid file {p}: `seeds:`")
    points = [AblatePoint(head, c, s) for c in configs for s in seed_list]
    names = collections.Counter(point.name for point in points)
    twice = sorted(name for name, count in names.items() if count > 1)
    if twice:  # one run folder each: a repeated value, seed or config would train (and count) one point twice
        raise ProtocacheError(f"grid file {p}: point {twice[0]} comes {names[twice[0]]} times"
                              f"{f' (and {len(twice) - 1} more points repeat)' if len(twice) > 1 else ''}; "
                              "list each value, seed and config once")
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
    build_config(FitConfig, fit, f"`fit:` (grid file {p})", noun="option")  # types and ranges of the fit options
    return points, dict(fit)


def parse_seeds(value: Any, where: str) -> list[int]:
    """A list of seeds (integers >= 0); anything else, e.g. `seeds: 3` or `seeds: zero`, is an error saying
    what to write."""
    items = value if isinstance(value, (list, tuple)) else None
    if not items or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 for s in items):
        one = value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else 7
        example = (f"--seeds {one} for the one seed {one}, --seeds 0,1,2 for three seeds" if where.startswith("--")
                   else f"`seeds: [{one}]` for the one seed {one}, `seeds: [0, 1, 2]` for three seeds")
        raise ProtocacheError(f"{where} must be a non-empty list of integers in [0, 2**63), got {value!r}; "
                              f"e.g. {example}")
    return [int(s) for s in items]


def check_points(points: Sequence[AblatePoint], store: Any, fit_options: dict[str, Any]) -> None:
    """Every point's fit options and head config resolved against the store exactly as its fit will be,
    so a bad value anywhere in the grid stops the sweep before the first fit."""
    from .fit import FitConfig
    from .heads import resolve_config, store_info
    from .sources import with_backbone_labels

    targets = sorted({str(p.config.get("target", "labels")) for p in points})
    if len(targets) > 1:  # val accuracy is accuracy for one and agreement with the backbone for the other
        raise ProtocacheError(f"the grid mixes target={' and target='.join(targets)}, whose val accuracies measure "
                              "different things (the labels vs agreement with the backbone's top-1), so no config "
                              "could be chosen between them; sweep each target in an ablate of its own")
    infos: dict[str, Any] = {}  # per target: the store's labels, or the backbone's top-1 as the fit sees them
    for point in points:
        try:
            fit = build_config(FitConfig, {**fit_options, "seed": point.seed, "progress": False}, "fit", noun="option")
            overrides = {**point.config, **({"epochs": fit.epochs} if fit.epochs is not None else {})}
            target = str(point.config.get("target", "labels"))
            if target not in infos:
                infos[target] = store_info(with_backbone_labels(store) if target == "backbone" else store)
            resolve_config(point.head, infos[target], overrides)
        except ProtocacheError as exc:
            raise ProtocacheError(f"grid point {point.name}: {exc}; nothing was trained") from None


def group_points(points: Sequence[AblatePoint]) -> list[list[AblatePoint]]:
    """Points sharing a batch schedule and labels: same head, seed, schedule keys and target (the store's labels
    or the backbone's top-1)."""
    groups: dict[tuple, list[AblatePoint]] = {}
    for p in points:
        key = (p.head, p.seed, str(p.config.get("target", "labels"))) + tuple(
            _fmt(p.config.get(k)) for k in SCHEDULE_KEYS)
        groups.setdefault(key, []).append(p)
    return list(groups.values())


RESUME_MODES = ("retrain", "strict")
NO_RUN = "no finished run"


def point_fit(point: AblatePoint, fit_options: dict[str, Any]):
    """The FitConfig a point is trained with (its own seed, no progress bar)."""
    from .fit import FitConfig

    return FitConfig(**{**fit_options, "seed": point.seed, "progress": False})


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=run_files._json_default))


def point_difference(run_dir: Path, point: AblatePoint, fit_options: dict[str, Any], store: Any) -> str | None:
    """None when `run_dir` holds a finished run of exactly this point: the same head, config and seed,
    the same fit options, on a store with the same fingerprint as `store`; otherwise what differs."""
    from .runs import store_difference

    try:
        config, metrics = run_files.read_run(run_dir)
    except ProtocacheError as exc:
        return NO_RUN if not (Path(run_dir) / run_files.CONFIG).exists() else f"a damaged run ({exc})"
    damage = run_files.run_damage(run_dir, metrics)
    if damage:
        return f"a damaged run ({damage})"
    recorded = config.get("ablate_point") or {}
    if _jsonable(recorded) != _jsonable({"head": point.head, "config": point.config, "seed": point.seed}):
        return f"fitted as another point ({_jsonable(recorded)})"
    then, now = _jsonable(config.get("fit") or {}), _jsonable(dataclasses.asdict(point_fit(point, fit_options)))
    differ = [k for k in sorted(set(then) | set(now)) if k != "progress" and then.get(k) != now.get(k)]
    if differ:
        return "other fit options (" + ", ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in differ) + ")"
    store_diff = store_difference(config, store)
    if store_diff:
        return f"fitted on the store before it was re-extracted ({store_diff})"
    return None


def point_done(run_dir: Path, point: AblatePoint, fit_options: dict[str, Any], store: Any) -> bool:
    return point_difference(run_dir, point, fit_options, store) is None


def prepare_sweep_dir(out: Path) -> Path:
    """Make `out` the sweep folder: a missing or empty folder, or a sweep (sweep.json, or only runs and
    results from before the marker); any other folder is refused with what it holds."""
    if out.exists() and not out.is_dir():
        raise ProtocacheError(f"{out} exists and is not a folder; choose another --out.")
    if out.exists() and not owned.is_sweep_folder(out):
        ours = {"results.parquet", "summary.png"}
        foreign = [e for e in out.iterdir()
                   if not e.name.startswith(".") and e.name not in ours and not owned.is_run_folder(e)]
        if foreign:
            owned.refuse_foreign_folder(out, "sweep folder")
    out.mkdir(parents=True, exist_ok=True)
    if not owned.is_sweep_folder(out):
        run_files.write_json(out / owned.SWEEP_MARKER, {"format": 1, "written_by": "protocache ablate"})
    return out


class SweepProgress:
    """Lines on stderr as a sweep goes: each read pass as it starts (its configs), each point as its fit
    finishes (points done / total, its config, its accuracies, elapsed time and an ETA)."""

    def __init__(self, total: int, passes: int, enabled: bool = True):
        self.total, self.passes, self.enabled = total, passes, enabled
        self.done = 0
        self.started = time.perf_counter()
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"ablate: {text}", file=sys.stderr, flush=True)

    def pass_started(self, index: int, group: Sequence[AblatePoint]) -> None:
        configs = "; ".join(describe_point(p, seed=False) for p in group)
        self.line(f"read pass {index + 1}/{self.passes}: {len(group)} point(s), seed {group[0].seed}: {configs}")

    def point_done(self, point: AblatePoint, metrics: dict[str, Any]) -> None:
        with self.lock:
            self.done += 1
            elapsed = time.perf_counter() - self.started
            eta = elapsed / self.done * (self.total - self.done)
            acc = ", ".join(f"{k} {metrics[k + '_accuracy']:.3f}" for k in ("val", "test")
                            if metrics.get(k + "_accuracy") is not None)
            seconds = metrics.get("fit_seconds", metrics.get("seconds"))
            fit = f" in {seconds:.1f}s" if seconds is not None else ""
            self.line(f"[{self.done}/{self.total}] {describe_point(point)}: {acc or 'fitted'}{fit}; "
                      f"elapsed {_clock(elapsed)}, ETA {_clock(eta)}")


def describe_point(point: AblatePoint, seed: bool = True) -> str:
    """`protoquant codebook_size=16 tau=0.1 seed=3` (the head's defaults where the config is empty)."""
    keys = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(point.config.items())) or "defaults"
    return f"{point.head} {keys}" + (f" seed={point.seed}" if seed else "")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_ablate(cfg: AblateConfig) -> dict[str, Any]:
    """Run (or resume) a sweep; writes OUT/results.parquet and OUT/summary.png."""
    cfg.validate()
    check_scheduler(cfg.scheduler)
    resolve_device(cfg.device)  # a device this machine lacks fails before any run folder is looked at
    points, file_fit = read_grid(cfg.grid_file, cfg.seeds)
    store = FeatureStore.open(cfg.store)
    missing = store.missing_shards()
    if missing:
        raise ProtocacheError(f"{cfg.store}: shards {missing} are not written; complete the store first.")
    if cfg.resume not in RESUME_MODES:
        raise ProtocacheError(f"--resume must be one of {', '.join(RESUME_MODES)}, not {cfg.resume!r}")
    # the whole grid, resolved against the store, before anything is written
    check_points(points, store, {**file_fit, **cfg.fit_options, "device": cfg.device,
                                 **({"threads": cfg.threads} if cfg.threads else {})})
    out = prepare_sweep_dir(Path(cfg.out).expanduser())
    fit_options = {**file_fit, **cfg.fit_options, "device": cfg.device}
    if cfg.threads:
        fit_options["threads"] = cfg.threads
    evaluate = cfg.evaluate if cfg.evaluate is not None else "parts_input" in store.metadata().column_names
    differences = {p.name: point_difference(out / p.name, p, fit_options, store) for p in points}
    todo = [p for p in points if differences[p.name] is not None]
    stale = [(name, why) for name, why in differences.items() if why not in (None, NO_RUN)]
    if stale and cfg.resume == "strict":
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise ProtocacheError(f"--resume strict: {len(stale)} point(s) in {out} have runs that do not match this "
                              f"sweep, e.g. {stale[0][0]}: {stale[0][1]}{more}; nothing was trained. Rerun without "
                              "--resume strict to train them again, or choose another --out.")
    for p in todo:  # a folder in the way that is not a run is refused before any training
        run_files.prepare_run_dir(out / p.name, store.path, store.fingerprint, replace=True)
    skipped = len(points) - len(todo)
    if skipped:
        print(f"{skipped} of {len(points)} points already finished; training the other {len(todo)}.",
              file=sys.stderr, flush=True)
    if stale:
        print(f"{len(stale)} point(s) have runs that differ from this sweep and are trained again, e.g. "
              f"{stale[0][0]}: {stale[0][1]}", file=sys.stderr, flush=True)
    groups = group_points(todo)
    progress = SweepProgress(len(todo), len(groups), cfg.progress)
    store_path = str(Path(store.path).resolve()) if store.is_local else store.location
    if groups and (cfg.workers or cfg.scheduler):
        from dask.distributed import as_completed

        with dask_client(cfg.scheduler, cfg.workers) as client:
            futures = [client.submit(run_group, store_path, g, str(out.resolve()), fit_options, evaluate,
                                     pure=False, retries=1) for g in groups]
            progress.line(f"{len(groups)} read pass(es), {len(todo)} point(s) sent to the cluster")
            group_of = {f.key: g for f, g in zip(futures, groups)}
            for f in as_completed(futures):
                for point, row in zip(group_of[f.key], f.result()):
                    progress.point_done(point, row)
            trained = [row for f in futures for row in f.result()]
    else:
        trained = []
        for i, g in enumerate(groups):
            progress.pass_started(i, g)
            trained += run_group(store_path, g, str(out), fit_options, evaluate, on_point_done=progress.point_done)
    evaluated = {row["run"]: {k: row[k] for k in EVAL_KEYS} for row in trained if evaluate}
    passes = {**previous_passes(out / "results.parquet"), **{row["run"]: {k: row.get(k) for k in PASS_KEYS}
                                                              for row in trained}}
    rows = []
    for p in points:  # every point, finished now or before, from its run folder
        config, metrics = run_files.read_run(out / p.name)
        row = _result_row(p, out / p.name, metrics)
        row.update(passes.get(p.name) or dict.fromkeys(PASS_KEYS))  # what its read pass cost
        if evaluate:  # points trained now were evaluated with their head in hand
            row.update(evaluated.get(p.name) or _eval_row(out / p.name))
        rows.append(row)
    chosen = rank_by_val(points, rows)
    write_results(rows, out / "results.parquet")
    swept = sorted({k for p in points for k in p.config})
    plot = summary_plot(rows, swept, out / "summary.png", chosen)
    return {"points": len(points), "trained": len(todo), "skipped": skipped, "groups": len(groups),
            "results": str(out / "results.parquet"), "summary": plot, "chosen": chosen}


def previous_passes(path: Path) -> dict[str, dict[str, Any]]:
    """The read-pass columns of each run in an earlier results.parquet (points a resumed sweep skips)."""
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path).to_pylist()
    except Exception:  # noqa: BLE001 - an unreadable old table only loses these figures
        return {}
    return {r["run"]: {k: r.get(k) for k in PASS_KEYS} for r in table if r.get("group_size") is not None}


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
    owned.replace_file(path, lambda tmp: pq.write_table(table, tmp))


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
        values = sorted({r.get(col) for r in rows},
                        key=lambda v: (v is None, isinstance(v, str), "" if v is None else v))
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
    owned.replace_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return str(path)
