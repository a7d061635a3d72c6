"""Any class-per-folder image tree, with or without train/val/test split folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocache.stores.errors import ProtocacheError

from ._common import (IMAGE_EXTENSIONS, check_options, image_files, load_image, printable_path, require_root,
                      stratified_split, subdirs)
from ._registry import Dataset, register_dataset

FOLDER_SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"
"""The one class of a folder of loose images (no class folders): e.g. images to explain the backbone on."""


@dataclass
class FolderOptions:
    """Options of the folder dataset."""

    test_fraction: float = 0.2
    """Share of each class's images that becomes split "test" (only for a tree without split folders)."""

    split_seed: int = 0
    """Seed of that stratified split (only for a tree without split folders)."""


@register_dataset("folder", loader=load_image)
def build_folder(root: Path | None = None, **options: Any) -> Dataset:
    """Any class-per-folder image tree.

    Either ``root/<split>/<class>/...`` with split folders named train, val and/or test
    (the split is the folder's name), or ``root/<class>/...``, split per class by a seeded
    stratified rule (options ``test_fraction``, default 0.2, and ``split_seed``, default 0).
    Images may sit in subfolders of a class folder; extensions are matched case-insensitively.
    Labels follow the sorted class folder names. A folder holding only loose images (no class
    folders) is unlabeled: one class "unlabeled" (label 0), split train/test by the same seeded
    rule, e.g. images on which to explain the backbone itself (fit-head infodisent
    --set target=backbone).
    """
    check_options("folder", options, FolderOptions.__dataclass_fields__)
    base = require_root(root, "folder", "a folder of class folders, or of train/val/test folders of "
                        "class folders", None)
    folders = subdirs(base)
    split_dirs = [d for d in folders if d.lower() in FOLDER_SPLITS]
    listing: list[tuple[str | None, str, Path]] = []  # split, class, file
    unlabeled = False
    if split_dirs:
        if options:
            raise ProtocacheError(f"{base} has split folders ({', '.join(split_dirs)}): options "
                                  f"{', '.join(sorted(options))} only apply to a tree without them")
        for split_dir in split_dirs:
            classes = subdirs(base / split_dir)
            if not classes:
                raise ProtocacheError(f"{base / split_dir} has no class folders: expected {base / split_dir}/<class>/*")
            for name in classes:
                files = image_files(base / split_dir / name, recursive=True)
                listing.extend((split_dir.lower(), name, f) for f in files)
    else:
        for name in folders:
            listing.extend((None, name, f) for f in image_files(base / name, recursive=True))
        unlabeled = not listing
        if unlabeled:  # loose images only: an unlabeled folder
            listing.extend((None, UNLABELED, f) for f in image_files(base))
    if not listing:
        loose = len(image_files(base))
        hint = f" ({loose} images lie directly in it: move them into one folder per class)" if loose else ""
        extensions = ", ".join("." + e for e in sorted(IMAGE_EXTENSIONS))
        raise ProtocacheError(f"no images found in {base}: expected {base}/<class>/<image> or "
                              f"{base}/train/<class>/<image>{hint}. Image extensions: {extensions}")
    not_text = [f for _, _, f in listing if printable_path(f) != str(f)]
    if not_text:  # the store's metadata names every image (and class) as UTF-8 text
        raise ProtocacheError(f"{len(not_text)} image path(s) under {base} are not valid UTF-8, e.g. "
                              f"{printable_path(not_text[0])}; "
                              "rename them (e.g. with `convmv -f latin1 -t utf8`) so the store can name them")
    class_names = sorted({name for _, name, _ in listing})
    index = {n: k for k, n in enumerate(class_names)}
    listing.sort(key=lambda item: (FOLDER_SPLITS.index(item[0]) if item[0] else 0,
                                   item[2].relative_to(base).as_posix()))
    labels = np.array([index[name] for _, name, _ in listing], dtype=np.int64)

    layout = "split folders" if split_dirs else ("unlabeled" if unlabeled else "class folders")
    dataset_options: dict[str, Any] = {"layout": layout}
    if split_dirs:
        splits = [split for split, _, _ in listing]
    else:
        try:
            opts = FolderOptions(test_fraction=float(options.get("test_fraction", 0.2)),
                                 split_seed=int(options.get("split_seed", 0)))
        except (TypeError, ValueError) as exc:
            raise ProtocacheError(f"folder: test_fraction must be a number and split_seed an integer ({exc})") from exc
        splits = _folder_split(labels, opts, class_names)
        dataset_options.update(test_fraction=opts.test_fraction, split_seed=opts.split_seed)
    records = [{"image_id": f.relative_to(base).as_posix(), "path": str(f), "label": int(labels[k]),
                "class_name": name, "split": str(splits[k])}
               for k, (_, name, f) in enumerate(listing)]
    return Dataset("folder", records, class_names, load_image, options=dataset_options)


def _folder_split(labels: np.ndarray, opts: FolderOptions, class_names: list[str]) -> list[str]:
    if not 0.0 <= opts.test_fraction < 1.0:
        raise ProtocacheError(f"test_fraction must be in [0, 1), not {opts.test_fraction}")
    if opts.test_fraction == 0.0:
        return ["train"] * len(labels)
    counts = np.bincount(labels, minlength=len(class_names))
    if counts.min() < 2:
        small = [class_names[k] for k in np.flatnonzero(counts < 2)][:5]
        raise ProtocacheError(f"class folder(s) {', '.join(small)} have fewer than 2 images: a stratified "
                              "train/test split needs at least 2 per class (add images or use test_fraction=0)")
    try:
        return [str(s) for s in stratified_split(labels, opts.test_fraction, opts.split_seed)]
    except ValueError as exc:  # e.g. fewer test slots than classes
        raise ProtocacheError(f"cannot split {len(labels)} images of {len(class_names)} classes with "
                              f"test_fraction={opts.test_fraction}: {exc}") from exc
