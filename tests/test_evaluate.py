"""evaluate on real stores: accuracy, the JSON schema, and interpretability metrics on synthetic birds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from protocache.pipeline.datasets.synthetic_birds import make_synthetic_birds
from protocache.pipeline.evaluate import EvaluateConfig, evaluate_head, evaluate_run, shuffle_prototypes
from protocache.pipeline.extract import ExtractConfig, run_extract
from protocache.pipeline.fit import FitConfig, fit_head
from protocache.pipeline.runs import load_run
from protocache.stores import FeatureStore

KEYS = {"top1", "top5", "consistency", "stability", "purity", "drift"}


@pytest.fixture(scope="module")
def birds_store(tmp_path_factory):
    """Synthetic birds (class decided by parts) through the real default backbone, clean + noise views."""
    tmp = tmp_path_factory.mktemp("birds")
    make_synthetic_birds(tmp / "data", classes=4, per_class=20, seed=0, image_size=128)
    out = tmp / "birds.zarr"
    run_extract(ExtractConfig(dataset="cub", root=str(tmp / "data"), out=str(out), views=("clean", "noise"),
                              progress=False, shard_size=40))
    return out


def test_digits_schema_with_missing_annotations(tmp_path):
    store = tmp_path / "d.zarr"
    run_extract(ExtractConfig(dataset="digits", backbone="test_efficientnet", weights="random", limit=60,
                              shard_size=16, out=str(store), progress=False, num_workers=0))
    fit_head("linear", store, tmp_path / "run", {"epochs": 2}, FitConfig(progress=False))
    r = subprocess.run([sys.executable, "-m", "protocache.cli.main", "evaluate", str(tmp_path / "run"), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert KEYS <= set(results)
    assert 0 <= results["top1"] <= results["top5"] <= 1
    for key in ("consistency", "stability", "purity"):
        assert results[key]["value"] is None and "parts_input" in results[key]["reason"]
    assert results["drift"]["value"] is None and "noise" in results["drift"]["reason"]
    assert sum(map(sum, results["confusion_matrix"])) == results["num_images"]
    assert (tmp_path / "run" / "eval-test.json").exists() and (tmp_path / "run" / "confusion-test.png").exists()


def test_trained_prototypes_beat_shuffled_ones_on_birds(birds_store, tmp_path):
    store = FeatureStore.open(birds_store)
    assert "parts_input" in store.metadata().column_names and store.views == ("clean", "noise")
    fit_head("protoquant", birds_store, tmp_path / "pq", {}, FitConfig(progress=False, seed=0))
    trained = evaluate_run(tmp_path / "pq", EvaluateConfig())
    assert KEYS <= set(trained) and trained["top1"] > 0.6
    head, _, _ = load_run(tmp_path / "pq")
    shuffled = evaluate_head(shuffle_prototypes(head, seed=0), store, EvaluateConfig())
    for key in ("consistency", "purity"):
        assert trained[key]["value"] is not None
        assert trained[key]["value"] >= shuffled[key]["value"] + 0.1, (key, trained[key], shuffled[key])
    assert trained["stability"]["value"] is not None and 0 <= trained["stability"]["value"] <= 1
    assert 0 <= trained["drift"]["noise"]["topk_overlap"] <= 1
    assert trained["class_prototype_rule"]
