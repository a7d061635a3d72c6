"""Run directories: everything a fitted head leaves on disk.

Layout of a run directory::

    weights.safetensors   the head's tensors (parameters and buffers), float32
    config.json           head name, resolved head config, fit config, store path + fingerprint
    metrics.json          accuracies (fractions in 0..1), loss curve, prototype counts, seconds
    log.txt               what the fit printed, one line per event

A run is written into a hidden sibling (.RUN.partial) and renamed into place when
complete (`begin_run`, `finish_run`), so a re-fit that fails or is killed leaves the
previous run whole, and a finished re-fit leaves nothing of the previous one (no old
eval-*.json beside the new weights).

This module only reads and writes files: it never builds a model, so evaluation and
reporting code can inspect runs without importing the heads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from . import owned
from .errors import ProtocacheError
from .fingerprint import difference_line

RUN_FORMAT = 1
"""config.json's "format": the run folder layout this version writes and reads."""
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
LOG = "log.txt"
RUN_FILES = (WEIGHTS, CONFIG, METRICS, LOG)


class RunMismatch(ProtocacheError):
    """An existing run directory was fitted on another store than the one given now."""


def write_json(path: Path, obj: Any) -> None:
    """Write strict JSON with sorted keys through a temporary file, so a crash never leaves half a file.

    Non-finite floats (NaN, Inf; also in numpy scalars and arrays) are written as null: bare
    `NaN` is not JSON, and every strict reader (jq, JavaScript, Go) refuses it.
    """
    import math

    def finite(value: Any) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set)):
            return [finite(v) for v in value]
        if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalars and arrays
            return finite(value.tolist())
        return value

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False) + "\n")
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


def _refit(run_dir: Path) -> str:
    return f"refit the run (`protocache fit-head ... --out {run_dir}`)"


def read_run_file(path: Path, run_dir: Path, read):
    """`read(path)`, with a damaged or unreadable run file reported in one line that says what to do."""
    try:
        if path.exists() and not os.access(path, os.R_OK):  # (safetensors reports it as a missing file)
            raise PermissionError(path)
        return read(path)
    except PermissionError:
        raise ProtocacheError(f"cannot read {path}: permission denied; ask its owner to make it readable "
                              f"(chmod a+r), or {_refit(run_dir)}") from None
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocacheError(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:120]}); "
                              f"{_refit(run_dir)}") from None


def _check_run_config(config: Any, run_dir: Path) -> dict:
    """config.json with the keys every reader of a run relies on, in the format this version reads."""
    where = run_dir / CONFIG
    if not isinstance(config, dict) or "format" not in config:
        raise ProtocacheError(f"{where} is not a protocache run config; {_refit(run_dir)}")
    if config["format"] != RUN_FORMAT:
        raise ProtocacheError(f"{where} has run format {config['format']!r}; this protocache reads format "
                              f"{RUN_FORMAT}: use the protocache version that wrote it, or {_refit(run_dir)}")
    store = config.get("store")
    missing = [k for k in ("head", "head_config", "store") if k not in config]
    missing += [f"store.{k}" for k in ("path", "fingerprint", "info") if isinstance(store, dict) and k not in store]
    if missing or not isinstance(store, dict) or not isinstance(config["head_config"], dict):
        raise ProtocacheError(f"{where} is damaged (missing or malformed: {', '.join(missing) or 'store'}); "
                              f"{_refit(run_dir)}")
    return config


