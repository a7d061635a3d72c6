"""The Dataset record type and the registry of dataset layouts (timm's style).

A layout registers its builder together with its image loader for one record::

    @register_dataset("mydata", loader=load_image)
    def build_mydata(root: Path | None, **options) -> Dataset: ...

``create_dataset("mydata", root=...)`` builds the dataset (lists the images);
``record_image_loader("mydata")`` is the loader alone, for code that already holds the
records (a store's metadata) and must not walk the dataset again.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from PIL import Image

from protocache.stores.errors import ProtocacheError

ImageLoader = Callable[[dict[str, Any]], Image.Image]


@dataclass
class Dataset:
    """A deterministic list of images with labels and splits, and how to load each one."""

    name: str
    records: list[dict[str, Any]]
    class_names: list[str]
    image_loader: ImageLoader
    options: dict[str, Any] = field(default_factory=dict)
    # Recommended extraction settings for this dataset; CLI flags win. {"resize": "stretch"}: the
    # records are cropped to a bounding box, which `--resize auto` resizes straight to the input.
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


class _Layout(NamedTuple):
    build: Callable[..., Dataset]
    loader: ImageLoader


_DATASETS: dict[str, _Layout] = {}


def register_dataset(name: str, *, loader: ImageLoader):
    """Decorator registering a dataset builder under `name`, with `loader`, the image of one record."""

    def wrap(fn):
        _DATASETS[name] = _Layout(fn, loader)
        return fn

    return wrap


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def _layout(name: str) -> _Layout:
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list(_DATASETS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ProtocacheError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(sorted(_DATASETS))}.")
    return _DATASETS[name]


def create_dataset(name: str, root: str | Path | None = None, **options: Any) -> Dataset:
    return _layout(name).build(Path(root).expanduser() if root else None, **options)


def record_image_loader(name: str) -> ImageLoader:
    """The image loader of dataset layout `name` for one metadata record (a dict with at least
    ``path``; ``index`` for digits), without listing or building the dataset."""
    return _layout(name).loader
