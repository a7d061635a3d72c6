"""The validation split of a fit: carved, stratified and seeded, from the store's train split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from protocache.stores.errors import ProtocacheError

from .runs import with_val_rows

VAL_ROWS = "val_rows.npy"
"""The run file holding the validation rows (store row indices, int64, sorted)."""


@dataclass
class Validation:
    """The validation split of one fit: where it came from and its rows."""

    fraction: float
    seed: int
    source: str
    """carved (from the store's train split) | store (the store's own val split) | none."""
    rows: np.ndarray
    """Store rows of the validation images, sorted."""
    num_train: int
    """Train images left for fitting."""
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "source": self.source, "num_val": int(len(self.rows)),
                "num_train": self.num_train, "rows_file": VAL_ROWS if len(self.rows) else None, "notes": self.notes}


def check_val_fraction(fraction: float) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise ProtocacheError(f"val_fraction must be in [0, 1), got {fraction!r}; e.g. --val-fraction 0.1, "
                              "or 0 to train on the whole train split")
    return value


def carve_validation(train_rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, list[str]]:
    """Validation rows carved from `train_rows` (labels[i] is the label of train_rows[i]): sorted rows, notes.

    scikit-learn's stratified rule (`train_test_split(..., stratify=labels)`, ceil(fraction * n)
    images held out, each class in proportion), seeded by `seed`. A class with a single
    train image keeps it in train; when the held-out count cannot cover every class (or
    leave one of each in train), the rows are drawn uniformly instead. Both are noted.
    """
    from sklearn.model_selection import train_test_split

    train_rows = np.asarray(train_rows, dtype=np.int64)
    labels = np.asarray(labels)
    notes: list[str] = []
    if fraction <= 0 or train_rows.size == 0:
        return np.zeros(0, dtype=np.int64), notes
    classes, counts = np.unique(labels, return_counts=True)
    single = classes[counts < 2]
    if single.size:
        notes.append(f"class(es) {[int(c) for c in single]} have a single train image: kept in train, none in val")
    eligible = ~np.isin(labels, single)
    rows, y = train_rows[eligible], labels[eligible]
    if rows.size == 0:
        raise ProtocacheError("cannot carve a validation split: every class has a single train image; "
                              "pass --val-fraction 0 (fit option val_fraction: 0)")
    if len(rows) - int(np.ceil(fraction * len(rows))) < 1:
        raise ProtocacheError(f"val_fraction {fraction} of {len(rows)} train images leaves none to train on; "
                              "choose a smaller --val-fraction (e.g. 0.1), or 0 to train on the whole train split")
    state = int(seed) % 2**32
    try:
        _, val = train_test_split(rows, test_size=fraction, random_state=state, stratify=y)
    except ValueError as exc:  # fewer held-out (or kept) images than classes
        notes.append(f"no stratified split possible ({exc}); val drawn uniformly at random instead")
        _, val = train_test_split(rows, test_size=fraction, random_state=state, shuffle=True)
    return np.sort(np.asarray(val, dtype=np.int64)), notes


def validation_split(store: Any, fraction: float, seed: int) -> Validation:
    """The validation split of a fit (see the module docstring)."""
    train = np.asarray(store.split_rows("train"), dtype=np.int64)
    if fraction <= 0:
        return Validation(0.0, seed, "none", np.zeros(0, dtype=np.int64), int(train.size), [])
    own = np.asarray(store.split_rows("val"), dtype=np.int64)
    if own.size:
        return Validation(fraction, seed, "store", own, int(train.size),
                          [f"the store has its own val split ({own.size} images): used as is, nothing carved "
                           "from train"])
    rows, notes = carve_validation(train, store.labels()[train], fraction, seed)
    return Validation(fraction, seed, "carved", rows, int(train.size - rows.size), notes)


def store_with_validation(store: Any, validation: Validation) -> Any:
    """The store as a recipe sees it: split "val" = the carved rows, "train" = the rest."""
    return with_val_rows(store, validation.rows) if validation.source == "carved" else store
