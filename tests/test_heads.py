"""Unit tests of the heads' math on small tensors (no store needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from protocache.pipeline import heads as H
from protocache.pipeline.fit import gumbel_scale, protopool_loss
from protocache.stores.errors import ProtocacheError

DIM, GRID, CLASSES = 12, (3, 4), 4
SMALL = {
    "linear": {},
    "protoquant": {"codebook_size": 9},
    "protopool": {"num_prototypes": 7, "slots_per_class": 3, "proto_dim": 5},
    "infodisent": {},
}


def make(name: str, **cfg) -> H.Head:
    torch.manual_seed(0)
    return H.create_head(name, dim=DIM, grid=GRID, num_classes=CLASSES, **{**SMALL[name], **cfg})


def tokens(n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, GRID[0] * GRID[1], DIM, generator=g) * 3


def test_registry_lists_the_four_heads():
    assert H.list_heads()[0] == "linear"
    assert set(H.list_heads()) >= {"linear", "protoquant", "protopool", "infodisent"}


def test_unknown_head_lists_the_registered_ones():
    with pytest.raises(ProtocacheError, match="unknown head 'protonet'.*linear.*protoquant"):
        H.create_head("protonet", dim=DIM, grid=GRID, num_classes=CLASSES)


def test_unknown_config_key_lists_the_valid_ones():
    with pytest.raises(ProtocacheError, match=r"unknown config key\(s\) 'codebok_size'.*valid keys: codebook_size"):
        H.create_head("protoquant", dim=DIM, grid=GRID, num_classes=CLASSES, codebok_size=3)


def test_config_values_are_type_checked_and_coerced():
    head = make("protoquant", tau=1)  # an int where a float is expected is fine
    assert isinstance(head.config.tau, float) and head.config.tau == 1.0
    with pytest.raises(ProtocacheError, match="'tau' expects float"):
        make("protoquant", tau="warm")
    with pytest.raises(ProtocacheError, match="init must be"):
        make("protoquant", init="random")


def test_defaults_scale_with_the_store():
    small = H.StoreInfo(dim=DIM, grid=GRID, num_classes=10, num_train=1437)
    cub = H.StoreInfo(dim=DIM, grid=GRID, num_classes=200, num_train=5994)
    pq_small, pq_cub = H.resolve_config("protoquant", small), H.resolve_config("protoquant", cub)
    assert pq_small.codebook_size == 137 and pq_small.prune_to == 100  # ten codes per class after pruning
    assert pq_cub.codebook_size == 2731 and pq_cub.prune_to == 2000
    assert pq_cub.batch_size == 512 and pq_small.batch_size == 128  # published 512; ~10 steps/epoch on small data
    assert pq_cub.epochs == 30
    pp_small, pp_cub = H.resolve_config("protopool", small), H.resolve_config("protopool", cub)
    assert pp_cub.num_prototypes == 202 and pp_cub.proto_dim == 256 and pp_cub.slots_per_class == 10
    assert pp_small.num_prototypes == 100 and pp_small.proto_dim == 32  # one prototype per class slot
    assert pp_cub.gumbel_epochs == 30 and pp_cub.epochs == 40
    assert pp_small.gumbel_epochs <= pp_small.epochs
    for name in H.list_heads():  # resolving twice changes nothing (run configs reload as written)
        once = H.resolve_config(name, small)
        assert H.resolve_config(name, small, dataclasses.asdict(once)) == once


@pytest.mark.parametrize("name", ["linear", "protoquant", "protopool", "infodisent"])
def test_interface_shapes(name):
    head = make(name).eval()
    x = tokens()
    p = head.prototype_count
    with torch.no_grad():
        logits = head(x)
        assert logits.shape == (5, CLASSES)
        assert head.similarity_map(x).shape == (5, p, *GRID)
        assert head.presence(x).shape == (5, p)
        weights = head.class_weights()
        assert weights.shape == (CLASSES, p)
        contrib = head.contributions(x)
        assert contrib.shape == (5, CLASSES, p)
        ev = head.evidence(x)
        assert ev["positive"].shape == ev["negative"].shape == (5, CLASSES, p)
        assert (ev["positive"] >= 0).all() and (ev["negative"] >= 0).all()
        torch.testing.assert_close(ev["positive"] - ev["negative"], contrib)
        if name != "linear":  # the probe's bias is not a prototype's contribution
            torch.testing.assert_close(contrib.sum(-1), logits, rtol=1e-4, atol=1e-4)
            assert (weights >= 0).all()
        for c in range(CLASSES):
            idx = head.class_prototypes(c)
            assert idx.dtype == torch.long and len(idx) >= 1
            assert int(idx.max()) < p


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


def test_infodisent_rotation_stays_orthogonal():
    head = make("infodisent")
    g = torch.Generator().manual_seed(3)
    for _ in range(5):  # optimiser-like steps folded into the rotation
        head.skew.data = torch.randn(DIM, DIM, generator=g) * 0.3
        head.retract()
        assert float(head.skew.detach().abs().max()) == 0.0
    u = head.rotation
    torch.testing.assert_close(u @ u.T, torch.eye(DIM), atol=1e-5, rtol=0)
    assert not torch.allclose(u, torch.eye(DIM))
    head.eval()
    head.skew.data = torch.randn(DIM, DIM, generator=g) * 0.1  # inference uses exp(A - A^T) R exactly
    expected = torch.linalg.matrix_exp(head.skew - head.skew.T) @ head.rotation
    torch.testing.assert_close(head.rotation_matrix(), expected)
    torch.testing.assert_close(expected @ expected.T, torch.eye(DIM), atol=1e-5, rtol=0)


def test_infodisent_gradient_at_zero_matches_matrix_exp():
    head = make("infodisent").train()
    head.rotation.copy_(torch.linalg.matrix_exp(torch.randn(DIM, DIM) * 0.2 - torch.randn(DIM, DIM) * 0.2))
    target = torch.randn(DIM, DIM)
    (head.rotation_matrix() * target).sum().backward()
    ours = head.skew.grad.clone()
    skew = torch.zeros(DIM, DIM, requires_grad=True)
    (torch.linalg.matrix_exp(skew - skew.T) @ head.rotation * target).sum().backward()
    torch.testing.assert_close(ours, skew.grad, atol=1e-5, rtol=1e-4)


def test_infodisent_pooling_positive_and_negative_evidence():
    head = make("infodisent").eval()
    x = tokens()
    j = x @ head.rotation_matrix().T
    pos, neg = head.channel_evidence(x)
    torch.testing.assert_close(pos, F.relu(j).amax(dim=1))
    torch.testing.assert_close(neg, F.relu(-j).amax(dim=1))
    torch.testing.assert_close(head(x), (pos - neg) @ F.relu(head.weight).T)
    head.train()  # the Gumbel-softmax stand-in is a weighted mean: never above the hard max
    with torch.no_grad():
        soft_pos, _ = head.channel_evidence(x)
    assert (soft_pos <= pos + 1e-5).all()


def test_protopool_slots_become_one_hot_at_the_end_of_the_schedule():
    head = make("protopool").train()
    cfg = head.config
    assert gumbel_scale(cfg, 0) == 0.0
    scales = [gumbel_scale(cfg, e) for e in torch.linspace(0, cfg.gumbel_epochs, 9).tolist()]
    assert scales == sorted(scales) and scales[-1] == cfg.gumbel_end
    assert gumbel_scale(cfg, cfg.gumbel_epochs + 5) == cfg.gumbel_end
    head.gumbel_scale = 0.0
    soft = head.slot_assignment()
    assert float(soft.amax(dim=1).min()) < 0.9
    torch.manual_seed(0)
    head.gumbel_scale = gumbel_scale(cfg, cfg.gumbel_epochs)
    hard = head.slot_assignment()
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


def test_linear_probe_on_pooled_or_mean():
    head = make("linear").eval()
    x = tokens()
    torch.testing.assert_close(head(x), head(None, pooled=x.mean(1)))
    torch.testing.assert_close(head.presence(x) + head.linear.bias, head(x), rtol=1e-5, atol=1e-5)
    assert head.prototype_count == CLASSES
