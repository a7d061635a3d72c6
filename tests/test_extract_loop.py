"""The extraction loop's split of the per-image transform (uint8 pixels from the workers, normalisation
batched in the main process) feeds the backbone the very values of the per-image transform, and the
store holds the very tokens of a forward pass over those inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from protocache.pipeline.backbones import Backbone, BackboneConfig
from protocache.pipeline.datasets import Dataset, create_dataset
from protocache.pipeline.extract import run_extract
from protocache.pipeline.extract_loop import _ImageViews, collate_images, shard_batches, view_inputs
from protocache.pipeline.runtime import pinned_threads
from protocache.pipeline.transforms import BatchNormalizer, ModelInputTransform, make_view
from protocache.stores import FeatureStore

from test_extract import tiny_config

CONFIGS = [  # timm's resize + centre crop with tf_ models' 0.5/0.5; a stretch with ImageNet's normalisation
    dict(input_size=(3, 64, 64), interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
         crop_pct=0.875, crop_mode="center", resize="timm"),
    dict(input_size=(3, 48, 80), interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
         crop_pct=1.0, resize="stretch"),
]


def photo_dataset(count: int = 5) -> Dataset:
    """Random RGB and greyscale images of odd sizes (every uint8 value occurs)."""
    rng = np.random.default_rng(0)
    shapes = [(37, 53), (120, 90), (64, 64), (31, 200), (97, 41)]
    images = [rng.integers(0, 256, shapes[i % len(shapes)] + (3,), dtype=np.uint8) for i in range(count)]
    records = [{"image_id": f"img-{i}", "path": f"img-{i}", "label": 0, "split": "train", "index": i}
               for i in range(count)]
    return Dataset("photos", records, ["x"],
                   lambda record: Image.fromarray(images[record["index"]]).convert("L" if record["index"] == 2 else "RGB"))


@pytest.mark.parametrize("data_config", CONFIGS)
def test_batched_normalisation_is_bit_identical_to_the_per_image_transform(data_config):
    dataset = photo_dataset()
    transform = ModelInputTransform(data_config)
    views = ("clean", "hflip", "noise")
    items = [_ImageViews(dataset, transform, views, 0.2)[i] for i in range(len(dataset))]
    assert all(item[1].dtype == torch.uint8 and item[1].shape[-1] == 3 for item in items)  # uint8 HWC leaves a worker
    batch = collate_images(items)
    for channels_last in (True, False):
        normalize = BatchNormalizer(transform.mean, transform.std, "cpu", channels_last)
        for view in views:
            expected = torch.stack([  # the per-image path: to_tensor, the view in pixel space, Normalize
                transform.normalize(make_view(transform.pixels(dataset.load_image(i)), view, f"img-{i}", 0.2))
                for i in range(len(dataset))])
            got = view_inputs(batch, view, normalize)
            assert torch.equal(got, expected), (view, channels_last)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            assert got.is_contiguous(memory_format=layout)
    assert batch["ok"].all() and batch["extras"][0] == {"width": 53, "height": 37}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_normalisation_on_cuda_equals_the_cpu_bit_for_bit():
    """On CUDA a division by a CPU scalar is a multiplication by its reciprocal; the normaliser divides by
    device tensors, so the GPU gets the values of the CPU transform."""
    pixels = torch.randint(0, 256, (4, 48, 80, 3), dtype=torch.uint8)
    config = CONFIGS[1]
    cpu = BatchNormalizer(config["mean"], config["std"], "cpu", True)(pixels)
    gpu = BatchNormalizer(config["mean"], config["std"], "cuda", True)(pixels.pin_memory())
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("num_workers, threads", [(None, 2), (1, 1)])  # decoded by threads between forwards; a worker
def test_store_tokens_are_the_forward_of_the_per_image_inputs(tmp_path, num_workers, threads):
    """Every view of a three-shard extraction (batched normalisation, float16 buffers reused across shards)
    holds, bit for bit, the float16 outputs of a forward pass over the per-image transform's inputs in the
    same batches. On the CPU, where the forward pass is deterministic (CUDA's kernels may differ by batch)."""
    views = ("clean", "hflip", "noise")
    cfg = tiny_config(tmp_path, limit=24, shard_size=8, batch_size=8, views=views, precision="fp32",
                      num_workers=num_workers, threads=threads, device="cpu")
    run_extract(cfg)
    store = FeatureStore.open(tmp_path / "s.zarr")
    backbone = Backbone(BackboneConfig("test_efficientnet", "random", device="cpu", precision="fp32"))
    dataset = create_dataset("digits").limit(24)
    transform = ModelInputTransform(store.fingerprint["preprocessing"])
    for rows in shard_batches(store.layout, range(store.layout.num_shards), cfg.batch_size):
        for view in views:
            inputs = torch.stack([transform.normalize(make_view(transform.pixels(dataset.load_image(i)), view,
                                                                dataset.records[i]["image_id"], cfg.noise_sigma))
                                  for i in rows])
            with pinned_threads(threads):  # the extraction's thread count (its kernels split work by it)
                outputs = dict(zip(("tokens", "pooled", "logits"), backbone.forward(inputs)))
            for name, value in outputs.items():
                expected = value.numpy().astype(np.float16)  # numpy's float16 rounding, as extraction used to
                got = store.read(name, rows[0], rows[-1] + 1, view)
                assert np.array_equal(got.view(np.uint16), expected.view(np.uint16)), (view, name, rows[0])


@pytest.mark.slow
def test_hand_written_loop_of_the_benchmark_sees_the_same_images_and_weights(digits_lite0_store, tmp_path):
    """bench_extract's hand-written loop (fp32, timm's transform, no protocache) computes the store's tokens."""
    from protocache.pipeline.backbones import DEFAULT_BACKBONE, create_frozen_model
    from protocache.pipeline.bench_extract import NAIVE_LOOP

    model, _ = create_frozen_model(DEFAULT_BACKBONE, "auto")
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    subprocess.run([sys.executable, "-c", NAIVE_LOOP, DEFAULT_BACKBONE, str(tmp_path / "weights.pth"),
                    str(tmp_path / "tokens.npy"), "1", "4", "8"], check=True, capture_output=True, timeout=300)
    naive = np.load(tmp_path / "tokens.npy")  # [8, D, H, W] float16
    assert naive.shape == (8, 1280, 7, 7)
    naive = torch.from_numpy(naive.reshape(8, 1280, 49).transpose(0, 2, 1).astype(np.float32))
    stored = torch.from_numpy(FeatureStore.open(digits_lite0_store).read("tokens", 0, 8).astype(np.float32))
    cosine = torch.nn.functional.cosine_similarity(naive, stored, dim=-1)
    assert cosine.min() > 0.98 and cosine.mean() > 0.995  # fp32 by hand, bf16 in the store
