"""The fast shard reader and the batch iterator on it: real Zarr stores on tmp_path, compared with zarr's own reads."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import google_crc32c
import numpy as np
import pytest

from protocache.stores import FeatureStore, MissingShardError, StoreLayout
from protocache.stores import batches
from protocache.stores.layout import array_path, array_paths
from protocache.stores.shard_reader import ShardReader, crc32c
from protocache.stores.shards import CorruptShardError

N, GRID, D, S, C = 21, (2, 3), 4, 8, 4  # 3 shards (8, 8, 5 images), 2 inner chunks each, the last one partial
VIEWS = ("clean", "noise")
CODECS = ("none", "zstd:1", "blosc:lz4:5")


def rows_of(start, stop):
    return [{"row": i, "image_id": f"img{i}", "path": "", "label": i % 3, "class_name": f"c{i % 3}",
             "split": "test" if i % 4 == 0 else "train", "width": 1, "height": 1} for i in range(start, stop)]


def make_store(path, compression="none", checksum="crc32c"):
    """Sparse ReLU-like tokens (mostly exact zeros, as a CNN's), every array and view written."""
    layout = StoreLayout(num_images=N, grid=GRID, dim=D, num_logits=5, shard_size=S, chunk_size=C, views=VIEWS,
                         compression=compression, checksum=checksum)
    store = FeatureStore.create_or_open(path, layout, {"dataset": "toy"})
    rng = np.random.default_rng(0)
    for shard in range(layout.num_shards):
        start, stop = layout.shard_bounds(shard)
        arrays = {}
        for k, view in enumerate(VIEWS):
            tokens = np.clip(rng.standard_normal((stop - start, 6, D)) - 1.0, 0, 6) + 10 * k
            tokens[:, 0, 0] = np.arange(start, stop)  # each row names itself
            arrays[view] = {"tokens": tokens, "pooled": tokens.mean(1), "logits": rng.standard_normal((stop - start, 5))}
        store.write_shard(shard, arrays, rows_of(start, stop))
    return FeatureStore.open(path)


def zarr_shard(store, name, shard):
    start, stop = store.layout.shard_bounds(shard)
    return store.group[name][start:stop]


def reference_batches(store, split, batch_size, fields, view="clean", shuffle=False, seed=0, shards_in_memory=2,
                      drop_last=False):
    """The batches of the zarr path: windows of whole shards (shard order permuted by `seed`), rows
    permuted within each window, batches cut from that stream across windows; arrays read by zarr."""
    wanted = store.split_rows(split)
    by_shard: dict[int, list[int]] = {}
    for r in wanted.tolist():
        by_shard.setdefault(r // store.layout.shard_size, []).append(r)
    order = sorted(by_shard)
    rng = np.random.default_rng(seed)
    if shuffle:
        order = [order[i] for i in rng.permutation(len(order))]
    windows = [order[w:w + shards_in_memory] for w in range(0, len(order), shards_in_memory)]
    perms = [rng.permutation(sum(len(by_shard[s]) for s in win)) if shuffle else None for win in windows]
    stream = np.concatenate([np.concatenate([by_shard[s] for s in win])[perm if shuffle else slice(None)]
                             for win, perm in zip(windows, perms)]).astype(np.int64)
    whole = {f: store.group[array_path(f, view)][:] for f in fields if f in ("tokens", "pooled", "logits")}
    labels = store.labels()
    out = []
    for b in range(0, len(stream), batch_size):
        rows = stream[b:b + batch_size]
        if len(rows) < batch_size and drop_last:
            break
        out.append({f: whole[f][rows] if f in whole else labels[rows] if f == "label" else rows for f in fields})
    return out


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert list(g) == list(e)
        for f in e:
            assert g[f].dtype == e[f].dtype and g[f].shape == e[f].shape, f
            assert g[f].tobytes() == e[f].tobytes(), f


@pytest.mark.parametrize("compression", CODECS)
def test_fast_reader_reads_what_zarr_reads(tmp_path, compression):
    store = make_store(tmp_path / "s.zarr", compression)
    for name in array_paths(store.layout):
        reader = ShardReader.for_array(store, name)
        assert reader is not None and reader.checksummed
        assert (reader.decompress is None) == (compression == "none")
        for shard in range(store.layout.num_shards):
            got, expected = reader.read(shard), zarr_shard(store, name, shard)
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), (name, shard)


def test_chunk_checksums_are_zarrs_crc32c(tmp_path):
    """zarr's crc32c codec appends the little-endian CRC-32C of the chunk's bytes; so does what we compare."""
    make_store(tmp_path / "s.zarr")
    data = (tmp_path / "s.zarr" / "tokens" / "c" / "1" / "0" / "0").read_bytes()
    chunk = np.frombuffer(data[:C * 6 * D * 2], dtype=np.uint8)  # inner chunk 0: 4 images x 6 tokens x 4 float16
    stored = int(np.frombuffer(data[C * 6 * D * 2:C * 6 * D * 2 + 4], dtype="<u4")[0])
    assert crc32c(chunk) == google_crc32c.value(chunk.tobytes()) == stored
    assert crc32c(np.frombuffer(b"123456789", dtype=np.uint8)) == 0xE3069283  # the CRC-32C check value


def test_a_store_without_checksums_is_read_raw_or_through_zarr(tmp_path):
    raw = make_store(tmp_path / "raw.zarr", checksum=None)
    reader = ShardReader.for_array(raw, "tokens")
    assert reader is not None and not reader.checksummed  # parsed without CRCs: each chunk's length is exact
    assert reader.read(2).tobytes() == zarr_shard(raw, "tokens", 2).tobytes()
    packed = make_store(tmp_path / "zstd.zarr", "zstd:1", checksum=None)
    assert ShardReader.for_array(packed, "tokens") is None  # compressed without a checksum: zarr decodes it
    got = list(packed.iter_batches(None, 5, fields=("tokens", "row"), shuffle=True, seed=1))
    assert_same_batches(got, reference_batches(packed, None, 5, ("tokens", "row"), shuffle=True, seed=1))


@pytest.mark.parametrize("compression", ("none", "zstd:1"))
def test_a_changed_byte_names_shard_and_chunk_as_zarrs_read_does(tmp_path, compression):
    store = make_store(tmp_path / "s.zarr", compression)
    path = tmp_path / "s.zarr" / "tokens" / "c" / "1" / "0" / "0"
    data = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(data[-(16 * 2 + 4):-4]), dtype="<u8").reshape(2, 2)
    data[int(index[1, 0]) + 5] ^= 0xFF  # a byte inside inner chunk 1 of shard 1 = rows 12..15
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError) as through_zarr:
        store.read("tokens", 8, 16)
    with pytest.raises(CorruptShardError) as fast:
        list(store.iter_batches(None, 4, fields=("tokens",)))
    assert str(fast.value) == str(through_zarr.value)
    assert "shard 1: tokens inner chunk 1 (rows 12..15): checksum mismatch" in str(fast.value)
    assert "--repair" in str(fast.value)
    reader = ShardReader.for_array(store, "tokens")
    assert reader.read(0).tobytes() == zarr_shard(store, "tokens", 0).tobytes()  # the other shards still read
    with pytest.raises(CorruptShardError, match="inner chunk 1"):
        reader.read(1)


