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

from protocache.pipeline.extract import ExtractConfig, run_extract, run_extract_distributed
from protocache.pipeline.transforms import make_view
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


def test_views_are_seeded_by_image():
    # (the noise's size and clipping in pixel space are pinned in test_extract.py)
    x = torch.zeros(3, 32, 32)
    n1 = make_view(x, "noise", "img-1")
    assert torch.equal(n1, make_view(x, "noise", "img-1"))
    assert not torch.equal(n1, make_view(x, "noise", "img-2"))
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


def make_folder_tree(root: Path, per_class: int = 6) -> list[Path]:
    """root/{train,test}/{a,b}/NN.jpg with small real JPEGs; returns the files in manifest order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for split in ("test", "train"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, size=(20 + i, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i:02d}.jpg", quality=90)
                files.append(d / f"{i:02d}.jpg")
    return files


def test_bad_images_stop_the_run_or_are_recorded(tmp_path):
    root = tmp_path / "tree"
    make_folder_tree(root)
    good = run_extract(tiny_config(tmp_path, "good.zarr", dataset="folder", root=str(root), limit=None, shard_size=8))
    assert good.shards_total == 3
    # Corrupt one image in the second shard: a truncated JPEG.
    meta = FeatureStore.open(tmp_path / "good.zarr").metadata()
    bad_row = 11
    bad_path = Path(meta.column("path")[bad_row].as_py())
    bad_path.write_bytes(bad_path.read_bytes()[:200])
    with pytest.raises(Exception) as err:
        run_extract(tiny_config(tmp_path, "stop.zarr", dataset="folder", root=str(root), limit=None, shard_size=8))
    assert str(bad_path) in str(err.value) and "--on-bad-image skip" in str(err.value)
    stopped = FeatureStore.open(tmp_path / "stop.zarr")
    assert stopped.written_shards() == [0] and stopped.verify() == ["missing shards: [1, 2]"]

    run_extract(tiny_config(tmp_path, "skip.zarr", dataset="folder", root=str(root), limit=None, shard_size=8,
                            on_bad_image="skip"))
    skip, ref = FeatureStore.open(tmp_path / "skip.zarr"), FeatureStore.open(tmp_path / "good.zarr")
    table = skip.metadata()
    assert table.column("ok").to_pylist() == [i != bad_row for i in range(24)]
    assert "truncated" in table.column("reason")[bad_row].as_py().lower() or table.column("reason")[bad_row].as_py()
    others = [i for i in range(24) if i != bad_row]
    assert np.array_equal(skip.read_rows("tokens", others), ref.read_rows("tokens", others))  # nothing shifted
    assert not skip.read("tokens", bad_row, bad_row + 1).any()
    assert bad_row not in skip.split_rows(table.column("split")[bad_row].as_py())
    assert table.column("image_id").to_pylist() == ref.metadata().column("image_id").to_pylist()

    # A file that is not an image at all, through the command line: one clear line, no traceback.
    bad_path.write_text("not an image")
    r = subprocess.run([sys.executable, "-m", "protocache.cli.main", "extract", "--dataset", "folder", "--root",
                        str(root), "--backbone", "test_efficientnet", "--weights", "random", "--out",
                        str(tmp_path / "cli.zarr"), "--no-progress", "--num-workers", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and str(bad_path) in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cub", "--root", "/nonexistent/birds"], "/nonexistent/birds"),
    (["--dataset", "cub"], "--root"),
    (["--dataset", "imagenet", "--root", "."], "image-net.org"),
])
def test_dataset_root_errors_are_clear(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "protocache.cli.main", "extract", *args, "--out",
                        str(tmp_path / "x.zarr")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
