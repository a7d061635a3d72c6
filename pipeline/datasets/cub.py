"""Caltech-UCSD Birds-200-2011 in its on-disk layout (images.txt, parts/, bounding_boxes.txt, ...).

Like every file-based layout, the builder lists images from the annotation files only: no
image is opened here (extract records each image's width and height from the decoded
image). Coordinates (``bbox`` [x0, y0, x1, y1], ``parts`` [[x, y, visible], ...]) are in
the original image's pixels; ``crop_box`` (when cropping) is what extract crops with PIL
before the backbone transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocache.stores.errors import ProtocacheError

from ._common import as_bool, check_options, load_image, pretty, read_rows, require_root
from ._registry import Dataset, register_dataset

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"


@dataclass
class CubOptions:
    """Options of the cub dataset."""

    crop: bool = True
    """Crop each image to its bird's bounding box (the usual protocol for prototype models)."""


def find_cub_root(root: Path) -> Path:
    """`root` itself or its CUB_200_2011/ subfolder, whichever holds images.txt."""
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise ProtocacheError(
        f"{root} is not a CUB-200-2011 folder: expected {root / 'images.txt'} or "
        f"{root / 'CUB_200_2011' / 'images.txt'} (with images/, classes.txt, image_class_labels.txt, "
        f"train_test_split.txt, bounding_boxes.txt and parts/). Download CUB_200_2011.tgz from {CUB_URL} "
        "and extract it, or make a small synthetic one with `protocache make-dataset synthetic-birds --out DIR`."
    )


@register_dataset("cub", loader=load_image)
def build_cub(root: Path | None = None, **options: Any) -> Dataset:
    """Caltech-UCSD Birds-200-2011 (11,788 images, 200 classes, 15 part keypoints, official split).

    `root` is the CUB_200_2011 folder or its parent. Option ``crop`` (default True) crops
    each image to its bounding box, as prototype models (ProtoPNet, ProtoPool, PIP-Net)
    do, and extract then resizes the box straight to the model input (``--resize auto``
    picks ``stretch``: no centre crop cuts the ends of a wide box); the usual input is
    224 px, timm's default for most backbones. Records carry
    ``bbox`` and ``parts`` (one [x, y, visible] per part name) in original-image pixels.
    """
    check_options("cub", options, CubOptions.__dataclass_fields__)
    opts = CubOptions(crop=as_bool(options.get("crop", True), "crop"))
    base = find_cub_root(require_root(root, "cub", "the CUB_200_2011 folder or its parent", CUB_URL))
    if not (base / "images").is_dir():
        raise ProtocacheError(f"missing {base / 'images'}/: the CUB folder is incomplete. Get it from {CUB_URL}.")

    classes = read_rows(base / "classes.txt", 2, CUB_URL, last_has_spaces=True)
    class_names = [pretty(name) for _, name in sorted(classes, key=lambda r: int(r[0]))]
    paths = {i: p for i, p in read_rows(base / "images.txt", 2, CUB_URL, last_has_spaces=True)}
    labels = {i: int(c) - 1 for i, c in read_rows(base / "image_class_labels.txt", 2, CUB_URL)}
    is_train = {i: t == "1" for i, t in read_rows(base / "train_test_split.txt", 2, CUB_URL)}
    boxes = {}
    for i, x, y, w, h in read_rows(base / "bounding_boxes.txt", 5, CUB_URL):
        x0, y0 = float(x), float(y)
        boxes[i] = [x0, y0, x0 + float(w), y0 + float(h)]
    part_rows = sorted(read_rows(base / "parts" / "parts.txt", 2, CUB_URL, last_has_spaces=True),
                       key=lambda r: int(r[0]))
    part_names = [name for _, name in part_rows]
    part_index = {pid: k for k, (pid, _) in enumerate(part_rows)}
    parts: dict[str, list[list[float]]] = {}
    for i, pid, x, y, visible in read_rows(base / "parts" / "part_locs.txt", 5, CUB_URL):
        # invisible parts are listed as (0, 0, 0), like CUB itself
        parts.setdefault(i, [[0.0, 0.0, 0] for _ in part_rows])[part_index[pid]] = [float(x), float(y), int(visible)]

    records = []
    for image_id in sorted(paths, key=int):
        missing = [name for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train),
                                            ("bounding_boxes.txt", boxes)) if image_id not in table]
        if missing:
            raise ProtocacheError(f"CUB image {image_id} ({paths[image_id]}) is missing from {', '.join(missing)}")
        label = labels[image_id]
        if not 0 <= label < len(class_names):
            raise ProtocacheError(f"CUB image {image_id} has label {label + 1}, not in classes.txt")
        record = {
            "image_id": image_id,
            "path": str(base / "images" / paths[image_id]),
            "label": label,
            "class_name": class_names[label],
            "split": "train" if is_train[image_id] else "test",
            "bbox": boxes[image_id],
            "parts": parts.get(image_id, [[0.0, 0.0, 0] for _ in part_rows]),
        }
        if opts.crop:
            x0, y0, x1, y1 = boxes[image_id]
            # outward rounding keeps the whole box; PIL pads anything outside the image
            record["crop_box"] = [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]
        records.append(record)
    # A box crop is resized straight to the model input (no centre crop), so every part in the box stays in it.
    defaults = {"resize": "stretch"} if opts.crop else {}
    return Dataset("cub", records, class_names, load_image, options={"crop": opts.crop}, extract_defaults=defaults,
                   part_names=part_names)
