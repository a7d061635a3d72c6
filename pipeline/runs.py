"""Load a finished run folder back as a head: what evaluate, explain, ablate and predict read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from protocache.stores import runs as run_files

from .heads import Head, StoreInfo, create_head
from .runtime import resolve_device


class Run(NamedTuple):
    """A fitted head (eval mode) with the run's config.json and metrics.json."""

    head: Head
    config: dict[str, Any]
    metrics: dict[str, Any]


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """The head of a finished run, rebuilt from its resolved config and weights; no store is opened."""
    config, metrics = run_files.read_run(run_dir)
    info = StoreInfo.from_json(config["store"]["info"])
    head = create_head(config["head"], info, **config["head_config"])
    head.load_weights(run_files.load_tensors(Path(run_dir) / run_files.WEIGHTS))
    return Run(head.to(resolve_device(device)).eval(), config, metrics)
