"""Compressed tokens: `--compression auto|none|zstd[:level]|blosc[:cname[:level]]`.

Two stores of the same 32 digits through the real extractor and the real tf_efficientnet_lite0
(2 shards of 16 images, inner chunks of 8): one with `auto` (the default), one uncompressed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from fit_helpers import quick_fit
from protocache.cli.main import main
from protocache.pipeline.extract import ExtractConfig, run_extract
from protocache.stores import FeatureStore, StoreLayout
from protocache.stores.errors import ProtocacheError
from protocache.stores.layout import choose_compression, parse_compression

IMAGES = 32


def lite0(out, **kw) -> ExtractConfig:
    return ExtractConfig(**{"dataset": "digits", "limit": IMAGES, "shard_size": 16, "batch_size": 16,
                            "num_workers": 0, "threads": 1, "progress": False, "out": str(out), **kw})


def files(path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {name: group[name][:] for name in ("tokens", "pooled", "logits")}


def chunk_index(shard_file, chunks: int = 2) -> np.ndarray:
    """(offset, length) per inner chunk, from the sharding index at the file's end (then its CRC-32C)."""
    data = shard_file.read_bytes()
    return np.frombuffer(data[-(16 * chunks + 4):-4], dtype="<u8").reshape(chunks, 2)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compression")
    run_extract(lite0(tmp / "auto.zarr"))  # compression="auto" is the default
    run_extract(lite0(tmp / "raw.zarr", compression="none"))
    return tmp / "auto.zarr", tmp / "raw.zarr"


def test_auto_compresses_digits_tokens_below_a_fifth_and_records_why(stores):
    auto, raw = (FeatureStore.open(p).info() for p in stores)
    assert auto["compression"] == "zstd:1" and raw["compression"] == "none"
    choice = auto["compression_choice"]
    assert choice["requested"] == "auto" and choice["codec"] == "zstd:1" and choice["probe_ratio"] >= 5
    assert auto["raw_bytes"] == raw["raw_bytes"] == IMAGES * (49 * 1280 + 1280 + 1000) * 2
    print(f"digits, {IMAGES} images, lite0: stored / raw {auto['stored_over_raw']:.3f} with auto "
          f"(probe {choice['probe_ratio']}x), {raw['stored_over_raw']:.3f} uncompressed")
    assert auto["stored_over_raw"] <= 0.2
    assert 1.0 <= raw["stored_over_raw"] <= 1.05  # raw float16 plus Parquet parts, indexes and checksums
    meta = json.loads((stores[0] / "tokens" / "zarr.json").read_text())
    inner = [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]
    assert inner == ["bytes", "zstd", "crc32c"]  # the checksum last: over the compressed bytes


def test_compressed_and_uncompressed_stores_hold_identical_arrays(stores):
    auto, raw = (arrays(p) for p in stores)
    for name in auto:
        assert np.array_equal(auto[name], raw[name]), name
    assert FeatureStore.open(stores[0]).fingerprint == FeatureStore.open(stores[1]).fingerprint


def test_heads_fitted_on_both_stores_are_identical(stores, tmp_path):
    from safetensors.numpy import load_file

    for head in ("linear", "protoquant"):
        runs = [quick_fit(head, path, tmp_path / f"{head}-{path.stem}", val_fraction=0) for path in stores]
        weights = [load_file(f"{r.run_dir}/weights.safetensors") for r in runs]
        assert weights[0].keys() == weights[1].keys() and weights[0]
        for key in weights[0]:
            assert np.array_equal(weights[0][key], weights[1][key]), (head, key)


def test_a_changed_byte_in_a_compressed_chunk_is_named_and_repaired(stores, tmp_path, capsys):
    store = shutil.copytree(stores[0], tmp_path / "s.zarr")
    shard_file = store / "tokens" / "c" / "1" / "0" / "0"
    index = chunk_index(shard_file)
    assert index[1, 1] < 8 * 49 * 1280 * 2 / 4 and index[0, 1] != index[1, 1]  # compressed, variable lengths
    data = bytearray(shard_file.read_bytes())
    data[int(index[1, 0]) + 100] ^= 0x01  # one bit inside chunk 1 of shard 1: rows 24..31
    shard_file.write_bytes(bytes(data))

    assert FeatureStore.open(store).verify() == ["shard 1: tokens inner chunk 1 (rows 24..31): checksum mismatch "
                                                 "(its bytes changed on disk)"]
    assert run_extract(lite0(store)).nothing_to_do  # the quick check reads indexes only
    result = run_extract(lite0(store, repair=True))
    assert result.shards_written_now == 1 and "rewriting shard 1" in capsys.readouterr().err
    assert files(store) == files(stores[0])


