"""ImageNet-1k (ILSVRC-2012) from train/<wnid>/ and val/<wnid>/ folders (or Kaggle's flat val/)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from protocache.stores.errors import ProtocacheError

from ._common import check_options, image_names, load_image, read_rows, require_root, subdirs
from ._registry import Dataset, register_dataset

IMAGENET_URL = "https://image-net.org/"


def _find_upwards(start: Path, names: Iterable[str], levels: int = 3) -> Path | None:
    """The first of `names` in `start` or up to `levels` parents (Kaggle's ILSVRC layout keeps them at the top)."""
    folder = start
    for _ in range(levels + 1):
        for name in names:
            if (folder / name).is_file():
                return folder / name
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def _imagenet_names(mapping: Path | None, wnids: list[str]) -> list[str]:
    """First synonym per wnid ('n01440764 tench, Tinca tinca' -> 'tench'), made unique, else the wnid."""
    if mapping is None:
        return list(wnids)
    names = {}
    for wnid, text in read_rows(mapping, 2, IMAGENET_URL, last_has_spaces=True):
        names[wnid] = text.split(",")[0].strip()
    first = [names.get(w, w) for w in wnids]
    counts = {n: first.count(n) for n in first}
    # ImageNet has a few repeated first names ('crane' the bird and the machine): keep them apart
    return [n if counts[n] == 1 else f"{n} ({w})" for n, w in zip(first, wnids)]


def _flat_val_labels(base: Path) -> dict[str, str]:
    """image stem -> wnid for a flat val/ folder, from Kaggle's LOC_val_solution.csv."""
    solution = _find_upwards(base, ["LOC_val_solution.csv"])
    if solution is None:
        raise ProtocacheError(
            f"{base / 'val'} holds images directly, not val/<wnid>/ folders, and no LOC_val_solution.csv was "
            "found next to it: sort the validation images into one folder per wnid (e.g. with the usual "
            f"valprep.sh) or put LOC_val_solution.csv in {base}.")
    labels = {}
    with open(solution, encoding="utf-8") as f:
        for line in f:
            image, _, prediction = line.strip().partition(",")
            if image and image != "ImageId" and prediction:
                labels[image] = prediction.split()[0]
    return labels


@register_dataset("imagenet", loader=load_image)
def build_imagenet(root: Path | None = None, **options) -> Dataset:
    """ImageNet-1k (ILSVRC-2012) from ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

    Classes are the wnids in sorted order (timm's and torchvision's label order). The
    validation set becomes split ``"test"`` (ImageNet's test labels are not public, so val
    is every paper's test set); image ids keep the folder ('val/n01440764/...'). Class names
    are human (first synonym) when ``LOC_synset_mapping.txt`` or ``synset_words.txt`` sits
    in the root (or up to three folders above it), else the wnids. A flat ``val/`` folder is
    read with Kaggle's ``LOC_val_solution.csv``.
    """
    check_options("imagenet", options, ())
    base = require_root(root, "imagenet", "the folder holding train/ and val/", IMAGENET_URL)
    split_dirs = [(split, base / folder) for split, folder in (("train", "train"), ("test", "val"))
                  if (base / folder).is_dir()]
    if not split_dirs:
        raise ProtocacheError(f"{base} is not an ImageNet folder: expected {base / 'train'}/<wnid>/*.JPEG and "
                              f"{base / 'val'}/<wnid>/*.JPEG (ILSVRC-2012). Get it from {IMAGENET_URL}.")
    # Plain strings, not Path objects: ImageNet's train set alone has 1.28M files.
    listing: list[tuple[str, str, str]] = []  # split, wnid, path relative to root
    for split, folder in split_dirs:
        wnids = subdirs(folder)
        if wnids:
            for wnid in wnids:
                listing.extend((split, wnid, f"{folder.name}/{wnid}/{name}") for name in image_names(folder / wnid))
        else:
            labels = _flat_val_labels(base)
            for name in image_names(folder):
                stem = os.path.splitext(name)[0]
                if stem not in labels:
                    raise ProtocacheError(f"{folder / name} is not in LOC_val_solution.csv")
                listing.append((split, labels[stem], f"{folder.name}/{name}"))
    wnids = sorted({wnid for _, wnid, _ in listing})
    if not wnids:
        raise ProtocacheError(f"no images found under {base}/train or {base}/val (expected <wnid>/*.JPEG)")
    class_names = _imagenet_names(_find_upwards(base, ["LOC_synset_mapping.txt", "synset_words.txt"]), wnids)
    index = {w: k for k, w in enumerate(wnids)}
    prefix = str(base) + os.sep
    records = [{"image_id": rel.rpartition(".")[0], "path": prefix + rel.replace("/", os.sep),
                "label": index[wnid], "class_name": class_names[index[wnid]], "split": split, "wnid": wnid}
               for split, wnid, rel in listing]
    return Dataset("imagenet", records, class_names, load_image)
