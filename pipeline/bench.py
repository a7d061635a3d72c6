"""Bench stage: fit every registered head on one store and compare.

The table is what the README quotes: each head's validation and test accuracy, its test
gap to the linear probe in percentage points (negative = below the probe), its prototype
count and how long its fit took. Every fit holds out `val_fraction` of the train split.
With a candidates file each head fits every config listed for it and keeps the one with the
best validation accuracy (the first on ties): val chooses, test only reports.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocache.stores.errors import ProtocacheError

from .config import build_config, check_values, read_yaml_mapping
from .fit import FitConfig, fit_head
from .heads import head_class, list_heads


@dataclass
class BenchConfig:
    store: str
    """Path of a complete feature store."""
    seed: int = 0
    """Seed of every fit."""
    heads: tuple[str, ...] | None = None
    """None: every registered head."""
    out: str | None = None
    """Keep the runs under OUT/<head>; None: a temporary folder, removed after."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    epochs: int | None = None
    """Override every head's epochs (quick smoke runs)."""
    val_fraction: float = 0.1
    """Share of the train split each fit holds out for validation (0: none)."""
    threads: int | None = None
    """Torch threads."""
    progress: bool = True
    """Print a line on stderr as each head's fit finishes (heads done / total, accuracies, seconds)."""
    fit_progress: bool = False
    """Also show each fit's progress bars and log lines on stderr."""
    candidates: str | None = None
    """YAML file mapping a head to a list of configs (key: value overrides; {} is the defaults) to choose
    from on val; heads it does not name fit their defaults."""

    def validate(self) -> None:
        """Every number in its range (pipeline/config.py's rules), before any fit."""
        check_values(self, "bench-heads", flags=True)


def bench_heads(config: BenchConfig) -> list[dict[str, Any]]:
    """Fit each head (the linear probe first) and return one row per head."""
    config.validate()
    heads = list(config.heads or list_heads())
    unknown = [h for h in heads if h not in list_heads()]
    if unknown:
        raise ProtocacheError(f"unknown head(s) {unknown}; registered heads: {', '.join(list_heads())}")
    if "linear" in heads:  # the yardstick first, so every gap is known as soon as a head finishes
        heads.remove("linear")
        heads.insert(0, "linear")
    root = Path(config.out).expanduser() if config.out else Path(tempfile.mkdtemp(prefix="protocache-bench-"))
    fit = FitConfig(seed=config.seed, device=config.device, epochs=config.epochs, threads=config.threads,
                    progress=config.fit_progress, val_fraction=config.val_fraction)
    fit.validate()
    candidates = read_candidates(config.candidates, heads)
    if any(len(c) > 1 for c in candidates.values()) and config.val_fraction <= 0:
        raise ProtocacheError("bench-heads: choosing among candidates needs a validation split; pass --val-fraction > 0")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for i, name in enumerate(heads):
            tried = []
            for j, overrides in enumerate(candidates[name]):
                run_dir = root / name if len(candidates[name]) == 1 else root / name / f"candidate-{j}"
                tried.append((fit_head(name, config.store, run_dir, overrides, fit).metrics, overrides, run_dir))
            # val chooses (the first on ties); test is only reported
            best = max(range(len(tried)), key=lambda j: (tried[j][0].get("val_accuracy") or 0.0, -j))
            m, overrides, run_dir = tried[best]
            rows.append({"head": name, "val_accuracy": m.get("val_accuracy"), "test_accuracy": m["test_accuracy"],
                         "train_accuracy": m["train_accuracy"], "config": overrides, "candidates": len(tried),
                         "prototype_count": m["prototype_count"], "local_size": m.get("local_size"),
                         "fit_seconds": m["seconds"], "run_dir": str(run_dir) if config.out else None})
            if config.progress:
                print(f"bench-heads: [{i + 1}/{len(heads)}] {head_line(rows[-1], rows[0])}; "
                      f"{time.perf_counter() - started:.0f}s so far", file=sys.stderr, flush=True)
    finally:
        if not config.out:
            shutil.rmtree(root, ignore_errors=True)
    probe = next((r["test_accuracy"] for r in rows if r["head"] == "linear"), None)
    for r in rows:
        r["gap_to_probe_points"] = None if probe is None else round(100 * (r["test_accuracy"] - probe), 2)
    return rows


def read_candidates(path: str | None, heads: list[str]) -> dict[str, list[dict[str, Any]]]:
    """{head: [config overrides, ...]} from a candidates file, every config checked before any fit."""
    data = read_yaml_mapping(path, "candidates file") if path else {}
    unknown = sorted(set(data) - set(list_heads()))
    if unknown:
        raise ProtocacheError(f"candidates file {path}: unknown head(s) {unknown}; registered: {', '.join(list_heads())}")
    out = {}
    for name in heads:
        configs = data.get(name) or [{}]
        if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
            raise ProtocacheError(f"candidates file {path}: `{name}:` must be a list of mappings, e.g. [{{}}, {{lr: 0.01}}]")
        for c in configs:
            build_config(head_class(name).config_class, c, f"head {name!r} (candidates file {path})")
        out[name] = [dict(c) for c in configs]
    return out


def head_line(row: dict[str, Any], first: dict[str, Any]) -> str:
    """`protoquant: val 91.20%, test 90.10% (-1.2 points vs the probe), 50 prototypes, 12.3s`."""
    val = "n/a" if row.get("val_accuracy") is None else f"{100 * row['val_accuracy']:.2f}%"
    gap = (f" ({100 * (row['test_accuracy'] - first['test_accuracy']):+.1f} points vs the probe)"
           if first["head"] == "linear" and row is not first else "")
    chosen = f", chosen on val of {row['candidates']}: {row['config'] or 'defaults'}" if row.get("candidates", 1) > 1 else ""
    return (f"{row['head']}: val {val}, test {100 * row['test_accuracy']:.2f}%{gap}, "
            f"{row['prototype_count']} prototypes, {row['fit_seconds']:.1f}s{chosen}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table (head, val and test accuracy %, test gap to the probe in points, prototypes, seconds)."""
    header = (f"{'head':<12} {'val acc':>9} {'test acc':>9} {'vs probe':>9} {'prototypes':>11} {'local size':>11} "
              f"{'fit s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        gap = "" if r["gap_to_probe_points"] is None or r["head"] == "linear" else f"{r['gap_to_probe_points']:+.1f}"
        local = "" if r.get("local_size") is None else f"{r['local_size']:.1f}"
        val = "n/a" if r.get("val_accuracy") is None else f"{100 * r['val_accuracy']:.2f}%"
        lines.append(f"{r['head']:<12} {val:>9} {100 * r['test_accuracy']:>8.2f}% {gap:>9} {r['prototype_count']:>11} "
                     f"{local:>11} {r['fit_seconds']:>7.1f}")
    chosen = [f"{r['head']}: {r['config'] or 'defaults'} (best val of {r['candidates']})" for r in rows
              if r.get("candidates", 1) > 1]
    return "\n".join(lines + (["", "chosen on val: " + "; ".join(chosen)] if chosen else []))
