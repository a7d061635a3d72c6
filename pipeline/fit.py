"""Fit stage: train one registered head on a feature store and write a run directory.

Data comes from the store in batches. A split that spans at most `shards_in_memory`
shards is read once and kept (that many shards is the memory bound anyway); a larger
one is streamed from the store every epoch with ``FeatureStore.iter_batches``, so memory
stays flat as the store grows. Per-image features derived from frozen parts (ProtoQuant
presence with frozen codes, ProtoPool slot similarities for last-layer tuning, pooled
features for the probe) are kept in RAM while they fit in `feature_cache_mb`, and
recomputed from the tokens each epoch otherwise.

Determinism: the seed fixes torch, numpy, Python's `random`, the k-means sample and the
batch order of every epoch; torch runs with deterministic algorithms. On the CPU, the
same seed, store, config and thread count give byte-identical weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from protocache.stores import FeatureStore
from protocache.stores import runs as run_files
from protocache.stores.errors import MissingShardError, ProtocacheError

from . import codebook as cb
from .heads import (Head, InfoDisent, LinearProbe, ProtoPool, ProtoQuant, StoreInfo, create_head, head_class,
                    list_heads, resolve_config, store_info)

RUN_FORMAT = 1


@dataclass
class FitConfig:
    """How to fit (the head's own hyper-parameters live in its config)."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    epochs: int | None = None  # shorthand for the head config's `epochs`
    shards_in_memory: int = 2  # at most this many shards of tokens in RAM
    feature_cache_mb: int = 1024  # derived per-image features kept in RAM up to this size
    threads: int | None = None  # torch threads; pin it for byte-identical CPU re-runs
    eval_batch_size: int = 256
    progress: bool = True


@dataclass
class FitResult:
    run_dir: str
    head: str
    metrics: dict[str, Any]
    config: dict[str, Any]


# ----------------------------------------------------------------------------- data sources


class Batches(Protocol):
    num_rows: int

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        ...


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class StoreSplit:
    """One split of a store as batches of the given fields (numpy, float16 arrays)."""

    def __init__(self, store: FeatureStore, split: str, fields: tuple[str, ...], seed: int = 0,
                 shards_in_memory: int = 2):
        self.store, self.split, self.fields, self.seed = store, split, tuple(fields), seed
        self.shards_in_memory = max(1, shards_in_memory)
        rows = store.split_rows(split)
        self.num_rows = int(len(rows))
        shards = np.unique(np.asarray(rows) // store.layout.shard_size)
        self.resident = len(shards) <= self.shards_in_memory
        self._arrays: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            parts: dict[str, list[np.ndarray]] = {f: [] for f in self.fields}
            for b in self.store.iter_batches(self.split, batch_size=4096, fields=self.fields,
                                             shards_in_memory=self.shards_in_memory):
                for f in self.fields:
                    parts[f].append(b[f])
            self._arrays = {f: np.concatenate(v) if v else np.zeros((0,)) for f, v in parts.items()}
        return self._arrays

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        seed = _epoch_seed(self.seed, epoch)
        if not self.resident:
            yield from self.store.iter_batches(self.split, batch_size=batch_size, fields=self.fields,
                                               shuffle=shuffle, seed=seed, shards_in_memory=self.shards_in_memory)
            return
        arrays = self._load()
        order = np.random.default_rng(seed).permutation(self.num_rows) if shuffle else np.arange(self.num_rows)
        for i in range(0, self.num_rows, batch_size):
            idx = order[i:i + batch_size]
            yield {f: v[idx] for f, v in arrays.items()}


class ArraySplit:
    """In-memory per-image arrays with the same batches() interface."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int = 0):
        self.arrays, self.seed = arrays, seed
        self.num_rows = int(len(next(iter(arrays.values()))))

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        order = (np.random.default_rng(_epoch_seed(self.seed, epoch)).permutation(self.num_rows)
                 if shuffle else np.arange(self.num_rows))
        for i in range(0, self.num_rows, batch_size):
            idx = order[i:i + batch_size]
            yield {f: v[idx] for f, v in self.arrays.items()}


class MappedSplit:
    """A source whose batches go through `fn` on the fly (derived features too big to keep)."""

    def __init__(self, source: Batches, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]):
        self.source, self.fn = source, fn
        self.num_rows = source.num_rows

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        for b in self.source.batches(batch_size, epoch=epoch, shuffle=shuffle):
            yield self.fn(b)


def derive(source: Batches, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], budget_mb: float,
           batch_size: int = 256) -> Batches:
    """Per-image features fn(batch) of a whole split: kept in RAM if under budget, else recomputed."""
    parts: dict[str, list[np.ndarray]] = {}
    used = 0
    for b in source.batches(batch_size, shuffle=False):
        out = fn(b)
        used += sum(v.nbytes for v in out.values())
        if used > budget_mb * 2**20:
            return MappedSplit(source, fn)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return ArraySplit({k: np.concatenate(v) for k, v in parts.items()}, seed=getattr(source, "seed", 0))


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        t = t.long() if k in ("label", "row") else t.float()
        out[k] = t.to(device)
    return out


# ----------------------------------------------------------------------------- context


class FitContext:
    """What a head's training procedure needs: the store, sources, device, logging, curves."""

    def __init__(self, store: FeatureStore, info: StoreInfo, fit: FitConfig, device: torch.device,
                 log: Callable[[str], None]):
        self.store, self.info, self.fit, self.device, self.log = store, info, fit, device, log
        self.loss_curve: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self._epoch_counter = 0
        self._sources: dict[tuple, StoreSplit] = {}

    def split(self, split: str, fields: tuple[str, ...]) -> StoreSplit:
        key = (split, tuple(fields))
        if key not in self._sources:
            self._sources[key] = StoreSplit(self.store, split, fields, seed=self.fit.seed,
                                            shards_in_memory=self.fit.shards_in_memory)
        return self._sources[key]

    def next_epoch(self) -> int:
        """A fresh epoch number for batch shuffling (distinct across stages)."""
        self._epoch_counter += 1
        return self._epoch_counter

    def torch_generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(_epoch_seed(self.fit.seed, 10_000 + salt))

    def progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                    disable=not self.fit.progress, dynamic_ncols=True)

    def train(self, stage: str, source: Batches, optimizer: torch.optim.Optimizer, epochs: int, batch_size: int,
              step: Callable[[dict[str, torch.Tensor], float], torch.Tensor],
              after_step: Callable[[], None] | None = None,
              after_epoch: Callable[[int], None] | None = None) -> None:
        """The shared loop: step(batch, epoch_progress) -> loss; records a loss per epoch."""
        steps = math.ceil(source.num_rows / batch_size)
        started = time.perf_counter()
        with self.progress(epochs * steps, stage) as bar:
            for epoch in range(epochs):
                total, count = 0.0, 0
                for i, b in enumerate(source.batches(batch_size, epoch=self.next_epoch(), shuffle=True)):
                    batch = to_torch(b, self.device)
                    loss = step(batch, epoch + i / steps)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if after_step is not None:
                        after_step()
                    n = len(batch["label"])
                    total += float(loss.detach()) * n
                    count += n
                    bar.update(1)
                mean = total / max(count, 1)
                self.loss_curve.append({"stage": stage, "epoch": epoch, "loss": mean})
                bar.set_postfix(loss=f"{mean:.4f}")
                if after_epoch is not None:
                    after_epoch(epoch)
        self.log(f"{stage}: {epochs} epoch(s), {epochs * steps} steps of batch {batch_size}, "
                 f"final loss {self.loss_curve[-1]['loss']:.4f} ({time.perf_counter() - started:.1f}s)")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(head: Head, source: Batches, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy (fraction) of the head on a source of tokens/pooled + labels."""
    was_training = head.training
    head.eval()
    correct = total = 0
    for b in source.batches(batch_size, shuffle=False):
        batch = to_torch(b, device)
        logits = head(batch.get("tokens"), pooled=batch.get("pooled"))
        correct += int((logits.argmax(1) == batch["label"]).sum())
        total += len(batch["label"])
    head.train(was_training)
    return correct / max(total, 1)


def head_fields(head: Head) -> tuple[str, ...]:
    return tuple(head.inputs) + ("label",)


# ----------------------------------------------------------------------------- linear probe


def pooled_source(ctx: FitContext, split: str, source_kind: str) -> Batches:
    """Per-image features for a probe: the store's pooled array, or the mean token.

    The mean token is read from `pooled` when the store says pooled is the mean token
    (CNNs), so a probe "on the mean" does not have to stream all tokens.
    """
    if source_kind == "pooled" or ctx.info.pooled == "mean":
        return ctx.split(split, ("pooled", "label"))
    tokens = ctx.split(split, ("tokens", "label"))
    return derive(tokens, lambda b: {"pooled": b["tokens"].astype(np.float32).mean(1), "label": b["label"]},
                  ctx.fit.feature_cache_mb)


def fit_linear(head: LinearProbe, ctx: FitContext, stage: str = "probe") -> None:
    """Standardise (optional), then AdamW on cross-entropy over the pooled features."""
    cfg = head.config
    train = pooled_source(ctx, "train", cfg.source)
    if cfg.standardize != "none":
        total = sq = None
        n = 0
        for b in train.batches(4096, shuffle=False):  # streaming mean / variance
            x = b["pooled"].astype(np.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
            n += len(x)
        mean = total / n
        if cfg.standardize == "feature":
            std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
            scale = np.where(std > 1e-6, std, 1.0)
        else:  # one scale (the RMS norm per dim) keeps every direction's relative size
            scale = np.full_like(mean, max(float(np.sqrt(sq.sum() / n / len(mean))), 1e-6))
            mean = np.zeros_like(mean)
        head.feature_mean.copy_(torch.from_numpy(mean).float())
        head.feature_scale.copy_(torch.from_numpy(scale).float())
    epochs = cfg.epochs
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ctx.train(stage, train, opt, epochs, cfg.batch_size,
              lambda b, _: F.cross_entropy(head.forward_features(b["pooled"]), b["label"]))


# ----------------------------------------------------------------------------- ProtoQuant


def _recover_backbone_classifier(ctx: FitContext) -> tuple[torch.nn.Linear, float] | None:
    """The backbone's own classifier as an affine map pooled -> logits, solved from the cache.

    On a CNN store pooled is the mean token and the classifier is linear in it, so least
    squares over the cached (pooled, logits) pairs recovers it; the relative residual
    says how well.
    """
    if not ctx.store.has_logits or ctx.info.num_logits != ctx.info.num_classes or ctx.info.pooled != "mean":
        return None
    d = ctx.info.dim
    xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    xty = torch.zeros(d + 1, ctx.info.num_logits, dtype=torch.float64)
    yy = 0.0
    for b in ctx.split("train", ("pooled", "logits", "label")).batches(2048, shuffle=False):
        x = torch.from_numpy(b["pooled"]).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        y = torch.from_numpy(b["logits"]).double()
        xtx += x.T @ x
        xty += x.T @ y
        yy += float((y * y).sum())
    sol = torch.linalg.solve(xtx + 1e-6 * torch.eye(d + 1, dtype=torch.float64), xty)
    resid = max(yy - float((sol * xty).sum()), 0.0)  # ||Y - X sol||^2 at the normal-equation solution
    layer = torch.nn.Linear(d, ctx.info.num_logits)
    layer.weight.data.copy_(sol[:d].T.float())
    layer.bias.data.copy_(sol[d].float())
    return layer, math.sqrt(resid / max(yy, 1e-12))


def protoquant_teacher(head: ProtoQuant, ctx: FitContext) -> torch.nn.Module | None:
    """The frozen classifier of mean-pooled (quantised) tokens used by stage 1."""
    cfg = head.config
    if cfg.task_weight == 0:
        return None
    if cfg.teacher in ("auto", "backbone"):
        recovered = _recover_backbone_classifier(ctx)
        if recovered is not None and recovered[1] < 1e-2:
            ctx.log(f"teacher: the backbone's classifier, recovered from cached logits (rel. residual {recovered[1]:.1e})")
            ctx.extra["teacher"] = {"kind": "backbone", "relative_residual": recovered[1]}
            return recovered[0].to(ctx.device).requires_grad_(False)
        if cfg.teacher == "backbone":
            why = ("the store has no logits" if not ctx.store.has_logits else
                   f"the backbone has {ctx.info.num_logits} logits for {ctx.info.num_classes} classes"
                   if ctx.info.num_logits != ctx.info.num_classes else
                   "pooled is not the mean token" if ctx.info.pooled != "mean" else
                   f"logits are not linear in pooled (rel. residual {recovered[1]:.2f})")
            raise ProtocacheError(f"protoquant teacher=backbone is not possible here: {why}; use teacher=probe")
    # a linear probe on the mean token, fitted on the cache first; one global feature
    # scale, not a per-dimension z-score, so quantisation error in near-constant
    # dimensions is not blown up in the CE gradient that reaches the codes
    probe = create_head("linear", ctx.info, source="mean", standardize="global").to(ctx.device)
    fit_linear(probe, ctx, stage="teacher")
    acc = evaluate(probe, pooled_source(ctx, "train", "mean"), ctx.device)
    ctx.log(f"teacher: linear probe on the mean token, train accuracy {acc:.4f}")
    ctx.extra["teacher"] = {"kind": "probe", "train_accuracy": acc}
    probe.eval().requires_grad_(False)
    return lambda m: probe.forward_features(m)  # type: ignore[return-value]


@torch.no_grad()
def init_codes(head: ProtoQuant, ctx: FitContext) -> None:
    """k-means (spherical, FAISS) on a seeded token sample, or the reference's orthogonal init.

    Centroids are unit vectors; each is scaled to the mean norm of its members so the
    codes live where the tokens do (the ||q - x||^2 term compares raw vectors).
    """
    cfg = head.config
    k = head.prototype_count
    if cfg.init == "kmeans":
        result = cb.fit_codebook(ctx.store, cb.KMeansConfig(num_codes=k, sample_size=cfg.kmeans_sample,
                                                            iters=cfg.kmeans_iters, spherical=True,
                                                            seed=ctx.fit.seed, split="train"))
        scale = np.where(result.member_norm > 0, result.member_norm, np.median(result.member_norm))
        codes = torch.from_numpy(result.centroids * scale[:, None])
        rep = asdict(result.report)
        rep.pop("cluster_sizes")
        ctx.extra["kmeans"] = rep
        ctx.log(f"k-means: {k} codes from {result.report.num_samples} tokens ({result.report.rows_read} images) "
                f"on {result.report.backend} in {result.report.seconds:.1f}s, {result.report.empty_clusters} empty")
    else:
        sample = cb.sample_tokens(ctx.store, min(cfg.kmeans_sample, 10_000), seed=ctx.fit.seed)
        codes = torch.empty(k, ctx.info.dim)
        torch.nn.init.orthogonal_(codes, generator=ctx.torch_generator(1))
        codes *= float(np.linalg.norm(sample.tokens, axis=1).mean())
        ctx.log(f"codes: orthogonal init scaled to the mean token norm")
    head.codes.data.copy_(codes.to(head.codes.device))


@torch.no_grad()
def code_usage(head: ProtoQuant, ctx: FitContext, batch_size: int = 256) -> torch.Tensor:
    usage = torch.zeros(head.prototype_count, dtype=torch.long, device=ctx.device)
    for b in ctx.split("train", ("tokens", "label")).batches(batch_size, shuffle=False):
        idx = head.nearest_code(to_torch(b, ctx.device)["tokens"])
        usage += torch.bincount(idx.flatten(), minlength=head.prototype_count)
    return usage


def train_codebook(head: ProtoQuant, ctx: FitContext, teacher) -> None:
    """Stage 1: hard cosine quantisation, CE through the frozen teacher + ||q - sg(x)||^2.

    Codes that no token chose in an epoch are re-seeded from random cached tokens.
    """
    cfg = head.config
    epochs = cfg.codebook_epochs
    if not epochs:
        return
    codes = head.codes
    codes.requires_grad_(True)
    opt = torch.optim.Adam([codes], lr=cfg.codebook_lr)
    usage = torch.zeros(head.prototype_count, dtype=torch.long, device=ctx.device)
    last: dict[str, torch.Tensor] = {}
    gen = ctx.torch_generator(2)
    reseeded: list[int] = []

    def step(b: dict[str, torch.Tensor], _: float) -> torch.Tensor:
        x = b["tokens"]
        idx = head.nearest_code(x)  # no gradient through the assignment
        usage.add_(torch.bincount(idx.flatten(), minlength=head.prototype_count))
        q = codes[idx]
        loss = cfg.codebook_weight * F.mse_loss(q, x)
        if teacher is not None and cfg.task_weight:
            loss = loss + cfg.task_weight * F.cross_entropy(teacher(q.mean(dim=1)), b["label"])
        last["tokens"] = x.detach()
        return loss

    @torch.no_grad()
    def reseed(_: int) -> None:
        dead = torch.nonzero(usage <= cfg.dead_code_threshold).flatten()
        if dead.numel():
            pool = last["tokens"].reshape(-1, ctx.info.dim)
            pick = torch.randperm(pool.shape[0], generator=gen)[:dead.numel()].to(pool.device)
            if pick.numel() < dead.numel():  # tiny batches: sample with replacement
                pick = torch.randint(pool.shape[0], (dead.numel(),), generator=gen).to(pool.device)
            codes.data[dead] = pool[pick]
            reseeded.append(int(dead.numel()))
        else:
            reseeded.append(0)
        usage.zero_()

    ctx.train("codebook", ctx.split("train", ("tokens", "label")), opt, epochs, cfg.codebook_batch_size, step,
              after_epoch=reseed)
    codes.requires_grad_(cfg.train_codes)
    ctx.extra["dead_codes_reseeded"] = reseeded


def prune_codebook(head: ProtoQuant, ctx: FitContext) -> None:
    """Usage-based pruning to `prune_to` codes in `prune_rounds` rounds (least used first)."""
    cfg = head.config
    target = cfg.prune_to
    if not target or target >= head.prototype_count:
        return
    history = [head.prototype_count]
    rounds = max(1, cfg.prune_rounds)
    for r in range(rounds):
        excess = head.prototype_count - target
        if excess <= 0:
            break
        drop = math.ceil(excess / (rounds - r))
        usage = code_usage(head, ctx)
        order = torch.argsort(usage.cpu(), stable=True)
        keep = torch.sort(order[drop:]).values
        head.keep_codes(keep.to(head.codes.device))
        history.append(head.prototype_count)
    ctx.extra["codebook_pruning"] = history
    ctx.log(f"pruned the codebook by usage: {' -> '.join(map(str, history))}")


def train_protoquant_head(head: ProtoQuant, ctx: FitContext, epochs: int, stage: str) -> None:
    """Stage 2: CE (+ L1 on ReLU(W)); codes frozen or trained with the commitment term."""
    cfg = head.config
    codes = head.codes
    codes.requires_grad_(cfg.train_codes)
    if cfg.train_codes:
        opt = torch.optim.AdamW([{"params": [head.weight], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                                 {"params": [codes], "lr": cfg.codes_lr, "weight_decay": 0.0}])

        def step(b: dict[str, torch.Tensor], _: float) -> torch.Tensor:
            x = b["tokens"]
            s = head.cosine(x)
            p = torch.softmax(s / cfg.tau, dim=-1).amax(dim=1)
            w = head.class_weights()
            loss = F.cross_entropy(p @ w.T, b["label"]) + cfg.l1 * w.sum()
            if cfg.codebook_weight:  # keeps the codes on the tokens they stand for (no drift)
                loss = loss + cfg.codebook_weight * F.mse_loss(codes[s.detach().argmax(-1)], x)
            return loss

        ctx.train(stage, ctx.split("train", ("tokens", "label")), opt, epochs, cfg.batch_size, step)
        return

    @torch.no_grad()
    def presence(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(b["tokens"]).float().to(ctx.device)
        return {"presence": head.presence(x).cpu().numpy(), "label": b["label"]}

    source = derive(ctx.split("train", ("tokens", "label")), presence, ctx.fit.feature_cache_mb)
    opt = torch.optim.AdamW([head.weight], lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step_frozen(b: dict[str, torch.Tensor], _: float) -> torch.Tensor:
        w = head.class_weights()
        return F.cross_entropy(b["presence"] @ w.T, b["label"]) + cfg.l1 * w.sum()

    ctx.train(stage, source, opt, epochs, cfg.batch_size, step_frozen)


def fit_protoquant(head: ProtoQuant, ctx: FitContext) -> None:
    cfg = head.config
    init_codes(head, ctx)
    teacher = protoquant_teacher(head, ctx) if cfg.codebook_epochs else None
    train_codebook(head, ctx, teacher)
    prune_codebook(head, ctx)
    train_protoquant_head(head, ctx, cfg.epochs, "head")
    if cfg.topk_per_class:
        ctx.extra["test_accuracy_dense"] = evaluate(head, ctx.split("test", ("tokens", "label")), ctx.device)
        ctx.extra["prototype_count_dense"] = head.prototype_count
        head.limit_per_class(cfg.topk_per_class)
        head.prune_unused()
        ctx.log(f"kept the top {cfg.topk_per_class} weights per class: {head.prototype_count} prototypes remain "
                f"(dense head: test accuracy {ctx.extra['test_accuracy_dense']:.4f})")
        if cfg.finetune_epochs:
            train_protoquant_head(head, ctx, cfg.finetune_epochs, "finetune")
    head.codes.requires_grad_(cfg.train_codes)


# ----------------------------------------------------------------------------- ProtoPool


def gumbel_scale(cfg, epoch: float) -> float:
    """The published schedule: start * sqrt(alpha * epoch), alpha = (end / start)^2 / gumbel_epochs,
    reaching `gumbel_end` (one-hot in practice) at gumbel_epochs and staying there."""
    interval = max(cfg.gumbel_epochs, 1e-9)
    if epoch >= interval:
        return float(cfg.gumbel_end)
    alpha = (cfg.gumbel_end / cfg.gumbel_start) ** 2 / interval
    return float(cfg.gumbel_start * math.sqrt(alpha * epoch))


def _dist_cost(dmin: torch.Tensor, weights: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mean over the batch of the smallest Dmin among each image's top_k weighted prototypes."""
    top = torch.topk(weights, top_k, dim=1).indices
    return dmin.gather(1, top).amin(dim=1).mean()


def protopool_loss(head: ProtoPool, batch: dict[str, torch.Tensor],
                   mix: tuple[float, torch.Tensor] | None = None) -> torch.Tensor:
    """CE + 0.8 cluster - 0.08 separation + 1e-4 L1 (off-class last-layer weights) + slot orthogonality.

    `mix` = (lambda, permutation) applies mixup as published (--mixup_data): token maps are
    mixed, CE is mixed over both labels, cluster/separation use the first label.
    """
    cfg = head.config
    a = head.slot_assignment()  # [C, M, K]
    x, y = batch["tokens"], batch["label"]
    if mix is not None:
        lam, perm = mix
        x = lam * x + (1 - lam) * x[perm]
    sims, dmin = head.slot_similarities(x, a)
    logits = head.last_layer(sims)
    loss = F.cross_entropy(logits, y)
    if mix is not None:
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits, y[perm])
    own = a[y].sum(dim=-1).detach()  # [B, M]: how much each prototype fills the true class's slots
    k, m = cfg.slots_per_class, head.prototype_count
    cluster = _dist_cost(dmin, own, k)
    separation = _dist_cost(dmin, (1 - a[y]).sum(dim=-1).detach(), max(1, m - k))
    l1 = (head.last_layer.weight * (1 - head.class_identity)).abs().sum()
    slots = head.slot_logits  # orthogonality of a class's slot distributions (on the logits, as published)
    cos = F.cosine_similarity(slots.unsqueeze(2), slots.unsqueeze(3), dim=1)  # [C, K, K]
    ortho = cos.sum() / (head.num_classes * k) - 1
    return (loss + cfg.cluster_weight * cluster - cfg.separation_weight * separation + cfg.l1 * l1
            + cfg.orthogonality_weight * ortho)


@torch.no_grad()
def push_prototypes(head: ProtoPool, ctx: FitContext, batch_size: int = 256) -> list[dict[str, Any]]:
    """Replace each prototype by its nearest training token (after the add-on) among images
    of the classes whose slots hold it; prototypes no class holds search all images."""
    head.eval()
    m = head.prototype_count
    slots = head.slot_prototypes()  # [C, K]
    allowed = torch.zeros(head.num_classes, m, dtype=torch.bool, device=slots.device)
    allowed.scatter_(1, slots, True)
    unused = ~allowed.any(dim=0)
    allowed[:, unused] = True
    best = torch.full((m,), float("inf"), device=ctx.device)
    best_vec = head.prototypes.detach().clone()
    best_row = torch.full((m,), -1, dtype=torch.long, device=ctx.device)
    best_cell = torch.full((m,), -1, dtype=torch.long, device=ctx.device)
    t = ctx.info.num_tokens
    for b in ctx.split("train", ("tokens", "label", "row")).batches(batch_size, shuffle=False):
        batch = to_torch(b, ctx.device)
        z = head.embed(batch["tokens"])  # [B, T, d]
        p = head.prototypes
        d = F.relu((z * z).sum(-1, keepdim=True) - 2 * z @ p.T + (p * p).sum(-1)[None, None])  # [B, T, M]
        ok = allowed[batch["label"]]  # [B, M]
        d = torch.where(ok[:, None, :], d, torch.full_like(d, float("inf")))
        flat = d.reshape(-1, m)  # [(B*T), M]
        val, pos = flat.min(dim=0)
        better = val < best
        if better.any():
            img, cell = pos // t, pos % t
            best[better] = val[better]
            best_vec[better] = z[img[better], cell[better]]
            best_row[better] = batch["row"][img[better]]
            best_cell[better] = cell[better]
    head.prototypes.data.copy_(best_vec)
    head.push_row.copy_(best_row)
    head.push_cell.copy_(best_cell)
    ids = ctx.store.metadata().column("image_id").to_pylist()
    w = ctx.info.grid[1]
    sources = []
    for j in range(m):
        r, c = int(best_row[j]), int(best_cell[j])
        sources.append({"prototype": j, "row": r, "image_id": str(ids[r]) if r >= 0 else None,
                        "cell": c, "grid_yx": [c // w, c % w], "distance": float(best[j]),
                        "classes": [int(k) for k in torch.nonzero(allowed[:, j] & ~unused[j]).flatten()]})
    head.train()
    return sources


def fit_protopool(head: ProtoPool, ctx: FitContext) -> None:
    cfg = head.config
    params = [{"params": head.add_on.parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
              {"params": [head.slot_logits], "lr": cfg.lr},
              {"params": [head.prototypes], "lr": cfg.lr}]
    head.last_layer.requires_grad_(False)  # as published: the last layer waits for the tuning phase
    opt = torch.optim.Adam(params)
    train = ctx.split("train", ("tokens", "label"))

    rng = np.random.default_rng(_epoch_seed(ctx.fit.seed, 3))
    gen = ctx.torch_generator(3)

    def step(b: dict[str, torch.Tensor], epoch: float) -> torch.Tensor:
        head.gumbel_scale = gumbel_scale(cfg, epoch)
        mix = None
        if cfg.mixup:
            perm = torch.randperm(len(b["label"]), generator=gen).to(ctx.device)
            mix = (float(rng.beta(cfg.mixup, cfg.mixup)), perm)
        return protopool_loss(head, b, mix)

    ctx.train("prototypes", train, opt, cfg.epochs, cfg.batch_size, step)
    head.gumbel_scale = float(cfg.gumbel_end)
    if cfg.push:
        ctx.extra["test_accuracy_before_push"] = evaluate(head, ctx.split("test", ("tokens", "label")), ctx.device)
        ctx.extra["prototype_sources"] = push_prototypes(head, ctx)
        ctx.log(f"pushed {head.prototype_count} prototypes onto their nearest training tokens "
                f"(test accuracy before push {ctx.extra['test_accuracy_before_push']:.4f})")
    if cfg.last_layer_epochs:
        head.requires_grad_(False)
        head.last_layer.requires_grad_(True)
        hard = head.hard_assignment()

        @torch.no_grad()
        def slot_features(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            x = torch.from_numpy(b["tokens"]).float().to(ctx.device)
            return {"slots": head.slot_similarities(x, hard)[0].cpu().numpy(), "label": b["label"]}

        source = derive(train, slot_features, ctx.fit.feature_cache_mb)
        opt = torch.optim.Adam(head.last_layer.parameters(), lr=cfg.last_layer_lr, weight_decay=1e-3)
        off = 1 - head.class_identity

        def tune(b: dict[str, torch.Tensor], _: float) -> torch.Tensor:
            logits = head.last_layer(b["slots"])
            return F.cross_entropy(logits, b["label"]) + cfg.l1 * (head.last_layer.weight * off).abs().sum()

        ctx.train("last_layer", source, opt, cfg.last_layer_epochs, cfg.batch_size, tune)
    head.requires_grad_(True)


# ----------------------------------------------------------------------------- InfoDisent


def fit_infodisent(head: InfoDisent, ctx: FitContext) -> None:
    """CE only. A warm-up fits W on the hard-pooled channels of the current rotation (the
    identity at first, so W starts from max-pooled backbone channels); then Adam trains W
    and the skew generator A jointly, A folded into the rotation after every step."""
    cfg = head.config
    train = ctx.split("train", ("tokens", "label"))
    if cfg.warmup_epochs:
        @torch.no_grad()
        def pooled(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            x = torch.from_numpy(b["tokens"]).float().to(ctx.device)
            return {"channels": head.eval().presence(x).cpu().numpy(), "label": b["label"]}

        channels = derive(train, pooled, ctx.fit.feature_cache_mb)
        head.train()
        opt = torch.optim.Adam([head.weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
        ctx.train("warmup", channels, opt, cfg.warmup_epochs, cfg.batch_size,
                  lambda b, _: F.cross_entropy(b["channels"] @ head.class_weights().T, b["label"]))
    if cfg.epochs:
        opt = torch.optim.Adam([{"params": [head.weight], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                                {"params": [head.skew], "lr": cfg.rotation_lr}])
        ctx.train("rotation", train, opt, cfg.epochs, cfg.batch_size,
                  lambda b, _: F.cross_entropy(head(b["tokens"]), b["label"]), after_step=head.retract)
    with torch.no_grad():
        u = head.rotation
        ctx.extra["rotation_orthogonality_error"] = float((u @ u.T - torch.eye(len(u), device=u.device)).abs().max())
        ctx.extra["rotation_distance_from_identity"] = float((u - torch.eye(len(u), device=u.device)).norm())


def fit_generic(head: Head, ctx: FitContext) -> None:
    """Fallback for heads registered without a procedure: AdamW on cross-entropy."""
    cfg = head.config
    opt = torch.optim.AdamW(head.parameters(), lr=getattr(cfg, "lr", 1e-3))
    ctx.train("head", ctx.split("train", head_fields(head)), opt, getattr(cfg, "epochs", None) or 10,
              getattr(cfg, "batch_size", None) or 256, lambda b, _: F.cross_entropy(head(b.get("tokens"), pooled=b.get("pooled")), b["label"]))


FITTERS: dict[str, Callable[[Any, FitContext], None]] = {
    "linear": fit_linear,
    "protoquant": fit_protoquant,
    "protopool": fit_protopool,
    "infodisent": fit_infodisent,
}


# ----------------------------------------------------------------------------- entry points


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProtocacheError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ProtocacheError(f"bad --device {device!r}: {exc}") from None


def seed_everything(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def open_complete_store(path: str | Path) -> FeatureStore:
    store = FeatureStore.open(path)
    missing = store.missing_shards()
    if missing:
        raise MissingShardError(f"{store.path}: shard(s) {missing} are not written; finish `protocache extract` "
                                "before fitting a head.")
    return store


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("protocache")
    except Exception:  # noqa: BLE001 - source tree without install
        return "0+unknown"


def fit_head(name: str, store_path: str | Path, out: str | Path, head_config: dict[str, Any] | None = None,
             fit: FitConfig | None = None, *, store: Any = None,
             extra_config: dict[str, Any] | None = None) -> FitResult:
    """Fit head `name` on the store and write RUN/ (weights, config, metrics, log).

    `store` may be an already opened store (or a wrapper with the same API, e.g. the
    ablation's shared reader); `extra_config` is merged into config.json.
    """
    fit = fit or FitConfig()
    head_class(name)  # unknown names fail before any work
    overrides = dict(head_config or {})
    if fit.epochs is not None:
        overrides["epochs"] = fit.epochs
    if store is None:
        store = open_complete_store(store_path)
    elif store.missing_shards():
        raise MissingShardError(f"{store.path}: shard(s) {store.missing_shards()} are not written; "
                                "finish `protocache extract` before fitting a head.")
    info = store_info(store)
    config = resolve_config(name, info, overrides)  # unknown keys fail before the run folder is touched
    run_dir = run_files.prepare_run_dir(out, store.path, store.fingerprint)
    echo = (lambda m: print(m, file=sys.stderr, flush=True)) if fit.progress else None
    log = run_files.RunLog(run_dir, echo=echo)
    if fit.threads:
        torch.set_num_threads(fit.threads)
    seed_everything(fit.seed)
    device = resolve_device(fit.device)
    started = time.perf_counter()
    log(f"fit-head {name} on {store.path} ({info.num_train} train images, {info.num_classes} classes, "
        f"tokens {info.num_tokens} x {info.dim}) -> {run_dir}; device {device}, seed {fit.seed}, "
        f"{torch.get_num_threads()} threads")
    log(f"head config: {asdict(config)}")
    head = head_class(name)(info, config).to(device)
    head.train()
    ctx = FitContext(store, info, fit, device, log)
    FITTERS.get(name, fit_generic)(head, ctx)
    head.eval()
    train_acc = evaluate(head, ctx.split("train", head_fields(head)), device, fit.eval_batch_size)
    test_acc = evaluate(head, ctx.split("test", head_fields(head)), device, fit.eval_batch_size)
    seconds = time.perf_counter() - started
    metrics = {
        "head": name,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "num_train": ctx.split("train", ("label",)).num_rows,
        "num_test": ctx.split("test", ("label",)).num_rows,
        "prototype_count": head.prototype_count,
        "loss_curve": ctx.loss_curve,
        "seconds": seconds,
        **head.extra_metrics(),
        **ctx.extra,
    }
    config_json = {
        "format": RUN_FORMAT,
        "head": name,
        "head_config": asdict(config),
        "fit": asdict(fit),
        "store": {"path": str(Path(store.path).resolve()), "fingerprint": store.fingerprint,
                  "info": info.to_json()},
        "versions": {"protocache": _package_version(), "torch": torch.__version__.split("+")[0]},
        **(extra_config or {}),
    }
    run_files.save_tensors(run_dir / run_files.WEIGHTS, head.state_dict(),
                           metadata={"head": name, "format": str(RUN_FORMAT)})
    run_files.write_json(run_dir / run_files.CONFIG, config_json)
    run_files.write_json(run_dir / run_files.METRICS, metrics)
    log(f"{name}: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}, "
        f"{head.prototype_count} prototypes, {seconds:.1f}s")
    return FitResult(str(run_dir), name, metrics, config_json)


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Head, dict[str, Any], dict[str, Any]]:
    """(head in eval mode, config.json, metrics.json) of a finished run; no store needed."""
    config, metrics = run_files.read_run(run_dir)
    name = config["head"]
    info = StoreInfo.from_json(config["store"]["info"])
    head = create_head(name, info, **config["head_config"])
    head.load_weights(run_files.load_tensors(Path(run_dir) / run_files.WEIGHTS))
    return head.to(resolve_device(device)).eval(), config, metrics


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings to a dict; values parse as YAML scalars (1, 0.5, true, [1, 2])."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ProtocacheError(f"--set expects key=value, got {item!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ProtocacheError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        out[key] = _yaml_float(parsed)
    return out


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; users mean the number."""
    if isinstance(value, str):
        try:
            return float(value) if any(ch.isdigit() for ch in value) and value.strip().lower() not in ("nan", "inf") else value
        except ValueError:
            return value
    if isinstance(value, list):
        return [_yaml_float(v) for v in value]
    return value


def read_config_file(path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(head config, fit options) from a YAML file: head keys at the top, fit options under `fit:`."""
    if not path:
        return {}, {}
    import yaml

    p = Path(path).expanduser()
    if not p.exists():
        raise ProtocacheError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProtocacheError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocacheError(f"config file {p} must hold a mapping of config keys")
    data = {k: _yaml_float(v) for k, v in data.items()}
    fit = data.pop("fit", None) or {}
    if not isinstance(fit, dict):
        raise ProtocacheError(f"config file {p}: `fit:` must be a mapping")
    valid = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(fit) - valid)
    if unknown:
        raise ProtocacheError(f"config file {p}: unknown fit option(s) {unknown}; valid: {', '.join(sorted(valid))}")
    return data, fit


__all__ = ["FitConfig", "FitResult", "fit_head", "load_run", "list_heads", "parse_overrides", "read_config_file"]
