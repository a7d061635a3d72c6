"""fit-head on a small real store: run folder, metrics, validation split, determinism, refusals, push, CLI."""

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
    assert sorted(p.name for p in run.iterdir()) == sorted(runs.RUN_FILES + (F.VAL_ROWS,))
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["head"] == name
    assert config["store"]["fingerprint"] == FeatureStore.open(store_path).fingerprint
    assert config["store"]["path"] == str(Path(store_path).resolve())
    assert all(v is not None for v in config["head_config"].values())  # resolved, nothing left to "auto"
    for key in QUICK[name]:
        assert config["head_config"][key] == QUICK[name][key]
    assert config["fit"]["seed"] == 0 and config["fit"]["val_fraction"] == 0.1
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    store = FeatureStore.open(store_path)
    assert metrics["num_test"] == len(store.split_rows("test"))
    # 97 train images, 10% held out: ceil(9.7) = 10 in val, 87 left to fit on
    assert (metrics["num_val"], metrics["num_train"]) == (10, 87) == (config["validation"]["num_val"],
                                                                      config["validation"]["num_train"])
    # figures recorded while fitting come from val, never from test
    assert not [k for k in metrics if k.startswith("test_") and k != "test_accuracy"]
    if name == "protoquant":
        assert 0 <= metrics["val_accuracy_dense"] <= 1
        assert metrics["kmeans"]["rows_read"] == 87  # the k-means sample never saw a val (or test) image
    if name == "protopool":
        assert 0 <= metrics["val_accuracy_before_push"] <= 1
        val = set(np.load(run / F.VAL_ROWS).tolist())
        assert not val & {s["row"] for s in metrics["prototype_sources"]}  # pushed onto train tokens only
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


