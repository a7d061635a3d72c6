"""The head registry, configs through the config door, and the interface every head shares."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protocache.pipeline import heads as H
from protocache.stores.errors import ProtocacheError

from head_helpers import CLASSES, DIM, GRID, make, tokens



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


def test_local_size_is_one_relative_definition_for_every_head():
    head = make("protoquant", codebook_size=4, prune_to=0).eval()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.5, 0.09, -1.0],  # max 1: 1.0 and 0.5 pass 0.1; 0.09 does not
                                        [0.05, 0.04, 0.001, 0.0],  # max 0.05: 0.05 and 0.04 pass 0.005
                                        [0.0, 0.0, 0.0, 0.0],  # nothing positive: 0
                                        [2.0, 2.0, 2.0, 0.2]]))  # 0.2 is not > 0.1 * 2.0: 3
    assert head.local_size().tolist() == [2, 2, 0, 3]
    # gmum/protoquant's own count (ReLU(W) > 0.1, absolute) stays reported beside it
    assert head.local_size_reference().tolist() == [2, 0, 0, 4]
    assert make("linear").local_size().tolist() == [1] * CLASSES


def test_infodisent_counts_its_k_strongest_channels_as_a_class_prototypes():
    head = make("infodisent", prototypes_per_class=3)
    with torch.no_grad():
        head.weight.copy_(torch.arange(CLASSES * DIM, dtype=torch.float32).reshape(CLASSES, DIM) - 20)
    assert head.class_prototype_k == 3
    assert head.class_prototypes(0).tolist() == []  # row 0 is -20..-9: no positive weight
    assert head.class_prototypes(1).tolist() == [11, 10, 9]  # row 1 is -8..3: the three largest positives
    assert make("infodisent", prototypes_per_class=0).class_prototype_k is None