def test_resume_with_auto_keeps_an_old_uncompressed_store_and_an_explicit_other_codec_is_refused(stores, tmp_path):
    store = shutil.copytree(stores[1], tmp_path / "s.zarr")
    group = zarr.open_group(store, mode="r+")  # as written before the field was renamed: `compressor: null`
    attrs = dict(group.attrs["protocache"])
    layout = dict(attrs["layout"])
    del layout["compression"]
    attrs["layout"] = {**layout, "compressor": None}
    group.attrs["protocache"] = attrs
    before = files(store)

    with pytest.raises(ProtocacheError, match=r"stored with compression none, not --compression zstd:3; pass "
                                              r"--compression auto \(keeps the store's\) or none") as err:
        run_extract(lite0(store, compression="zstd:3"))
    assert "\n" not in str(err.value) and files(store) == before

    for key in ("meta/part-00001.parquet", "tokens/c/1/0/0", "pooled/c/1/0", "logits/c/1/0"):
        (store / key).unlink()
    result = run_extract(lite0(store))  # auto: adopts the store's codec, never its own choice
    assert result.shards_written_now == 1 and FeatureStore.open(store).layout.compression == "none"
    assert files(store)["tokens/c/1/0/0"] == files(stores[1])["tokens/c/1/0/0"]
    assert FeatureStore.open(store).verify() == []


@pytest.mark.parametrize("value, why", [("zstd:99", "level must be 1..22, got 99"), ("lz4", "unknown compression"),
                                        ("blosc:snappy", "blosc compressors are"), ("blosc:lz4:10", "0..9, got 10"),
                                        ("zstd:1:2", "too many"), ("", "unknown compression")])
def test_bad_compression_values_are_one_line_before_any_work(value, why, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--dataset", "digits", "--limit", "8", "--compression", value, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: extract: --compression {value!r}: ") and why in err, err
    assert not (tmp_path / "s").exists()


def test_parse_compression_canonical_names_and_old_layouts():
    assert [parse_compression(v) for v in ("auto", "none", "zstd", "ZSTD:7", "blosc", "blosc:zstd", "blosc:lz4hc:9")] \
        == ["auto", "none", "zstd:1", "zstd:7", "blosc:lz4:5", "blosc:zstd:5", "blosc:lz4hc:9"]
    old = {"num_images": 8, "grid": [1, 1], "dim": 2, "views": ["clean"], "shard_size": 8}
    assert StoreLayout.from_json({**old, "compressor": None}).compression == "none"
    assert StoreLayout.from_json({**old, "compressor": "zstd"}).compression == "zstd:1"
    dense = np.random.default_rng(0).standard_normal((4, 196, 768)).astype(np.float16)  # ViT-like tokens
    choice = choose_compression("auto", probe_tokens=dense)
    assert choice["codec"] == "none" and choice["probe_ratio"] < 1.3


def test_blosc_store_round_trips_verifies_and_records_its_codec(tmp_path):
    layout = StoreLayout(num_images=24, grid=(7, 7), dim=64, shard_size=16, chunk_size=8, compression="blosc:lz4:5")
    store = FeatureStore.create_or_open(tmp_path / "b.zarr", layout, {"dataset": "toy"})
    rng = np.random.default_rng(0)
    tokens = np.maximum(rng.standard_normal((24, 49, 64)), 1.2).astype(np.float16) - np.float16(1.2)  # ~90 % zeros
    for shard in range(layout.num_shards):
        start, stop = layout.shard_bounds(shard)
        rows = [{"row": i, "image_id": str(i), "path": "", "label": i % 3, "class_name": str(i % 3),
                 "split": "train", "width": 1, "height": 1} for i in range(start, stop)]
        store.write_shard(shard, {"clean": {"tokens": tokens[start:stop], "pooled": tokens[start:stop].mean(1)}}, rows)
    opened = FeatureStore.open(tmp_path / "b.zarr")
    assert np.array_equal(opened.read("tokens", 0, 24), tokens) and opened.verify() == []
    info = opened.info()
    assert info["compression"] == "blosc:lz4:5" and info["stored_over_raw"] < 0.6
    codec = opened.array("tokens").metadata.codecs[0].codecs[1]
    assert type(codec).__name__ == "BloscCodec" and codec.typesize == 2 and codec.shuffle.value == "shuffle"
