"""`protocache bench --scale N`: a tiny store written and streamed cold; the report's fields agree."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from protocache.cli.main import main
from protocache.pipeline.bench_disk import drop_page_cache, resident_fraction, sequential_read
from protocache.pipeline.bench_scale import (IMAGENET_TRAIN, TOKEN_KINDS, ScaleBenchConfig, TokenSource, bench_scale,
                                             resolve_codec)


def _on_tmpfs(path: Path) -> bool:
    """Whether `path` lies on tmpfs/ramfs, where the page cache holds the file itself and cannot drop it."""
    best, fstype = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, kind = line.split()[:3]
        if str(path.resolve()).startswith(mount) and len(mount) > len(best):
            best, fstype = mount, kind
    return fstype in ("tmpfs", "ramfs")


def test_dropping_the_page_cache_evicts_a_file_we_wrote(tmp_path):
    name = tmp_path / "f.bin"
    name.write_bytes(os.urandom(4 << 20))
    sequential_read([str(name)])
    before = resident_fraction([str(name)])
    if before is None:
        pytest.skip("mincore cannot be called here")
    assert before == 1.0
    drop_page_cache([str(name)])
    if _on_tmpfs(tmp_path):
        pytest.skip("tmpfs: the page cache is the file")
    assert resident_fraction([str(name)]) == 0.0
    read = sequential_read([str(name)])
    assert read["bytes"] == 4 << 20 and resident_fraction([str(name)]) == 1.0


def test_drawn_tokens_look_like_lite0_and_vit_tokens():
    sparse = TokenSource(TOKEN_KINDS["sparse"], 64, seed=0).images(64)
    tokens = sparse["tokens"]
    assert tokens.shape == (64, 49, 1280) and tokens.dtype == np.float16
    assert 0.89 <= float((tokens == 0).mean()) <= 0.93  # ReLU6 maps of natural photos: ~91 % exact zeros
    assert float(tokens.min()) == 0.0 and float(tokens.max()) <= 6.0
    # no token row repeats within an image chunk: compression sees distinct rows, as with real tokens
    assert len(np.unique(tokens[:8].reshape(-1, 1280), axis=0)) == 8 * 49
    np.testing.assert_allclose(sparse["pooled"], tokens.mean(axis=1, dtype=np.float32), rtol=1e-2, atol=1e-3)
    dense = TokenSource(TOKEN_KINDS["dense"], 16, seed=0).images(16)["tokens"]
    assert dense.shape == (16, 196, 768) and float((dense == 0).mean()) < 0.01
    # as `extract --compression auto` decides: zstd for ReLU tokens, none for a ViT's
    sparse_choice = resolve_codec(TOKEN_KINDS["sparse"], "auto", 0)
    dense_choice = resolve_codec(TOKEN_KINDS["dense"], "auto", 0)
    assert sparse_choice["codec"] == "zstd:1" and sparse_choice["probe_ratio"] > 4
    assert dense_choice["codec"] == "none" and dense_choice["probe_ratio"] < 1.3


def test_scale_report_fields_agree(tmp_path, capsys):
    capsys.readouterr()
    main(["bench", "--scale", "64", "--json", "--no-head", "--dir", str(tmp_path)])
    report = json.loads(capsys.readouterr().out)
    assert report["scale"] == 64 and report["machine"]["cores"] >= 1
    assert [(r["tokens"], r["compression"]) for r in report["runs"]] == [("sparse", "none"), ("sparse", "zstd:1")]
    assert list(tmp_path.iterdir()) == []  # the stores are removed
    cold_ok = report["cold_cache"]["verified"]
    assert cold_ok == (not _on_tmpfs(tmp_path) and all(
        r["resident_after_drop"] is None or r["resident_after_drop"] <= 0.01 for r in report["runs"]))
    for run in report["runs"]:
        raw = 64 * 49 * 1280 * 2
        assert run["raw_tokens_bytes"] == raw and run["images"] == 64
        assert 0 < run["tokens_bytes_on_disk"] < run["bytes_on_disk"]
        assert run["raw_over_stored"] == pytest.approx(raw / run["tokens_bytes_on_disk"])
        assert run["disk_read"]["bytes"] == run["page_cache_read"]["bytes"] == run["tokens_bytes_on_disk"]
        for read in (run["disk_read"], run["page_cache_read"]):
            assert read["mb_per_s"] == pytest.approx(read["bytes"] / 1e6 / read["seconds"])
        for epoch in (run["epoch_cold"], run["epoch_warm"]):
            assert epoch["images"] == 64 and epoch["batches"] == 1 and epoch["tokens_bytes"] == raw
            assert epoch["mb_per_s"] == pytest.approx(raw / 1e6 / epoch["seconds"])
            assert epoch["images_per_s"] == pytest.approx(64 / epoch["seconds"])
        assert run["epoch_warm"]["resident_at_start"] in (None, 1.0)  # the cold epoch read every page
        if cold_ok:
            assert run["epoch_cold"]["resident_at_start"] in (None, 0.0)
        assert run["epoch_cold"]["peak_rss_mib"] >= run["epoch_cold"]["rss_before_mib"] > 0
        target = run["target"]
        assert target["value"] == pytest.approx(run["epoch_cold"]["mb_per_s"] / run["disk_read"]["mb_per_s"])
        assert target["met"] == (target["value"] >= 0.8 if run["compression"] == "none" else target["value"] > 1)
        ext = run["extrapolation"]
        assert ext["images"] == IMAGENET_TRAIN and "lite0" in ext["like"]
        assert ext["bytes_on_disk"] == pytest.approx(run["bytes_on_disk"] * IMAGENET_TRAIN / 64)
        assert ext["raw_tokens_bytes"] == pytest.approx(IMAGENET_TRAIN * 49 * 1280 * 2)
        assert ext["epoch_cold_s"] == pytest.approx(run["epoch_cold"]["seconds"] * IMAGENET_TRAIN / 64)
        assert ext["head_epoch_cold_s"] is None and "head_epoch_cold" not in run
    none, zstd = report["runs"]
    assert math.isclose(none["raw_over_stored"], 1.0, rel_tol=1e-3) and zstd["raw_over_stored"] > 4
    assert zstd["compression_choice"]["requested"] == "auto"


def test_scale_head_epoch_streams_protoquant_steps(tmp_path):
    report = bench_scale(ScaleBenchConfig(scale=24, tokens="dense", compression="auto", batch_size=16,
                                          dir=str(tmp_path)))
    (run,) = report["runs"]  # auto chose none on dense tokens
    assert run["compression"] == "none" and run["token_shape"] == [196, 768]
    head = run["head_epoch_cold"]
    assert head["head"] == "protoquant" and head["images"] == 24 and head["batches"] == 2
    assert head["mb_per_s"] == pytest.approx(24 * 196 * 768 * 2 / 1e6 / head["seconds"])
    assert head["peak_rss_mib"] > run["epoch_cold"]["peak_rss_mib"]  # torch and the head live in that process
    assert run["extrapolation"]["head_epoch_cold_s"] == pytest.approx(head["seconds"] * IMAGENET_TRAIN / 24)
    assert "ViT-B/16" in run["extrapolation"]["like"]


@pytest.mark.parametrize("argv, message", [
    (["bench", "--tokens", "dense"], "bench: --tokens belong to the scale benchmark; add --scale N"),
    (["bench", "--scale", "64", "--quick"], "bench: --quick and --scale are separate benchmarks"),
    (["bench", "--scale", "0"], "bench: --scale must be an integer >= 1, got 0"),
    (["bench", "--scale", "8", "--tokens", "sparse,vit"], "bench: --tokens 'sparse,vit': use sparse, dense"),
    (["bench", "--scale", "8", "--compression", "none,lz9"], "bench: --compression 'lz9': unknown compression"),
    (["bench", "--only", "kmeans,gpu"], "bench: unknown part(s) gpu; choose from extraction, extract-process, store"),
    (["bench", "--scale", "8", "--only", "kmeans"], "bench: --only picks parts of the stage benchmark, not of --scale"),
    (["bench", "--only", " , "], "bench: --only names no part; e.g. --only extraction,predict"),
])
def test_bad_bench_options_are_one_line(argv, message, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith(f"error: {message}") and "\n" not in err
