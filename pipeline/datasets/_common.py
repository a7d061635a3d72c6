"""Helpers shared by the dataset layouts: loading an image file, options from a command line,
root checks, listing image files, annotation text files and the seeded stratified split."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageOps

from protocache.stores.errors import ProtocacheError

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm"})


def printable_path(path: str | Path) -> str:
    """The path as text a Parquet table or a page can hold: bytes of a file name that are not UTF-8
    (which Python keeps as lone surrogates) are written as backslash escapes (`bad\\xff.png`)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def load_image(record: dict[str, Any]) -> Image.Image:
    """Open the record's image file, decoded and turned upright in RGB by `to_rgb` (module-level, so
    DataLoader workers can pickle it)."""
    path = record["path"]
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the reader forever, a device never end
        raise ValueError(f"{path} is not a regular file")
    with Image.open(path) as image:
        image.load()  # decode now and release the file handle
        return to_rgb(image)


BACKGROUND = (255, 255, 255)
"""What transparent pixels are composited on."""
EXIF_ORIENTATION = 0x0112


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image a model expects, from any mode PIL decodes; every image loader uses it.

    - EXIF orientation applied first (``ImageOps.exif_transpose``), so the image is upright as
      viewers show it (and as timm/torchvision users expect); width, height and annotations are
      those of the upright image.
    - 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``; and ``I``, read as 16-bit values) is
      scaled to 8 bits, v -> round(v * 255 / 65535), never clipped (PIL's own conversion clips
      every value above 255 to white). ``F`` (float): values within [0, 1] are scaled by 255,
      otherwise read as 0..255 (PIL's convention) and clipped; NaN becomes 0.
    - Alpha (``RGBA``, ``LA``, ``PA``, palette or greyscale images with a transparent colour) is
      composited on white, so transparent pixels are white whatever colour they hide.
    - Everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``) goes
      through PIL's own conversion to RGB.
    """
    if 0 in image.size:
        raise ValueError(f"the image is {image.size[0]} x {image.size[1]} pixels: nothing to see")
    if image.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1):  # 1: upright already (no copy made then)
        image = ImageOps.exif_transpose(image)
    if image.mode == "La":  # premultiplied alpha: PIL converts it to LA only
        image = image.convert("LA")
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.rint(values.clip(0, 255)).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("P", "L", "1", "RGB") and "transparency" in image.info or mode in ("PA", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """'train'/'test' per item: a seeded, per-class random split (scikit-learn's rule)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    _, test_index = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)
    split = np.full(len(labels), "train", dtype=object)
    split[test_index] = "test"
    return split


# ---------------------------------------------------------------------------- options and roots
def as_bool(value: Any, option: str) -> bool:
    """Options may arrive as strings from a command line."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ProtocacheError(f"option {option} must be true or false, not {value!r}")


def check_options(dataset: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise ProtocacheError(f"dataset {dataset} does not take option(s) {', '.join(unknown)} (it takes: {known})")


def require_root(root: Path | None, dataset: str, what: str, url: str | None) -> Path:
    """The root folder, or an error that says what to pass and where the data comes from."""
    where = f" Get it from {url}." if url else ""
    if root is None:
        raise ProtocacheError(f"dataset {dataset} is read from disk: pass --root DIR ({what}).{where}")
    if not root.is_dir():
        raise ProtocacheError(f"dataset {dataset}: --root {root} is not a folder; pass {what}.{where}")
    return root.resolve()


# ---------------------------------------------------------------------------- listing image files
def is_image(name: str) -> bool:
    # str methods, not os.path.splitext: this runs once per file of ImageNet
    _, dot, extension = name.rpartition(".")
    return bool(dot) and not name.startswith(".") and extension.lower() in IMAGE_EXTENSIONS


def subdirs(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders (os.scandir: no stat per entry on large trees)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def image_names(folder: Path) -> list[str]:
    """Sorted names of the image files directly in a folder."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and is_image(e.name))


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Sorted image files in a folder (and its subfolders when recursive), by relative path."""
    if not recursive:
        return [folder / n for n in image_names(folder)]
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if is_image(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


# ---------------------------------------------------------------------------- annotation text files
def read_rows(path: Path, columns: int, url: str, last_has_spaces: bool = False) -> list[list[str]]:
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


def pretty(name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross' (also 'n02085620-Chihuahua' style)."""
    head, sep, tail = name.partition(".")
    if sep and head.isdigit():
        name = tail
    return name.replace("_", " ").strip()
