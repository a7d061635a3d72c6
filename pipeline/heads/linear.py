"""The linear probe: the accuracy yardstick every interpretable head is judged against."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from protocache.stores.errors import ProtocacheError

from ..stacked import Stack, StackedStep, headwise_bmm, per_head_cross_entropy
from ._registry import register_head
from .base import Head, StoreInfo, auto_batch_size, grid_map, scaled_epochs

if TYPE_CHECKING:
    from ..fit import Batches, FitContext


@dataclass
class LinearConfig:
    """Linear probe: the accuracy yardstick for the interpretable heads."""

    source: str = "pooled"
    """pooled (the store's pooled array: CLS or mean token) | mean (mean of tokens)."""
    standardize: str = "feature"
    """feature (z-score each dim) | global (one scale for all dims) | none."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    epochs: int | None = None
    """None: 30, or 60 on small data."""
    batch_size: int | None = None
    """None: 256, smaller on small data."""


@register_head("linear")
class LinearProbe(Head):
    """Affine map of the pooled (or mean) token to class logits.

    Its "prototypes" are the C class directions: similarity_map is the per-cell class
    score (a class activation map) and presence its mean over cells.
    """

    config_class = LinearConfig
    class_prototype_rule = "the class's own weight vector (one prototype per class)"

    def __init__(self, info: StoreInfo, config: LinearConfig):
        super().__init__(info, config)
        d, c = info.dim, info.num_classes
        self.linear = nn.Linear(d, c)
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_scale", torch.ones(d))

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        # a CNN store's pooled array is the mean token: read it instead of all tokens
        return ("pooled",) if self.config.source == "pooled" or self.info.pooled == "mean" else ("tokens",)

    @classmethod
    def resolve(cls, config: LinearConfig, info: StoreInfo) -> LinearConfig:
        bs = config.batch_size or auto_batch_size(info.num_train, 256)
        return dataclasses.replace(config, batch_size=bs, epochs=scaled_epochs(config.epochs, 30, 60, info.num_train))

    @classmethod
    def validate(cls, config: LinearConfig, info: StoreInfo) -> None:
        super().validate(config, info)
        if config.standardize not in ("feature", "global", "none"):
            raise ProtocacheError(f"linear: standardize must be feature, global or none, not {config.standardize!r}")
        if config.source not in ("pooled", "mean"):
            raise ProtocacheError(f"linear: source must be 'pooled' or 'mean', not {config.source!r}")

    def features(self, tokens: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if pooled is not None and (self.config.source == "pooled" or tokens is None):
            return pooled  # with source=mean, callers pass the mean token as `pooled`
        if tokens is None:
            raise ProtocacheError("linear probe needs tokens (or pooled features)")
        return tokens.mean(dim=1)  # equals `pooled` on CNN stores (pooled = mean token)

    def forward_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear((feats - self.feature_mean) / self.feature_scale)

    def forward(self, tokens: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(self.features(tokens, pooled))

    def _cell_scores(self, tokens: torch.Tensor) -> torch.Tensor:
        z = (tokens - self.feature_mean) / self.feature_scale
        return z @ self.linear.weight.T  # [N, T, C]; mean over T plus bias = logits

    @property
    def prototype_count(self) -> int:
        return self.num_classes

    def similarity_map(self, tokens: torch.Tensor) -> torch.Tensor:
        return grid_map(self._cell_scores(tokens), self.info.grid)

    def presence(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._cell_scores(tokens).mean(dim=1)

    def class_weights(self) -> torch.Tensor:
        return torch.eye(self.num_classes, device=self.linear.weight.device)

    def class_prototypes(self, c: int) -> torch.Tensor:
        return torch.tensor([int(c)])

    # training --------------------------------------------------------------------------
    def fit(self, ctx: "FitContext", stage: str = "probe") -> None:
        """Standardise (optional), then AdamW on cross-entropy over the pooled features."""
        cfg = self.config
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
            self.feature_mean.copy_(torch.from_numpy(mean).float())
            self.feature_scale.copy_(torch.from_numpy(scale).float())
        opt = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        ctx.train(stage, train, opt, cfg.epochs, cfg.batch_size, StackedStep(probe_losses, self))


def probe_losses(stack: Stack, b: dict[str, torch.Tensor], _: float) -> torch.Tensor:
    """[N] cross-entropy of each stacked probe (`forward_features`: standardise, then affine) on the pooled features."""
    z = (b["pooled"] - stack["feature_mean"][:, None]) / stack["feature_scale"][:, None]  # [N, B, D]
    logits = headwise_bmm(z, stack["linear.weight"].transpose(1, 2)) + stack["linear.bias"][:, None]
    return per_head_cross_entropy(logits, b["label"])


def pooled_source(ctx: "FitContext", split: str, source_kind: str) -> "Batches":
    """Per-image features for a probe: the store's pooled array, or the mean token.

    The mean token is read from `pooled` when the store says pooled is the mean token
    (CNNs), so a probe "on the mean" does not have to stream all tokens.
    """
    if source_kind == "pooled" or ctx.info.pooled == "mean":
        return ctx.split(split, ("pooled", "label"))
    tokens = ctx.split(split, ("tokens", "label"))
    return ctx.derive(tokens, lambda b: {"pooled": b["tokens"].astype(np.float32).mean(1), "label": b["label"]})
