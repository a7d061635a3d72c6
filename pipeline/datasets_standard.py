"""Standard on-disk dataset layouts (CUB-200-2011, Stanford Cars, Stanford Dogs, ImageNet, folder trees).

Every builder lists its images from the annotation files or the folder tree only: no
image is opened here (ImageNet-size datasets must list in seconds; extract records each
image's width and height from the decoded image). Rows are sorted, so a manifest and
therefore a store's row order never depend on the file system's listing order.

Coordinates (``bbox`` [x0, y0, x1, y1], ``parts`` [[x, y, visible], ...]) are in the
original image's pixels; ``crop_box`` (when a dataset crops) is what extract crops with
PIL before the backbone transform. Splits are ``"train"`` and ``"test"`` (a folder tree
keeps the names of its split folders).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from protocache.stores.errors import ProtocacheError

from .datasets import Dataset, register_dataset, stratified_split

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
CARS_URL = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
DOGS_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
IMAGENET_URL = "https://image-net.org/"

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm"})
FOLDER_SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------- helpers
def load_image(record: dict[str, Any]) -> Image.Image:
    """Open the record's image file, decoded (module-level, so DataLoader workers can pickle it)."""
    image = Image.open(record["path"])
    image.load()  # decode now and release the file handle
    return image


def _as_bool(value: Any, option: str) -> bool:
    """Options may arrive as strings from a command line."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ProtocacheError(f"option {option} must be true or false, not {value!r}")


def _check_options(dataset: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ProtocacheError(f"dataset {dataset} does not take option(s) {', '.join(unknown)} (it takes: {known})")


def _require_root(root: Path | None, dataset: str, what: str, url: str | None) -> Path:
    """The root folder, or an error that says what to pass and where the data comes from."""
    where = f" Get it from {url}." if url else ""
    if root is None:
        raise ProtocacheError(f"dataset {dataset} is read from disk: pass --root DIR ({what}).{where}")
    if not root.is_dir():
        raise ProtocacheError(f"dataset {dataset}: --root {root} is not a folder; pass {what}.{where}")
    return root.resolve()


def _is_image(name: str) -> bool:
    # str methods, not os.path.splitext: this runs once per file of ImageNet
    _, dot, extension = name.rpartition(".")
    return bool(dot) and not name.startswith(".") and extension.lower() in IMAGE_EXTENSIONS


def _subdirs(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders (os.scandir: no stat per entry on large trees)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _image_names(folder: Path) -> list[str]:
    """Sorted names of the image files directly in a folder."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and _is_image(e.name))


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Sorted image files in a folder (and its subfolders when recursive), by relative path."""
    if not recursive:
        return [folder / n for n in _image_names(folder)]
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if _is_image(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _read_rows(path: Path, columns: int, url: str, last_has_spaces: bool = False) -> list[list[str]]:
    """Whitespace-separated rows of a text annotation file with `columns` fields each."""
    if not path.is_file():
        raise ProtocacheError(f"missing {path}: the dataset folder is incomplete. Get the full dataset from {url}.")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=columns - 1) if last_has_spaces else line.split()
            if len(fields) != columns:
                raise ProtocacheError(f"{path} line {number}: expected {columns} fields, got {line.strip()!r}")
            rows.append([v.strip() for v in fields])
    return rows


def _pretty(name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross' (also 'n02085620-Chihuahua' style)."""
    head, sep, tail = name.partition(".")
    if sep and head.isdigit():
        name = tail
    return name.replace("_", " ").strip()


# ---------------------------------------------------------------------------- CUB-200-2011
@dataclass
class CubOptions:
    crop: bool = True  # crop each image to its bird's bounding box (the usual protocol for prototype models)


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


