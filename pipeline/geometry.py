"""Where things land in model-input pixels: the store's resize rule applied to annotations.

Datasets give bounding boxes and part keypoints in original-image pixels (after their
own crop, if any); the store keeps them in model-input pixels, the same space as the
store's token-to-pixel boxes, so metrics never go back to the raw files.

Coordinates are continuous pixel coordinates: pixel i spans [i, i + 1), so a resize by
a factor s maps x to x * s (PIL's resampling uses the same convention) and a crop at
offset o maps x to x - o. The store's token boxes use the same convention.

The preprocessing config's ``resize`` rule (``pipeline/transforms.py``) picks the map:
``stretch`` (bounding-box crops) resizes the image straight to the input's W x H, so
``x -> x * W / width`` and ``y -> y * H / height`` with no offset (``stretch_geometry``);
``timm`` (the default, and what stores without the key used) is timm's eval transform.

For ``timm`` the geometry reproduces timm's evaluation transform,
``timm.data.create_transform(**data_config, is_training=False)``
(``transforms_imagenet_eval``), step by step and with the same integer rounding:

* optional border trim (``crop_border_pixels``),
* resize: ``scale = floor(input / crop_pct)``; crop_mode ``center`` resizes the shorter
  side to ``scale`` (torchvision's ``Resize(int)``, which truncates the longer side, for
  a square input; timm's ``ResizeKeepRatio``, which rounds, for a non-square one),
  ``squash`` resizes both sides to ``scale`` ignoring the aspect ratio, ``border``
  resizes the longer side to fit (``ResizeKeepRatio(longest=1)``),
* center crop to the input size, padding first if the image is smaller (torchvision's
  ``CenterCrop`` and timm's ``CenterCropOrPad`` share the same offsets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

DEFAULT_CROP_PCT = 0.875  # timm's default when a data config has no crop_pct


@dataclass(frozen=True)
class InputGeometry:
    """An axis-aligned affine map from (cropped) image pixels to model-input pixels.

    ``x_input = x * scale_x - offset_x`` (and likewise for y); the model input is
    ``width`` x ``height`` pixels.
    """

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    width: int
    height: int

    def map_point(self, x: float, y: float) -> tuple[float, float]:
        return x * self.scale_x - self.offset_x, y * self.scale_y - self.offset_y

    def inside(self, x: float, y: float) -> bool:
        """Whether a mapped point lies on the model input."""
        return 0.0 <= x < self.width and 0.0 <= y < self.height


def _input_hw(input_size: Any) -> tuple[int, int]:
    """(height, width) from an int, (h, w) or (c, h, w)."""
    if isinstance(input_size, (int, np.integer)):
        return int(input_size), int(input_size)
    size = tuple(int(v) for v in input_size)
    return size[-2], size[-1]


def _center_crop_offset(size: int, crop: int) -> float:
    """Shift of a coordinate by torchvision's/timm's center crop of one axis (pads first when too small)."""
    if crop > size:
        pad_before = (crop - size) // 2
        return -float(pad_before)  # padded to exactly `crop`: no crop after the pad
    return float(int(round((size - crop) / 2.0)))


def stretch_geometry(image_size: tuple[int, int], data_config: dict[str, Any]) -> InputGeometry:
    """The geometry of a resize straight to the input size (no crop) of an image of `image_size` = (width, height)."""
    out_h, out_w = _input_hw(data_config.get("input_size", 224))
    width, height = int(image_size[0]), int(image_size[1])
    return InputGeometry(scale_x=out_w / width, scale_y=out_h / height, offset_x=0.0, offset_y=0.0,
                         width=out_w, height=out_h)


def input_geometry(image_size: tuple[int, int], data_config: dict[str, Any]) -> InputGeometry:
    """The geometry of the preprocessing config's resize rule (stretch, or timm's eval transform)."""
    from .transforms import resize_mode

    if resize_mode(data_config) == "stretch":
        return stretch_geometry(image_size, data_config)
    return eval_transform_geometry(image_size, data_config)


def eval_transform_geometry(image_size: tuple[int, int], data_config: dict[str, Any]) -> InputGeometry:
    """The geometry of timm's eval transform for an image of `image_size` = (width, height)."""
    width, height = int(image_size[0]), int(image_size[1])
    out_h, out_w = _input_hw(data_config.get("input_size", 224))
    crop_pct = data_config.get("crop_pct") or DEFAULT_CROP_PCT
    crop_mode = data_config.get("crop_mode") or "center"
    border = int(data_config.get("crop_border_pixels") or 0)

    offset_x = offset_y = 0.0
    if border:
        # timm's TrimBorder clamps both offsets with the height (sic); reproduce it exactly.
        left = top = min(border, height)
        offset_x, offset_y = float(left), float(top)
        width, height = max(0, width - 2 * border), max(0, height - 2 * border)

    scale_h, scale_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
    if crop_mode == "squash":
        new_w, new_h = scale_w, scale_h
    elif crop_mode == "border":
        ratio = max(height / scale_h, width / scale_w)
        new_w, new_h = round(width / ratio), round(height / ratio)
    elif scale_h == scale_w:
        # torchvision Resize(int): the shorter side becomes `scale`, the longer one is truncated.
        if width <= height:
            new_w, new_h = scale_w, int(scale_w * height / width)
        else:
            new_w, new_h = int(scale_h * width / height), scale_h
    else:
        ratio = min(height / scale_h, width / scale_w)  # ResizeKeepRatio(longest=0)
        new_w, new_h = round(width / ratio), round(height / ratio)

    sx, sy = new_w / width, new_h / height
    return InputGeometry(
        scale_x=sx,
        scale_y=sy,
        offset_x=offset_x * sx + _center_crop_offset(new_w, out_w),
        offset_y=offset_y * sy + _center_crop_offset(new_h, out_h),
        width=out_w,
        height=out_h,
    )


