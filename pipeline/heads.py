"""Heads: the models trained on cached tokens, behind a small registry in timm's style.

Every head maps tokens ``X [N, T, D]`` (T = H*W grid cells, row-major) to class logits
and exposes the same "this looks like that" interface, so evaluation and explanation
code never needs to know which head it holds:

- ``forward(tokens, pooled=None) -> logits [N, C]``
- ``similarity_map(tokens) -> [N, P, H, W]``: where each prototype fires
- ``presence(tokens) -> [N, P]``: how strongly each prototype is present in each image
- ``class_weights() -> [C, P]``: the (non-negative) weight of prototype p for class c
- ``contributions(tokens) -> [N, C, P]``: signed per-prototype share of each class logit
  (it sums over P to the logit, bias aside)
- ``evidence(tokens) -> {"positive", "negative"}``: the contributions split into
  evidence for and against (InfoDisent has both; the others only positive)
- ``class_prototypes(c)``: indices of the prototypes class c uses, strongest first
- ``prototype_count``: number of prototypes P

Heads only hold the math; the training procedures (k-means init, codebook stage,
Gumbel schedule, push, ...) live in pipeline/fit.py. Configs are dataclasses whose
field names follow the papers; ``None`` means "derive from the store" and is replaced
by a concrete value when the config is resolved (and that resolved config is what a
run records).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from protocache.stores.errors import ProtocacheError

# ----------------------------------------------------------------------------- registry

_HEADS: dict[str, type["Head"]] = {}


def register_head(name: str) -> Callable[[type["Head"]], type["Head"]]:
    """Class decorator: make a Head subclass creatable by name (timm's register_model idea)."""

    def wrap(cls: type["Head"]) -> type["Head"]:
        if name in _HEADS and _HEADS[name] is not cls:
            raise ValueError(f"head {name!r} is already registered by {_HEADS[name].__qualname__}")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return wrap


def list_heads() -> list[str]:
    """Registered head names, the linear probe (the yardstick) first."""
    return sorted(_HEADS, key=lambda n: (n != "linear", n))


def head_class(name: str) -> type["Head"]:
    try:
        return _HEADS[name]
    except KeyError:
        raise ProtocacheError(f"unknown head {name!r}; registered heads: {', '.join(list_heads())}") from None


@dataclass(frozen=True)
class StoreInfo:
    """What a head needs to know about the cache it reads (no arrays)."""

    dim: int
    grid: tuple[int, int]
    num_classes: int
    num_logits: int = 0
    num_train: int = 0
    pooled: str = "mean"  # what the store's `pooled` array holds: "mean" token or "cls"
    class_names: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StoreInfo":
        d = dict(d)
        d["grid"] = tuple(d["grid"])
        d["class_names"] = tuple(d.get("class_names") or ())
        return cls(**d)


def store_info(store) -> StoreInfo:
    """StoreInfo of an open FeatureStore."""
    attrs = store.attrs
    num_classes = attrs.get("num_classes")
    if not num_classes:
        num_classes = int(store.labels().max()) + 1
    return StoreInfo(dim=store.layout.dim, grid=tuple(store.layout.grid), num_classes=int(num_classes),
                     num_logits=store.layout.num_logits, num_train=int(len(store.split_rows("train"))),
                     pooled=str(attrs.get("pooled", "mean")), class_names=tuple(attrs.get("class_names") or ()))


def _as_info(info: Any = None, *, dim: int | None = None, grid: tuple[int, int] | None = None,
             num_classes: int | None = None, num_train: int = 0) -> StoreInfo:
    if isinstance(info, StoreInfo):
        return info
    if info is not None and hasattr(info, "layout") and hasattr(info, "attrs"):  # a FeatureStore
        return store_info(info)
    if isinstance(info, dict):
        return StoreInfo.from_json(info)
    if dim is None or num_classes is None:
        raise ProtocacheError("create_head needs a store, a StoreInfo, or dim= and num_classes= (and grid=)")
    if grid is None:
        raise ProtocacheError("create_head needs grid=(H, W) together with dim= and num_classes=")
    return StoreInfo(dim=int(dim), grid=(int(grid[0]), int(grid[1])), num_classes=int(num_classes),
                     num_train=int(num_train))


def config_keys(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(head_class(name).config_class)]


def _coerce(name: str, key: str, value: Any, hint: Any) -> Any:
    """Light type checking for values from YAML/--set: ints become floats where floats are expected."""
    if value is None:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `int | None` and friends
        args = [a for a in typing.get_args(hint) if a is not type(None)]
    else:
        args = [hint]
    for want in args:
        if want is bool and isinstance(value, bool):
            return value
        if want is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if want is str and isinstance(value, str):
            return value
        if typing.get_origin(want) in (list, tuple) and isinstance(value, (list, tuple)):
            return list(value)
    expected = " or ".join(getattr(a, "__name__", str(a)) for a in args)
    raise ProtocacheError(f"{name} config key {key!r} expects {expected}, got {value!r}")


def resolve_config(name: str, info: StoreInfo, overrides: dict[str, Any] | None = None):
    """The head's config with `overrides` applied (checked) and store-derived defaults filled in."""
    cls = head_class(name)
    ccls = cls.config_class
    overrides = dict(overrides or {})
    valid = config_keys(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ProtocacheError(f"unknown config key(s) {', '.join(map(repr, unknown))} for head {name!r}; "
                              f"valid keys: {', '.join(valid)}")
    hints = typing.get_type_hints(ccls)
    checked = {k: _coerce(name, k, v, hints[k]) for k, v in overrides.items()}
    config = ccls(**checked)
    config = cls.resolve(config, info)
    cls.validate(config, info)
    return config


def create_head(name: str, info: Any = None, *, dim: int | None = None, grid: tuple[int, int] | None = None,
                num_classes: int | None = None, **cfg: Any) -> "Head":
    """Build a registered head for a store (a FeatureStore, a StoreInfo, or dim/grid/num_classes).

    Keyword arguments are config keys of that head; unknown keys raise a ProtocacheError
    that lists the valid ones.
    """
    info = _as_info(info, dim=dim, grid=grid, num_classes=num_classes)
    config = resolve_config(name, info, cfg)
    return head_class(name)(info, config)


# ----------------------------------------------------------------------------- base class


class Head(nn.Module):
    """Base class of all heads (see the module docstring for the interface)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    # which store arrays the head reads; "pooled" only for the probe on pooled features
    inputs: ClassVar[tuple[str, ...]] = ("tokens",)

    def __init__(self, info: StoreInfo, config: Any):
        super().__init__()
        self.info = info
        self.config = config

    # config hooks ------------------------------------------------------------------
    @classmethod
    def resolve(cls, config: Any, info: StoreInfo) -> Any:
        """Fill the store-dependent defaults (fields left None)."""
        return config

    @classmethod
    def validate(cls, config: Any, info: StoreInfo) -> None:
        for key in ("epochs", "batch_size"):
            value = getattr(config, key, 1)
            if value is not None and value < 1:
                raise ProtocacheError(f"{cls.name}: {key} must be >= 1, got {value}")

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    # interface -----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def prototype_count(self) -> int:
        raise NotImplementedError

    def similarity_map(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def presence(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def class_weights(self) -> torch.Tensor:
        raise NotImplementedError

    def contributions(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, C, P]: presence times class weight; sums over P to the logits."""
        return self.presence(tokens)[:, None, :] * self.class_weights()[None]

    def evidence(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Contributions split into evidence for (positive) and against (negative) each class."""
        c = self.contributions(tokens)
        return {"positive": c.clamp(min=0), "negative": (-c).clamp(min=0)}

    def class_prototypes(self, c: int) -> torch.Tensor:
        """Prototype indices with a positive weight for class c, strongest first."""
        w = self.class_weights()[int(c)].detach()
        order = torch.argsort(w, descending=True, stable=True)
        return order[w[order] > 0]

    def extra_metrics(self) -> dict[str, Any]:
        """Head-specific numbers for metrics.json (e.g. local size)."""
        return {}

    # state ---------------------------------------------------------------------------
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict whose tensors may have other shapes (pruned codebooks)."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ProtocacheError(f"weights do not fit head {self.name!r}: missing {missing}, unexpected {unexpected}")
        for key, value in state.items():
            module_name, _, attr = key.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            current = getattr(module, attr)
            value = value.to(dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                setattr(module, attr, nn.Parameter(value.clone(), requires_grad=current.requires_grad))
            else:
                setattr(module, attr, value.clone())
        self.after_load()

    def after_load(self) -> None:
        """Re-derive any Python-side state from the loaded tensors."""


def _grid_map(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[N, T, P] -> [N, P, H, W] (tokens are row-major over the grid)."""
    n, t, p = values.shape
    h, w = grid
    if t != h * w:
        raise ProtocacheError(f"{t} tokens do not fill a {h}x{w} grid")
    return values.permute(0, 2, 1).reshape(n, p, h, w)


SMALL_DATA = 5000  # training images below which a head uses its small-data epoch count


def scaled_epochs(value: int | None, published: int, small: int, num_train: int) -> int:
    """`value` if set; else the published epoch count, or `small` on datasets under 5,000
    training images (there the batch is smaller too, so the step count stays comparable
    while a CPU fit stays within a minute or two)."""
    if value is not None:
        return int(value)
    return int(small if 0 < num_train < SMALL_DATA else published)


def auto_batch_size(num_train: int, published: int) -> int:
    """The published batch size, smaller on small data so an epoch still has ~10 steps.

    A power of two in [32, published]: e.g. 1,437 digits -> 128, CUB (5,994) -> 512.
    """
    if num_train <= 0:
        return published
    target = max(32, num_train // 10)
    return int(min(published, 2 ** int(math.log2(target))))


# ----------------------------------------------------------------------------- linear probe


@dataclass
class LinearConfig:
    """Linear probe: the accuracy yardstick for the interpretable heads."""

    source: str = "pooled"  # pooled (the store's pooled array: CLS or mean token) | mean (mean of tokens)
    standardize: str = "feature"  # feature (z-score each dim) | global (one scale for all dims) | none
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int | None = None  # None: 30, or 60 on small data
    batch_size: int | None = None  # None: 256, smaller on small data


@register_head("linear")
class LinearProbe(Head):
    """Affine map of the pooled (or mean) token to class logits.

    Its "prototypes" are the C class directions: similarity_map is the per-cell class
    score (a class activation map) and presence its mean over cells.
    """

    config_class = LinearConfig

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
        return _grid_map(self._cell_scores(tokens), self.info.grid)

    def presence(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._cell_scores(tokens).mean(dim=1)

    def class_weights(self) -> torch.Tensor:
        return torch.eye(self.num_classes, device=self.linear.weight.device)

    def class_prototypes(self, c: int) -> torch.Tensor:
        return torch.tensor([int(c)])


# ----------------------------------------------------------------------------- ProtoQuant


@dataclass
class ProtoQuantConfig:
    """ProtoQuant (arXiv 2602.06592): a codebook of real-token prototypes + a PIP-Net-style head."""

    codebook_size: int | None = None  # None: ~13.7 per class in [64, 4096], pruned to 10 per class
    tau: float = 0.1  # softmax temperature over codes
    task_weight: float = 1.0  # stage-1 CE weight through the frozen teacher; 0 = label-free online spherical k-means
    codebook_weight: float = 1.0  # ||q - sg(x)||^2 weight (stage 1, and stage 2 when codes train)
    init: str = "kmeans"  # kmeans (FAISS spherical k-means on a token sample) | orthogonal (reference init)
    train_codes: bool = True  # False: codes frozen in stage 2 (the paper's default; see fit.py for why not here)
    l1: float = 0.0  # L1 on ReLU(W) in stage 2
    teacher: str = "auto"  # auto | backbone (cached logits, only when classes match) | probe
    codebook_epochs: int | None = None  # stage-1 epochs; None: scaled to the data, 0 skips stage 1
    codebook_lr: float = 5e-4  # Adam, as the reference's CUB runs
    codebook_batch_size: int | None = None
    dead_code_threshold: int = 0  # codes used <= this many times in an epoch are re-seeded
    kmeans_sample: int | None = None  # tokens for k-means; None: 256 per code (FAISS's own cap) in [10k, 100k]
    kmeans_iters: int = 20
    prune_to: int | None = None  # usage-based pruning target; None: 3000/4096 of the codebook; 0 = off
    prune_rounds: int = 8
    lr: float = 0.05  # stage 2, AdamW
    codes_lr: float = 0.01  # stage 2 codes (when train_codes)
    weight_decay: float = 0.01
    epochs: int | None = None  # stage 2; None: the published 30, fewer passes on small data
    batch_size: int | None = None  # None: the published 512, smaller on small data
    topk_per_class: int = 5  # post-hoc: keep the k largest weights per class (0 = keep all)
    finetune_epochs: int | None = None  # after top-k; None: 30 (the reference re-trains the limited head)
    local_size_threshold: float = 0.1


@register_head("protoquant")
class ProtoQuant(Head):
    """Stage-2 head over a codebook E [K, D]: s = cos(X, E), a = softmax_K(s / tau),
    presence p_k = max_t a_tk, logits = p . (ReLU(W) * mask)^T, no bias."""

    config_class = ProtoQuantConfig

    def __init__(self, info: StoreInfo, config: ProtoQuantConfig):
        super().__init__(info, config)
        k, c = config.codebook_size, info.num_classes
        codes = torch.empty(k, info.dim)
        nn.init.orthogonal_(codes)  # replaced by k-means (or kept) when fitted
        self.codes = nn.Parameter(codes, requires_grad=config.train_codes)
        self.weight = nn.Parameter(torch.empty(c, k))
        nn.init.normal_(self.weight, mean=1.0, std=0.1)
        self.register_buffer("weight_mask", torch.ones(c, k))  # 0 where top-k sparsification removed a weight

    @classmethod
    def resolve(cls, config: ProtoQuantConfig, info: StoreInfo) -> ProtoQuantConfig:
        # enough codes that the paper's 4096 -> 3000 usage pruning leaves ten per class
        k = config.codebook_size or int(min(4096, max(64, math.ceil(10 * info.num_classes * 4096 / 3000))))
        prune_to = config.prune_to
        if prune_to is None:
            prune_to = int(round(k * 3000 / 4096))  # the paper's 4096 -> 3000
        bs = config.batch_size or auto_batch_size(info.num_train, 512)
        cbs = config.codebook_batch_size or auto_batch_size(info.num_train, 128)
        epochs = scaled_epochs(config.epochs, 30, 15, info.num_train)
        sample = config.kmeans_sample or int(min(100_000, max(10_000, 256 * k)))
        return dataclasses.replace(config, codebook_size=k, kmeans_sample=sample, prune_to=prune_to, batch_size=bs,
                                   codebook_batch_size=cbs, epochs=epochs,
                                   codebook_epochs=scaled_epochs(config.codebook_epochs, 60, 5, info.num_train),
                                   finetune_epochs=scaled_epochs(config.finetune_epochs, 30, 30, info.num_train))

    @classmethod
    def validate(cls, config: ProtoQuantConfig, info: StoreInfo) -> None:
        super().validate(config, info)
        if config.init not in ("kmeans", "orthogonal"):
            raise ProtocacheError(f"protoquant: init must be 'kmeans' or 'orthogonal', not {config.init!r}")
        if config.teacher not in ("auto", "backbone", "probe"):
            raise ProtocacheError(f"protoquant: teacher must be auto, backbone or probe, not {config.teacher!r}")
        if config.tau <= 0:
            raise ProtocacheError("protoquant: tau must be > 0")
        if config.prune_to and config.prune_to > config.codebook_size:
            raise ProtocacheError(f"protoquant: prune_to {config.prune_to} > codebook_size {config.codebook_size}")
        if config.prune_to and config.prune_to < max(1, config.topk_per_class):
            raise ProtocacheError("protoquant: prune_to must leave at least topk_per_class codes")

    @property
    def prototype_count(self) -> int:
        return int(self.codes.shape[0])

    def cosine(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, K] cosine similarity of every token to every code."""
        return F.normalize(tokens, dim=-1, eps=1e-6) @ F.normalize(self.codes, dim=-1, eps=1e-6).T

    def assignment(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, K] soft assignment a = softmax_K(cos / tau)."""
        return torch.softmax(self.cosine(tokens) / self.config.tau, dim=-1)

    def nearest_code(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T] index of the most cosine-similar code (the hard quantisation of stage 1)."""
        with torch.no_grad():
            return self.cosine(tokens).argmax(dim=-1)

    def presence(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.assignment(tokens).amax(dim=1)

    def class_weights(self) -> torch.Tensor:
        return F.relu(self.weight) * self.weight_mask

    def classify(self, presence: torch.Tensor) -> torch.Tensor:
        return presence @ self.class_weights().T

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.presence(tokens))

    def similarity_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """The soft assignment a_{t,k} on the grid; its max over cells is the presence."""
        return _grid_map(self.assignment(tokens), self.info.grid)

    # post-hoc sparsification -------------------------------------------------------
    @torch.no_grad()
    def limit_per_class(self, k: int) -> None:
        """Keep the k largest positive weights of each class; zero (and mask) the rest."""
        w = self.class_weights()
        if k <= 0 or k >= w.shape[1]:
            return
        top = torch.topk(w, k=k, dim=1).indices
        keep = torch.zeros_like(w).scatter_(1, top, 1.0) * (w > 0)
        self.weight_mask.mul_(keep)
        self.weight.data.mul_(keep)

    @torch.no_grad()
    def prune_unused(self) -> list[int]:
        """Drop codes with no positive weight in any class; returns the kept indices."""
        active = (self.class_weights() > 0).any(dim=0)
        keep = torch.nonzero(active).flatten()
        if keep.numel() == 0 or keep.numel() == self.prototype_count:
            return list(range(self.prototype_count))
        self.keep_codes(keep)
        return keep.tolist()

    @torch.no_grad()
    def keep_codes(self, keep: torch.Tensor) -> None:
        """Shrink the codebook (and the head's columns) to the codes in `keep`."""
        self.codes = nn.Parameter(self.codes.data[keep].clone(), requires_grad=self.codes.requires_grad)
        self.weight = nn.Parameter(self.weight.data[:, keep].clone())
        self.weight_mask = self.weight_mask[:, keep].clone()

    def local_size(self) -> torch.Tensor:
        """Prototypes per class with weight above the threshold (the paper's "local size")."""
        return (self.class_weights() > self.config.local_size_threshold).sum(dim=1)

    def extra_metrics(self) -> dict[str, Any]:
        ls = self.local_size()
        return {"local_size": float(ls.float().mean()), "local_size_per_class": [int(v) for v in ls]}


# ----------------------------------------------------------------------------- ProtoPool


@dataclass
class ProtoPoolConfig:
    """ProtoPool (arXiv 2112.02902): a pool of prototypes shared through per-class Gumbel slots."""

    num_prototypes: int | None = None  # None: ~1 per class as published (202 for CUB), at least 100 (see resolve)
    slots_per_class: int = 10
    proto_dim: int | None = None  # None: 256 as published for CUB; 32 on small data (see resolve)
    gumbel_tau: float = 0.5
    gumbel_start: float = 1.3  # scale of the slot logits at epoch 0 ...
    gumbel_end: float = 1000.0  # ... growing as sqrt(epoch) to this (hard one-hot) at gumbel_epochs
    gumbel_epochs: int | None = None  # None: 30 of the published schedule, scaled to `epochs`
    cluster_weight: float = 0.8
    separation_weight: float = 0.08
    l1: float = 1e-4
    orthogonality_weight: float = 1.0
    mixup: float = 0.5  # Beta(alpha, alpha) mixup of token maps, as published (0 = off)
    lr: float | None = None  # None: 3 x 1e-3 as published for the add-on, prototypes and slots; 1e-2 on small data
    weight_decay: float = 1e-3  # add-on layer
    epochs: int | None = None
    batch_size: int | None = None  # None: the published 80, smaller on small data
    push: bool = True
    last_layer_epochs: int = 25
    last_layer_lr: float = 1e-4  # lr / 10, as published


@register_head("protopool")
class ProtoPool(Head):
    """Add-on z = sigmoid(Linear(x)); squared-L2 distances of every cell to M prototypes;
    per-prototype min and mean over cells; each class's K slots select prototypes
    (Gumbel-softmax over the pool in training, one-hot at inference); focal similarity
    g(Dmin) - g(Davg) per slot; logits = last_layer(slot similarities)."""

    config_class = ProtoPoolConfig
    epsilon = 1e-4

    def __init__(self, info: StoreInfo, config: ProtoPoolConfig):
        super().__init__(info, config)
        c, m, k, d = info.num_classes, config.num_prototypes, config.slots_per_class, config.proto_dim
        self.add_on = nn.Linear(info.dim, d)
        nn.init.kaiming_normal_(self.add_on.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.add_on.bias)
        self.prototypes = nn.Parameter(torch.rand(m, d))
        self.slot_logits = nn.Parameter(torch.empty(c, m, k))  # the paper's "proto_presence"
        nn.init.xavier_normal_(self.slot_logits, gain=1.0)
        identity = torch.zeros(c, c * k)
        for j in range(c * k):
            identity[j // k, j] = 1.0
        self.register_buffer("class_identity", identity)  # [C, C*K]: slot j belongs to class j // K
        self.last_layer = nn.Linear(c * k, c, bias=False)
        self.last_layer.weight.data.copy_(identity)
        # push provenance: the store row and grid cell each prototype was projected onto (-1: not pushed)
        self.register_buffer("push_row", torch.full((m,), -1, dtype=torch.long))
        self.register_buffer("push_cell", torch.full((m,), -1, dtype=torch.long))
        self.gumbel_scale = 0.0  # set by the training schedule; 0 = plain softmax

    @classmethod
    def resolve(cls, config: ProtoPoolConfig, info: StoreInfo) -> ProtoPoolConfig:
        # Published: M ~ 1.01 C (202 for CUB's 200 classes) with K = 10 slots, so a class's slots
        # hold 5% of the pool. With few classes that ratio breaks down (digits: 10 slots of 11
        # prototypes would make every class read nearly the same pool), so the pool is at
        # least min(C * K, 100): one prototype per class slot up to 100.
        c, k = info.num_classes, config.slots_per_class
        m = config.num_prototypes or int(max(math.ceil(1.01 * c), min(c * k, 100)))
        # The add-on is the only learned feature map on a frozen cache; on small training sets
        # a narrow one overfits less (digits test accuracy: 0.82 at 256, 0.86 at 64, 0.89 at 32).
        d = config.proto_dim or (32 if 0 < info.num_train < SMALL_DATA else 256)
        bs = config.batch_size or auto_batch_size(info.num_train, 80)
        epochs = scaled_epochs(config.epochs, 40, 30, info.num_train)
        small = 0 < info.num_train < SMALL_DATA
        lr = config.lr if config.lr is not None else (1e-2 if small else 3e-3)  # fewer steps on small data
        gumbel = config.gumbel_epochs if config.gumbel_epochs is not None else max(1, round(epochs * 30 / 40))
        return dataclasses.replace(config, num_prototypes=m, proto_dim=d, batch_size=bs, epochs=epochs,
                                   gumbel_epochs=gumbel, lr=lr)

    @classmethod
    def validate(cls, config: ProtoPoolConfig, info: StoreInfo) -> None:
        super().validate(config, info)
        if config.slots_per_class > config.num_prototypes:
            raise ProtocacheError(f"protopool: slots_per_class {config.slots_per_class} > num_prototypes "
                                  f"{config.num_prototypes}")

    @property
    def prototype_count(self) -> int:
        return int(self.prototypes.shape[0])

    # slot assignment -----------------------------------------------------------------
    def slot_assignment(self) -> torch.Tensor:
        """[C, M, K]: which prototype fills each class slot (a distribution over M per slot)."""
        if self.training:
            if self.gumbel_scale <= 0:
                return torch.softmax(self.slot_logits, dim=1)
            return F.gumbel_softmax(self.slot_logits * self.gumbel_scale, tau=self.config.gumbel_tau, dim=1)
        return self.hard_assignment()

    def hard_assignment(self) -> torch.Tensor:
        """One-hot [C, M, K]: each slot's argmax prototype (what the schedule converges to)."""
        idx = self.slot_logits.argmax(dim=1)  # [C, K]
        return F.one_hot(idx, self.prototype_count).permute(0, 2, 1).to(self.slot_logits.dtype)

    def slot_prototypes(self) -> torch.Tensor:
        """[C, K] index of the prototype in each class slot (hard)."""
        return self.slot_logits.argmax(dim=1)

    # distances -----------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, d] add-on features sigmoid(Linear(x)); pushed prototypes are rows of this."""
        return torch.sigmoid(self.add_on(tokens))

    def distances(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, M] squared L2 distances of every cell's add-on feature to every prototype."""
        z = self.embed(tokens)
        p = self.prototypes
        d = (z * z).sum(-1, keepdim=True) - 2 * z @ p.T + (p * p).sum(-1)[None, None]
        return F.relu(d)

    def log_similarity(self, d: torch.Tensor) -> torch.Tensor:
        return torch.log((d + 1) / (d + self.epsilon))

    def slot_similarities(self, tokens: torch.Tensor, assignment: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, C*K] focal similarity per slot, [N, M] min distance per prototype)."""
        d = self.distances(tokens)
        dmin, davg = d.amin(dim=1), d.mean(dim=1)
        a = self.slot_assignment() if assignment is None else assignment
        mixed_min = torch.einsum("bm,cmk->bck", dmin, a)
        mixed_avg = torch.einsum("bm,cmk->bck", davg, a)
        sim = self.log_similarity(mixed_min) - self.log_similarity(mixed_avg)
        return sim.flatten(1), dmin

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        return self.last_layer(self.slot_similarities(tokens)[0])

    # interface -----------------------------------------------------------------------
    def similarity_map(self, tokens: torch.Tensor) -> torch.Tensor:
        return _grid_map(self.log_similarity(self.distances(tokens)), self.info.grid)

    def presence(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, M] focal similarity g(Dmin) - g(Davg) of each prototype (>= 0)."""
        d = self.distances(tokens)
        return self.log_similarity(d.amin(dim=1)) - self.log_similarity(d.mean(dim=1))

    def class_weights(self) -> torch.Tensor:
        """[C, M]: last-layer weight of every slot, summed onto the prototype filling it.

        With the hard assignment, presence . class_weights^T equals the logits.
        """
        a = self.hard_assignment()  # [C', M, K]
        slot_to_proto = a.permute(0, 2, 1).reshape(-1, self.prototype_count)  # [C'*K, M]
        return self.last_layer.weight @ slot_to_proto

    def class_prototypes(self, c: int) -> torch.Tensor:
        """The prototypes in class c's own slots (first occurrence order)."""
        seen: list[int] = []
        for p in self.slot_prototypes()[int(c)].tolist():
            if p not in seen:
                seen.append(p)
        return torch.tensor(seen, dtype=torch.long)

    def extra_metrics(self) -> dict[str, Any]:
        slots = self.slot_prototypes()
        used = torch.unique(slots)
        per_class = [len(set(row.tolist())) for row in slots]
        return {"prototypes_used": int(used.numel()), "local_size": sum(per_class) / len(per_class),
                "local_size_per_class": per_class}


# ----------------------------------------------------------------------------- InfoDisent


@dataclass
class InfoDisentConfig:
    """InfoDisent (arXiv 2409.10329): rotated channels as atomic parts, max-pooled both ways."""

    gumbel_tau: float = 0.1  # Gumbel-softmax over cells (of J / tau) stands in for the max in training
    straight_through: bool = True  # forward the selected cell's value (= the max at inference), soft gradient
    lr: float = 1e-3  # Adam on W
    rotation_lr: float = 1e-4  # Adam on the skew generator A
    weight_decay: float = 0.0
    warmup_epochs: int | None = None  # W alone on the pooled channels of the current rotation (cheap)
    epochs: int | None = None  # joint epochs: rotation and W
    batch_size: int | None = None  # None: 256, smaller on small data


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
        return _grid_map(self.rotate(tokens), self.info.grid)

    def evidence(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pos, neg = self.channel_evidence(tokens)
        w = self.class_weights()[None]
        return {"positive": pos[:, None, :] * w, "negative": neg[:, None, :] * w}

    def extra_metrics(self) -> dict[str, Any]:
        w = self.class_weights()
        strong = (w > 0.1 * w.amax(dim=1, keepdim=True)).sum(dim=1).float()
        return {"channels_used": int((w > 0).any(dim=0).sum()),
                "channels_per_class_above_10pct_of_max": float(strong.mean())}
