"""Synthetic birds in CUB-200-2011's exact on-disk layout: test data and interpretability ground truth.

Each image is a cartoon bird (body, head, beak, eye, wing, tail, legs) drawn with PIL.
A bird's class is decided by its parts only: head colour x wing style (colour and shape)
x tail shape, the first `classes` combinations of a balanced grid (4 classes: 2 head
colours x 2 wing styles; 8 classes: x 2 tail shapes too). Everything else is nuisance,
drawn independently of the class: position, size, facing direction, body proportions,
body/beak/leg colours, tail tilt, background colour and clutter.

The 15 keypoints (CUB's part names) are the true positions of the drawn parts. A bird
facing right shows its left side: its left eye and left wing are drawn and visible, the
right ones are hidden (listed as 0 0 0, as CUB lists invisible parts); both legs show.
The bounding box is the bird's true extent. ``synthetic_birds.json`` next to the CUB
files records each class's attributes and which parts decide the class.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from protocache.stores.errors import ProtocacheError

PART_NAMES = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
              "nape", "right eye", "right leg", "right wing", "tail", "throat"]

HEAD_COLOURS = [("Red", (220, 30, 30)), ("Yellow", (245, 215, 20)), ("Blue", (30, 70, 225)),
                ("Black", (15, 15, 15)), ("White", (250, 250, 250)), ("Orange", (250, 130, 10)),
                ("Purple", (140, 40, 175)), ("Green", (25, 165, 55))]
# (name, colour, shape); neighbours differ in colour and shape.
WING_STYLES = [("Black_pointed", (15, 15, 15), "pointed"), ("White_round", (250, 250, 250), "round"),
               ("Blue_pointed", (30, 70, 225), "pointed"), ("Yellow_round", (245, 215, 20), "round"),
               ("Red_pointed", (220, 30, 30), "pointed"), ("Green_round", (25, 165, 55), "round"),
               ("Orange_pointed", (250, 130, 10), "pointed"), ("Purple_round", (140, 40, 175), "round")]
TAIL_SHAPES = ["Fan", "Forked", "Pointed", "Square", "Round", "Long"]
MAX_CLASSES = len(HEAD_COLOURS) * len(WING_STYLES) * len(TAIL_SHAPES)
DECISIVE_PARTS = {"head_colour": ["crown", "forehead", "nape", "throat"],
                  "wing_style": ["left wing", "right wing"],
                  "tail_shape": ["tail"]}


@dataclass(frozen=True)
class BirdClass:
    head: int
    wing: int
    tail: int

    @property
    def folder_name(self) -> str:
        return f"{HEAD_COLOURS[self.head][0]}_headed_{WING_STYLES[self.wing][0]}_winged_{TAIL_SHAPES[self.tail]}_tailed"


def class_grid(classes: int) -> list[int]:
    """Sizes of the (head, wing, tail) grid: grow the smallest factor until it holds `classes`."""
    dims = [1, 1, 1]
    limits = [len(HEAD_COLOURS), len(WING_STYLES), len(TAIL_SHAPES)]
    while math.prod(dims) < classes:
        k = min((d, i) for i, d in enumerate(dims) if d < limits[i])[1]
        dims[k] += 1
    return dims


def bird_classes(classes: int) -> list[BirdClass]:
    """The first `classes` combinations of the grid, head colour varying fastest."""
    h, w, _ = class_grid(classes)
    return [BirdClass(k % h, (k // h) % w, k // (h * w)) for k in range(classes)]


# ---------------------------------------------------------------------------- drawing
def _rotate(points: list[tuple[float, float]], origin: tuple[float, float], direction: tuple[float, float]):
    """Local (along, across) coordinates -> image coordinates, `along` pointing in `direction`."""
    (ox, oy), (vx, vy) = origin, direction
    return [(ox + s * vx - t * vy, oy + s * vy + t * vx) for s, t in points]


def _tail_polygon(shape: str, length: float, width: float) -> list[tuple[float, float]]:
    """Tail outline in local coordinates: x along the tail (from its base), y across it."""
    if shape == "Fan":
        return [(0, -width * 0.5), (length, -width * 1.6), (length, width * 1.6), (0, width * 0.5)]
    if shape == "Forked":
        return [(0, -width * 0.6), (length * 1.1, -width * 1.3), (length * 0.55, 0), (length * 1.1, width * 1.3),
                (0, width * 0.6)]
    if shape == "Pointed":
        return [(0, -width * 0.8), (length * 1.15, 0), (0, width * 0.8)]
    if shape == "Square":
        return [(0, -width * 0.7), (length, -width * 0.7), (length, width * 0.7), (0, width * 0.7)]
    if shape == "Round":
        stem = [(0, -width * 0.35), (length * 0.35, -width * 0.35)]
        arc = [(length * 0.65 + length * 0.4 * math.cos(a), width * 1.1 * math.sin(a))
               for a in np.linspace(-math.pi * 0.8, math.pi * 0.8, 13)]
        return stem + arc + [(length * 0.35, width * 0.35), (0, width * 0.35)]
    if shape == "Long":
        return [(0, -width * 0.3), (length * 1.45, -width * 0.3), (length * 1.45, width * 0.3), (0, width * 0.3)]
    raise ValueError(shape)


def _muted(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
    """A low-saturation colour: a grey level plus a small tint (nuisance colours stay apart from the cues)."""
    grey = rng.integers(low, high)
    tint = rng.integers(-25, 26, size=3)
    return tuple(int(np.clip(grey + t, 0, 255)) for t in tint)


def draw_bird(cls: BirdClass, rng: np.random.Generator, size: int) -> tuple[Image.Image, list[float], list[list]]:
    """One bird image, its box [x0, y0, x1, y1] and its 15 keypoints [[x, y, visible], ...]."""
    d = 1.0 if rng.random() < 0.5 else -1.0  # facing right (+1) shows the bird's left side
    a = size * rng.uniform(0.13, 0.19)  # body half-length
    b = a * rng.uniform(0.5, 0.62)  # body half-height
    r = a * rng.uniform(0.42, 0.5)  # head radius
    beak_len = r * rng.uniform(0.8, 1.1)
    tail_len = a * rng.uniform(0.55, 0.7)
    tilt = math.radians(rng.uniform(-25, 25))
    leg_len = a * rng.uniform(0.45, 0.6)

    # Layout around the body's centre (0, 0); shifted into the image below.
    head = (d * a * 0.85, -b * 0.75)
    hx, hy = head
    beak = [(hx + d * r * 0.8, hy - r * 0.3), (hx + d * (r + beak_len), hy + r * 0.1), (hx + d * r * 0.8, hy + r * 0.3)]
    eye = (hx + d * r * 0.35, hy)
    if WING_STYLES[cls.wing][2] == "pointed":
        wing = [(d * a * 0.4, -b * 0.2), (-d * a * 0.3, -b * 0.45), (-d * a * 1.15, -b * 0.05),
                (-d * a * 0.3, b * 0.4), (d * a * 0.3, b * 0.3)]
    else:
        wing = [(-d * a * 0.15 + a * 0.55 * math.cos(t), b * 0.42 * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, 24)]
    tail_base = (-d * a * 0.85, -b * 0.1)
    direction = (-d * math.cos(tilt), -math.sin(tilt))
    tail = _rotate(_tail_polygon(TAIL_SHAPES[cls.tail], tail_len, b * 0.45), tail_base, direction)
    tail_centre = _rotate([(tail_len * 0.4, 0.0)], tail_base, direction)[0]
    near_leg_x, far_leg_x = d * a * 0.1, -d * a * 0.2
    legs = [[(x, b * 0.8), (x, b * 0.8 + leg_len), (x + d * leg_len * 0.35, b * 0.8 + leg_len)]
            for x in (far_leg_x, near_leg_x)]

    shapes = beak + wing + tail + [p for leg in legs for p in leg]
    xs = [p[0] for p in shapes] + [-a, a, hx - r, hx + r]
    ys = [p[1] for p in shapes] + [-b, b, hy - r, hy + r]
    margin = 2.0
    ox = rng.uniform(margin - min(xs), size - margin - max(xs))
    oy = rng.uniform(margin - min(ys), size - margin - max(ys))

    def at(p):
        return (p[0] + ox, p[1] + oy)

    def poly(points):
        return [at(p) for p in points]

    # Background: a flat colour and a few muted blobs of clutter.
    image = Image.new("RGB", (size, size), _muted(rng, 60, 230))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, rr = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.03, size * 0.12)
        draw.ellipse([cx - rr, cy - rr * 0.6, cx + rr, cy + rr * 0.6], fill=_muted(rng, 50, 240))

    body_colour = _muted(rng, 90, 200)
    outline = (30, 25, 20)
    line = max(1, round(size / 64))
    draw.polygon(poly(tail), fill=tuple(int(c * 0.75) for c in body_colour), outline=outline)
    leg_colour = _muted(rng, 20, 80)
    for leg in legs:
        draw.line(poly(leg), fill=leg_colour, width=line + 1)
    draw.ellipse([ox - a, oy - b, ox + a, oy + b], fill=body_colour, outline=outline)
    draw.polygon(poly(wing), fill=WING_STYLES[cls.wing][1], outline=outline)
    draw.ellipse([ox + hx - r, oy + hy - r, ox + hx + r, oy + hy + r], fill=HEAD_COLOURS[cls.head][1], outline=outline)
    draw.polygon(poly(beak), fill=(int(rng.integers(200, 256)), int(rng.integers(140, 200)), int(rng.integers(0, 60))),
                 outline=outline)
    er = max(1.5, r * 0.22)
    ex, ey = at(eye)
    draw.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(255, 255, 255), outline=(0, 0, 0))
    draw.ellipse([ex - er * 0.5, ey - er * 0.5, ex + er * 0.5, ey + er * 0.5], fill=(0, 0, 0))

    near, far = ("left", "right") if d > 0 else ("right", "left")
    points = {
        "back": (-d * a * 0.3, -b * 0.75),
        "beak": (hx + d * (r * 0.8 + beak_len * 0.4), hy),
        "belly": (d * a * 0.05, b * 0.62),
        "breast": (d * a * 0.62, b * 0.15),
        "crown": (hx - d * r * 0.05, hy - r * 0.7),
        "forehead": (hx + d * r * 0.5, hy - r * 0.5),
        f"{near} eye": eye,
        f"{near} wing": (-d * a * 0.2, 0.0),
        "nape": (hx - d * r * 0.65, hy - r * 0.1),
        "tail": (tail_centre[0], tail_centre[1]),
        "throat": (hx + d * r * 0.3, hy + r * 0.65),
        f"{near} leg": (near_leg_x, b * 0.8 + leg_len * 0.7),
        f"{far} leg": (far_leg_x, b * 0.8 + leg_len * 0.7),
    }
    keypoints = []
    for name in PART_NAMES:
        if name in points:
            x, y = at(points[name])
            keypoints.append([round(x, 1), round(y, 1), 1])
        else:
            keypoints.append([0.0, 0.0, 0])
    box = [math.floor(min(xs) + ox), math.floor(min(ys) + oy), math.ceil(max(xs) + ox), math.ceil(max(ys) + oy)]
    box = [float(max(0, min(size, v))) for v in box]
    return image, box, keypoints


# ---------------------------------------------------------------------------- the CUB files
@dataclass
class SyntheticBirdsConfig:
    """What `make-dataset synthetic-birds` draws."""

    classes: int = 4
    """Number of classes (head colour x wing style x tail shape)."""

    per_class: int = 12
    """Images per class, half of them (rounded up) train."""

    seed: int = 0
    """Random seed; the same seed writes the same files."""

    image_size: int = 128
    """Side of the square images in pixels."""

    def check(self) -> None:
        if not 1 <= self.classes <= MAX_CLASSES:
            raise ProtocacheError(f"--classes must be between 1 and {MAX_CLASSES}, not {self.classes}")
        if self.per_class < 2:
            raise ProtocacheError(f"--per-class must be at least 2 (one train and one test image), "
                                  f"not {self.per_class}")
        if self.image_size < 32:
            raise ProtocacheError(f"--image-size must be at least 32 pixels, not {self.image_size}")


def make_synthetic_birds(out: Path, classes: int = 4, per_class: int = 12, seed: int = 0,
                         image_size: int = 128) -> Path:
    """Write a synthetic CUB-200-2011 folder at ``out/CUB_200_2011/`` and return its path.

    Same files and formats as CUB (images.txt, image_class_labels.txt, train_test_split.txt,
    classes.txt, bounding_boxes.txt, parts/parts.txt, parts/part_locs.txt, JPEGs in
    images/<class folder>/), so ``protocache extract --dataset cub --root OUT`` reads it.
    Per class, half the images (rounded up) are train. Deterministic for a given seed.
    """
    cfg = SyntheticBirdsConfig(classes, per_class, seed, image_size)
    cfg.check()
    base = Path(out).expanduser() / "CUB_200_2011"
    if (base / "images.txt").exists():
        raise ProtocacheError(f"{base} already holds a dataset; choose another --out or remove it first")
    (base / "parts").mkdir(parents=True, exist_ok=True)
    kinds = bird_classes(cfg.classes)
    images, labels, splits, boxes, part_locs = [], [], [], [], []
    for k, cls in enumerate(kinds):
        folder = f"{k + 1:03d}.{cls.folder_name}"
        (base / "images" / folder).mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng([cfg.seed, k, 1]).permutation(cfg.per_class)
        train = set(order[: (cfg.per_class + 1) // 2].tolist())
        for j in range(cfg.per_class):
            # one generator per image: an image does not depend on how many others are drawn
            image, box, keypoints = draw_bird(cls, np.random.default_rng([cfg.seed, k, 0, j]), cfg.image_size)
            rel = f"{folder}/{cls.folder_name}_{j + 1:04d}.jpg"
            image.save(base / "images" / rel, quality=95, subsampling=0)  # 4:4:4 keeps part colours crisp
            images.append(rel)
            labels.append(k + 1)
            splits.append(1 if j in train else 0)
            boxes.append(box)
            part_locs.append(keypoints)

    def write(name: str, lines: list[str]) -> None:
        (base / name).write_text("".join(line + "\n" for line in lines))

    ids = range(1, len(images) + 1)
    write("images.txt", [f"{i} {rel}" for i, rel in zip(ids, images)])
    write("image_class_labels.txt", [f"{i} {label}" for i, label in zip(ids, labels)])
    write("train_test_split.txt", [f"{i} {s}" for i, s in zip(ids, splits)])
    write("classes.txt", [f"{k + 1} {k + 1:03d}.{cls.folder_name}" for k, cls in enumerate(kinds)])
    write("bounding_boxes.txt", [f"{i} {x0:.1f} {y0:.1f} {x1 - x0:.1f} {y1 - y0:.1f}"
                                 for i, (x0, y0, x1, y1) in zip(ids, boxes)])
    write("parts/parts.txt", [f"{p + 1} {name}" for p, name in enumerate(PART_NAMES)])
    write("parts/part_locs.txt", [f"{i} {p + 1} {x:.1f} {y:.1f} {v}"
                                  for i, kps in zip(ids, part_locs) for p, (x, y, v) in enumerate(kps)])
    meta = {"generator": "protocache.pipeline.datasets.synthetic_birds", "config": asdict(cfg),
            "decisive_parts": DECISIVE_PARTS,
            "classes": [{"label": k, "class": f"{k + 1:03d}.{c.folder_name}",
                         "head_colour": HEAD_COLOURS[c.head][0], "wing_style": WING_STYLES[c.wing][0],
                         "tail_shape": TAIL_SHAPES[c.tail]} for k, c in enumerate(kinds)]}
    (base / "synthetic_birds.json").write_text(json.dumps(meta, indent=2) + "\n")
    return base


# ---------------------------------------------------------------------------- `make-dataset`
DATASET_MAKERS = {"synthetic-birds": make_synthetic_birds}


def make_dataset(kind: str, out: Path, **options: Any) -> Path:
    """Generate a dataset of the given kind under `out` (see DATASET_MAKERS)."""
    if kind not in DATASET_MAKERS:
        raise ProtocacheError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(sorted(DATASET_MAKERS))}")
    return DATASET_MAKERS[kind](Path(out), **options)