def prepare_run_dir(run_dir: str | Path, store_path: str | Path, fingerprint: Mapping[str, Any], *,
                    replace: bool = False) -> Path:
    """Check that `run_dir` may receive a fit on the store with `fingerprint`; nothing is deleted.

    A missing or empty folder is fine. An existing run (a config.json with our format key)
    is replaced only if it was fitted on a store with the same fingerprint (or `replace`,
    as ablate does for a point it re-trains); otherwise RunMismatch names the fields that
    differ. Anything else is refused with what it holds, so a typo in --out never clobbers
    unrelated files. The fit is written with `begin_run` / `finish_run`.
    """
    run_dir = Path(run_dir).expanduser()
    owned.check_new_folder_place(run_dir, "run folder")
    owned.restore_interrupted(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ProtocacheError(f"{run_dir} exists and is not a folder; choose another --out.")
    if owned.is_run_folder(run_dir):
        recorded = read_json(run_dir / CONFIG).get("store") or {}
        difference = difference_line(recorded.get("fingerprint") or {}, dict(fingerprint), "run has")
        if difference and not replace:
            raise RunMismatch(
                f"{run_dir} was fitted on another store ({recorded.get('path')}); fingerprint fields that differ: "
                f"{difference}. Refusing to overwrite it with a fit on {store_path}: choose another --out or "
                f"delete {run_dir}."
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        owned.refuse_foreign_folder(run_dir, "run folder")
    return run_dir


_writing: dict[str, int] = {}  # staging folder -> the descriptor holding its lock, while a fit of this process writes it


def _lock(folder: Path) -> int | None:
    """A descriptor of `folder` holding an exclusive flock on it, or None when another process holds one."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def begin_run(run_dir: str | Path) -> Path:
    """The empty hidden sibling (.RUN.partial) a fit writes its run into; `finish_run` puts it in place.

    Until then the previous run (if any) stays whole and loadable: a failed or killed fit
    leaves only the staging folder (its log.txt says how far it got), which the next fit removes.
    The staging folder is locked while a fit writes it, so a second fit into the same folder is
    refused instead of deleting the first one's work (a killed fit's lock goes with its process)."""
    run_dir = Path(run_dir).expanduser()
    staging = owned.staging_path(run_dir)
    busy = ProtocacheError(f"another fit is writing {run_dir} right now (its {staging.name} is locked); wait for "
                           "it to finish, or choose another --out")
    if staging.is_dir():
        fd = _lock(staging)
        if fd is None:
            raise busy
        os.close(fd)  # a leftover of a fit that ended: removed by fresh_staging
    try:
        staging = owned.fresh_staging(run_dir)
    except FileExistsError:  # another fit made it between the check and here
        raise busy from None
    fd = _lock(staging)
    if fd is None:
        raise busy
    _writing[str(staging)] = fd
    return staging


def end_run(run_dir: str | Path) -> None:
    """Let go of the lock of a fit of `run_dir` that ended without `finish_run` (its staging folder stays)."""
    fd = _writing.pop(str(owned.staging_path(Path(run_dir).expanduser())), None)
    if fd is not None:
        os.close(fd)


def finish_run(staging: str | Path, run_dir: str | Path) -> None:
    """Swap the complete run in `staging` in for `run_dir`: everything of the previous run, its
    eval-*.json, eval-<split>/ and confusion-*.png included, goes with it."""
    owned.replace_dir(staging, Path(run_dir).expanduser())
    end_run(run_dir)


def save_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write torch tensors to safetensors (contiguous, CPU); bytes depend only on the values."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    # One metadata entry: safetensors keeps metadata in a hash map whose key order varies
    # between processes, so several keys would make the file header differ run to run.
    header = {"protocache": json.dumps(dict(metadata or {}), sort_keys=True)} if metadata else None
    # the same bytes as save_file, written by Python so the file gets the umask's mode like the run's
    # other files (save_file creates it owner-only)
    tmp.write_bytes(save(clean, metadata=header))
    tmp.replace(path)


def load_tensors(path: str | Path) -> dict[str, Any]:
    """The tensors of a safetensors file; a missing, unreadable or damaged file is one ProtocacheError."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ProtocacheError(f"no weights at {path}; is this a finished run folder?")

    def load(p: Path) -> dict[str, Any]:
        try:
            return load_file(str(p))
        except (OSError, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type: a header or size that does not add up
            raise ValueError(str(exc)) from None

    return read_run_file(path, path.parent, load)


def read_run(run_dir: str | Path) -> tuple[dict, dict]:
    """The (config, metrics) of a finished run; raises if the run is incomplete."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        owned.restore_interrupted(run_dir)  # a swap cut short between its renames
    missing = [n for n in (CONFIG, METRICS, WEIGHTS) if not (run_dir / n).exists()]
    if missing:
        raise ProtocacheError(f"{run_dir} is not a finished run (missing {', '.join(missing)}); "
                              "fit one with `protocache fit-head`.")
    config = _check_run_config(read_run_file(run_dir / CONFIG, run_dir, read_json), run_dir)
    metrics = read_run_file(run_dir / METRICS, run_dir, read_json)
    if not isinstance(metrics, dict):
        raise ProtocacheError(f"{run_dir / METRICS} is damaged (not a JSON object); {_refit(run_dir)}")
    return config, metrics


def run_damage(run_dir: str | Path, metrics: dict) -> str | None:
    """What is wrong with a run that `read_run` reads (None: nothing): metrics without the accuracies a
    finished fit records, or a weights file whose header does not fit its size. Reads the header only."""
    from safetensors import safe_open

    lost = [k for k in ("train_accuracy", "val_accuracy", "test_accuracy") if k not in metrics]
    if lost:
        return f"{METRICS} has no {', '.join(lost)}"
    try:
        with safe_open(str(Path(run_dir) / WEIGHTS), "pt"):
            pass
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type, and OSError
        return f"{WEIGHTS} cannot be read: {str(exc)[:100]}"
    return None


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
