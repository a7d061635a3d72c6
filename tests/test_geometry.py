"""Annotation geometry against the real transforms (timm's eval transform, and the stretch resize of
bounding-box crops): a dot drawn at a known place must land where `input_space_annotations` says it does."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from protocache.pipeline.geometry import (eval_transform_geometry, input_geometry, input_space_annotations,
                                          point_to_token)
from protocache.pipeline.transforms import ModelInputTransform

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def lite0_config() -> dict:
    """tf_efficientnet_lite0's own preprocessing config (224 px, crop_pct 0.875, bicubic, center)."""
    pretrained_cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite0").to_dict()
    cfg = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg)
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]) == ((3, 224, 224), 0.875, "bicubic")
    return cfg


CONFIGS = {
    "lite0": lite0_config(),
    "squash": dict(input_size=(3, 224, 224), interpolation="bicubic", mean=MEAN, std=STD, crop_pct=1.0,
                   crop_mode="squash"),
    "center_nonsquare": dict(input_size=(3, 192, 256), interpolation="bilinear", mean=MEAN, std=STD, crop_pct=0.9,
                             crop_mode="center"),
    "border": dict(input_size=(3, 160, 160), interpolation="bilinear", mean=MEAN, std=STD, crop_pct=1.0,
                   crop_mode="border"),
    "trim_border": dict(input_size=(3, 128, 128), interpolation="bilinear", mean=MEAN, std=STD, crop_pct=0.95,
                        crop_mode="center", crop_border_pixels=6),
    # box crops: resized straight to the input (extract's `stretch` rule), whatever crop_pct/crop_mode say
    "stretch": {**lite0_config(), "resize": "stretch"},
    "stretch_nonsquare": dict(input_size=(3, 192, 256), interpolation="bilinear", mean=MEAN, std=STD, crop_pct=0.9,
                              crop_mode="center", resize="stretch"),
}
TIMM_CONFIGS = {k: v for k, v in CONFIGS.items() if "resize" not in v}
SIZES = [(301, 200), (190, 317), (97, 61)]  # landscape, portrait, small (upscaled)


def dot_image(size: tuple[int, int], x: float, y: float, sigma: float = 1.0) -> Image.Image:
    """A black image with a bright Gaussian dot centred at continuous pixel coordinates (x, y)."""
    w, h = size
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    dot = np.exp(-((xs[None, :] - x) ** 2 + (ys[:, None] - y) ** 2) / (2 * sigma ** 2))
    return Image.fromarray(np.round(255 * dot).astype(np.uint8)).convert("RGB")


def real_transform(cfg: dict):
    """The transform extract runs: timm's own eval transform, or ours for the stretch rule."""
    if cfg.get("resize") == "stretch":
        return ModelInputTransform(cfg)
    return timm.data.create_transform(**cfg, is_training=False)


