"""evaluate on real stores: accuracy, the JSON schema, the evidence rows on disk and the metrics they give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from protocache.pipeline.datasets.synthetic_birds import make_synthetic_birds
from protocache.pipeline.evaluate import EvaluateConfig, evaluate_head, evaluate_run, shuffle_prototypes
from protocache.pipeline.extract import ExtractConfig, run_extract
from protocache.pipeline.fit import FitConfig, fit_head
from protocache.pipeline.runs import load_run
from protocache.stores import FeatureStore

KEYS = {"top1", "top5", "consistency", "stability", "purity", "drift", "class_prototype_rule", "class_prototype_k",
        "local_size", "metric_config"}


@pytest.fixture(scope="module")
def birds_store(tmp_path_factory):
    """Synthetic birds (class decided by parts) through the real default backbone, clean + noise views."""
    tmp = tmp_path_factory.mktemp("birds")
    make_synthetic_birds(tmp / "data", classes=4, per_class=20, seed=0, image_size=128)
    out = tmp / "birds.zarr"
    run_extract(ExtractConfig(dataset="cub", root=str(tmp / "data"), out=str(out), views=("clean", "noise"),
                              progress=False, shard_size=40))
    return out


@pytest.fixture(scope="module")
def protoquant_run(birds_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("pq") / "run"
    fit_head("protoquant", birds_store, run, {}, FitConfig(progress=False, seed=0))
    return run


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
    # the top images are written even without parts; no consistency rows without parts
    assert results["evidence"] == {"purity": "eval-test/purity.parquet"}
    rows = pq.read_table(tmp_path / "run" / "eval-test" / "purity.parquet")
    assert rows.column_names == ["prototype", "rank", "image_id", "presence", "peak_x", "peak_y"]
    assert not (tmp_path / "run" / "eval-test" / "consistency.parquet").exists()


def test_linear_probe_on_a_vit_store_gets_its_cls_token(tmp_path):
    """On a ViT store the probe was fitted on `pooled` (the CLS token): evaluate must feed it that, not the
    mean patch token, so its top-1 is fit's test accuracy."""
    store = tmp_path / "vit.zarr"
    run_extract(ExtractConfig(dataset="digits", backbone="test_vit", weights="random", limit=60, shard_size=32,
                              out=str(store), progress=False, num_workers=0))
    assert FeatureStore.open(store).attrs["pooled"] == "cls"
    result = fit_head("linear", store, tmp_path / "run", {"epochs": 5}, FitConfig(progress=False, seed=0))
    assert result.model.inputs == ("pooled",)
    evaluated = evaluate_run(tmp_path / "run", EvaluateConfig(confusion_png=False))
    assert evaluated["top1"] == result.metrics["test_accuracy"]


def test_trained_prototypes_beat_shuffled_ones_on_birds(birds_store, protoquant_run):
    store = FeatureStore.open(birds_store)
    assert "parts_input" in store.metadata().column_names and store.views == ("clean", "noise")
    trained = evaluate_run(protoquant_run, EvaluateConfig())
    assert KEYS <= set(trained) and trained["top1"] > 0.6
    head, _, _ = load_run(protoquant_run)
    shuffled = evaluate_head(shuffle_prototypes(head, seed=0), store, EvaluateConfig())
    for key in ("consistency", "purity"):
        assert trained[key]["value"] is not None
        assert trained[key]["value"] >= shuffled[key]["value"] + 0.1, (key, trained[key], shuffled[key])
    assert trained["stability"]["value"] is not None and 0 <= trained["stability"]["value"] <= 1
    assert 0 <= trained["drift"]["noise"]["topk_overlap"] <= 1


# ----------------------------------------------------------------------------- recomputing from the rows
# Plain numpy + pyarrow, nothing from protocache.pipeline: the rows, the store's metadata Parquet files and
# the eval JSON's metric_config are enough to get the same numbers.


