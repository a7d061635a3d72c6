"""Stanford Dogs in its layout (Images/<wnid>-<breed>/*.jpg, train_list.mat, test_list.mat)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from protocache.stores.errors import ProtocacheError

from ._common import check_options, load_image, pretty, require_root
from ._mat import mat_cells
from ._registry import Dataset, register_dataset

DOGS_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"


@register_dataset("dogs", loader=load_image)
def build_dogs(root: Path | None = None, **options: Any) -> Dataset:
    """Stanford Dogs (20,580 images, 120 breeds, official train/test split).

    `root` holds ``Images/<wnid>-<breed>/*.jpg`` and the lists ``train_list.mat`` and
    ``test_list.mat`` (``file_list`` relative to Images/, ``labels`` 1-based). Class names
    are the breeds ('n02085782-Japanese_spaniel' -> 'Japanese spaniel'). The bounding boxes
    in Annotation/ are not read.
    """
    check_options("dogs", options, ())
    base = require_root(root, "dogs", "the Stanford Dogs folder with Images/ and train_list.mat", DOGS_URL)
    if not (base / "Images").is_dir() or not (base / "train_list.mat").is_file():
        raise ProtocacheError(
            f"{base} is not a Stanford Dogs folder: expected {base / 'Images'}/ (images.tar) and "
            f"{base / 'train_list.mat'}, {base / 'test_list.mat'} (lists.tar). Get them from {DOGS_URL}.")
    folders: dict[int, str] = {}
    records = []
    for split in ("train", "test"):
        path = base / f"{split}_list.mat"
        files = [str(f) for f in mat_cells(path, "file_list", DOGS_URL)]
        labels = [int(v) for v in mat_cells(path, "labels", DOGS_URL)]
        if len(files) != len(labels):
            raise ProtocacheError(f"{path}: {len(files)} files but {len(labels)} labels")
        for rel, label in sorted(zip(files, labels)):
            folder = rel.split("/")[0]
            if folders.setdefault(label, folder) != folder:
                raise ProtocacheError(f"{path}: label {label} is used for both {folders[label]} and {folder}")
            records.append({"image_id": os.path.splitext(rel)[0], "path": str(base / "Images" / rel),
                            "label": label - 1, "class_name": "", "split": split})
    num_classes = max(folders)
    if sorted(folders) != list(range(1, num_classes + 1)):
        raise ProtocacheError(f"{base}: the lists' labels are not 1..{num_classes}; "
                              f"get the lists again from {DOGS_URL}")
    class_names = [pretty(folders[k].split("-", 1)[-1]) for k in range(1, num_classes + 1)]
    for record in records:
        record["class_name"] = class_names[record["label"]]
    return Dataset("dogs", records, class_names, load_image)
