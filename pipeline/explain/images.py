"""The image source: the model-input view of a store row, from the store's own metadata.

A store's metadata row carries what the dataset's per-record loader needs (``path``,
``index``, ``crop_box``), so no dataset is listed or built here: the row goes straight to
``record_image_loader(dataset)``. When the dataset moved, ``--root`` re-roots the paths
recorded under the store's ``dataset_root``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any, Sequence

import numpy as np
from PIL import Image

from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError


def model_input_view(image: Image.Image, data_config: dict[str, Any], crop_box: Sequence[float] | None = None
                     ) -> Image.Image:
    """The image as the backbone saw it, before normalisation: in RGB by the loaders' `to_rgb` (16-bit scaled,
    alpha on white, EXIF orientation applied), crop_box crop, then the store's resize rule.

    Uses extract's own geometry step (``pipeline/transforms.py``: a resize straight to the input
    size for ``resize = stretch``, timm's eval resize + center crop or pad for ``timm``), so the
    geometry (resize rule, rounding, interpolation, crop) is exactly the one the cache was
    extracted with; the result is an RGB image of the model's input size.
    """
    from protocache.pipeline.datasets._common import to_rgb
    from protocache.pipeline.transforms import geometry_transform, to_pixels

    image = to_rgb(image)  # the loaders' one decode rule (a no-op on what load_image returns)
    if crop_box is not None:
        image = image.crop(tuple(int(round(float(v))) for v in crop_box))
    x = to_pixels(geometry_transform(dict(data_config))(image))
    array = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def reroot(path: str, recorded_root: str | None, root: str | None) -> str:
    """Where a recorded image path is now: its part under `recorded_root` (the store's
    ``dataset_root``) placed under `root` (``--root``; default: the recorded root).

    Absolute paths outside the recorded root, and paths of datasets without a folder
    (digits' ``sklearn:digits/3``), are returned unchanged. A relative path (the dataset
    was extracted with a relative ``--root``) starts with that root's last component(s),
    which are dropped before joining.
    """
    if not path or not recorded_root:
        return path
    old = Path(recorded_root)
    new = Path(root).expanduser().resolve() if root else old
    p = Path(path)
    if p.is_absolute():
        for candidate in (p, p.resolve()):  # resolve: the recorded root is a resolved path
            try:
                return str(new / candidate.relative_to(old))
            except ValueError:
                continue
        return path
    parts = list(PurePath(path).parts)
    while parts and parts[0] in (".", ".."):
        parts.pop(0)
    tail = old.parts
    for k in range(min(len(tail) - 1, len(parts) - 1), 0, -1):
        if tuple(parts[:k]) == tuple(tail[-k:]):
            parts = parts[k:]
            break
    return str(new.joinpath(*parts)) if parts else path


class ImageSource:
    """Model-input views of store rows, loaded from their metadata records (small LRU cache)."""

    def __init__(self, store: FeatureStore, root: str | None = None, cache_size: int = 256):
        self.store = store
        self.root = root
        self.data_config = dict(store.fingerprint.get("preprocessing") or {})
        if "input_size" not in self.data_config:
            self.data_config["input_size"] = store.attrs["input_size"]
        self._loader = None
        self._table = store.metadata()
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()
        self.cache_size = cache_size

    @property
    def loader(self):
        """The dataset layout's loader of one record (no dataset is listed)."""
        if self._loader is None:
            from protocache.pipeline.datasets import record_image_loader

            self._loader = record_image_loader(self.store.fingerprint["dataset"])
        return self._loader

    def record(self, row: int) -> dict[str, Any]:
        """The store's metadata record of row `row`, its path re-rooted where --root says the dataset moved."""
        record = {k: v[0] for k, v in self._table.slice(int(row), 1).to_pydict().items()}
        if record.get("path"):
            record["path"] = reroot(str(record["path"]), self.store.attrs.get("dataset_root"), self.root)
        return record

    def view(self, row: int) -> Image.Image:
        row = int(row)
        if row in self._cache:
            self._cache.move_to_end(row)
            return self._cache[row]
        loader = self.loader
        record = self.record(row)
        try:
            image = loader(record)
        except Exception as exc:  # noqa: BLE001 - any load failure names the image
            raise ProtocacheError(f"cannot reload image {record.get('path')!r} (row {row}): "
                                  f"{type(exc).__name__}: {exc}. Pass --root DIR if the dataset moved.") from exc
        view = model_input_view(image, self.data_config, record.get("crop_box"))
        expected = tuple(int(v) for v in self.store.attrs["input_size"][-2:])[::-1]
        if view.size != expected:
            raise ProtocacheError(f"model-input view of row {row} is {view.size}, the store's input is {expected}")
        self._cache[row] = view
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return view
