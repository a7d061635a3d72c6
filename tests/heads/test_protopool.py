"""ProtoPool: the Gumbel slot schedule, its math and the push onto cached tokens."""

from __future__ import annotations


import pytest
import torch

from protocache.pipeline.heads.protopool import gumbel_scale, protopool_loss
from protocache.pipeline.runs import load_run
from protocache.stores import FeatureStore

from fit_helpers import quick_fit
from head_helpers import CLASSES, make, tokens




def test_protopool_slots_become_one_hot_at_the_end_of_the_schedule():
    head = make("protopool").train()
    cfg = head.config
    assert gumbel_scale(cfg, 0) == 0.0
    scales = [gumbel_scale(cfg, e) for e in torch.linspace(0, cfg.gumbel_epochs, 9).tolist()]
    assert scales == sorted(scales) and scales[-1] == cfg.gumbel_end
    assert gumbel_scale(cfg, cfg.gumbel_epochs + 5) == cfg.gumbel_end
    head.gumbel_scale = 0.0
    soft = head.slot_assignment()
    assert float(soft.detach().amax(dim=1).min()) < 0.9
    torch.manual_seed(0)
    head.gumbel_scale = gumbel_scale(cfg, cfg.gumbel_epochs)
    hard = head.slot_assignment().detach()
    torch.testing.assert_close(hard.sum(dim=1), torch.ones(CLASSES, cfg.slots_per_class))
    assert float(hard.amax(dim=1).min()) > 0.999
    torch.testing.assert_close(hard.argmax(dim=1), head.slot_prototypes())
    assert torch.equal(head.hard_assignment().argmax(dim=1), head.slot_prototypes())


def test_protopool_math():
    head = make("protopool").eval()
    x = tokens()
    z = torch.sigmoid(head.add_on(x))
    d = ((z[:, :, None, :] - head.prototypes[None, None]) ** 2).sum(-1)
    torch.testing.assert_close(head.distances(x), d, atol=1e-5, rtol=1e-5)
    g = lambda v: torch.log((v + 1) / (v + 1e-4))  # noqa: E731
    presence = head.presence(x)
    torch.testing.assert_close(presence, g(d.amin(1)) - g(d.mean(1)), atol=1e-5, rtol=1e-5)
    assert (presence >= -1e-6).all()  # focal similarity: Dmin <= Davg
    # the last layer starts as the class/slot identity
    k = head.config.slots_per_class
    expected = torch.zeros(CLASSES, CLASSES * k)
    for j in range(CLASSES * k):
        expected[j // k, j] = 1
    torch.testing.assert_close(head.last_layer.weight.data, expected)
    head.train()
    loss = protopool_loss(head, {"tokens": x, "label": torch.tensor([0, 1, 2, 3, 0])})
    loss.backward()
    assert torch.isfinite(loss) and head.slot_logits.grad is not None and head.prototypes.grad is not None


def test_push_puts_prototypes_exactly_on_cached_tokens(store_path, tmp_path):
    result = quick_fit("protopool", store_path, tmp_path / "run")
    head, _, metrics = load_run(result.run_dir)
    store = FeatureStore.open(store_path)
    ids = store.metadata().column("image_id").to_pylist()
    labels = store.labels()
    train = set(store.split_rows("train").tolist())
    sources = metrics["prototype_sources"]
    assert len(sources) == head.prototype_count
    for j, src in enumerate(sources):
        row, cell = src["row"], src["cell"]
        assert row == int(head.push_row[j]) and cell == int(head.push_cell[j])
        assert row in train and src["image_id"] == ids[row]
        assert src["grid_yx"] == [cell // store.layout.grid[1], cell % store.layout.grid[1]]
        token = torch.from_numpy(store.read("tokens", row, row + 1)[0, cell]).float()
        with torch.no_grad():
            torch.testing.assert_close(head.embed(token[None, None])[0, 0], head.prototypes[j], atol=1e-6, rtol=0)
        if src["classes"]:  # a prototype in some class's slots comes from an image of one of those classes
            assert int(labels[row]) in src["classes"]


def test_standardize_uses_the_train_tokens_statistics_and_old_runs_still_load(store_path, tmp_path):
    import numpy as np

    from protocache.pipeline.fit import FitConfig, fit_head
    from fit_helpers import QUICK

    result = fit_head("protopool", store_path, tmp_path / "run", {**QUICK["protopool"], "standardize": True},
                      FitConfig(progress=False, threads=1, val_fraction=0))
    store = FeatureStore.open(store_path)
    train = store.read("tokens", 0, store.num_images)[store.split_rows("train")].astype(np.float64)
    train = train.reshape(-1, train.shape[-1])
    head = result.model
    np.testing.assert_allclose(head.token_mean.numpy(), train.mean(0), rtol=1e-5, atol=1e-5)
    std = train.std(0)
    np.testing.assert_allclose(head.token_scale.numpy(), np.where(std > 1e-6, std, 1.0), rtol=1e-4, atol=1e-5)
    # a run written before the statistics existed has no such tensors: it loads with the identity
    from protocache.pipeline.heads import StoreInfo, create_head

    config = result.config
    old_run = create_head("protopool", StoreInfo.from_json(config["store"]["info"]), **config["head_config"])
    old_run.load_weights({k: v for k, v in head.state_dict().items() if k not in ("token_mean", "token_scale")})
    assert torch.equal(old_run.token_mean, torch.zeros_like(old_run.token_mean))
    assert torch.equal(old_run.token_scale, torch.ones_like(old_run.token_scale))
    torch.testing.assert_close(old_run.prototypes, head.prototypes)
