"""Run directories: everything a fitted head leaves on disk.

Layout of a run directory::

    weights.safetensors   the head's tensors (parameters and buffers), float32
    config.json           head name, resolved head config, fit config, store path + fingerprint
    metrics.json          accuracies (fractions in 0..1), loss curve, prototype counts, seconds
    log.txt               what the fit printed, one line per event

This module only reads and writes files: it never builds a model, so evaluation and
reporting code can inspect runs without importing the heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .errors import ProtocacheError
from .fingerprint import compare_fingerprints, describe_difference as _describe_difference

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
LOG = "log.txt"
RUN_FILES = (WEIGHTS, CONFIG, METRICS, LOG)


class RunMismatch(ProtocacheError):
    """An existing run directory was fitted on another store than the one given now."""


def write_json(path: Path, obj: Any) -> None:
    """Write JSON with sorted keys through a temporary file, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def prepare_run_dir(run_dir: str | Path, store_path: str | Path, fingerprint: Mapping[str, Any]) -> Path:
    """Make `run_dir` ready for a fit on the store with `fingerprint`.

    A new or empty folder is created. An existing run is reused (its files are
    replaced) only if it was fitted on a store with the same fingerprint; otherwise
    RunMismatch names the fields that differ. A non-empty folder that is not a run is
    refused, so a typo in --out never clobbers unrelated files.
    """
    run_dir = Path(run_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise ProtocacheError(f"{run_dir} exists and is not a folder; choose another --out.")
    config_path = run_dir / CONFIG
    if config_path.exists():
        try:
            recorded = read_json(config_path).get("store", {})
        except (OSError, ValueError) as exc:
            raise ProtocacheError(f"{config_path} is unreadable ({exc}); remove the run folder or choose another --out.") from exc
        old = recorded.get("fingerprint") or {}
        differ = compare_fingerprints(old, dict(fingerprint))
        if differ:
            raise RunMismatch(
                f"{run_dir} was fitted on another store ({recorded.get('path')}); fingerprint fields that differ:\n"
                f"{_describe_difference(old, dict(fingerprint), differ)}\n"
                f"Refusing to overwrite it with a fit on {store_path}: choose another --out or delete {run_dir}."
            )
    elif run_dir.exists() and any(p.name not in RUN_FILES and not p.name.startswith(".") for p in run_dir.iterdir()):
        raise ProtocacheError(f"{run_dir} exists, is not empty and is not a run folder; choose another --out.")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (METRICS, LOG):  # stale results must never sit next to new weights
        (run_dir / name).unlink(missing_ok=True)
    return run_dir


def save_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write torch tensors to safetensors (contiguous, CPU); bytes depend only on the values."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    # One metadata entry: safetensors keeps metadata in a hash map whose key order varies
    # between processes, so several keys would make the file header differ run to run.
    header = {"protocache": json.dumps(dict(metadata or {}), sort_keys=True)} if metadata else None
    save_file(clean, str(tmp), metadata=header)
    tmp.replace(path)


def load_tensors(path: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ProtocacheError(f"no weights at {path}; is this a finished run folder?")
    return load_file(str(path))


def read_run(run_dir: str | Path) -> tuple[dict, dict]:
    """The (config, metrics) of a finished run; raises if the run is incomplete."""
    run_dir = Path(run_dir).expanduser()
    missing = [n for n in (CONFIG, METRICS, WEIGHTS) if not (run_dir / n).exists()]
    if missing:
        raise ProtocacheError(f"{run_dir} is not a finished run (missing {', '.join(missing)}); "
                              "fit one with `protocache fit-head`.")
    return read_json(run_dir / CONFIG), read_json(run_dir / METRICS)


class RunLog:
    """Appends lines to RUN/log.txt (and echoes them to a callback, e.g. stderr)."""

    def __init__(self, run_dir: str | Path, echo=None):
        self.path = Path(run_dir) / LOG
        self.echo = echo

    def __call__(self, message: str) -> None:
        with self.path.open("a") as fh:
            fh.write(message.rstrip("\n") + "\n")
        if self.echo is not None:
            self.echo(message)
