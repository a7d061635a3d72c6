"""The validation split: carved from train, stratified, seeded, disjoint."""

from __future__ import annotations

import numpy as np
import pytest

from protocache.pipeline.validation import carve_validation, check_val_fraction
from protocache.stores.errors import ProtocacheError


def test_carve_validation_is_stratified_seeded_and_reproducible():
    # 20 train rows (store rows 100..119), classes 0 and 1 with 10 images each, fraction 0.2:
    # ceil(0.2 * 20) = 4 held out, in proportion 10:10 -> 2 of each class
    rows = np.arange(100, 120)
    labels = np.array([0] * 10 + [1] * 10)
    val, notes = carve_validation(rows, labels, 0.2, seed=0)
    assert notes == [] and len(val) == 4 and list(val) == sorted(val)
    assert set(val) <= set(rows.tolist())
    assert sorted(np.bincount(labels[val - 100]).tolist()) == [2, 2]
    np.testing.assert_array_equal(val, carve_validation(rows, labels, 0.2, seed=0)[0])  # same seed, same rows
    others = {tuple(carve_validation(rows, labels, 0.2, seed=s)[0]) for s in range(1, 4)}
    assert len(others | {tuple(val)}) > 1  # the seed picks the rows
    assert carve_validation(rows, labels, 0.0, seed=0)[0].size == 0


def test_carve_validation_falls_back_when_classes_are_too_small():
    # a class with one image cannot be in train and val: it stays in train; the other 20
    # rows split as above (4 held out, 2 per class)
    rows = np.arange(21)
    labels = np.array([0] * 10 + [1] * 10 + [2])
    val, notes = carve_validation(rows, labels, 0.2, seed=0)
    assert 20 not in val and len(val) == 4 and "[2] have a single train image" in notes[0]
    # 10 classes of 2 images, fraction 0.1: ceil(0.1 * 20) = 2 held out < 10 classes, so no
    # stratified split exists; 2 rows are drawn uniformly instead, and the log says so
    labels = np.repeat(np.arange(10), 2)
    val, notes = carve_validation(np.arange(20), labels, 0.1, seed=0)
    assert len(val) == 2 and "no stratified split possible" in notes[0]
    with pytest.raises(ProtocacheError, match="every class has a single train image; pass --val-fraction 0"):
        carve_validation(np.arange(3), np.arange(3), 0.5, seed=0)
    with pytest.raises(ProtocacheError, match=r"val_fraction must be in \[0, 1\)"):
        check_val_fraction(-0.1)
