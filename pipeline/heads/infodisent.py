"""InfoDisent (arXiv 2409.10329; no public code): its config, module and training recipe.

An orthogonal channel rotation U = exp(A - A^T) is applied at every token; each rotated
channel is an atomic part with positive and negative evidence, pooled by max over cells;
a non-negative last layer reads them. A Gumbel-softmax stands in for the max in training.

What the paper establishes, and what it does not
------------------------------------------------
Our reading of the paper (its abstract and summary, the only text of it we could reach;
the architecture in shared/DESIGN.md): the backbone is frozen; U, the pooling and the
non-negative last layer W are what is learned, from the cross-entropy alone; the max
over cells is replaced by a Gumbel-softmax while training and is a hard max at
inference. Nothing we could read fixes the schedule: the optimiser, the learning rates
of U and W, the epochs, whether W is warmed up or tuned at the end, the Gumbel
temperature or any annealing of it, and the initialisation of A (we start at U = I).
Every number below is therefore ours, chosen on the synthetic rotated-parts test
(tests/heads/test_infodisent.py) and the digits cache; none is the paper's.

The recipe (``fit_infodisent``)
-------------------------------
1. Warm-up (``warmup_epochs``, short on purpose): W alone on the hard-pooled channels of
   U = I, cached per image (cheap). A long warm-up fits W to the raw channels and the
   rotation then has little loss left to learn from; a few epochs give the rotation's
   gradient a sensible W to flow through.
2. Joint (``epochs``): W (Adam, ``lr``) and the skew generator A together, through the
   Gumbel-softmax pooling, at temperature ``gumbel_tau`` times the RMS of the train
   tokens (so one value means the same for every backbone), fixed (no annealing). After
   every step A is folded into the rotation (R <- exp(A - A^T) R, A <- 0), so each
   gradient is the exact one at A = 0 (``_ExpAtZero``) and U stays orthogonal to
   float precision. A's optimiser (``_FrameAdam``) is Adam with a single second moment
   for the whole matrix, so one step moves U by at most about ``rotation_lr`` in
   Frobenius norm whatever the width D. Per-entry Adam on the D x D generator would
   move every entry by ~lr whether its gradient is signal or noise: at D = 1,280 that
   turns the frame at random, which is why the old recipe needed a tiny learning rate
   and then barely moved (||U - I|| ~ 1).
3. Last layer (``last_layer_epochs``): W alone on the hard-max channels of the learned
   rotation (cached, cheap), so W is fitted to what inference computes.

``train_rotation=False`` keeps U = I and trains W for the same warm-up + joint +
last-layer epochs on the hard-pooled raw channels: the +-max-pooled channel probe the
rotation is judged against.

Explaining the pretrained network itself (``target=backbone``)
-------------------------------------------------------------
The paper frames InfoDisent as an explanation of a pretrained classifier: the head is
built on the backbone's features and reproduces that network's own decisions. We could
not find its reference code or its initialisation (no public repository under gmum or
elsewhere in what we could search), so the following is our design. With
``target=backbone`` the classes are the backbone classifier's (ImageNet's 1,000 for
tf_efficientnet_lite0's shipped weights; names from timm's ImageNetInfo), the label of
an image is the backbone's top-1 (pipeline/sources.py ``with_backbone_labels``), and
any folder of unlabeled images will do.

- Init (``init_from_backbone``): U = I, and W from the backbone's final linear layer
  (W_b, rebuilt on the CPU from the store's fingerprint, its SHA-256 checked). Two facts
  make the head start at that classifier: (1) the backbone reads the mean token m, the
  head the +-max-pooled channels v, so each channel d is rescaled by r_d, the least-squares
  fit of m_d by v_d on the train images (r_d = sum m_d v_d / sum v_d^2); (2) W must be
  non-negative and W_b is not (54 % of lite0's entries are negative), but subtracting from
  column d its minimum over the classes adds the same amount to every class's logit,
  which the softmax and the top-1 ignore: W = r * W_b - min_c (r * W_b). So the initial
  head is the backbone's classifier applied to r * v instead of m, without its bias
  (which moves lite0's top-1 on a few percent of images). With mean pooling this
  reproduces the backbone exactly; with InfoDisent's max pooling it agrees on about
  70 % of images before training (``backbone_agreement_at_init``).
- Loss: KL(p_backbone || p_head) between the softmax of the backbone's cached logits and
  the head's (distillation at temperature 1), instead of cross-entropy to the backbone's
  top-1: the full distribution carries the backbone's ranking of all 1,000 classes, which
  is what a few unlabeled images can teach, and it does not push the head to be surer
  than the backbone on ambiguous images. The phases are those of the recipe above.
- Metrics: accuracy on a split is agreement with the backbone's top-1 there;
  ``backbone_agreement`` (test split, held out) and ``backbone_agreement_val`` are written
  by fit.py for any run whose labels are the backbone's.

What the rotation learned is in metrics.json: ``rotation_distance_from_identity``
(||U - I||_F; about sqrt(2 D) for a random rotation) and
``identity_rotation_test_accuracy`` / ``identity_rotation_val_accuracy``: the accuracy
of the fitted head with U replaced by I and nothing refitted (the same W read on raw
channels). A large gap to ``test_accuracy`` / ``val_accuracy`` means the decision rests
on rotated channels; no gap means the rotation could be dropped.
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

    gumbel_tau: float = 0.5
    """Temperature of the Gumbel-softmax over cells that stands in for the max in training, in
    units of the train tokens' RMS (the logits are J / (gumbel_tau * rms)); fixed, no annealing."""
    straight_through: bool = True
    """Forward the selected cell's value (= the max at inference), soft gradient."""
    lr: float = 1e-3
    """Adam learning rate of W."""
    rotation_lr: float = 0.5
    """Step of the rotation: each step moves U by at most about this in Frobenius norm, for any D
    (momentum 0.9 and one second moment for the whole generator A)."""
    weight_decay: float = 0.0
    """Adam weight decay of W."""
    train_rotation: bool = True
    """Learn U. False keeps U = I and trains W alone on the +-max-pooled raw channels for the same
    warm-up + joint + last-layer epochs: the baseline that shows what the rotation adds."""
    warmup_epochs: int | None = None
    """Epochs of W alone on the hard-pooled channels of U = I before the joint phase (cached, cheap);
    None: 5."""
    epochs: int | None = None
    """Joint epochs of the rotation and W through the Gumbel-softmax pooling; None: 20, or 5 under
    5,000 training images."""
    last_layer_epochs: int | None = None
    """Epochs of W alone on the hard-max channels of the learned rotation at the end (cached, cheap);
    None: 20, or 60 under 5,000 training images."""
    batch_size: int | None = None
    """Batch size; None: 256, smaller on small data."""
    prototypes_per_class: int = 10
    """Channels a class counts as its prototypes in the metrics and the report: its k largest
    positive weights (0: every channel with a positive weight)."""
    target: str = "labels"
    """labels: the dataset's classes, cross-entropy to the store's labels. backbone: explain the pretrained
    network itself: its classifier's classes (ImageNet's 1,000 for the shipped weights), W initialised from its
    final linear layer, trained to reproduce its cached logits (KL distillation), no labels needed; the store
    must hold logits."""
    backbone_weights: str = "fingerprint"
    """target=backbone: where the backbone's classifier comes from: fingerprint (rebuilt from the store's
    fingerprint: shipped, hub or random weights), or the checkpoint PATH where the store was extracted from a
    local file, whose path the store does not record."""


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
        self.token_rms = 1.0  # RMS of the train tokens, set by the recipe: the Gumbel temperature's unit

    @classmethod
    def resolve(cls, config: InfoDisentConfig, info: StoreInfo) -> InfoDisentConfig:
        return dataclasses.replace(config, batch_size=config.batch_size or auto_batch_size(info.num_train, 256),
                                   warmup_epochs=scaled_epochs(config.warmup_epochs, 5, 5, info.num_train),
                                   epochs=scaled_epochs(config.epochs, 20, 5, info.num_train),
                                   last_layer_epochs=scaled_epochs(config.last_layer_epochs, 20, 60, info.num_train))

    @classmethod
    def validate(cls, config: InfoDisentConfig, info: StoreInfo) -> None:
        super().validate(config, info)
        if config.gumbel_tau <= 0:
            raise ProtocacheError("infodisent: gumbel_tau must be > 0")
        if config.rotation_lr <= 0:
            raise ProtocacheError("infodisent: rotation_lr must be > 0 (train_rotation=false keeps U = I)")
        if config.target not in ("labels", "backbone"):
            raise ProtocacheError(f"infodisent: target must be 'labels' or 'backbone', not {config.target!r}")
        if config.target == "backbone" and (not info.num_logits or info.num_classes != info.num_logits):
            raise ProtocacheError("infodisent: target=backbone needs a store with the backbone's logits, its classes "
                                  "the backbone's (`protocache fit-head infodisent --set target=backbone`)")

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
        """A differentiable max over cells (dim 1): Gumbel-softmax weights of f / (tau * token_rms).

        With straight_through the forward value is f at the selected cell (the max, up to
        the noise that tau scales) and the gradient is the soft weights'.
        """
        gumbel = -torch.rand_like(f).clamp_(min=1e-20).log_().neg_().log_()  # -log(-log u), u ~ U(0, 1)
        logits = f / (self.config.gumbel_tau * self.token_rms) + gumbel
        soft = torch.softmax(logits, dim=1)
        if not self.config.straight_through:
            return (soft * f).sum(1)
        hard = f.gather(1, logits.max(dim=1, keepdim=True).indices).squeeze(1)  # f at the sampled cell
        smooth = (soft * f.detach()).sum(1)  # carries the soft weights' gradient, adds 0 to the value
        return hard + (smooth - smooth.detach())

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
    """CE only (target=backbone: KL to the backbone's logits, W from its classifier): warm-up of W
    on U = I, joint epochs of W and the rotation (Gumbel-softmax pooling, A folded into U after
    every step), last layer on the learned rotation's hard-max channels (see the module docstring)."""
    cfg = head.config
    distill = cfg.target == "backbone"
    train = ctx.split("train", ("tokens", "logits", "label") if distill else ("tokens", "label"))
    head.token_rms = token_rms(train, ctx)
    ctx.extra["token_rms"] = head.token_rms
    loss_of = distillation_loss if distill else (lambda logits, b: F.cross_entropy(logits, b["label"]))
    if distill:
        init_from_backbone(head, train, ctx)

    def fit_last_layer(stage: str, epochs: int) -> None:
        """W alone on the hard-pooled channels of the current rotation, cached per image."""
        if not epochs:
            return

        @torch.no_grad()
        def pooled(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            x = torch.from_numpy(b["tokens"]).float().to(ctx.device)
            kept = {k: b[k] for k in ("label", "logits") if k in b}
            return {"channels": head.eval().presence(x).cpu().numpy(), **kept}

        channels = ctx.derive(train, pooled)
        head.train()
        opt = torch.optim.Adam([head.weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
        ctx.train(stage, channels, opt, epochs, cfg.batch_size,
                  lambda b, _: loss_of(b["channels"] @ head.class_weights().T, b))

    if not cfg.train_rotation:
        fit_last_layer("last layer, U = I", cfg.warmup_epochs + cfg.epochs + cfg.last_layer_epochs)
    else:
        fit_last_layer("warmup", cfg.warmup_epochs)
        opt = _Both(torch.optim.Adam([head.weight], lr=cfg.lr, weight_decay=cfg.weight_decay),
                    _FrameAdam([head.skew], lr=cfg.rotation_lr))
        head.train()
        ctx.train("rotation", train, opt, cfg.epochs, cfg.batch_size,
                  lambda b, _: loss_of(head(b["tokens"]), b), after_step=head.retract)
        fit_last_layer("last layer", cfg.last_layer_epochs)
    head.eval()
    record_rotation(head, ctx)


def distillation_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(p_backbone || p_head) per image, batch mean: softmax of the cached backbone logits vs the head's."""
    return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(batch["logits"], dim=1), log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def init_from_backbone(head: InfoDisent, source, ctx: "FitContext") -> None:
    """U = I and W = r * W_b - min over classes of (r * W_b): the backbone's classifier read on the
    +-max-pooled channels, each rescaled by r_d = sum m_d v_d / sum v_d^2 (m: mean token, the
    classifier's input) on the train images (see the module docstring)."""
    from ..backbones import backbone_classifier

    weights = head.config.backbone_weights
    classifier = backbone_classifier(ctx.store.fingerprint, None if weights == "fingerprint" else weights)
    if classifier is None or tuple(classifier[0].shape) != (head.num_classes, head.info.dim):
        ctx.log("init: the backbone's classifier is not one linear layer over the tokens; W keeps its default init")
        ctx.extra["init"] = "default (the backbone's classifier is not a linear layer over the tokens)"
        return
    weight = classifier[0].to(ctx.device, torch.float64)
    cross = torch.zeros(head.info.dim, device=ctx.device, dtype=torch.float64)
    square = torch.zeros_like(cross)
    head.eval()
    for b in source.batches(256, shuffle=False):
        x = torch.from_numpy(b["tokens"]).to(ctx.device, torch.float32)
        pos, neg = head._pool(x)  # U = I here: the raw channels, hard max
        v, m = (pos - neg).double(), x.double().mean(1)
        cross += (v * m).sum(0)
        square += v.square().sum(0)
    scale = torch.where(square > 0, cross / square.clamp(min=1e-30), torch.zeros_like(square))
    w = weight * scale[None, :]
    head.weight.copy_((w - w.amin(dim=0, keepdim=True)).to(head.weight))  # shift per column: same for every class
    ctx.extra["init"] = "backbone classifier"
    ctx.extra["backbone_agreement_at_init_val"] = ctx.val_accuracy(head)
    ctx.extra["backbone_agreement_at_init"] = ctx.accuracy(head, ctx.split("test", ("tokens", "label")))
    ctx.log(f"init: W from the backbone's classifier; agreement with its top-1 before training "
            f"{ctx.extra['backbone_agreement_at_init']:.4f} (test), "
            f"{ctx.val_text(ctx.extra['backbone_agreement_at_init_val'])}")
    head.train()


@torch.no_grad()
def token_rms(source, ctx: "FitContext", max_images: int = 4096) -> float:
    """sqrt(mean of x_d^2) over the tokens of (up to) the first `max_images` train images, in store order.

    Any rotation keeps it (||x U^T|| = ||x||), so it is the RMS of J too."""
    total, count = 0.0, 0
    for b in source.batches(256, shuffle=False):
        x = torch.from_numpy(b["tokens"]).to(ctx.device, torch.float64)
        total += float(x.square().sum())
        count += x.numel()
        if count >= max_images * x.shape[1] * x.shape[2]:
            break
    rms = math.sqrt(total / max(count, 1))
    return rms if rms > 0 else 1.0


@torch.no_grad()
def record_rotation(head: InfoDisent, ctx: "FitContext") -> None:
    """metrics.json: how far U is from I, how orthogonal it is, and the accuracy with U = I (no refit)."""
    u = head.rotation
    eye = torch.eye(len(u), device=u.device, dtype=u.dtype)
    ctx.extra["rotation_orthogonality_error"] = float((u @ u.T - eye).abs().max())
    ctx.extra["rotation_distance_from_identity"] = float((u - eye).norm())
    learned = u.clone()
    try:
        u.copy_(eye)
        fields = ("tokens", "label")
        val = getattr(ctx, "val_accuracy", None)  # None: a fit stage without a validation split
        ctx.extra["identity_rotation_val_accuracy"] = val(head) if val is not None else None
        ctx.extra["identity_rotation_test_accuracy"] = ctx.accuracy(head, ctx.split("test", fields))
    finally:
        u.copy_(learned)


class _FrameAdam(torch.optim.Optimizer):
    """Adam for the skew generator A with one second moment for the whole matrix.

    m <- b1 m + (1 - b1) G,  v <- b2 v + (1 - b2) ||G||_F^2,  A <- A - (lr / 2) m_hat / sqrt(v_hat).
    G = dL/dA is skew here, so the step of S = A - A^T is lr * m_hat / sqrt(v_hat): at most
    about lr in Frobenius norm, and so is the step of U = exp(S) R (R orthogonal). Unlike
    per-entry Adam, an entry moves in proportion to its gradient, so noise in the D^2
    entries is not blown up to the learning rate. The moments live in the coordinates of
    S, which stay comparable across the retractions (S always acts as exp(S) R).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-30):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros((), device=p.device)
                state["step"] += 1
                state["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                state["v"].mul_(b2).add_(p.grad.square().sum(), alpha=1 - b2)
                m_hat = state["m"] / (1 - b1 ** state["step"])
                v_hat = state["v"] / (1 - b2 ** state["step"])
                p.sub_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=group["lr"] / 2)
        return None


class _Both:
    """Two optimisers stepped as one (W's Adam and A's _FrameAdam)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()
