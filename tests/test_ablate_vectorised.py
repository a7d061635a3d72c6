"""ablate's read pass: heads of one kind trained as one vectorised module, each exactly its lone fit
(CPU, one torch thread), each with its own optimiser, the store read once for all of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protocache.pipeline.ablate import AblatePoint, run_group
from protocache.pipeline.ablate_pass import ReadMeter
from protocache.pipeline.fit import FitConfig, fit_head
from protocache.pipeline.stacked import StackedAdam, headwise_bmm
from protocache.stores import FeatureStore
from protocache.stores import runs
from protocache.stores.errors import ProtocacheError

OPTIONS = {"threads": 1, "shards_in_memory": 1}  # streamed from the store every epoch
PQ = {"codebook_size": 16, "codebook_epochs": 1, "prune_rounds": 1, "epochs": 2, "finetune_epochs": 1,
      "kmeans_iters": 5}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / runs.WEIGHTS))


def lone(store_path, point: AblatePoint, out: Path, meter: bool = False):
    store = ReadMeter(FeatureStore.open(store_path)) if meter else None
    result = fit_head(point.head, store_path, out / point.name, point.config,
                      FitConfig(seed=point.seed, progress=False, **OPTIONS), store=store)
    return result, store


def assert_lone_weights(store_path, points, out: Path) -> None:
    for p in points:
        result, _ = lone(store_path, p, out / "alone")
        assert (Path(result.run_dir) / runs.WEIGHTS).read_bytes() == (out / "pass" / p.name / runs.WEIGHTS).read_bytes()


def test_linear_probes_train_as_one_module_each_with_its_lone_weights(store_path, tmp_path):
    # lr and weight decay differ per head: each head keeps its own AdamW hyper-parameters and moments
    points = [AblatePoint("linear", {"epochs": 3, "lr": lr, "weight_decay": wd}, 0)
              for lr, wd in ((1e-3, 0.0), (1e-2, 1e-4), (3e-2, 1e-2))]
    rows = run_group(str(store_path), points, str(tmp_path / "pass"), OPTIONS)
    assert all(r["train_loops"] == "probe: vectorised (3 of 3 heads)" for r in rows)
    assert_lone_weights(store_path, points, tmp_path)  # bit for bit
    # independent heads: another lr gives other weights
    w = [weights(tmp_path / "pass" / p.name)["linear.weight"] for p in points]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert (w[2] - w[0]).abs().max() > 1e-3


def test_protoquant_stage_two_is_vectorised_with_lone_weights(store_path, tmp_path):
    points = [AblatePoint("protoquant", {**PQ, "tau": tau, "lr": lr}, 3) for tau, lr in ((0.1, 0.05), (0.2, 0.02))]
    rows = run_group(str(store_path), points, str(tmp_path / "pass"), OPTIONS)
    loops = rows[0]["train_loops"]
    assert "teacher: vectorised (2 of 2 heads)" in loops and "head: vectorised (2 of 2 heads)" in loops
    assert "codebook: shared (2 heads)" in loops  # stage 1 counts code usage in place: not a stacked step
    assert_lone_weights(store_path, points, tmp_path)


def test_heads_whose_shapes_differ_share_the_batches_and_keep_their_lone_weights(store_path, tmp_path):
    points = [AblatePoint("protoquant", {**PQ, "codebook_size": k}, 3) for k in (16, 24)]
    rows = run_group(str(store_path), points, str(tmp_path / "pass"), OPTIONS)
    assert "head: shared (2 heads)" in rows[0]["train_loops"]  # 12 and 18 codes after pruning: no stack
    assert rows[0]["group_served"] > rows[0]["group_reads"] > 0
    assert_lone_weights(store_path, points, tmp_path)


def test_one_pass_reads_a_third_of_three_separate_fits(store_path, tmp_path):
    points = [AblatePoint("linear", {"epochs": 2, "lr": lr}, 0) for lr in (1e-3, 2e-3, 4e-3)]
    rows = run_group(str(store_path), points, str(tmp_path / "pass"), OPTIONS)
    separate = []
    for p in points:
        _, meter = lone(store_path, p, tmp_path / "alone", meter=True)
        separate.append(meter.counts["bytes"])
    assert len(set(separate)) == 1 and separate[0] > 0
    assert rows[0]["group_bytes_read"] * 3 == sum(separate)
    assert rows[0]["bytes_read_per_head"] * 3 == separate[0]
    # a group of one reads what a lone fit reads
    single = run_group(str(store_path), points[:1], str(tmp_path / "single"), OPTIONS)
    assert single[0]["group_bytes_read"] == separate[0]


def test_a_diverging_head_stops_alone(store_path, tmp_path):
    points = [AblatePoint("linear", {"epochs": 3, "lr": lr, "standardize": "none"}, 0) for lr in (1e-3, 1e37)]
    with pytest.raises(ProtocacheError, match="training diverged"):
        run_group(str(store_path), points, str(tmp_path / "pass"), OPTIONS)
    assert (tmp_path / "pass" / points[0].name / runs.WEIGHTS).exists()  # the sound head finished
    assert not (tmp_path / "pass" / points[1].name / runs.WEIGHTS).exists()
    assert_lone_weights(store_path, points[:1], tmp_path)


SWEEP = [{"lr": 1e-2, "weight_decay": 0.0}, {"lr": 3e-3, "weight_decay": 0.1}, {"lr": 1e-1, "weight_decay": 1e-2}]
APART = [{"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.8, 0.99)},
         {"lr": 1e-1, "weight_decay": 1e-2, "eps": 1e-6}]


@pytest.mark.parametrize("kind", [torch.optim.AdamW, torch.optim.Adam])
@pytest.mark.parametrize("settings", [SWEEP, APART], ids=["lr-wd", "betas-eps"])
def test_stacked_adam_is_each_heads_own_optimiser(kind, settings):
    # 35 entries a head: a vectorised part and a tail, which kernels may round differently
    torch.manual_seed(0)
    lone_params = [torch.nn.Parameter(torch.randn(5, 7)) for _ in settings]
    stacked = torch.stack([p.detach() for p in lone_params]).requires_grad_()
    heads = []
    for p in lone_params:
        head = torch.nn.Module()
        head.w = torch.nn.Parameter(p.detach().clone())
        heads.append(head)
    optimizers = [kind([h.w], **s) for h, s in zip(heads, settings)]
    reference = [kind([p], **s) for p, s in zip(lone_params, settings)]
    adam = StackedAdam.build(optimizers, heads, ("w",))
    adam.stack_moments([stacked])
    for _ in range(5):
        grads = torch.randn(len(settings), 5, 7)
        stacked.grad = grads.clone()
        adam.step()
        for p, opt, g in zip(lone_params, reference, grads):
            p.grad = g.clone()
            opt.step()
    for i, p in enumerate(lone_params):
        assert torch.equal(stacked[i].detach(), p.detach())
    adam.write_back([[h.w] for h in heads])  # the moments go back to each head's own optimiser
    for opt, ref, h, p in zip(optimizers, reference, heads, lone_params):
        assert torch.equal(opt.state[h.w]["exp_avg_sq"], ref.state[p]["exp_avg_sq"])
        assert float(opt.state[h.w]["step"]) == 5


def test_headwise_bmm_matches_each_heads_own_product():
    torch.manual_seed(0)
    a = torch.rand(3, 13, 18, requires_grad=True)  # slices off 64-byte boundaries
    b = torch.rand(3, 18, 10, requires_grad=True)
    out = headwise_bmm(a, b)
    out.square().sum().backward()
    for i in range(3):
        ai, bi = a[i:i + 1].detach().clone().requires_grad_(), b[i:i + 1].detach().clone().requires_grad_()
        oi = torch.bmm(ai, bi)
        oi.square().sum().backward()
        assert torch.equal(out[i], oi[0]) and torch.equal(a.grad[i], ai.grad[0]) and torch.equal(b.grad[i], bi.grad[0])


def test_heads_explaining_the_backbone_share_a_pass_on_its_labels_with_lone_weights(store_path, tmp_path):
    """target=backbone points train in one pass over the store relabelled once with the backbone's top-1, each
    with the weights of its lone fit; a labels point of the same head is a group of its own."""
    from protocache.pipeline.ablate import check_points, group_points

    quick = {"target": "backbone", "warmup_epochs": 1, "epochs": 1, "last_layer_epochs": 1}
    points = [AblatePoint("infodisent", {**quick, "gumbel_tau": tau}, 3) for tau in (0.3, 0.5)]
    labels_point = AblatePoint("infodisent", {k: v for k, v in quick.items() if k != "target"}, 3)
    assert [len(g) for g in group_points([*points, labels_point])] == [2, 1]
    with pytest.raises(ProtocacheError, match="the grid mixes target=backbone and target=labels"):
        check_points([*points, labels_point], FeatureStore.open(store_path), OPTIONS)
    rows = run_group(str(store_path), points, str(tmp_path / "pass"), OPTIONS)
    assert "rotation: shared (2 heads)" in rows[0]["train_loops"]
    for p in points:
        config = (tmp_path / "pass" / p.name / runs.CONFIG).read_text()
        assert '"source": "backbone"' in config
    assert_lone_weights(store_path, points, tmp_path)
