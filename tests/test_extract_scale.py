"""Extraction that survives: cached views, SIGKILL then resume, and dask.distributed workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from protocache.pipeline.extract import ExtractConfig, make_view, run_extract, run_extract_distributed
from protocache.stores import FeatureStore

from test_extract import store_bytes, tiny_config


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
    return float(torch.nn.functional.cosine_similarity(ta, tb, dim=-1).mean())


def test_views_noise_changes_tokens_and_is_repeatable(tmp_path):
    views = ("clean", "hflip", "noise")
    run_extract(tiny_config(tmp_path, "a.zarr", views=views, limit=16, weights="random"))
    run_extract(tiny_config(tmp_path, "b.zarr", views=views, limit=16, weights="random", num_workers=1))
    a = FeatureStore.open(tmp_path / "a.zarr")
    assert a.views == views and a.verify() == []
    clean, noise, flip = (a.read("tokens", 0, 16, view=v) for v in views)
    assert cosine(clean, noise) < 0.95  # a real perturbation of these tokens
    assert not np.array_equal(clean, flip)
    # the same bytes on a second run in another process layout
    assert store_bytes(tmp_path / "a.zarr") == store_bytes(tmp_path / "b.zarr")
    assert a.fingerprint["noise_sigma"] == 0.2


def test_noise_view_is_clipped_gaussian_seeded_by_image():
    x = torch.zeros(3, 32, 32)
    n1 = make_view(x, "noise", "img-1")
    assert torch.equal(n1, make_view(x, "noise", "img-1"))
    assert not torch.equal(n1, make_view(x, "noise", "img-2"))
    assert float(n1.abs().max()) <= 0.25 + 1e-7
    assert 0.15 < float(n1.std()) < 0.2  # sigma 0.2 before clipping at +-0.25
    assert torch.equal(make_view(torch.arange(4.0).reshape(1, 1, 4), "hflip", "i"),
                       torch.tensor([[[3.0, 2.0, 1.0, 0.0]]]))


def test_sigkill_mid_run_then_resume_gives_identical_bytes(tmp_path):
    args = ["--dataset", "digits", "--backbone", "test_efficientnet", "--weights", "random", "--limit", "160",
            "--shard-size", "16", "--batch-size", "8", "--threads", "1", "--num-workers", "0", "--no-progress"]
    cmd = [sys.executable, "-m", "protocache.cli.main", "extract", *args]
    run_extract(ExtractConfig(dataset="digits", backbone="test_efficientnet", weights="random", limit=160,
                              shard_size=16, batch_size=8, threads=1, num_workers=0, progress=False,
                              out=str(tmp_path / "clean.zarr")))
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "meta").glob("part-*.parquet")) if (out / "meta").exists()
                                         else []) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = FeatureStore.open(out)
    done = partial.written_shards(refresh=True)
    assert 3 <= len(done) < 10, "the kill should land mid-run"
    assert partial.verify() == [f"missing shards: {partial.missing_shards()}"]  # what is there is sound
    resumed = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} of 10 shards already written" in resumed.stderr
    assert store_bytes(out) == store_bytes(tmp_path / "clean.zarr")
    assert pq.read_table(out / "meta").sort_by("row").equals(pq.read_table(tmp_path / "clean.zarr" / "meta").sort_by("row"))
    assert not list(out.rglob("*.partial")) and not list(out.rglob(".part-*"))  # no leftovers of the killed writes


def test_local_dask_cluster_matches_single_process(tmp_path):
    single = tiny_config(tmp_path, "single.zarr", limit=48, threads=1)
    run_extract(single)
    dist = tiny_config(tmp_path, "dist.zarr", limit=48, threads=1)
    result = run_extract_distributed(dist, workers=2)
    assert result.shards_written_now == 3 and result.images_written_now == 48
    a, b = FeatureStore.open(single.out), FeatureStore.open(dist.out)
    assert b.verify() == [] and a.layout == b.layout and a.fingerprint == b.fingerprint
    assert a.metadata().equals(b.metadata())
    ta, tb = a.read("tokens", 0, 48).astype(np.float32), b.read("tokens", 0, 48).astype(np.float32)
    np.testing.assert_allclose(ta, tb, rtol=2e-3, atol=2e-3)  # within float16 rounding
    assert store_bytes(Path(single.out)) == store_bytes(Path(dist.out))  # same pinned thread count: same bytes
    again = run_extract_distributed(dist, workers=2)
    assert again.nothing_to_do


def test_store_at_an_fsspec_url(tmp_path):
    """Object storage goes through fsspec; the in-memory filesystem is a real fsspec backend."""
    import fsspec

    url = "memory://protocache-test/digits.zarr"
    fsspec.filesystem("memory").rm("/protocache-test", recursive=True) if fsspec.filesystem("memory").exists(
        "/protocache-test") else None
    run_extract(tiny_config(tmp_path, limit=20, out=url))
    run_extract(tiny_config(tmp_path, "local.zarr", limit=20))
    remote, local = FeatureStore.open(url), FeatureStore.open(tmp_path / "local.zarr")
    assert not remote.is_local and remote.verify() == [] and remote.bytes_on_disk() > 0
    assert np.array_equal(remote.read("tokens", 0, 20), local.read("tokens", 0, 20))
    assert remote.metadata().equals(local.metadata())
    assert run_extract(tiny_config(tmp_path, limit=20, out=url)).nothing_to_do
    url_local = FeatureStore.open(f"file://{tmp_path / 'local.zarr'}")
    assert url_local.is_local and url_local.verify() == []
