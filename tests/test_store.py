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
    with pytest.raises(MissingShardError, match=r"shard 1 \(rows 8\.\.15\) is not written"):
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
    assert problems == ["shard 0: tokens: NaN or Inf values in 1 row(s): 3"]


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


# ---------------------------------------------------------------------------- checksums and damage
def shard_index(path):
    """(offset, length) of each inner chunk of a sharded array's file: the zarr v3 sharding index at the
    file's end, n pairs of little-endian uint64 followed by the index's own 4-byte CRC-32C."""
    data = path.read_bytes()
    n = 2  # shard 8 / chunk 4
    return np.frombuffer(data[-(16 * n + 4):-4], dtype="<u8").reshape(n, 2).tolist()


def test_every_array_carries_a_crc32c_per_chunk(tmp_path, layout, fingerprint):
    full_store(tmp_path / "s.zarr", layout, fingerprint)
    tokens = json.loads((tmp_path / "s.zarr" / "tokens" / "zarr.json").read_text())["codecs"][0]["configuration"]
    assert [c["name"] for c in tokens["codecs"]] == ["bytes", "crc32c"]  # inside the shard, per inner chunk
    for name in ("pooled", "logits"):
        codecs = json.loads((tmp_path / "s.zarr" / name / "zarr.json").read_text())["codecs"]
        assert [c["name"] for c in codecs] == ["bytes", "crc32c"]
    attrs = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]["protocache"]
    assert attrs["layout"]["checksum"] == "crc32c"
    # Each inner chunk of 4 images x 6 tokens x 4 dims float16 = 192 bytes + its 4-byte checksum.
    assert shard_index(tmp_path / "s.zarr" / "tokens" / "c" / "1" / "0" / "0") == [[0, 196], [196, 196]]


def test_a_changed_byte_names_shard_and_chunk_on_read_and_verify(tmp_path, layout, fingerprint):
    from protocache.stores.shards import CorruptShardError, damaged_shards

    full_store(tmp_path / "s.zarr", layout, fingerprint)
    path = tmp_path / "s.zarr" / "tokens" / "c" / "1" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[196 + 50] ^= 0xFF  # a byte inside inner chunk 1 of shard 1 = rows 12..15
    path.write_bytes(bytes(data))
    store = FeatureStore.open(tmp_path / "s.zarr")
    expected = "shard 1: tokens inner chunk 1 (rows 12..15): checksum mismatch"
    problems = store.verify()
    assert len(problems) == 1 and problems[0].startswith(expected)
    with pytest.raises(CorruptShardError, match=r"shard 1: tokens inner chunk 1 \(rows 12\.\.15\).*--repair"):
        store.read("tokens", 8, 16)
    with pytest.raises(CorruptShardError, match="shard 1"):
        list(store.iter_batches(None, batch_size=4, fields=("tokens",)))
    assert np.allclose(store.read("tokens", 8, 12)[:, 0, 0], np.arange(8, 12))  # chunk 0 is still sound
    assert np.allclose(store.read("tokens", 16, 21)[:, 0, 0], np.arange(16, 21))
    assert damaged_shards(store, full=False) == {}  # the quick check reads only the index
    assert list(damaged_shards(store, full=True)) == [1]


