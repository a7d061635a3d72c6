"""Loading a finished run folder back as a head, and its splits (what evaluate, explain and ablate read)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protocache.pipeline.fit import StoreSplit, accuracy, head_fields
from protocache.pipeline.runs import Run, load_run
from protocache.stores import FeatureStore
from protocache.stores import runs as run_files
from protocache.stores.errors import ProtocacheError

from fit_helpers import quick_fit



@pytest.mark.parametrize("name", ["linear", "protoquant", "protopool", "infodisent"])
def test_a_loaded_run_is_the_fitted_head(name, store_path, tmp_path):
    result = quick_fit(name, store_path, tmp_path / "run")
    run = load_run(result.run_dir)
    assert isinstance(run, Run) and not run.head.training
    assert run.config == result.config and run.metrics == result.metrics
    fitted = result.model.state_dict()
    loaded = run.head.state_dict()
    assert fitted.keys() == loaded.keys()
    for key in fitted:
        assert torch.equal(fitted[key].cpu(), loaded[key]), key
    store = FeatureStore.open(store_path)
    test = StoreSplit(store, "test", head_fields(run.head))
    assert accuracy(run.head, test, torch.device("cpu")) == result.metrics["test_accuracy"]


def test_an_unfinished_run_is_a_clear_error(store_path, tmp_path):
    result = quick_fit("linear", store_path, tmp_path / "run")
    (Path(result.run_dir) / run_files.WEIGHTS).unlink()
    with pytest.raises(ProtocacheError, match=r"is not a finished run \(missing weights.safetensors\)"):
        load_run(result.run_dir)
    with pytest.raises(ProtocacheError, match="is not a finished run"):
        load_run(tmp_path / "nowhere")


def test_evaluate_split_val_measures_the_fit_s_val_rows(store_path, tmp_path, capsys):
    from protocache.cli.main import main
    from protocache.pipeline.evaluate import EvaluateConfig, evaluate_run
    from protocache.pipeline.fit import VAL_ROWS
    from protocache.pipeline.runs import split_rows

    result = quick_fit("linear", store_path, tmp_path / "run", seed=1)
    store = FeatureStore.open(store_path)
    val = np.load(Path(result.run_dir) / VAL_ROWS)
    np.testing.assert_array_equal(split_rows(result.run_dir, store, "val"), val)
    assert sorted(split_rows(result.run_dir, store, "train").tolist()) == \
        sorted(set(store.split_rows("train").tolist()) - set(val.tolist()))
    np.testing.assert_array_equal(split_rows(result.run_dir, store, "test"), store.split_rows("test"))
    m = result.metrics
    for split in ("val", "train", "test"):
        res = evaluate_run(result.run_dir, EvaluateConfig(split=split, device="cpu", confusion_png=False))
        assert res["top1"] == pytest.approx(m[f"{split}_accuracy"]) and res["num_images"] == m[f"num_{split}"]
    main(["evaluate", result.run_dir, "--split", "val", "--device", "cpu", "--json"])
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(m["val_accuracy"])


def test_a_run_without_validation_has_no_val_rows(store_path, tmp_path):
    from protocache.pipeline.runs import split_rows

    result = quick_fit("linear", store_path, tmp_path / "run", val_fraction=0)
    store = FeatureStore.open(store_path)
    with pytest.raises(ProtocacheError, match="no validation split"):
        split_rows(result.run_dir, store, "val")
    np.testing.assert_array_equal(split_rows(result.run_dir, store, "train"), store.split_rows("train"))


def test_open_run_store_refuses_a_store_with_another_fingerprint(store_path, tmp_path):
    import shutil

    from protocache.pipeline.runs import open_run_store

    result = quick_fit("linear", store_path, tmp_path / "run")
    assert open_run_store(result.run_dir).fingerprint == FeatureStore.open(store_path).fingerprint
    # the same store with one fingerprint field changed by hand, as a re-extraction with other weights would
    moved = tmp_path / "s.zarr"
    shutil.copytree(store_path, moved)
    group = json.loads((moved / "zarr.json").read_text())
    old = group["attributes"]["protocache"]["fingerprint"]["weights_sha256"]
    group["attributes"]["protocache"]["fingerprint"]["weights_sha256"] = "0" * 64
    (moved / "zarr.json").write_text(json.dumps(group))
    with pytest.raises(run_files.RunMismatch) as info:
        open_run_store(result.run_dir, store=FeatureStore.open(moved))
    message = str(info.value)
    assert f'weights_sha256: at fit time "{old}", now "{"0" * 64}"' in message and "\n" not in message
    assert "refit the run" in message