@register_dataset("cub")
def build_cub(root: Path | None = None, **options: Any) -> Dataset:
    """Caltech-UCSD Birds-200-2011 (11,788 images, 200 classes, 15 part keypoints, official split).

    `root` is the CUB_200_2011 folder or its parent. Option ``crop`` (default True) crops
    each image to its bounding box, as prototype models (ProtoPNet, ProtoPool, PIP-Net)
    do; the usual input is 224 px, timm's default for most backbones. Records carry
    ``bbox`` and ``parts`` (one [x, y, visible] per part name) in original-image pixels.
    """
    _check_options("cub", options, CubOptions.__dataclass_fields__)
    opts = CubOptions(crop=_as_bool(options.get("crop", True), "crop"))
    base = find_cub_root(_require_root(root, "cub", "the CUB_200_2011 folder or its parent", CUB_URL))
    if not (base / "images").is_dir():
        raise ProtocacheError(f"missing {base / 'images'}/: the CUB folder is incomplete. Get it from {CUB_URL}.")

    classes = _read_rows(base / "classes.txt", 2, CUB_URL, last_has_spaces=True)
    class_names = [_pretty(name) for _, name in sorted(classes, key=lambda r: int(r[0]))]
    paths = {i: p for i, p in _read_rows(base / "images.txt", 2, CUB_URL, last_has_spaces=True)}
    labels = {i: int(c) - 1 for i, c in _read_rows(base / "image_class_labels.txt", 2, CUB_URL)}
    is_train = {i: t == "1" for i, t in _read_rows(base / "train_test_split.txt", 2, CUB_URL)}
    boxes = {}
    for i, x, y, w, h in _read_rows(base / "bounding_boxes.txt", 5, CUB_URL):
        x0, y0 = float(x), float(y)
        boxes[i] = [x0, y0, x0 + float(w), y0 + float(h)]
    part_rows = sorted(_read_rows(base / "parts" / "parts.txt", 2, CUB_URL, last_has_spaces=True),
                       key=lambda r: int(r[0]))
    part_names = [name for _, name in part_rows]
    part_index = {pid: k for k, (pid, _) in enumerate(part_rows)}
    parts: dict[str, list[list[float]]] = {}
    for i, pid, x, y, visible in _read_rows(base / "parts" / "part_locs.txt", 5, CUB_URL):
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
    return Dataset("cub", records, class_names, load_image, options={"crop": opts.crop}, part_names=part_names)


# ---------------------------------------------------------------------------- .mat helpers
def _mat_value(value: Any) -> Any:
    """A MATLAB scalar or string as loaded by scipy.io.loadmat (arrays like [[39]] or ['00001.jpg'])."""
    array = np.asarray(value)
    if array.dtype == object:
        return _mat_value(array.ravel()[0]) if array.size else None
    if array.dtype.kind in "US":
        return str(array.ravel()[0]) if array.size else ""
    return array.ravel()[0].item() if array.size else None