def dot_centre(image: Image.Image, cfg: dict) -> tuple[float, float]:
    """Intensity-weighted centre of the dot after the real transform, in model-input pixels."""
    transform = real_transform(cfg)
    x = transform(image)[0].numpy()
    assert x.shape == tuple(cfg["input_size"][1:])
    background = transform(Image.new("RGB", image.size))[0].numpy()  # black, plus any padding timm adds
    weight = np.clip(x - background, 0, None)
    weight[weight < 0.3 * weight.max()] = 0  # ignore the resampling filter's faint ringing
    rows, cols = np.nonzero(weight)
    w = weight[rows, cols]
    return float(((cols + 0.5) * w).sum() / w.sum()), float(((rows + 0.5) * w).sum() / w.sum())


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("size", SIZES)
def test_points_land_where_timm_puts_them(name, size):
    cfg = CONFIGS[name]
    w, h = size
    geometry = input_geometry(size, cfg)
    assert (geometry.height, geometry.width) == tuple(cfg["input_size"][1:])
    checked = 0
    for fx, fy in [(0.5, 0.5), (0.3, 0.6), (0.62, 0.35), (0.2, 0.25), (0.8, 0.8)]:
        px, py = fx * w, fy * h
        mx, my = geometry.map_point(px, py)
        if not (4 <= mx <= geometry.width - 4 and 4 <= my <= geometry.height - 4):
            continue  # the dot would be cut by the crop; visibility is checked below
        cx, cy = dot_centre(dot_image(size, px, py), cfg)
        assert abs(cx - mx) < 0.75 and abs(cy - my) < 0.75, (name, size, (px, py), (mx, my), (cx, cy))
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("name", ["lite0", "center_nonsquare"])
def test_parts_outside_the_center_crop_become_invisible(name):
    cfg = CONFIGS[name]
    size = (400, 200)  # wide: the center crop cuts the left and right ends
    record = {"parts": [[5.0, 100.0, 1], [200.0, 100.0, 1], [395.0, 100.0, 1], [200.0, 100.0, 0]],
              "bbox": [0.0, 20.0, 400.0, 180.0]}
    out = input_space_annotations(record, size, cfg)
    assert [v for _, _, v in out["parts_input"]] == [0, 1, 0, 0]
    geometry = eval_transform_geometry(size, cfg)
    # the box is clipped to the input, the middle part maps to the input's middle
    x0, y0, x1, y1 = out["bbox_input"]
    assert (x0, x1) == (0.0, geometry.width) and 0 < y0 < y1 < geometry.height
    assert out["parts_input"][1][0] == pytest.approx(geometry.width / 2, abs=0.5)
    # the dot at the image's left end really is outside: the output left column is dark
    x = timm.data.create_transform(**cfg, is_training=False)(dot_image(size, 5.0, 100.0))[0].numpy()
    assert x.max() == pytest.approx((0 - cfg["mean"][0]) / cfg["std"][0], abs=1e-3)


def test_stretch_keeps_every_part_of_a_wide_box():
    """The same wide image as above under the stretch rule: nothing is cut.

    Hand computation: 400 x 200 -> 224 x 224 gives scale_x = 224 / 400 = 0.56, scale_y = 224 / 200 = 1.12,
    no offset; (5, 100) -> (2.8, 112), (200, 100) -> (112, 112), (395, 100) -> (221.2, 112); the box
    [0, 20, 400, 180] -> [0, 22.4, 224, 201.6].
    """
    cfg = CONFIGS["stretch"]
    record = {"parts": [[5.0, 100.0, 1], [200.0, 100.0, 1], [395.0, 100.0, 1], [200.0, 100.0, 0]],
              "bbox": [0.0, 20.0, 400.0, 180.0]}
    out = input_space_annotations(record, (400, 200), cfg)
    assert [v for _, _, v in out["parts_input"]] == [1, 1, 1, 0]
    assert [p[:2] for p in out["parts_input"][:3]] == [pytest.approx(p) for p in ([2.8, 112], [112, 112],
                                                                                  [221.2, 112])]
    assert out["bbox_input"] == pytest.approx([0.0, 22.4, 224.0, 201.6])
    # and the dot at the left end really is on the input
    cx, cy = dot_centre(dot_image((400, 200), 5.0, 100.0, sigma=2.0), cfg)
    assert abs(cx - 2.8) < 0.75 and abs(cy - 112) < 0.75
    # non-square input 192 x 256 (h x w): scale_x = 256 / 400 = 0.64, scale_y = 192 / 200 = 0.96
    geometry = input_geometry((400, 200), CONFIGS["stretch_nonsquare"])
    assert geometry.map_point(395.0, 100.0) == pytest.approx((252.8, 96.0))


def test_timm_rule_is_the_default_and_unknown_rules_fail():
    lite0 = CONFIGS["lite0"]
    assert input_geometry((400, 200), lite0) == eval_transform_geometry((400, 200), lite0)
    assert input_geometry((400, 200), {**lite0, "resize": "timm"}) == eval_transform_geometry((400, 200), lite0)
    with pytest.raises(Exception, match="unknown resize rule 'squish'"):
        input_geometry((400, 200), {**lite0, "resize": "squish"})


