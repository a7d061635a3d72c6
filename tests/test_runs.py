"""Loading a finished run folder back as a head (what evaluate, explain and ablate read)."""

from __future__ import annotations

from pathlib import Path

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
