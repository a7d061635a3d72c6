"""Bench stage: fit every registered head with its defaults on one store and compare.

The table is what the README quotes: each head's validation and test accuracy, its test
gap to the linear probe in percentage points (negative = below the probe), its prototype
count and how long its fit took. Every fit holds out `val_fraction` of the train split.
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

from .config import check_values
from .fit import FitConfig, fit_head
from .heads import list_heads


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
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for i, name in enumerate(heads):
            result = fit_head(name, config.store, root / name, {}, fit)
            m = result.metrics
            rows.append({"head": name, "val_accuracy": m.get("val_accuracy"), "test_accuracy": m["test_accuracy"],
                         "train_accuracy": m["train_accuracy"],
                         "prototype_count": m["prototype_count"], "local_size": m.get("local_size"),
                         "fit_seconds": m["seconds"], "run_dir": str(root / name) if config.out else None})
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


def head_line(row: dict[str, Any], first: dict[str, Any]) -> str:
    """`protoquant: val 91.20%, test 90.10% (-1.2 points vs the probe), 50 prototypes, 12.3s`."""
    val = "n/a" if row.get("val_accuracy") is None else f"{100 * row['val_accuracy']:.2f}%"
    gap = (f" ({100 * (row['test_accuracy'] - first['test_accuracy']):+.1f} points vs the probe)"
           if first["head"] == "linear" and row is not first else "")
    return (f"{row['head']}: val {val}, test {100 * row['test_accuracy']:.2f}%{gap}, "
            f"{row['prototype_count']} prototypes, {row['fit_seconds']:.1f}s")


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
    return "\n".join(lines)