@pytest.mark.parametrize("key, cut, what", [
    ("tokens/c/2/0/0", lambda b: b[:len(b) // 2], "tokens (rows 16..20): shard index fails its checksum"),
    ("tokens/c/2/0/0", lambda b: b[:20], "tokens (rows 16..20): shard file is 20 bytes, shorter than its own index"),
    ("pooled/c/2/0", lambda b: b[:-3], "pooled (rows 16..20): checksum mismatch"),
])
def test_a_truncated_shard_file_is_one_clear_error(tmp_path, key, cut, what):
    store = make_store(tmp_path / "s.zarr")
    path = tmp_path / "s.zarr" / key
    path.write_bytes(cut(path.read_bytes()))
    with pytest.raises(CorruptShardError, match=r"s\.zarr is damaged: shard 2: ") as err:
        list(store.iter_batches(None, 4, fields=("tokens", "pooled")))
    assert what in str(err.value)


def test_missing_and_empty_shard_files_are_missing(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    (tmp_path / "s.zarr" / "tokens" / "c" / "1" / "0" / "0").unlink()  # gone after the store was opened
    with pytest.raises(MissingShardError, match=r"shard 1 \(rows 8\.\.15\) is not written"):
        ShardReader.for_array(store, "tokens").read(1)
    (tmp_path / "s.zarr" / "pooled" / "c" / "2" / "0").write_bytes(b"")
    with pytest.raises(MissingShardError, match=r"shard 2 \(rows 16\.\."):
        ShardReader.for_array(store, "pooled").read(2)
    with pytest.raises(MissingShardError):
        list(FeatureStore.open(tmp_path / "s.zarr").iter_batches(None, 4, fields=("tokens",)))


@pytest.mark.parametrize("compression", ("none", "zstd:1"))
def test_iter_batches_are_the_zarr_paths_batches_byte_for_byte(tmp_path, compression):
    store = make_store(tmp_path / "s.zarr", compression)
    cases = [
        dict(split="train", batch_size=5, fields=("tokens", "label", "row"), shuffle=True, seed=3),
        dict(split="train", batch_size=3, fields=("tokens", "pooled", "logits"), shuffle=False, shards_in_memory=1),
        dict(split="test", batch_size=2, fields=("row", "tokens"), shuffle=True, seed=0, view="noise"),
        dict(split=None, batch_size=4, fields=("pooled", "label"), shuffle=True, seed=7, shards_in_memory=3,
             drop_last=True),
        dict(split=None, batch_size=100, fields=("tokens", "logits", "row"), view="noise"),
    ]
    for case in cases:
        expected = reference_batches(store, **case)
        for prefetch in (True, False):
            got = list(store.iter_batches(**case, prefetch=prefetch))
            assert_same_batches(got, expected)
    subset = store.with_splits(["a" if i in (1, 2, 9, 17, 20) else "b" for i in range(N)])  # a split of bits of shards
    assert_same_batches(list(subset.iter_batches("a", 2, fields=("tokens", "row"), shuffle=True, seed=5)),
                        reference_batches(subset, "a", 2, ("tokens", "row"), shuffle=True, seed=5))
    torch_batch = next(store.iter_batches("train", 3, fields=("tokens", "label"), as_torch=True))
    assert torch_batch["tokens"].numpy().tobytes() == reference_batches(store, "train", 3, ("tokens",))[0]["tokens"].tobytes()


def test_a_store_on_object_storage_streams_the_same_batches_through_zarr(tmp_path):
    local = make_store(tmp_path / "s.zarr", "zstd:1")
    remote = make_store("memory://protocache-test-reader/s.zarr", "zstd:1")
    assert ShardReader.for_array(remote, "tokens") is None
    args = dict(split="train", batch_size=5, fields=("tokens", "pooled", "row"), shuffle=True, seed=2)
    assert_same_batches(list(remote.iter_batches(**args)), list(local.iter_batches(**args)))


def test_each_shard_is_read_once_into_two_windows_at_most(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s.zarr")
    reads, slots = [], set()
    original = batches.read_shards

    def counting(jobs):
        reads.append(sorted({shard for _, shard, _ in jobs}))
        slots.update(id(out.base) for _, _, out in jobs)  # the slot array each window is read into
        return original(jobs)

    monkeypatch.setattr(batches, "read_shards", counting)
    for _ in store.iter_batches(None, batch_size=100, fields=("tokens",), shards_in_memory=1):
        pass
    assert reads == [[0], [1], [2]] and len(slots) <= 2  # one whole shard per read, each once, two slots reused
    reads.clear()
    for _ in store.iter_batches(None, batch_size=100, fields=("tokens",), shards_in_memory=2):
        pass
    assert reads == [[0, 1], [2]]


def test_stopping_early_ends_the_prefetch_thread(tmp_path):
    store = make_store(tmp_path / "s.zarr")

    def producers():
        return [t for t in threading.enumerate() if t.name == batches.PREFETCH_THREAD and t.is_alive()]

    stream = store.iter_batches(None, batch_size=2, fields=("tokens",), shards_in_memory=1)
    next(stream)
    assert len(producers()) == 1
    time.sleep(0.2)  # by now the producer has filled the second slot and waits for a free one
    closing = threading.Thread(target=stream.close, daemon=True)  # a producer left waiting would hang close()
    closing.start()
    closing.join(timeout=10)
    assert not closing.is_alive()
    deadline = time.monotonic() + 10
    while producers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert producers() == []


def test_read_ahead_brings_a_whole_cold_file_into_the_page_cache(tmp_path):
    """One WILLNEED call reads ahead only one readahead step (Linux clamps it): a cold shard of many
    steps must be read ahead step by step, so it streams at the disk's rate."""
    import os

    from protocache.pipeline.bench_disk import drop_page_cache, resident_fraction
    from protocache.stores.shard_reader import _readahead_step, read_ahead

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    path = tmp_path / "shard"
    step = _readahead_step(os.stat(tmp_path).st_dev)
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 3 * step + 4096, dtype=np.uint8).tobytes())
    drop_page_cache([str(path)])
    if (resident_fraction([str(path)]) or 0) > 0.01:
        pytest.skip("the page cache cannot be dropped here (tmpfs?)")
    fd = os.open(path, os.O_RDONLY)
    try:
        read_ahead(fd, 0, os.fstat(fd).st_size)
        deadline = time.monotonic() + 10
        while resident_fraction([str(path)]) < 1.0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert resident_fraction([str(path)]) == 1.0
        read_ahead(fd, 0, os.fstat(fd).st_size)  # a cached file: nothing left to ask for, no error
    finally:
        os.close(fd)
