"""Stanford Cars in its devkit layout (cars_train/, cars_test/, devkit/*.mat)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocache.stores.errors import ProtocacheError

from ._common import as_bool, check_options, load_image, require_root
from ._mat import mat_cells, mat_struct_rows
from ._registry import Dataset, register_dataset

CARS_URL = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


@dataclass
class CarsOptions:
    """Options of the cars dataset."""

    crop: bool = False
    """Crop each image to its car's bounding box."""


def find_cars_root(root: Path) -> Path:
    for candidate in (root, root / "stanford_cars"):
        if (candidate / "devkit" / "cars_train_annos.mat").is_file():
            return candidate
    raise ProtocacheError(
        f"{root} is not a Stanford Cars folder: expected {root / 'devkit' / 'cars_train_annos.mat'} "
        "(the devkit, car_devkit.tgz) next to cars_train/ and cars_test/, and "
        "cars_test_annos_withlabels.mat in devkit/ or the root. Get them from " + CARS_URL
    )


@register_dataset("cars", loader=load_image)
def build_cars(root: Path | None = None, **options: Any) -> Dataset:
    """Stanford Cars (16,185 images, 196 classes, official train/test split), devkit layout.

    `root` holds ``devkit/`` (cars_train_annos.mat, cars_meta.mat), ``cars_train/``,
    ``cars_test/`` and ``cars_test_annos_withlabels.mat`` (in devkit/ or the root). Records
    carry the car's ``bbox`` [x1, y1, x2, y2] as given by the devkit; option ``crop``
    (default False) crops to it, and extract then resizes the crop straight to the model
    input (``--resize auto`` picks ``stretch``).
    """
    check_options("cars", options, CarsOptions.__dataclass_fields__)
    opts = CarsOptions(crop=as_bool(options.get("crop", False), "crop"))
    base = find_cars_root(require_root(root, "cars", "the Stanford Cars folder with devkit/", CARS_URL))
    test_annos = next((p for p in (base / "devkit" / "cars_test_annos_withlabels.mat",
                                   base / "cars_test_annos_withlabels.mat") if p.is_file()), None)
    if test_annos is None:
        raise ProtocacheError(
            f"missing cars_test_annos_withlabels.mat in {base / 'devkit'} or {base}: the devkit's "
            f"cars_test_annos.mat has no labels. Get the labelled test annotations from {CARS_URL}.")
    class_names = [str(c) for c in mat_cells(base / "devkit" / "cars_meta.mat", "class_names", CARS_URL)]
    records = []
    for split, annos, folder in (("train", base / "devkit" / "cars_train_annos.mat", "cars_train"),
                                 ("test", test_annos, "cars_test")):
        if not (base / folder).is_dir():
            raise ProtocacheError(f"missing {base / folder}/ (the {split} images). Get it from {CARS_URL}.")
        rows = mat_struct_rows(annos, "annotations", CARS_FIELDS, CARS_URL)
        for row in sorted(rows, key=lambda r: r["fname"]):
            label = int(row["class"]) - 1
            if not 0 <= label < len(class_names):
                raise ProtocacheError(f"{annos}: {row['fname']} has class {label + 1}, cars_meta.mat has "
                                      f"{len(class_names)} classes")
            bbox = [float(row[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")]
            record = {"image_id": f"{folder}/{row['fname']}", "path": str(base / folder / row["fname"]),
                      "label": label, "class_name": class_names[label], "split": split, "bbox": bbox}
            if opts.crop:
                record["crop_box"] = [math.floor(bbox[0]), math.floor(bbox[1]), math.ceil(bbox[2]), math.ceil(bbox[3])]
            records.append(record)
    # A box crop is resized straight to the model input (no centre crop): the whole car stays in it.
    defaults = {"resize": "stretch"} if opts.crop else {}
    return Dataset("cars", records, class_names, load_image, options={"crop": opts.crop}, extract_defaults=defaults)
