"""The feature store on its own: real Zarr v3 + Parquet on tmp_path, no backbone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from protocache.stores import FeatureStore, FingerprintMismatch, MissingShardError, StoreLayout, StoreNotFound
from protocache.stores.layout import default_shard_size

N, GRID, D, S = 21, (2, 3), 4, 8  # 3 shards: 8, 8, 5 images


def make_rows(start, stop):
    return [{"row": i, "image_id": f"img{i}", "path": f"/data/{i}.png", "label": i % 3,
             "class_name": f"c{i % 3}", "split": "test" if i % 4 == 0 else "train", "width": 10, "height": 12}
            for i in range(start, stop)]


def make_arrays(layout, shard, views=("clean",)):
    start, stop = layout.shard_bounds(shard)
    n = stop - start
    base = np.arange(start, stop, dtype=np.float32)
    out = {}
    for k, v in enumerate(views):
        tokens = base[:, None, None] + np.linspace(0, 0.5, layout.num_tokens * layout.dim).reshape(
            1, layout.num_tokens, layout.dim) + 100 * k
        out[v] = {"tokens": tokens, "pooled": tokens.mean(1), "logits": np.tile(base[:, None], (1, 5))}
    return out


@pytest.fixture
def layout():
    return StoreLayout(num_images=N, grid=GRID, dim=D, num_logits=5, shard_size=S, chunk_size=4)


@pytest.fixture
def fingerprint():
    return {"dataset": "toy", "manifest_sha256": "abc", "backbone": "none", "weights_sha256": "0"}


def full_store(path, layout, fingerprint, views=("clean",)):
    store = FeatureStore.create_or_open(path, layout, fingerprint)
    for shard in range(layout.num_shards):
        start, stop = layout.shard_bounds(shard)
        store.write_shard(shard, make_arrays(layout, shard, views), make_rows(start, stop))
    return store


def test_layout_opens_with_plain_zarr_and_pyarrow(tmp_path, layout, fingerprint):
    full_store(tmp_path / "s.zarr", layout, fingerprint)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert group.metadata.zarr_format == 3
    tokens = group["tokens"]
    assert tokens.shape == (N, 6, D) and tokens.dtype == np.float16
    assert tokens.shards == (S, 6, D) and tokens.chunks == (4, 6, D)
    codecs = json.loads((tmp_path / "s.zarr" / "tokens" / "zarr.json").read_text())["codecs"]
    assert codecs[0]["name"] == "sharding_indexed"
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "meta").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(tmp_path / "s.zarr" / "meta" / "part-00002.parquet")
    assert table.column("row").to_pylist() == list(range(16, 21))
    assert np.allclose(tokens[16:21, 0, 0], np.arange(16, 21))


def test_fingerprint_mismatch_names_fields(tmp_path, layout, fingerprint):
    full_store(tmp_path / "s.zarr", layout, fingerprint)
    other = {**fingerprint, "backbone": "vit", "weights_sha256": "1"}
    with pytest.raises(FingerprintMismatch) as err:
        FeatureStore.create_or_open(tmp_path / "s.zarr", layout, other)
    assert "backbone" in str(err.value) and "weights_sha256" in str(err.value)
    assert "dataset" not in str(err.value).split("fields that differ")[1]
    # Same inputs but another shard size is refused too, and the data is untouched.
    with pytest.raises(FingerprintMismatch, match="shard_size"):
        FeatureStore.create_or_open(tmp_path / "s.zarr", StoreLayout(N, GRID, D, 5, 16, 4), fingerprint)
    assert FeatureStore.open(tmp_path / "s.zarr").verify() == []


def test_missing_shard_raises_instead_of_fill_value(tmp_path, layout, fingerprint):
    store = full_store(tmp_path / "s.zarr", layout, fingerprint)
    shutil.rmtree(tmp_path / "s.zarr" / "tokens" / "c" / "1")
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.missing_shards() == [1]
    assert np.allclose(store.read("tokens", 0, 8)[:, 0, 0], np.arange(8))
    with pytest.raises(MissingShardError, match=r"shard\(s\) \[1\]"):
        store.read("tokens", 7, 9)
    with pytest.raises(MissingShardError):
        list(store.iter_batches(split=None, batch_size=4))
    with pytest.raises(MissingShardError):
        store.tokens_dask()
    assert any("missing shards: [1]" in p for p in store.verify())


def test_shard_without_metadata_part_is_not_written(tmp_path, layout, fingerprint):
    store = full_store(tmp_path / "s.zarr", layout, fingerprint)
    (tmp_path / "s.zarr" / "meta" / "part-00002.parquet").unlink()
    assert FeatureStore.open(tmp_path / "s.zarr").missing_shards() == [2]


def test_verify_finds_nan(tmp_path, layout, fingerprint):
    store = full_store(tmp_path / "s.zarr", layout, fingerprint)
    arrays = make_arrays(layout, 0)
    arrays["clean"]["tokens"][3, 1, 2] = np.nan
    store.write_shard(0, arrays, make_rows(0, 8))
    problems = FeatureStore.open(tmp_path / "s.zarr").verify()
    assert problems == ["shard 0: tokens has NaN or Inf values"]


def test_readers(tmp_path, layout, fingerprint):
    store = full_store(tmp_path / "s.zarr", layout, fingerprint, views=("clean",))
    store = FeatureStore.open(tmp_path / "s.zarr")
    # dask: one chunk per shard, same values as zarr
    arr = store.tokens_dask()
    assert arr.chunks[0] == (8, 8, 5)
    assert np.array_equal(arr.compute(), store.array("tokens")[:])
    # random access by image id
    item = store.get("img13")
    assert item["label"] == 13 % 3 and item["row"] == 13
    assert np.allclose(item["tokens"][0, 0], 13)
    # batches: each train row exactly once, labels aligned with tokens
    train = store.split_rows("train")
    seen = []
    for batch in store.iter_batches("train", batch_size=5, fields=("tokens", "label", "row"), shuffle=True, seed=3):
        assert len(batch["row"]) <= 5
        assert np.allclose(batch["tokens"][:, 0, 0], batch["row"])
        assert np.array_equal(batch["label"], batch["row"] % 3)
        seen.extend(batch["row"].tolist())
    assert sorted(seen) == train.tolist()
    again = [b["row"].tolist() for b in store.iter_batches("train", 5, fields=("row",), shuffle=True, seed=3)]
    other = [b["row"].tolist() for b in store.iter_batches("train", 5, fields=("row",), shuffle=True, seed=4)]
    assert sum(again, []) == seen and sum(other, []) != seen
    ordered = sum((b["row"].tolist() for b in store.iter_batches("test", 2, fields=("row",))), [])
    assert ordered == store.split_rows("test").tolist() == [0, 4, 8, 12, 16, 20]
    torch_batch = next(store.iter_batches("test", 3, fields=("tokens", "label"), as_torch=True))
    assert tuple(torch_batch["tokens"].shape) == (3, 6, D)


def test_iter_batches_holds_a_bounded_number_of_shards(tmp_path, layout, fingerprint, monkeypatch):
    store = full_store(tmp_path / "s.zarr", layout, fingerprint)
    reads = []
    original = FeatureStore.read

    def counting_read(self, name, start, stop, view="clean"):
        reads.append((start, stop))
        return original(self, name, start, stop, view)

    monkeypatch.setattr(FeatureStore, "read", counting_read)
    for _ in store.iter_batches(None, batch_size=100, fields=("tokens",), shards_in_memory=1):
        pass
    assert reads == [(0, 8), (8, 16), (16, 21)]  # one whole shard per read, each once


def test_views_live_beside_clean(tmp_path, fingerprint):
    layout = StoreLayout(num_images=10, grid=GRID, dim=D, num_logits=0, shard_size=8, chunk_size=4,
                         views=("clean", "noise"))
    store = full_store(tmp_path / "s.zarr", layout, fingerprint, views=("clean", "noise"))
    assert np.allclose(store.read("tokens", 0, 2, view="noise") - store.read("tokens", 0, 2), 100)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert group["views/noise/tokens"].shape == (10, 6, D)
    assert "logits" not in group


def test_open_errors(tmp_path):
    with pytest.raises(StoreNotFound, match="no feature store"):
        FeatureStore.open(tmp_path / "nope.zarr")


def test_default_shard_size_targets_about_150_mb():
    s = default_shard_size(49, 1280)
    assert s % 8 == 0 and 100e6 < s * 49 * 1280 * 2 < 200e6


def test_stores_import_no_torch():
    import subprocess
    import sys

    code = "import sys, protocache.stores, protocache.stores.runs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
