"""Backbones: tokens from timm models, weight sources (shipped, local checkpoints), devices."""

from __future__ import annotations

import pytest
import torch

from protocache.pipeline.backbones import (Backbone, BackboneConfig, remap_efficientnet_lite, resolve_device,
                                           shipped_weights_path)
from protocache.pipeline.config import field_docs
from protocache.stores import ProtocacheError


def test_cnn_tokens_are_the_feature_map_row_major():
    backbone = Backbone(BackboneConfig("test_efficientnet", weights="random", device="cpu", precision="fp32"))
    x = torch.randn(2, 3, *backbone.input_size[1:])
    tokens, pooled, logits = backbone.forward(x)
    with torch.inference_mode():
        feats = backbone.model.forward_features(x.contiguous(memory_format=torch.channels_last))
    h, w = backbone.grid
    assert feats.shape[2:] == (h, w) and tokens.shape == (2, h * w, backbone.dim)
    for t in (0, 1, w, h * w - 1):  # token t is row t // W, column t % W
        assert torch.allclose(tokens[:, t], feats[:, :, t // w, t % w], atol=1e-5)
    assert torch.allclose(pooled, tokens.mean(1), atol=1e-5)
    assert logits.shape == (2, 1000)
    boxes = backbone.token_boxes()
    size = backbone.input_size[1]
    assert boxes[0] == [0, 0, size / w, size / h] and boxes[-1][2:] == [size, size]


def test_transform_is_timms_or_a_straight_resize():
    """transform() is timm's eval transform bit for bit; transform("stretch") resizes a wide 300 x 100 image
    straight to the 160 x 160 input (test_efficientnet's), so its left and right ends stay in the picture."""
    import numpy as np
    import timm
    from PIL import Image

    backbone = Backbone(BackboneConfig("test_efficientnet", weights="random", device="cpu", precision="fp32"))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(100, 300, 3), dtype=np.uint8))
    assert torch.equal(backbone.transform()(image),
                       timm.data.create_transform(**backbone.data_config, is_training=False)(image))
    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 15, 100))  # a white band on the left 5% (timm's centre crop cuts it)
    mean = torch.tensor(backbone.data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(backbone.data_config["std"]).view(3, 1, 1)
    stretched = backbone.transform("stretch")(wide) * std + mean
    assert stretched.shape == (3, 160, 160)
    assert stretched[:, :, :7].min() > 0.9 and stretched[:, :, 9:].max() < 0.1  # 15 px x 160/300 = 8 px
    assert backbone.transform()(wide).mul(std).add(mean).max() < 0.1


def test_vit_drops_prefix_tokens_and_keeps_cls_as_pooled():
    backbone = Backbone(BackboneConfig("test_vit", weights="random", device="cpu", precision="fp32"))
    x = torch.randn(2, 3, *backbone.input_size[1:])
    tokens, pooled, _ = backbone.forward(x)
    with torch.inference_mode():
        feats = backbone.model.forward_features(x)
    assert backbone.num_prefix_tokens == 1 and backbone.grid == (10, 10) and not backbone.is_cnn
    assert torch.equal(tokens, feats[:, 1:]) and torch.equal(pooled, feats[:, 0])


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_shipped_weights_load_strictly_and_classify_photos(name):
    from skimage import data
    from PIL import Image
    from timm.data import ImageNetInfo

    path = shipped_weights_path(name)
    if path is None:
        pytest.skip(f"{name}: weights package not installed (extra `lite`)")
    backbone = Backbone(BackboneConfig(name, weights="shipped", device="cpu", precision="fp32"))
    assert backbone.weights_source.startswith("shipped:")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(remap_efficientnet_lite(raw, backbone.model)) == set(backbone.model.state_dict())
    transform = backbone.transform()
    photos = torch.stack([transform(Image.fromarray(data.coffee())), transform(Image.fromarray(data.chelsea()))])
    _, _, logits = backbone.forward(photos)
    top1 = logits.argmax(1).tolist()
    info = ImageNetInfo()
    assert info.index_to_description(top1[0]) == "espresso"
    assert 281 <= top1[1] <= 285, info.index_to_description(top1[1])  # a domestic cat class


def test_no_weights_is_a_clear_error(tmp_path):
    bad = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    fits_not = (r"do not fit EfficientNet \(missing blocks\.0\.0\.bn1\.bias, .* and \d+ more; "
                r"unexpected conv\.weight\); pass")
    with pytest.raises(ProtocacheError, match=fits_not):  # one line: the first keys of each kind, then a count
        Backbone(BackboneConfig("test_efficientnet", weights=str(bad), device="cpu"))
    with pytest.raises(ProtocacheError, match="does not exist"):
        Backbone(BackboneConfig("test_efficientnet", weights=str(tmp_path / "missing.pth"), device="cpu"))
    with pytest.raises(ProtocacheError, match="no shipped weights"):
        Backbone(BackboneConfig("test_efficientnet", weights="shipped", device="cpu"))


def test_local_checkpoint_roundtrip(tmp_path):
    from safetensors.torch import save_file

    ref = Backbone(BackboneConfig("test_vit", weights="random", device="cpu"))
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, tmp_path / "vit.safetensors")
    loaded = Backbone(BackboneConfig("test_vit", weights=str(tmp_path / "vit.safetensors"), device="cpu"))
    assert loaded.weights_sha256 == ref.weights_sha256 and loaded.weights_source == "file:vit.safetensors"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ProtocacheError, match="torch sees no CUDA device"):
        Backbone(BackboneConfig("test_efficientnet", weights="random", device="cuda"))


def test_device_resolution_is_the_runtime_one():
    from protocache.pipeline import runtime

    assert resolve_device is runtime.resolve_device
    assert resolve_device("cpu") == torch.device("cpu")


def test_every_config_field_has_a_docstring():
    from dataclasses import fields

    assert set(field_docs(BackboneConfig)) == {f.name for f in fields(BackboneConfig)}
