"""Reading MATLAB annotation files (Stanford Cars' devkit, Stanford Dogs' lists) with scipy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from protocache.stores.errors import ProtocacheError


def mat_value(value: Any) -> Any:
    """A MATLAB scalar or string as loaded by scipy.io.loadmat (arrays like [[39]] or ['00001.jpg'])."""
    array = np.asarray(value)
    if array.dtype == object:
        return mat_value(array.ravel()[0]) if array.size else None
    if array.dtype.kind in "US":
        return str(array.ravel()[0]) if array.size else ""
    return array.ravel()[0].item() if array.size else None


def load_mat(path: Path, variable: str, url: str) -> np.ndarray:
    from scipy.io import loadmat

    if not path.is_file():
        raise ProtocacheError(f"missing {path}. Get it from {url}.")
    try:
        mat = loadmat(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise ProtocacheError(f"cannot read {path} as a MATLAB file ({exc}). Get it again from {url}.") from exc
    if variable not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__"))
        raise ProtocacheError(f"{path} has no variable {variable!r} (it has: {found}). Get it again from {url}.")
    return mat[variable]


def mat_struct_rows(path: Path, variable: str, fields: Iterable[str], url: str) -> list[dict[str, Any]]:
    """The elements of a MATLAB struct array as dicts of plain Python values."""
    array = load_mat(path, variable, url)
    names = array.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise ProtocacheError(f"{path}: {variable} has no field(s) {', '.join(missing)} (it has: "
                              f"{', '.join(names)}). Get the devkit again from {url}.")
    return [{f: mat_value(item[f]) for f in names} for item in array.ravel()]


def mat_cells(path: Path, variable: str, url: str) -> list[Any]:
    """The entries of a MATLAB cell array or numeric column, flattened."""
    return [mat_value(v) for v in load_mat(path, variable, url).ravel()]