def input_space_annotations(record: dict[str, Any], image_size: tuple[int, int],
                            data_config: dict[str, Any]) -> dict[str, Any]:
    """Extra metadata columns with the record's annotations mapped into model-input pixels.

    `image_size` is (width, height) of the image handed to the backbone transform, i.e.
    after the record's `crop_box` (if any) was applied.

    Returns ``bbox_input`` [x0, y0, x1, y1] (clipped to the input) when the record has a
    ``bbox``, and ``parts_input`` [[x, y, visible], ...] when it has ``parts``; a part that
    lands outside the input is marked visible = 0 (its coordinates are kept).
    """
    out: dict[str, Any] = {}
    if record.get("bbox") is None and record.get("parts") is None:
        return out
    geometry = input_geometry(image_size, data_config)
    # extract crops with int(round(v)); the crop origin moves every annotation.
    crop = record.get("crop_box")
    cx, cy = (int(round(crop[0])), int(round(crop[1]))) if crop is not None else (0, 0)

    if record.get("bbox") is not None:
        x0, y0, x1, y1 = (float(v) for v in record["bbox"])
        x0, y0 = geometry.map_point(x0 - cx, y0 - cy)
        x1, y1 = geometry.map_point(x1 - cx, y1 - cy)
        out["bbox_input"] = [min(max(x0, 0.0), geometry.width), min(max(y0, 0.0), geometry.height),
                             min(max(x1, 0.0), geometry.width), min(max(y1, 0.0), geometry.height)]
    if record.get("parts") is not None:
        parts = []
        for x, y, visible in record["parts"]:
            px, py = geometry.map_point(float(x) - cx, float(y) - cy)
            seen = 1 if (int(visible) and geometry.inside(px, py)) else 0
            parts.append([px, py, seen])
        out["parts_input"] = parts
    return out


def point_to_token(x: float | np.ndarray, y: float | np.ndarray, input_size: int | Sequence[int],
                   grid: Sequence[int]) -> int | np.ndarray:
    """Row-major index of the token whose pixel box holds the model-input point (x, y).

    `input_size` is an int, (h, w) or (c, h, w); `grid` is (rows, cols). Token (i, j)
    covers x in [j * W / cols, (j + 1) * W / cols), as in the store's token boxes.
    Points outside the input are clipped to the nearest border token: check a part's
    visibility before asking. Works on scalars and on numpy arrays.
    """
    h, w = _input_hw(input_size)
    rows, cols = int(grid[0]), int(grid[1])
    col = np.clip(np.floor(np.asarray(x, dtype=np.float64) * cols / w), 0, cols - 1).astype(np.int64)
    row = np.clip(np.floor(np.asarray(y, dtype=np.float64) * rows / h), 0, rows - 1).astype(np.int64)
    index = row * cols + col
    return int(index) if index.ndim == 0 else index
