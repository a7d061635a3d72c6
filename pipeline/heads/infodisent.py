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
    train_rotation: bool = True
    rotation_optimizer: str = "adam"
    prototypes_per_class: int = 10
    """Channels a class counts as its prototypes in the metrics and the report: its k largest
    positive weights (0: every channel with a positive weight)."""


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
        if not torch.any(skew):  # always so in training (A is folded after every step): exp(0) U = U
            return base.clone()
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
    class_prototype_rule = ("the class's `prototypes_per_class` rotated channels with the largest positive "
                            "last-layer weights, strongest first")

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
        gumbel = -torch.rand_like(f).clamp_(min=1e-20).log_().neg_().log_()  # -log(-log u), u ~ U(0, 1)
        logits = f / self.config.gumbel_tau + gumbel
        soft = torch.softmax(logits, dim=1)
        if not self.config.straight_through:
            return (soft * f).sum(1)
        hard = f.gather(1, logits.max(dim=1, keepdim=True).indices).squeeze(1)  # f at the sampled cell
        smooth = (soft * f.detach()).sum(1)  # carries the soft weights' gradient, adds 0 to the value
        return hard + smooth - smooth.detach()

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

    @property
    def class_prototype_k(self) -> int | None:  # type: ignore[override]
        return self.config.prototypes_per_class or None

    def class_prototypes(self, c: int) -> torch.Tensor:
        """Class c's `prototypes_per_class` channels with the largest positive weights, strongest first."""
        ranked = super().class_prototypes(c)
        k = self.config.prototypes_per_class
        return ranked[:k] if k else ranked

    def extra_metrics(self) -> dict[str, Any]:
        return {**super().extra_metrics(), "channels_used": int((self.class_weights() > 0).any(dim=0).sum())}

    # training --------------------------------------------------------------------------
    def fit(self, ctx: "FitContext") -> None:
        fit_infodisent(self, ctx)


# ----------------------------------------------------------------------------- training recipe


def fit_infodisent(head: InfoDisent, ctx: "FitContext") -> None:
    cfg = head.config
    train = ctx.split("train", ("tokens", "label"))

    @torch.no_grad()
    def pooled(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(b["tokens"]).float().to(ctx.device)
        return {"channels": head.eval().presence(x).cpu().numpy(), "label": b["label"]}

    def fit_w(stage: str, epochs: int) -> None:
        channels = ctx.derive(train, pooled)
        head.train()
        opt = torch.optim.Adam([head.weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
        ctx.train(stage, channels, opt, epochs, cfg.batch_size,
                  lambda b, _: F.cross_entropy(b["channels"] @ head.class_weights().T, b["label"]))

    if not getattr(cfg, "train_rotation", True):
        fit_w("last layer (U = I)", cfg.warmup_epochs + cfg.epochs)
    else:
        if cfg.warmup_epochs:
            fit_w("warmup", cfg.warmup_epochs)
        if cfg.epochs:
            kind = getattr(cfg, "rotation_optimizer", "adam")
            wopt = [{"params": [head.weight], "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
            if kind == "adam":
                opt = torch.optim.Adam(wopt + [{"params": [head.skew], "lr": cfg.rotation_lr}])
            else:
                opt = _Combined(torch.optim.Adam(wopt), _NormalizedSGD([head.skew], cfg.rotation_lr))
            ctx.train("rotation", train, opt, cfg.epochs, cfg.batch_size,
                      lambda b, _: F.cross_entropy(head(b["tokens"]), b["label"]), after_step=head.retract)
    head.eval()
    with torch.no_grad():
        u = head.rotation
        eye = torch.eye(len(u), device=u.device)
        ctx.extra["rotation_orthogonality_error"] = float((u @ u.T - eye).abs().max())
        ctx.extra["rotation_distance_from_identity"] = float((u - eye).norm())
        saved = u.clone()
        u.copy_(eye)
        ctx.extra["identity_rotation_test_accuracy"] = ctx.accuracy(head, ctx.split("test", ("tokens", "label")))
        val = getattr(ctx, "val_accuracy", None)
        ctx.extra["identity_rotation_val_accuracy"] = val(head) if val else None
        u.copy_(saved)


class _Combined:
    def __init__(self, *opts):
        self.opts = opts

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in self.opts:
            o.step()


class _NormalizedSGD:
    """Momentum on the skew gradient; the step is lr * m / sqrt(EMA of mean squared gradient) (one scalar)."""

    def __init__(self, params, lr, beta1=0.9, beta2=0.999):
        self.params, self.lr, self.b1, self.b2 = list(params), lr, beta1, beta2
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [0.0 for _ in self.params]
        self.t = 0

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            self.m[i].mul_(self.b1).add_(g, alpha=1 - self.b1)
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * float(g.pow(2).sum())
            mh = self.m[i] / (1 - self.b1 ** self.t)
            vh = self.v[i] / (1 - self.b2 ** self.t)
            p.sub_(mh, alpha=self.lr / (vh ** 0.5 + 1e-12))
