"""fit-head on a small real store: run folder, metrics, determinism, refusals, push, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protocache.cli.main import main
from protocache.pipeline import fit as F
from protocache.pipeline.bench import BenchConfig, bench_heads, format_table
from protocache.pipeline.runs import load_run
from protocache.stores import FeatureStore
from protocache.stores import runs
from protocache.stores.errors import MissingShardError, ProtocacheError

from fit_helpers import QUICK, quick_fit


@pytest.mark.parametrize("name", ["linear", "protoquant", "protopool", "infodisent"])
def test_fit_writes_a_complete_run(name, store_path, tmp_path):
    result = quick_fit(name, store_path, tmp_path / "run")
    run = Path(result.run_dir)
    assert sorted(p.name for p in run.iterdir()) == sorted(runs.RUN_FILES)
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["head"] == name
    assert config["store"]["fingerprint"] == FeatureStore.open(store_path).fingerprint
    assert config["store"]["path"] == str(Path(store_path).resolve())
    assert all(v is not None for v in config["head_config"].values())  # resolved, nothing left to "auto"
    for key in QUICK[name]:
        assert config["head_config"][key] == QUICK[name][key]
    assert config["fit"]["seed"] == 0
    for key in ("train_accuracy", "test_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["num_test"] == len(FeatureStore.open(store_path).split_rows("test"))
    assert isinstance(metrics["prototype_count"], int) and metrics["prototype_count"] > 0
    assert metrics["seconds"] > 0
    assert metrics["loss_curve"] and all(np.isfinite(e["loss"]) for e in metrics["loss_curve"])
    assert {"stage", "epoch", "loss"} <= set(metrics["loss_curve"][0])
    if name == "protoquant":
        assert 0 < metrics["local_size"] <= config["head_config"]["topk_per_class"]
    assert "test accuracy" in (run / "log.txt").read_text()
    head, cfg, met = load_run(run)
    assert cfg == config and met == metrics
    assert head.prototype_count == metrics["prototype_count"]
    # the loaded head reproduces the recorded test accuracy
    store = FeatureStore.open(store_path)
    source = F.StoreSplit(store, "test", F.head_fields(head))
    assert F.accuracy(head, source, torch.device("cpu")) == pytest.approx(metrics["test_accuracy"])


@pytest.mark.parametrize("name", ["protoquant", "protopool", "infodisent"])
def test_same_seed_gives_byte_identical_weights(name, store_path, tmp_path):
    a = quick_fit(name, store_path, tmp_path / "a", seed=5)
    b = quick_fit(name, store_path, tmp_path / "b", seed=5)
    c = quick_fit(name, store_path, tmp_path / "c", seed=6)
    wa = (Path(a.run_dir) / runs.WEIGHTS).read_bytes()
    assert wa == (Path(b.run_dir) / runs.WEIGHTS).read_bytes()
    assert wa != (Path(c.run_dir) / runs.WEIGHTS).read_bytes()
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]


def test_streaming_with_one_shard_in_memory_gives_the_same_kind_of_run(store_path, tmp_path):
    store = FeatureStore.open(store_path)
    split = F.StoreSplit(store, "train", ("tokens", "label"), shards_in_memory=1)
    assert not split.resident  # 8 shards > 1: streamed every epoch, never all loaded
    seen = sum(len(b["label"]) for b in split.batches(7, epoch=1))
    assert seen == len(store.split_rows("train")) and split._arrays is None
    result = quick_fit("infodisent", store_path, tmp_path / "run", shards_in_memory=1)
    assert 0 <= result.metrics["test_accuracy"] <= 1


def test_refuses_a_run_fitted_on_another_store(store_path, tmp_path):
    from protocache.pipeline.extract import ExtractConfig, run_extract

    other = tmp_path / "other.zarr"
    run_extract(ExtractConfig(dataset="digits", backbone="test_efficientnet", weights="random", limit=64,
                              shard_size=16, out=str(other), progress=False, num_workers=0))
    run = tmp_path / "run"
    quick_fit("linear", store_path, run)
    before = (run / runs.WEIGHTS).read_bytes()
    with pytest.raises(runs.RunMismatch, match="manifest_sha256") as info:
        quick_fit("linear", other, run)
    assert "num_images" in str(info.value)
    assert (run / runs.WEIGHTS).read_bytes() == before  # nothing was touched
    quick_fit("linear", store_path, run, seed=1)  # the same store may refit the run


def test_clear_errors_for_unknown_heads_keys_and_bad_folders(store_path, tmp_path):
    with pytest.raises(ProtocacheError, match="unknown head 'protonet'; registered heads: linear"):
        F.fit_head("protonet", store_path, tmp_path / "r", {}, F.FitConfig(progress=False))
    with pytest.raises(ProtocacheError, match=r"'slots' for head 'protopool'.*valid keys: num_prototypes"):
        F.fit_head("protopool", store_path, tmp_path / "r", {"slots": 3}, F.FitConfig(progress=False))
    assert not (tmp_path / "r").exists()  # validation happens before the run folder is made
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ProtocacheError, match="not a run folder"):
        quick_fit("linear", store_path, busy)
    with pytest.raises(ProtocacheError, match="no feature store"):
        quick_fit("linear", tmp_path / "nowhere.zarr", tmp_path / "r2")


def test_refuses_an_incomplete_store(store_path, tmp_path):
    import shutil

    partial = tmp_path / "partial.zarr"
    shutil.copytree(store_path, partial)
    (partial / "meta" / "part-00003.parquet").unlink()
    with pytest.raises(MissingShardError, match=r"shard\(s\) \[3\]"):
        quick_fit("linear", partial, tmp_path / "run")


def test_cli_fit_head_and_bench(store_path, tmp_path, capsys):
    cfg = tmp_path / "pq.yaml"
    cfg.write_text("codebook_size: 24\nprune_to: 0\ncodebook_epochs: 1\nfit:\n  seed: 3\n")
    run = tmp_path / "run"
    main(["fit-head", "protoquant", "--store", str(store_path), "--out", str(run), "--config", str(cfg),
          "--set", "finetune_epochs=1", "--set", "kmeans_iters=5", "--epochs", "1", "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["test_accuracy"] <= 1
    config = json.loads((run / "config.json").read_text())
    assert config["fit"]["seed"] == 3 and config["head_config"]["codebook_size"] == 24
    assert config["head_config"]["epochs"] == 1 and config["head_config"]["prune_to"] == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["fit-head", "protoquant", "--store", str(store_path), "--out", str(tmp_path / "x"),
              "--set", "codebok_size=3", "--no-progress"])
    assert exit_info.value.code == 2
    assert "valid keys: codebook_size" in capsys.readouterr().err
    main(["heads"])
    assert capsys.readouterr().out.split()[0] == "linear"
    main(["bench-heads", "--store", str(store_path), "--heads", "linear,infodisent", "--epochs", "1"])
    table = capsys.readouterr().out
    assert "linear" in table and "infodisent" in table and "vs probe" in table


def test_bench_rows_and_table(store_path):
    rows = bench_heads(BenchConfig(store=str(store_path), heads=("infodisent", "linear"), epochs=1))
    assert [r["head"] for r in rows] == ["linear", "infodisent"]
    probe, info = rows
    assert probe["gap_to_probe_points"] == 0.0
    assert info["gap_to_probe_points"] == pytest.approx(100 * (info["test_accuracy"] - probe["test_accuracy"]), abs=0.01)
    assert info["prototype_count"] == 256 and info["fit_seconds"] > 0
    text = format_table(rows)
    assert text.splitlines()[0].split()[:2] == ["head", "test"]
