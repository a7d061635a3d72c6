"""Dataset registry: each dataset is a manifest (one dict per image) plus an image loader.

A manifest row has at least ``image_id, path, label, class_name, split``; ``width, height``
are filled in by extract from the decoded image when the manifest does not know them;
datasets with annotations add columns (bounding box, part keypoints). Row order is the
store's row order, so it must be deterministic.

Register a dataset in timm's style::

    @register_dataset("mydata")
    def build_mydata(root: Path | None, **options) -> Dataset: ...

and build it with ``create_dataset("mydata", root=...)``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from protocache.stores.errors import ProtocacheError

_DATASETS: dict[str, Callable[..., "Dataset"]] = {}


@dataclass
class Dataset:
    """A deterministic list of images with labels and splits, and how to load each one."""

    name: str
    records: list[dict[str, Any]]
    class_names: list[str]
    image_loader: Callable[[dict[str, Any]], Image.Image]
    options: dict[str, Any] = field(default_factory=dict)
    # Recommended extraction settings for this dataset (e.g. input size); CLI flags win.
    extract_defaults: dict[str, Any] = field(default_factory=dict)
    # Names of annotated parts, in the order of each record's `parts` list (empty: no parts).
    part_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_image(self, index: int) -> Image.Image:
        return self.image_loader(self.records[index])

    def manifest_sha256(self) -> str:
        """Hash of the manifest (what is extracted, with which labels and splits) and options."""
        h = hashlib.sha256()
        h.update(json.dumps({"name": self.name, "options": self.options}, sort_keys=True, default=str).encode())
        for r in self.records:
            h.update(json.dumps(r, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def limit(self, n: int | None) -> "Dataset":
        """The first n images (all when n is None)."""
        if n is None or n >= len(self.records):
            return self
        return Dataset(self.name, self.records[:n], self.class_names, self.image_loader,
                       {**self.options, "limit": n}, self.extract_defaults, self.part_names)


def register_dataset(name: str):
    def wrap(fn):
        _DATASETS[name] = fn
        return fn

    return wrap


def list_datasets() -> list[str]:
    _import_builtin_datasets()
    return sorted(_DATASETS)


def create_dataset(name: str, root: str | Path | None = None, **options: Any) -> Dataset:
    _import_builtin_datasets()
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list(_DATASETS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ProtocacheError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(sorted(_DATASETS))}.")
    return _DATASETS[name](Path(root).expanduser() if root else None, **options)


def _import_builtin_datasets() -> None:
    # Dataset modules register themselves on import; keep this list in one place.
    from . import datasets_standard  # noqa: F401


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """'train'/'test' per item: a seeded, per-class random split (scikit-learn's rule)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    _, test_index = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)
    split = np.full(len(labels), "train", dtype=object)
    split[test_index] = "test"
    return split


# ---------------------------------------------------------------------------- digits
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DigitsLoader:
    """Renders scikit-learn's 8x8 digit i as dark ink on white paper, RGB (picklable)."""

    def __init__(self):
        self._images = None

    def __call__(self, record: dict[str, Any]) -> Image.Image:
        if self._images is None:
            from sklearn.datasets import load_digits

            self._images = load_digits().images
        ink = self._images[record["index"]] / 16.0
        gray = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")


@register_dataset("digits")
def build_digits(root: Path | None = None, **options: Any) -> Dataset:
    """scikit-learn's bundled handwritten digits (1,797 images, 10 classes), no download.

    Row i is scikit-learn's image i. Split: stratified 80/20, seed 0.
    """
    from sklearn.datasets import load_digits

    if options:
        raise ProtocacheError(f"digits takes no options, got {sorted(options)}")
    labels = load_digits().target.astype(np.int64)
    split = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    records = [
        {"image_id": f"digits-{i:04d}", "path": f"sklearn:digits/{i}", "label": int(labels[i]),
         "class_name": str(int(labels[i])), "split": str(split[i]), "width": 8, "height": 8, "index": i}
        for i in range(len(labels))
    ]
    return Dataset("digits", records, [str(d) for d in range(10)], DigitsLoader(),
                   options={"test_fraction": DIGITS_TEST_FRACTION, "split_seed": DIGITS_SPLIT_SEED})
