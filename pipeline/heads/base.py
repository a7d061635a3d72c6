"""The Head interface every registered head implements, and what a head knows about its cache.

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
- ``fit(ctx)``: the head's training recipe over a ``FitContext`` (pipeline/fit.py)

and declares, instead of being probed for them: ``signed_evidence`` (whether its evidence
has a negative part), ``class_prototype_rule`` (how a class's prototypes are chosen) and
``class_prototype_k`` and ``local_size()`` (prototypes per class above a tenth of its largest weight).

Configs are dataclasses whose field names follow the papers and whose field docstrings
are their help; ``None`` means "derive from the store" and is replaced by a concrete value
when the config is resolved (and that resolved config is what a run records).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from protocache.stores.errors import ProtocacheError

if TYPE_CHECKING:
    from ..fit import FitContext


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


class Head(nn.Module):
    """Base class of all heads (see the module docstring for the interface)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    inputs: ClassVar[tuple[str, ...]] = ("tokens",)
    """Which store arrays the head reads; "pooled" only for the probe on pooled features."""
    signed_evidence: ClassVar[bool] = False
    """True when a prototype can also count against a class (its evidence has a negative part)."""
    class_prototype_rule: ClassVar[str] = "prototypes with a positive last-layer weight for the class, strongest first"
    """How `class_prototypes(c)` chooses a class's prototypes (recorded by evaluate)."""
    optional_state: ClassVar[tuple[str, ...]] = ()
    """State keys that runs written before they existed lack (they keep their initial values)."""
    class_prototype_k: ClassVar[int | None] = None
    """The k of a rule that takes a class's k strongest prototypes; None where the rule has no k."""

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
        """Every field of the resolved config of its type and every number in the range its name
        implies (pipeline/config.py's VALUE_RULES: epochs, sizes >= 1, lr >= 0, tau > 0, fractions
        in [0, 1], ...). A head adds the checks between fields in its own validate."""
        from ..config import check_values

        check_values(config, f"head {cls.name!r}")

    # training --------------------------------------------------------------------------
    def fit(self, ctx: "FitContext") -> None:
        """The head's training recipe: train it in place from the batches `ctx` serves."""
        raise NotImplementedError(f"head {self.name!r} has no training recipe (define fit(self, ctx))")

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

    def local_size(self) -> torch.Tensor:
        """[C] prototypes per class whose weight exceeds LOCAL_SIZE_FRACTION of that class's largest.

        One definition for every head: relative to the class's largest weight, because the
        heads' weight scales differ by orders of magnitude (ProtoQuant's W starts near 1,
        InfoDisent's near 1/sqrt(D)). It is taken on the head as it is (after any forced top-k).
        """
        w = self.class_weights().detach()
        top = w.amax(dim=1, keepdim=True)
        return ((w > LOCAL_SIZE_FRACTION * top) & (w > 0)).sum(dim=1)

    def extra_metrics(self) -> dict[str, Any]:
        """Numbers for metrics.json: the local size, and whatever a head adds."""
        ls = self.local_size()
        return {"local_size": float(ls.float().mean()), "local_size_per_class": [int(v) for v in ls]}

    # state ---------------------------------------------------------------------------
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict whose tensors may have other shapes (pruned codebooks)."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        missing = sorted(set(own) - set(state) - set(self.optional_state))
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


def grid_map(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[N, T, P] -> [N, P, H, W] (tokens are row-major over the grid)."""
    n, t, p = values.shape
    h, w = grid
    if t != h * w:
        raise ProtocacheError(f"{t} tokens do not fill a {h}x{w} grid")
    return values.permute(0, 2, 1).reshape(n, p, h, w)


LOCAL_SIZE_FRACTION = 0.1  # a prototype counts for a class's local size above this share of its largest weight
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