@pytest.mark.parametrize("damage, what", [
    (lambda b: bytes(len(b)), "shard index fails its checksum"),  # zeros over the whole file
    (lambda b: b[:len(b) // 2], "shard index fails its checksum"),  # truncated
    (lambda b: b[:20], "shorter than its own index"),
])
def test_overwritten_or_truncated_shard_files_fail_the_quick_check(tmp_path, layout, fingerprint, damage, what):
    from protocache.stores.shards import CorruptShardError, damaged_shards, discard_shard

    full_store(tmp_path / "s.zarr", layout, fingerprint)
    path = tmp_path / "s.zarr" / "tokens" / "c" / "2" / "0" / "0"
    path.write_bytes(damage(path.read_bytes()))
    store = FeatureStore.open(tmp_path / "s.zarr")
    problems = store.verify()
    assert len(problems) == 1 and problems[0].startswith("shard 2: tokens (rows 16..20): ") and what in problems[0]
    found = damaged_shards(store, full=False)
    assert list(found) == [2] and what in str(found[2][0])
    with pytest.raises(CorruptShardError, match="shard 2"):
        store.read("tokens", 16, 21)
    discard_shard(store, 2)  # what extract does before rewriting it
    assert FeatureStore.open(tmp_path / "s.zarr").missing_shards() == [2]


def test_an_empty_shard_file_is_missing_not_zeros(tmp_path, layout, fingerprint):
    full_store(tmp_path / "s.zarr", layout, fingerprint)
    (tmp_path / "s.zarr" / "pooled" / "c" / "0" / "0").write_bytes(b"")  # zarr alone would read zeros
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.missing_shards() == [0]
    assert store.verify() == ["missing shards: [0]", "shard 0: pooled/c/0/0 is an empty file"]
    with pytest.raises(MissingShardError):
        store.read("pooled", 0, 8)


def test_small_arrays_are_checked_whole(tmp_path, layout, fingerprint):
    from protocache.stores.shards import damaged_shards

    full_store(tmp_path / "s.zarr", layout, fingerprint)
    path = tmp_path / "s.zarr" / "logits" / "c" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[3] ^= 1
    path.write_bytes(bytes(data))
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.verify() == ["shard 0: logits (rows 0..7): checksum mismatch (its bytes changed on disk)"]
    assert list(damaged_shards(store, full=False)) == [0]  # pooled/logits are small: checked even by the quick pass


def test_a_store_written_before_checksums_still_opens_reads_and_resumes(tmp_path, layout, fingerprint):
    from dataclasses import replace

    old = replace(layout, checksum=None)
    store = FeatureStore.create_or_open(tmp_path / "s.zarr", old, fingerprint)
    store.write_shard(0, make_arrays(old, 0), make_rows(0, 8))
    # What such a store has on disk: no checksum key in its layout, no crc32c in its arrays' codecs.
    group = zarr.open_group(tmp_path / "s.zarr", mode="r+")
    attrs = dict(group.attrs["protocache"])
    attrs["layout"] = {k: v for k, v in attrs["layout"].items() if k != "checksum"}
    group.attrs["protocache"] = attrs
    codecs = json.loads((tmp_path / "s.zarr" / "tokens" / "zarr.json").read_text())["codecs"][0]["configuration"]
    assert [c["name"] for c in codecs["codecs"]] == ["bytes"]
    reopened = FeatureStore.open(tmp_path / "s.zarr")
    assert reopened.layout.checksum is None and reopened.layout != layout
    assert np.allclose(reopened.read("tokens", 0, 8)[:, 0, 0], np.arange(8))
    # Resumed with today's layout: accepted, and the new shards are written with the store's own codecs.
    resumed = FeatureStore.create_or_open(tmp_path / "s.zarr", layout, fingerprint)
    for shard in (1, 2):
        start, stop = layout.shard_bounds(shard)
        resumed.write_shard(shard, make_arrays(layout, shard), make_rows(start, stop))
    again = FeatureStore.open(tmp_path / "s.zarr")
    assert again.verify() == [] and again.layout.checksum is None
    assert np.allclose(again.read("tokens", 0, 21)[:, 0, 0], np.arange(21))
    # Its shard index still has its own checksum: zeros over a shard file are still caught.
    path = tmp_path / "s.zarr" / "tokens" / "c" / "1" / "0" / "0"
    path.write_bytes(bytes(path.stat().st_size))
    assert "shard index fails its checksum" in FeatureStore.open(tmp_path / "s.zarr").verify()[0]


def test_a_shard_of_zeros_is_written_not_skipped(tmp_path, layout, fingerprint):
    # zarr skips chunks equal to the fill value unless told otherwise; a shard of bad images (all
    # zeros) must still be on disk, or it would count as missing forever.
    store = FeatureStore.create_or_open(tmp_path / "s.zarr", layout, fingerprint)
    arrays = {"clean": {k: np.zeros_like(v) for k, v in make_arrays(layout, 0)["clean"].items()}}
    store.write_shard(0, arrays, make_rows(0, 8))
    reopened = FeatureStore.open(tmp_path / "s.zarr")
    assert reopened.written_shards() == [0]
    assert shard_index(tmp_path / "s.zarr" / "tokens" / "c" / "0" / "0" / "0") == [[0, 196], [196, 196]]
    assert not reopened.read("tokens", 0, 8).any()
