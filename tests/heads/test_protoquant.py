"""ProtoQuant: its math, post-hoc sparsification and its teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protocache.pipeline import fit
from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError

from fit_helpers import QUICK
from head_helpers import CLASSES, DIM, make, tokens




def test_protoquant_math():
    head = make("protoquant").eval()
    x = tokens()
    s = F.normalize(x, dim=-1) @ F.normalize(head.codes, dim=-1).T
    a = torch.softmax(s / 0.1, dim=-1)
    p = head.presence(x)
    torch.testing.assert_close(p, a.amax(dim=1))
    assert (p >= 0).all() and (p <= 1).all()
    torch.testing.assert_close(head.similarity_map(x).amax(dim=(2, 3)), p)
    torch.testing.assert_close(head(x), p @ F.relu(head.weight).T)
    assert head.nearest_code(x).shape == (5, 12)
    # the classifier is initialised around 1 and stays non-negative through ReLU
    assert abs(float(head.weight.detach().mean()) - 1.0) < 0.1
    head.weight.data[0, 0] = -3.0
    assert float(head.class_weights().detach()[0, 0]) == 0.0


def test_protoquant_topk_and_pruning():
    head = make("protoquant").eval()
    head.limit_per_class(2)
    w = head.class_weights()
    assert ((w > 0).sum(dim=1) <= 2).all()
    used = int((w > 0).any(dim=0).sum())
    x = tokens()
    before = head(x)
    kept = head.prune_unused()
    assert head.prototype_count == used == len(kept)
    assert head.codes.shape == (used, DIM) and head.weight.shape == (CLASSES, used)
    # removing codes no class weighs changes presence of the rest (softmax over fewer codes),
    # but every class still reads only its own kept codes
    assert ((head.class_weights() > 0).sum(dim=1) <= 2).all()
    assert before.shape == head(x).shape
    assert (head.local_size() <= 2).all()


def test_protoquant_loads_pruned_weights_of_another_shape():
    head = make("protoquant")
    head.limit_per_class(1)
    head.prune_unused()
    fresh = make("protoquant")
    fresh.load_weights(head.state_dict())
    assert fresh.prototype_count == head.prototype_count
    torch.testing.assert_close(fresh.eval()(tokens()), head.eval()(tokens()))


def _store_with_matching_logits(path: Path, n: int = 96, classes: int = 4, dim: int = 16) -> tuple[Path, np.ndarray]:
    """A store whose cached logits are an exact affine map of pooled (= mean token), C0 = C."""
    from protocache.stores import StoreLayout

    layout = StoreLayout(num_images=n, grid=(2, 3), dim=dim, num_logits=classes, shard_size=32, chunk_size=8)
    store = FeatureStore.create_or_open(path, layout, {"test": "matching-logits"},
                                        {"num_classes": classes, "class_names": [str(c) for c in range(classes)],
                                         "pooled": "mean"})
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(classes, dim)).astype(np.float32)
    for s in range(layout.num_shards):
        start, stop = layout.shard_bounds(s)
        tokens = rng.random((stop - start, 6, dim)).astype(np.float16)
        pooled = tokens.astype(np.float32).mean(1)
        logits = pooled @ weight.T + 0.5
        labels = logits.argmax(1)
        rows = [{"row": i, "image_id": f"img{i}", "path": "", "label": int(labels[i - start]),
                 "class_name": str(labels[i - start]), "split": "test" if i % 4 == 0 else "train",
                 "width": 1, "height": 1} for i in range(start, stop)]
        store.write_shard(s, {"clean": {"tokens": tokens, "pooled": pooled, "logits": logits}}, rows)
    return path, weight


def test_protoquant_teacher_is_the_backbone_classifier_when_classes_match(tmp_path, store_path):
    path, weight = _store_with_matching_logits(tmp_path / "m.zarr")
    cfg = {**QUICK["protoquant"], "codebook_size": 12, "prune_to": 0, "kmeans_sample": 400}
    result = fit.fit_head("protoquant", path, tmp_path / "run", {**cfg, "teacher": "backbone"},
                        fit.FitConfig(progress=False))
    teacher = result.metrics["teacher"]
    assert teacher["kind"] == "backbone" and teacher["relative_residual"] < 1e-2
    auto = fit.fit_head("protoquant", path, tmp_path / "auto", cfg, fit.FitConfig(progress=False))
    assert auto.metrics["teacher"]["kind"] == "backbone"
    # digits logits are 1000 ImageNet classes: the backbone cannot teach 10 digit classes
    with pytest.raises(ProtocacheError, match="1000 logits for 10 classes; use teacher=probe"):
        fit.fit_head("protoquant", store_path, tmp_path / "digits", {**QUICK["protoquant"], "teacher": "backbone"},
                   fit.FitConfig(progress=False))
    label_free = fit.fit_head("protoquant", store_path, tmp_path / "free", {**QUICK["protoquant"], "task_weight": 0},
                            fit.FitConfig(progress=False))
    assert "teacher" not in label_free.metrics  # online spherical k-means: no labels in stage 1


def test_a_codebook_too_small_for_the_top_k_names_what_to_change():
    with pytest.raises(ProtocacheError, match=r"usage pruning would keep 1 codes .* each class keeps up to 5 "
                                              r"\(topk_per_class\): raise codebook_size or prune_to"):
        make("protoquant", codebook_size=1)
