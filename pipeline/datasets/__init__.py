"""Datasets: each is a manifest (one dict per image) plus an image loader, registered by name.

A manifest row has at least ``image_id, path, label, class_name, split``; ``width, height``
are filled in by extract from the decoded image when the manifest does not know them;
datasets with annotations add columns (bounding box, part keypoints). Row order is the
store's row order, so it must be deterministic.

One module per on-disk layout registers itself here (timm's style)::

    @register_dataset("mydata", loader=load_image)
    def build_mydata(root: Path | None, **options) -> Dataset: ...

``create_dataset("mydata", root=...)`` builds a dataset; ``record_image_loader("mydata")``
loads one stored record's image without building it. ``synthetic_birds`` (beside the
layouts, imported on demand) writes a small CUB-layout folder with true part keypoints.
"""

from __future__ import annotations

from ._common import load_image, stratified_split
from ._registry import Dataset, ImageLoader, create_dataset, list_datasets, record_image_loader, register_dataset

# The layouts register themselves on import; this list is the one place naming them.
from . import cars, cub, digits, dogs, folder, imagenet  # noqa: E402,F401  isort: skip
from .cars import CarsOptions  # noqa: E402
from .cub import CubOptions  # noqa: E402
from .digits import DigitsLoader  # noqa: E402
from .folder import FolderOptions  # noqa: E402

__all__ = ["Dataset", "ImageLoader", "register_dataset", "list_datasets", "create_dataset", "record_image_loader",
           "stratified_split", "load_image", "DigitsLoader", "CubOptions", "CarsOptions", "FolderOptions"]