def test_a_fit_gives_back_the_callers_thread_count(store_path, tmp_path):
    """fit_head(threads=N) pins torch's threads (and asks for deterministic kernels) for the fit only:
    after it, and after a fit that fails, the caller's settings are as they were."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    try:
        result = quick_fit("linear", store_path, tmp_path / "run", threads=1)
        assert "1 threads" in (Path(result.run_dir) / runs.LOG).read_text()  # the fit ran pinned
        assert torch.get_num_threads() == 2
        assert not torch.are_deterministic_algorithms_enabled()  # the fit's own kernel choice, given back too
        with pytest.raises(ProtocacheError):  # unknown key: fails inside the pinned block
            F.fit_head("linear", store_path, tmp_path / "bad", {"no_such_key": 1}, F.FitConfig(threads=1))
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=True)


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
          "--set", "finetune_epochs=1", "--set", "kmeans_iters=5", "--epochs", "1", "--no-progress", "--json",
          "--val-fraction", "0.2"])
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["test_accuracy"] <= 1 and 0 <= out["val_accuracy"] <= 1
    config = json.loads((run / "config.json").read_text())
    assert config["fit"]["seed"] == 3 and config["head_config"]["codebook_size"] == 24
    assert config["fit"]["val_fraction"] == 0.2 and config["validation"]["num_val"] == 20  # ceil(0.2 * 97)
    assert config["head_config"]["epochs"] == 1 and config["head_config"]["prune_to"] == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["fit-head", "protoquant", "--store", str(store_path), "--out", str(tmp_path / "x"),
              "--set", "codebok_size=3", "--no-progress"])
    assert exit_info.value.code == 2
    assert "valid keys: codebook_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit-head", "linear", "--store", str(store_path), "--out", str(tmp_path / "y"), "--val-fraction", "1",
              "--no-progress"])
    assert exit_info.value.code == 2
    assert "error: val_fraction must be in [0, 1), got 1.0" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    main(["heads"])
    assert capsys.readouterr().out.split()[0] == "linear"
    main(["bench-heads", "--store", str(store_path), "--heads", "linear,infodisent", "--epochs", "1"])
    table = capsys.readouterr().out
    assert "linear" in table and "infodisent" in table and "vs probe" in table and "val acc" in table


def test_bench_rows_and_table(store_path):
    rows = bench_heads(BenchConfig(store=str(store_path), heads=("infodisent", "linear"), epochs=1))
    assert [r["head"] for r in rows] == ["linear", "infodisent"]
    probe, info = rows
    assert probe["gap_to_probe_points"] == 0.0
    assert info["gap_to_probe_points"] == pytest.approx(100 * (info["test_accuracy"] - probe["test_accuracy"]), abs=0.01)
    assert info["prototype_count"] == 256 and info["fit_seconds"] > 0
    assert all(0 <= r["val_accuracy"] <= 1 for r in rows)
    text = format_table(rows)
    assert text.splitlines()[0].split()[:5] == ["head", "val", "acc", "test", "acc"]
    assert f"{100 * info['val_accuracy']:.2f}%" in text.splitlines()[3]


# ----------------------------------------------------------------------------- validation split


def test_fit_carves_val_from_train_only(store_path, tmp_path):
    store = FeatureStore.open(store_path)
    train, test, labels = store.split_rows("train"), store.split_rows("test"), store.labels()
    a = quick_fit("linear", store_path, tmp_path / "a", seed=4)
    val = np.load(Path(a.run_dir) / F.VAL_ROWS)
    assert a.config["validation"] == {"fraction": 0.1, "seed": 4, "source": "carved", "num_val": 10,
                                      "num_train": 87, "rows_file": F.VAL_ROWS, "notes": []}
    assert len(val) == 10 and set(val) <= set(train) and not set(val) & set(test)
    # stratified: each class's val count is its share of the 10, within one image
    for c in range(10):
        n_c = int((labels[train] == c).sum())
        assert abs(int((labels[val] == c).sum()) - 10 * n_c / len(train)) < 1
    # the recipe's sources: "train" serves the other rows, "val" the carved ones
    view = F.store_with_validation(store, F.validation_split(store, 0.1, seed=4))
    served = lambda split: sorted(int(r) for b in F.StoreSplit(view, split, ("row",)).batches(64) for r in b["row"])
    assert served("val") == sorted(val.tolist())
    assert served("train") == sorted(set(train.tolist()) - set(val.tolist()))
    assert served("test") == sorted(test.tolist())
    # the same seed carves the same rows; another seed other rows
    b = quick_fit("linear", store_path, tmp_path / "b", seed=4)
    np.testing.assert_array_equal(val, np.load(Path(b.run_dir) / F.VAL_ROWS))
    c = quick_fit("linear", store_path, tmp_path / "c", seed=5)
    assert not np.array_equal(val, np.load(Path(c.run_dir) / F.VAL_ROWS))


@pytest.mark.parametrize("name", ["protoquant", "protopool"])
def test_val_fraction_zero_is_the_old_code_path(name, store_path, tmp_path):
    """val_fraction=0 changes nothing: the fit's weights are those of the loop as it was before
    validation splits existed (the whole train split, the store as it is)."""
    from dataclasses import asdict

    from protocache.pipeline.heads import head_class, resolve_config, store_info
    from protocache.pipeline.runtime import fit_settings, seed_everything

    result = quick_fit(name, store_path, tmp_path / "run", seed=2, val_fraction=0)
    m = result.metrics
    assert m["val_accuracy"] is None and m["num_val"] == 0 and m["num_train"] == 97
    assert result.config["validation"]["source"] == "none"
    assert not (Path(result.run_dir) / F.VAL_ROWS).exists()
    assert m.get("val_accuracy_dense", None) is None and m.get("val_accuracy_before_push", None) is None
    # the old fit: the recipe on the raw store, no validation, same seed and threads
    store = FeatureStore.open(store_path)
    info = store_info(store)
    fit = F.FitConfig(seed=2, progress=False, threads=1, val_fraction=0)
    with fit_settings(1):
        seed_everything(2)
        head = head_class(name)(info, resolve_config(name, info, QUICK[name]))
        head.train()
        head.fit(F.FitContext(store, info, fit, torch.device("cpu"), lambda _: None))
    old = head.state_dict()
    new = runs.load_tensors(Path(result.run_dir) / runs.WEIGHTS)
    assert old.keys() == new.keys()
    for key in old:
        assert torch.equal(old[key].float().cpu(), new[key].float()), key
    assert asdict(head.config) == result.config["head_config"]


def test_a_store_with_its_own_val_split_keeps_it(store_path, tmp_path):
    # a store whose manifest already has a "val" split (a folder tree with val/ folders):
    # here the first 12 train rows; nothing more is carved from train
    store = FeatureStore.open(store_path)
    splits = np.asarray(store.metadata().column("split").to_pylist(), dtype=object)
    own = store.split_rows("train")[:12]
    splits[own] = "val"
    result = F.fit_head("linear", store_path, tmp_path / "run", QUICK["linear"],
                        F.FitConfig(progress=False, threads=1), store=store.with_splits(splits))
    assert result.config["validation"]["source"] == "store"
    assert (result.metrics["num_train"], result.metrics["num_val"]) == (97 - 12, 12)
    np.testing.assert_array_equal(np.load(Path(result.run_dir) / F.VAL_ROWS), own)
    assert "the store has its own val split (12 images)" in (Path(result.run_dir) / "log.txt").read_text()


def test_bench_heads_chooses_each_heads_config_on_val(store_path, tmp_path):
    candidates = tmp_path / "candidates.yaml"
    candidates.write_text("linear:\n  - {}\n  - {lr: 0.3, standardize: none}\n  - {lr: 0.0}\n")
    rows = bench_heads(BenchConfig(store=str(store_path), heads=("linear",), epochs=2, out=str(tmp_path / "runs"),
                                   candidates=str(candidates), progress=False))
    (row,) = rows
    tried = [json.loads((tmp_path / "runs" / "linear" / f"candidate-{j}" / "metrics.json").read_text())
             for j in range(3)]
    vals = [m["val_accuracy"] for m in tried]
    best = vals.index(max(vals))  # the first of the best on ties
    assert row["candidates"] == 3 and row["val_accuracy"] == vals[best]
    assert row["test_accuracy"] == tried[best]["test_accuracy"]  # test is reported, never chosen on
    assert row["config"] == [{}, {"lr": 0.3, "standardize": "none"}, {"lr": 0.0}][best]
    assert "chosen on val" in format_table(rows)
    candidates.write_text("linear:\n  - {lr: 0.3}\n  - {lrr: 0.1}\n")
    with pytest.raises(ProtocacheError, match="'lrr'"):  # every candidate is checked before any fit
        bench_heads(BenchConfig(store=str(store_path), heads=("linear",), epochs=1, out=str(tmp_path / "r2"),
                                candidates=str(candidates)))
    assert not (tmp_path / "r2").exists()