def _parts(store_path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    meta = pq.read_table(store_path / "meta")
    attrs = json.loads((store_path / "zarr.json").read_text())["attributes"]["protocache"]
    parts = {str(i): np.asarray(p, dtype=np.float64)
             for i, p in zip(meta.column("image_id").to_pylist(), meta.column("parts_input").to_pylist())}
    return parts, attrs["part_names"]


def _purity(rows: dict, parts: dict, names: list[str], patch: float, size: list[int]) -> tuple[float, int]:
    base = [n.replace("left ", "").replace("right ", "") for n in names]
    merged = sorted(set(base))
    scores = []
    for p in sorted(set(rows["prototype"])):
        seen, hit = dict.fromkeys(merged, 0), dict.fromkeys(merged, 0)
        for q, image, x, y in zip(rows["prototype"], rows["image_id"], rows["peak_x"], rows["peak_y"]):
            if q != p:
                continue
            x0 = min(max(x - patch / 2, 0), size[1] - patch)
            y0 = min(max(y - patch / 2, 0), size[0] - patch)
            vis = {m: False for m in merged}
            inside = {m: False for m in merged}
            for (px, py, v), m in zip(parts[image], base):
                if v > 0:
                    vis[m] = True
                    inside[m] |= bool(x0 <= px <= x0 + patch and y0 <= py <= y0 + patch)
            for m in merged:
                seen[m] += vis[m]
                hit[m] += inside[m]
        shares = [hit[m] / seen[m] for m in merged if seen[m]]
        scores.append(max(shares) if shares else 0.0)
    return float(np.mean(scores)), sum(s > 0.5 for s in scores)


def _in_box(peak_x, peak_y, part, box, size):
    px, py, h = np.floor(peak_x), np.floor(peak_y), box / 2
    x, y = np.floor(part[:, 0]), np.floor(part[:, 1])
    return ((part[:, 2] > 0) & (x >= max(0, px - h)) & (x <= min(size[1], px + h))
            & (y >= max(0, py - h)) & (y <= min(size[0], py + h)))


def _consistency_stability(rows: dict, parts: dict, box: float, threshold: float, size: list[int]):
    pairs: dict[tuple[int, int], list] = {}
    for i in range(len(rows["image_id"])):
        part = parts[rows["image_id"][i]]
        clean = _in_box(rows["peak_x"][i], rows["peak_y"][i], part, box, size)
        noisy = _in_box(rows["noise_peak_x"][i], rows["noise_peak_y"][i], part, box, size)
        pairs.setdefault((rows["label"][i], rows["prototype"][i]), []).append((clean, part[:, 2] > 0, noisy))
    consistent, stable = [], []
    for entries in pairs.values():
        hits = np.sum([e[0] for e in entries], axis=0)
        seen = np.sum([e[1] for e in entries], axis=0)
        consistent.append(float((hits / np.maximum(seen, 1) >= threshold).any()))
        stable.append(np.mean([np.array_equal(e[0], e[2]) for e in entries]))
    return float(np.mean(consistent)), float(np.mean(stable)), len(pairs)


@pytest.fixture(scope="module")
def birds_run(birds_store, protoquant_run, tmp_path_factory):
    """A run of each prototype head on the birds store (ProtoPool and InfoDisent with short schedules)."""
    runs = {"protoquant": protoquant_run}

    def get(name: str) -> Path:
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(name) / "run"
            fit_head(name, birds_store, runs[name], {"epochs": 3}, FitConfig(progress=False, seed=0))
        return runs[name]

    return get


@pytest.mark.parametrize("split,name", [("test", "protoquant"), ("train", "protoquant"), ("test", "protopool"),
                                        ("test", "infodisent")])
def test_metrics_recompute_from_the_evidence_rows(birds_store, birds_run, split, name):
    run = birds_run(name)  # any head: the rows and the rules are the same
    results = evaluate_run(run, EvaluateConfig(split=split, confusion_png=False))
    saved = json.loads((run / f"eval-{split}.json").read_text())
    conf = saved["metric_config"]
    assert conf["input_size"] == [224, 224] and conf["purity_patch"] == 32 and conf["consistency_box"] == 72
    assert conf["threshold"] == 0.8 and "noise_sigma_pixels" in conf
    parts, names = _parts(Path(birds_store))

    purity = pq.read_table(run / f"eval-{split}" / "purity.parquet").to_pydict()
    used = sorted(set(purity["prototype"]))
    assert len(used) == results["purity"]["prototypes"] == results["prototypes_used"]
    n_split = results["num_images"]
    assert purity["rank"] == list(range(min(10, n_split))) * len(used)
    for p in used:  # each prototype: distinct images, presence falling with the rank
        mine = [i for i, q in enumerate(purity["prototype"]) if q == p]
        assert len({purity["image_id"][i] for i in mine}) == len(mine)
        assert all(np.diff([purity["presence"][i] for i in mine]) <= 0)
    value, related = _purity(purity, parts, names, conf["purity_patch"], conf["input_size"])
    assert results["purity"]["value"] == pytest.approx(value, abs=1e-12)
    assert results["purity"]["part_related"] == related

    cons = pq.read_table(run / f"eval-{split}" / "consistency.parquet")
    assert cons.column_names == ["image_id", "label", "prototype", "peak_x", "peak_y", "noise_peak_x", "noise_peak_y"]
    rows = cons.to_pydict()
    consistency, stability, pairs = _consistency_stability(rows, parts, conf["consistency_box"], conf["threshold"],
                                                           conf["input_size"])
    assert results["consistency"]["value"] == pytest.approx(consistency, abs=1e-12)
    assert results["stability"]["value"] == pytest.approx(stability, abs=1e-12)
    assert results["consistency"]["pairs"] == results["stability"]["pairs"] == pairs
    assert len(set(rows["image_id"])) == n_split  # every image of the split, with the prototypes of its class


def test_eval_json_records_the_class_prototype_rule_and_local_size(protoquant_run):
    results = evaluate_run(protoquant_run, EvaluateConfig(confusion_png=False))
    head, _, run_metrics = load_run(protoquant_run)
    assert results["class_prototype_rule"] == head.class_prototype_rule
    assert results["class_prototype_k"] == head.class_prototype_k
    assert results["local_size"] == pytest.approx(float(head.local_size().float().mean()))
    assert results.get("local_size_before_topk") == run_metrics.get("local_size_before_topk")
