"""Drawing: colour maps, the translucent heat-map overlay, boxes, patch crops and colour scales.

Unsigned maps (similarities) are scaled min-max on their image with a sequential map (jet);
signed maps (heads whose ``signed_evidence`` is True, e.g. InfoDisent's rotated channels)
use a diverging map centred on 0 (red positive, blue negative). The heat map is blended at
most at ``HEAT_ALPHA`` so the image under it stays readable; each picture's scale (the
values at both ends of its colours) is returned with it, for the page's colour bar.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

HEAT_ALPHA = 0.45  # the heat map's largest opacity: the image always shows through
POSITIVE_BOX = (0, 230, 64)  # the peak (strongest positive evidence)
NEGATIVE_BOX = (255, 0, 200)  # the strongest negative evidence (signed maps)
BOX_EDGE = (20, 20, 20)  # a dark rim around each box, visible on light and dark pixels


def _colormap(name: str):
    try:
        import matplotlib

        return matplotlib.colormaps[name]
    except (ImportError, KeyError):
        return None


def colorize(values: np.ndarray, diverging: bool = False) -> np.ndarray:
    """values in [0, 1] (or [-1, 1] when diverging) -> uint8 RGB [..., 3]."""
    cmap = _colormap("RdBu_r" if diverging else "jet")
    x = (values + 1.0) / 2.0 if diverging else values
    x = np.clip(x, 0.0, 1.0)
    if cmap is not None:
        return (cmap(x)[..., :3] * 255.0).round().astype(np.uint8)
    if diverging:  # blue - white - red
        r = np.clip(2.0 * x, 0, 1)
        b = np.clip(2.0 - 2.0 * x, 0, 1)
        g = np.minimum(r, b)
        rgb = np.stack([r, g, b], axis=-1)
    else:  # jet
        rgb = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], axis=-1)
    return (rgb * 255.0).round().astype(np.uint8)


def css_gradient(diverging: bool = False, stops: int = 11) -> str:
    """The colour map as a CSS ``linear-gradient`` (left: low, right: high), for the page's colour bars."""
    x = np.linspace(-1.0 if diverging else 0.0, 1.0, stops)
    colors = colorize(x, diverging=diverging)
    parts = [f"rgb({r},{g},{b}) {100.0 * k / (stops - 1):.0f}%" for k, (r, g, b) in enumerate(colors.tolist())]
    return "linear-gradient(to right, " + ", ".join(parts) + ")"


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W] token-grid map -> [height, width] bilinear, cell values at the cell centres. size = (width, height)."""
    m = Image.fromarray(np.ascontiguousarray(grid_map, dtype=np.float32), mode="F")
    return np.asarray(m.resize(size, Image.BILINEAR), dtype=np.float32)


def overlay(view: Image.Image, grid_map: np.ndarray, signed: bool = False, alpha: float = HEAT_ALPHA
            ) -> tuple[Image.Image, dict[str, Any]]:
    """The view with the map upsampled to its size and blended on top, and the picture's colour scale.

    Unsigned: min-max on this image, opacity from 0.3 to 1 times `alpha` (the image shows
    through where the prototype is absent). Signed: centred on 0, scaled by the largest
    |value|, opacity |value| times `alpha`. Scale: ``{"min", "max", "signed"}``, the values
    at the two ends of the colour map.
    """
    m = upsample(grid_map, view.size)
    base = np.asarray(view.convert("RGB"), dtype=np.float32)
    if signed:
        bound = float(np.abs(m).max())
        v = m / (bound or 1.0)
        colors = colorize(v, diverging=True).astype(np.float32)
        a = (alpha * np.abs(v))[..., None]
        scale = {"min": -bound, "max": bound, "signed": True}
    else:
        lo, hi = float(m.min()), float(m.max())
        v = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        colors = colorize(v).astype(np.float32)
        a = (alpha * (0.3 + 0.7 * v))[..., None]
        scale = {"min": lo, "max": hi, "signed": False}
    out = base * (1.0 - a) + colors * a
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), mode="RGB"), scale


def draw_box(image: Image.Image, box: Sequence[float], color: tuple[int, int, int], width: int | None = None
             ) -> Image.Image:
    """A rectangle outline drawn inside the pixel box [x0, y0, x1, y1) (continuous coordinates), with a dark rim."""
    width = width or max(2, round(min(image.size) / 80))
    out = image.copy()
    x0, y0, x1, y1 = round(box[0]), round(box[1]), round(box[2]), round(box[3])
    x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)
    draw = ImageDraw.Draw(out)
    draw.rectangle([x0, y0, x1, y1], outline=BOX_EDGE, width=width + 2)
    draw.rectangle([x0 + 1, y0 + 1, max(x0 + 1, x1 - 1), max(y0 + 1, y1 - 1)], outline=color, width=width)
    return out


def patch_window(box: Sequence[float], input_wh: tuple[int, int], side: float) -> tuple[int, int, int, int]:
    """A square of `side` px centred on the token box, shifted to stay inside the input."""
    w, h = input_wh
    side = int(round(min(side, w, h)))
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    x0 = int(round(min(max(cx - side / 2.0, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2.0, 0), h - side)))
    return x0, y0, x0 + side, y0 + side


def crop_patch(image: Image.Image, window: tuple[int, int, int, int], px: int) -> Image.Image:
    """The window of `image`, resized to a px x px square."""
    return image.crop(window).resize((px, px), Image.BICUBIC)