@pytest.mark.parametrize("name", sorted(TIMM_CONFIGS))
def test_timm_rule_through_our_steps_is_timms_transform_bit_for_bit(name):
    """extract runs geometry -> [0, 1] pixels -> view -> normalise; for the clean view under the timm
    rule that is exactly timm's own eval transform (border pad fill included)."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(0)
    for size in SIZES:
        image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
        ours = ModelInputTransform({**cfg, "resize": "timm"})(image)
        assert torch.equal(ours, timm.data.create_transform(**cfg, is_training=False)(image)), (name, size)


@pytest.mark.parametrize("name", ["lite0", "stretch"])
@pytest.mark.parametrize("crop_box", [[40, 15, 260, 190], [-20, -10, 330, 230]])
def test_crop_box_moves_annotations_like_extract(crop_box, name):
    """extract crops with PIL (padding outside the image), then transforms: annotations follow."""
    cfg = CONFIGS[name]
    size = (301, 200)
    for px, py in [(150.0, 100.0), (120.5, 80.0), (200.0, 130.0)]:
        record = {"crop_box": crop_box, "parts": [[px, py, 1]]}
        image = dot_image(size, px, py).crop(tuple(int(round(v)) for v in crop_box))
        (mx, my, visible), = input_space_annotations(record, image.size, cfg)["parts_input"]
        assert visible == 1
        cx, cy = dot_centre(image, cfg)
        assert abs(cx - mx) < 0.75 and abs(cy - my) < 0.75, (crop_box, (px, py), (mx, my), (cx, cy))


def test_no_annotations_no_columns():
    assert input_space_annotations({"image_id": "x"}, (100, 80), CONFIGS["lite0"]) == {}


def test_resize_rounding_matches_timm():
    """Sizes where truncation and rounding differ: the resized size matches timm's pipeline."""
    for cfg in TIMM_CONFIGS.values():
        for size in [(333, 251), (251, 333), (500, 167), (224, 224), (1000, 999)]:
            tf = timm.data.create_transform(**{**cfg, "normalize": False}, is_training=False)
            resize = [t for t in tf.transforms if "Resize" in type(t).__name__][0]
            image = Image.new("RGB", size)
            trimmed = tf.transforms[0](image) if "Trim" in type(tf.transforms[0]).__name__ else image
            resized = resize(trimmed)
            geometry = eval_transform_geometry(size, cfg)
            tw, th = trimmed.size
            assert geometry.scale_x * tw == pytest.approx(resized.size[0])
            assert geometry.scale_y * th == pytest.approx(resized.size[1])


def test_point_to_token_matches_token_boxes():
    grid, size = (7, 7), (3, 224, 224)
    boxes = [[j * 224 / 7, i * 224 / 7, (j + 1) * 224 / 7, (i + 1) * 224 / 7] for i in range(7) for j in range(7)]
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(0, 224, size=(200, 2)):
        t = point_to_token(x, y, size, grid)
        x0, y0, x1, y1 = boxes[t]
        assert x0 <= x < x1 and y0 <= y < y1
    assert point_to_token(0, 0, 224, grid) == 0
    assert point_to_token(223.99, 223.99, (224, 224), grid) == 48
    assert point_to_token(224, 224, 224, grid) == 48  # the far edge belongs to the last token
    assert point_to_token(31.9, 32.1, 224, grid) == 7
    # non-square grids and arrays
    np.testing.assert_array_equal(point_to_token(np.array([0.0, 100.0]), np.array([0.0, 50.0]), (3, 96, 128), (6, 8)),
                                  [0, 3 * 8 + 6])


@pytest.mark.parametrize("name", ["lite0", "border", "stretch", "stretch_nonsquare"])
def test_report_view_is_what_extract_fed_the_backbone(name):
    """explain's model_input_view (crop_box crop, the store's resize rule) is, up to its 8-bit rounding, the
    pixel image extract normalises for the backbone: the report's images line up with the tokens."""
    from protocache.pipeline.explain.images import model_input_view

    cfg = CONFIGS[name]
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(200, 301, 3), dtype=np.uint8))
    crop_box = [40, 15, 260, 190]
    view = model_input_view(image, cfg, crop_box)
    assert view.size == tuple(cfg["input_size"][1:][::-1])
    mine = torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1)
    transform = ModelInputTransform(cfg)
    pixels = transform.pixels(image.crop(tuple(crop_box)))
    assert (mine - pixels.clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6  # the view is stored as 8-bit RGB
    assert torch.equal(transform.normalize(pixels), transform(image.crop(tuple(crop_box))))
