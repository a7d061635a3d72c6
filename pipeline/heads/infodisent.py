"""InfoDisent (arXiv 2409.10329; no public code): its config, module and training recipe.

An orthogonal channel rotation U = exp(A - A^T) is applied at every token; each rotated
channel is an atomic part with positive and negative evidence, pooled by max over cells;
a non-negative last layer reads them. A Gumbel-softmax stands in for the max in training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protocache.stores.errors import ProtocacheError

from ._registry import register_head
from .base import Head, StoreInfo, auto_batch_size, grid_map, scaled_epochs

if TYPE_CHECKING:
    from ..fit import FitContext


@dataclass
class InfoDisentConfig:
    """InfoDisent (arXiv 2409.10329): rotated channels as atomic parts, max-pooled both ways."""

    gumbel_tau: float = 0.1
    """Gumbel-softmax over cells (of J / tau) stands in for the max in training."""
    straight_through: bool = True
    """Forward the selected cell's value (= the max at inference), soft gradient."""
    lr: float = 1e-3
    """Adam learning rate of W."""
    rotation_lr: float = 1e-4
    """Adam learning rate of the skew generator A."""
    weight_decay: float = 0.0
    """Adam weight decay of W."""
    warmup_epochs: int | None = None
    """Warm-up epochs: W alone on the hard-pooled channels of the current rotation (cheap); None: scaled to the data."""
    epochs: int | None = None
    """Joint epochs of the rotation and W; None: scaled to the data."""
    batch_size: int | None = None
    """Batch size; None: 256, smaller on small data."""


class _ExpAtZero(torch.autograd.Function):
    """exp(S) @ U for a skew S that is zero when called, with the exact gradient at S = 0.

    The derivative of the matrix exponential at 0 is the identity, so d(exp(S) U)/dS
    applied to G is G U^T. torch's own backward for matrix_exp builds a 2D x 2D
    exponential (seconds for D = 1280); this skips it. Training keeps S at 0 by folding
    every step into U (see InfoDisent.retract).
    """

    @staticmethod
    def forward(ctx, skew: torch.Tensor, base: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(base)
        return torch.linalg.matrix_exp(skew) @ base

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (base,) = ctx.saved_tensors
        return grad @ base.T, None


@register_head("infodisent")
class InfoDisent(Head):
    """J = X U^T with U = exp(A - A^T) R orthogonal (R: rotation accumulated so far);
    v_c = max_t ReLU(J_tc) - max_t ReLU(-J_tc); logits = v . ReLU(W)^T."""

    config_class = InfoDisentConfig
    signed_evidence = True
    class_prototype_rule = "rotated channels with a positive last-layer weight for the class, strongest first"

    def __init__(self, info: StoreInfo, config: InfoDisentConfig):
        super().__init__(info, config)
        d, c = info.dim, info.num_classes
        self.skew = nn.Parameter(torch.zeros(d, d))  # A; U = matrix_exp(A - A^T) @ rotation
        self.register_buffer("rotation", torch.eye(d))
        self.weight = nn.Parameter(torch.empty(c, d))
        nn.init.normal_(self.weight, mean=1.0 / math.sqrt(d), std=0.1 / math.sqrt(d))  # positive, small logits

    @classmethod
    def resolve(cls, config: InfoDisentConfig, info: StoreInfo) -> InfoDisentConfig:
        return dataclasses.replace(config, batch_size=config.batch_size or auto_batch_size(info.num_train, 256),
                                   warmup_epochs=scaled_epochs(config.warmup_epochs, 10, 60, info.num_train),
                                   epochs=scaled_epochs(config.epochs, 20, 2, info.num_train))

    @classmethod
    def validate(cls, config: InfoDisentConfig, info: StoreInfo) -> None:
        super().validate(config, info)
        if config.gumbel_tau <= 0:
            raise ProtocacheError("infodisent: gumbel_tau must be > 0")

    @property
    def prototype_count(self) -> int:
        return int(self.info.dim)

    def rotation_matrix(self) -> torch.Tensor:
        s = self.skew - self.skew.T
        if self.training and torch.is_grad_enabled():
            return _ExpAtZero.apply(s, self.rotation)
        return torch.linalg.matrix_exp(s) @ self.rotation

    @torch.no_grad()
    def retract(self) -> None:
        """Fold A into the rotation (R <- exp(A - A^T) R) and reset A to zero."""
        if torch.count_nonzero(self.skew) == 0:
            return
        self.rotation.copy_(torch.linalg.matrix_exp(self.skew - self.skew.T) @ self.rotation)
        self.skew.zero_()

    def rotate(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens @ self.rotation_matrix().T

    def _pool(self, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max_t ReLU(J), max_t ReLU(-J)) [N, D] each; a Gumbel-softmax stand-in in training."""
        pos, neg = F.relu(j), F.relu(-j)
        if self.training and torch.is_grad_enabled():
            return self._gumbel_max(pos), self._gumbel_max(neg)
        return pos.amax(dim=1), neg.amax(dim=1)

    def _gumbel_max(self, f: torch.Tensor) -> torch.Tensor:
        """A differentiable max over cells (dim 1): Gumbel-softmax weights of f / tau.

        With straight_through the forward value is f at the selected cell (the max, up to
        the noise that tau scales) and the gradient is the soft weights'.
        """
        noise = -torch.empty_like(f).exponential_().log()
        soft = torch.softmax(f / self.config.gumbel_tau + noise, dim=1)
        if not self.config.straight_through:
            return (soft * f).sum(1)
        hard = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
        return ((hard - soft.detach() + soft) * f).sum(1)

    def channel_evidence(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pool(self.rotate(tokens))

    def presence(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, D] v = positive minus negative evidence of each rotated channel (signed)."""
        pos, neg = self.channel_evidence(tokens)
        return pos - neg

    def class_weights(self) -> torch.Tensor:
        return F.relu(self.weight)

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.presence(tokens) @ self.class_weights().T

    def similarity_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rotated channel values J on the grid (signed: positive and negative parts)."""
        return grid_map(self.rotate(tokens), self.info.grid)

    def evidence(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pos, neg = self.channel_evidence(tokens)
        w = self.class_weights()[None]
        return {"positive": pos[:, None, :] * w, "negative": neg[:, None, :] * w}

    def extra_metrics(self) -> dict[str, Any]:
        w = self.class_weights()
        strong = (w > 0.1 * w.amax(dim=1, keepdim=True)).sum(dim=1).float()
        return {"channels_used": int((w > 0).any(dim=0).sum()),
                "channels_per_class_above_10pct_of_max": float(strong.mean())}

    # training --------------------------------------------------------------------------
    def fit(self, ctx: "FitContext") -> None:
        fit_infodisent(self, ctx)


# ----------------------------------------------------------------------------- training recipe


def fit_infodisent(head: InfoDisent, ctx: "FitContext") -> None:
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

        channels = ctx.derive(train, pooled)
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
