"""A few named arrays kept in one .npz file under a key: a result worth reusing while its inputs are unchanged.

The key (a JSON-able dict describing the inputs) is stored beside the arrays; reading gives None when the
file is missing, unreadable or holds another key, so the caller recomputes. Writing goes through a hidden
sibling and a rename (a killed write leaves the old file or none), and a folder that cannot be written
(a shared, read-only run) only means the result is not kept.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .owned import replace_file

_KEY = "__key__"


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def load_keyed(path: str | Path, key: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The arrays of `path` if it was saved under `key`, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if _KEY not in data.files or str(data[_KEY]) != _key_text(key):
                return None
            return {name: data[name] for name in data.files if name != _KEY}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def save_keyed(path: str | Path, key: dict[str, Any], arrays: dict[str, np.ndarray]) -> bool:
    """Keep `arrays` in `path` under `key`; False when the folder cannot be written."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **{_KEY: np.asarray(_key_text(key))}, **arrays)

    try:
        replace_file(path, write)
        return True
    except OSError:
        return False