def _load_mat(path: Path, variable: str, url: str) -> np.ndarray:
    from scipy.io import loadmat

    if not path.is_file():
        raise ProtocacheError(f"missing {path}. Get it from {url}.")
    try:
        mat = loadmat(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise ProtocacheError(f"cannot read {path} as a MATLAB file ({exc}). Get it again from {url}.") from exc
    if variable not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__"))
        raise ProtocacheError(f"{path} has no variable {variable!r} (it has: {found}). Get it again from {url}.")
    return mat[variable]


def _mat_struct_rows(path: Path, variable: str, fields: Iterable[str], url: str) -> list[dict[str, Any]]:
    """The elements of a MATLAB struct array as dicts of plain Python values."""
    array = _load_mat(path, variable, url)
    names = array.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise ProtocacheError(f"{path}: {variable} has no field(s) {', '.join(missing)} (it has: "
                              f"{', '.join(names)}). Get the devkit again from {url}.")
    return [{f: _mat_value(item[f]) for f in names} for item in array.ravel()]


def _mat_cells(path: Path, variable: str, url: str) -> list[Any]:
    """The entries of a MATLAB cell array or numeric column, flattened."""
    return [_mat_value(v) for v in _load_mat(path, variable, url).ravel()]


# ---------------------------------------------------------------------------- Stanford Cars
@dataclass
class CarsOptions:
    crop: bool = False  # crop each image to its car's bounding box


CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def find_cars_root(root: Path) -> Path:
    for candidate in (root, root / "stanford_cars"):
        if (candidate / "devkit" / "cars_train_annos.mat").is_file():
            return candidate
    raise ProtocacheError(
        f"{root} is not a Stanford Cars folder: expected {root / 'devkit' / 'cars_train_annos.mat'} "
        "(the devkit, car_devkit.tgz) next to cars_train/ and cars_test/, and "
        "cars_test_annos_withlabels.mat in devkit/ or the root. Get them from " + CARS_URL
    )


@register_dataset("cars")
def build_cars(root: Path | None = None, **options: Any) -> Dataset:
    """Stanford Cars (16,185 images, 196 classes, official train/test split), devkit layout.

    `root` holds ``devkit/`` (cars_train_annos.mat, cars_meta.mat), ``cars_train/``,
    ``cars_test/`` and ``cars_test_annos_withlabels.mat`` (in devkit/ or the root). Records
    carry the car's ``bbox`` [x1, y1, x2, y2] as given by the devkit; option ``crop``
    (default False) crops to it.
    """
    _check_options("cars", options, CarsOptions.__dataclass_fields__)
    opts = CarsOptions(crop=_as_bool(options.get("crop", False), "crop"))
    base = find_cars_root(_require_root(root, "cars", "the Stanford Cars folder with devkit/", CARS_URL))
    test_annos = next((p for p in (base / "devkit" / "cars_test_annos_withlabels.mat",
                                   base / "cars_test_annos_withlabels.mat") if p.is_file()), None)
    if test_annos is None:
        raise ProtocacheError(
            f"missing cars_test_annos_withlabels.mat in {base / 'devkit'} or {base}: the devkit's "
            f"cars_test_annos.mat has no labels. Get the labelled test annotations from {CARS_URL}.")
    class_names = [str(c) for c in _mat_cells(base / "devkit" / "cars_meta.mat", "class_names", CARS_URL)]
    records = []
    for split, annos, folder in (("train", base / "devkit" / "cars_train_annos.mat", "cars_train"),
                                 ("test", test_annos, "cars_test")):
        if not (base / folder).is_dir():
            raise ProtocacheError(f"missing {base / folder}/ (the {split} images). Get it from {CARS_URL}.")
        rows = _mat_struct_rows(annos, "annotations", CARS_FIELDS, CARS_URL)
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
    return Dataset("cars", records, class_names, load_image, options={"crop": opts.crop})


# ---------------------------------------------------------------------------- Stanford Dogs
@register_dataset("dogs")
def build_dogs(root: Path | None = None, **options: Any) -> Dataset:
    """Stanford Dogs (20,580 images, 120 breeds, official train/test split).

    `root` holds ``Images/<wnid>-<breed>/*.jpg`` and the lists ``train_list.mat`` and
    ``test_list.mat`` (``file_list`` relative to Images/, ``labels`` 1-based). Class names
    are the breeds ('n02085782-Japanese_spaniel' -> 'Japanese spaniel'). The bounding boxes
    in Annotation/ are not read.
    """
    _check_options("dogs", options, ())
    base = _require_root(root, "dogs", "the Stanford Dogs folder with Images/ and train_list.mat", DOGS_URL)
    if not (base / "Images").is_dir() or not (base / "train_list.mat").is_file():
        raise ProtocacheError(
            f"{base} is not a Stanford Dogs folder: expected {base / 'Images'}/ (images.tar) and "
            f"{base / 'train_list.mat'}, {base / 'test_list.mat'} (lists.tar). Get them from {DOGS_URL}.")
    folders: dict[int, str] = {}
    records = []
    for split in ("train", "test"):
        path = base / f"{split}_list.mat"
        files = [str(f) for f in _mat_cells(path, "file_list", DOGS_URL)]
        labels = [int(v) for v in _mat_cells(path, "labels", DOGS_URL)]
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
    class_names = [_pretty(folders[k].split("-", 1)[-1]) for k in range(1, num_classes + 1)]
    for record in records:
        record["class_name"] = class_names[record["label"]]
    return Dataset("dogs", records, class_names, load_image)


# ---------------------------------------------------------------------------- ImageNet
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
    for wnid, text in _read_rows(mapping, 2, IMAGENET_URL, last_has_spaces=True):
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


@register_dataset("imagenet")
def build_imagenet(root: Path | None = None, **options: Any) -> Dataset:
    """ImageNet-1k (ILSVRC-2012) from ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

    Classes are the wnids in sorted order (timm's and torchvision's label order). The
    validation set becomes split ``"test"`` (ImageNet's test labels are not public, so val
    is every paper's test set); image ids keep the folder ('val/n01440764/...'). Class names
    are human (first synonym) when ``LOC_synset_mapping.txt`` or ``synset_words.txt`` sits
    in the root (or up to three folders above it), else the wnids. A flat ``val/`` folder is
    read with Kaggle's ``LOC_val_solution.csv``.
    """
    _check_options("imagenet", options, ())
    base = _require_root(root, "imagenet", "the folder holding train/ and val/", IMAGENET_URL)
    split_dirs = [(split, base / folder) for split, folder in (("train", "train"), ("test", "val"))
                  if (base / folder).is_dir()]
    if not split_dirs:
        raise ProtocacheError(f"{base} is not an ImageNet folder: expected {base / 'train'}/<wnid>/*.JPEG and "
                              f"{base / 'val'}/<wnid>/*.JPEG (ILSVRC-2012). Get it from {IMAGENET_URL}.")
    # Plain strings, not Path objects: ImageNet's train set alone has 1.28M files.
    listing: list[tuple[str, str, str]] = []  # split, wnid, path relative to root
    for split, folder in split_dirs:
        wnids = _subdirs(folder)
        if wnids:
            for wnid in wnids:
                listing.extend((split, wnid, f"{folder.name}/{wnid}/{name}") for name in _image_names(folder / wnid))
        else:
            labels = _flat_val_labels(base)
            for name in _image_names(folder):
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


# ---------------------------------------------------------------------------- any class-per-folder tree
@dataclass
class FolderOptions:
    test_fraction: float = 0.2  # only for a tree without split folders
    split_seed: int = 0


@register_dataset("folder")
def build_folder(root: Path | None = None, **options: Any) -> Dataset:
    """Any class-per-folder image tree.

    Either ``root/<split>/<class>/...`` with split folders named train, val and/or test
    (the split is the folder's name), or ``root/<class>/...``, split per class by a seeded
    stratified rule (options ``test_fraction``, default 0.2, and ``split_seed``, default 0).
    Images may sit in subfolders of a class folder; extensions are matched case-insensitively.
    Labels follow the sorted class folder names.
    """
    _check_options("folder", options, FolderOptions.__dataclass_fields__)
    base = _require_root(root, "folder", "a folder of class folders, or of train/val/test folders of "
                         "class folders", None)
    subdirs = _subdirs(base)
    split_dirs = [d for d in subdirs if d.lower() in FOLDER_SPLITS]
    listing: list[tuple[str | None, str, Path]] = []  # split, class, file
    if split_dirs:
        if options:
            raise ProtocacheError(f"{base} has split folders ({', '.join(split_dirs)}): options "
                                  f"{', '.join(sorted(options))} only apply to a tree without them")
        for split_dir in split_dirs:
            classes = _subdirs(base / split_dir)
            if not classes:
                raise ProtocacheError(f"{base / split_dir} has no class folders: expected {base / split_dir}/<class>/*")
            for name in classes:
                files = _image_files(base / split_dir / name, recursive=True)
                listing.extend((split_dir.lower(), name, f) for f in files)
    else:
        for name in subdirs:
            listing.extend((None, name, f) for f in _image_files(base / name, recursive=True))
    if not listing:
        loose = len(_image_files(base))
        hint = f" ({loose} images lie directly in it: move them into one folder per class)" if loose else ""
        extensions = ", ".join("." + e for e in sorted(IMAGE_EXTENSIONS))
        raise ProtocacheError(f"no images found in {base}: expected {base}/<class>/<image> or "
                              f"{base}/train/<class>/<image>{hint}. Image extensions: {extensions}")
    class_names = sorted({name for _, name, _ in listing})
    index = {n: k for k, n in enumerate(class_names)}
    listing.sort(key=lambda item: (FOLDER_SPLITS.index(item[0]) if item[0] else 0,
                                   item[2].relative_to(base).as_posix()))
    labels = np.array([index[name] for _, name, _ in listing], dtype=np.int64)

    dataset_options: dict[str, Any] = {"layout": "split folders" if split_dirs else "class folders"}
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
