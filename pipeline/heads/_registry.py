"""The head registry, in timm's style: a decorator registers a Head class under a name."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from protocache.stores.errors import ProtocacheError

from ..config import build_config
from .base import Head, StoreInfo, store_info

_HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: make a Head subclass creatable by name (timm's register_model idea)."""

    def wrap(cls: type[Head]) -> type[Head]:
        if name in _HEADS and _HEADS[name] is not cls:
            raise ValueError(f"head {name!r} is already registered by {_HEADS[name].__qualname__}")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return wrap


def list_heads() -> list[str]:
    """Registered head names, the linear probe (the yardstick) first."""
    return sorted(_HEADS, key=lambda n: (n != "linear", n))


def head_class(name: str) -> type[Head]:
    try:
        return _HEADS[name]
    except KeyError:
        raise ProtocacheError(f"unknown head {name!r}; registered heads: {', '.join(list_heads())}") from None


def config_keys(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(head_class(name).config_class)]


def resolve_config(name: str, info: StoreInfo, overrides: dict[str, Any] | None = None):
    """The head's config with `overrides` applied (checked) and store-derived defaults filled in."""
    cls = head_class(name)
    config = build_config(cls.config_class, overrides, f"head {name!r}")
    config = cls.resolve(config, info)
    cls.validate(config, info)
    return config


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


def create_head(name: str, info: Any = None, *, dim: int | None = None, grid: tuple[int, int] | None = None,
                num_classes: int | None = None, **cfg: Any) -> Head:
    """Build a registered head for a store (a FeatureStore, a StoreInfo, or dim/grid/num_classes).

    Keyword arguments are config keys of that head; unknown keys raise a ProtocacheError
    that names the closest valid key and lists them all.
    """
    info = _as_info(info, dim=dim, grid=grid, num_classes=num_classes)
    config = resolve_config(name, info, cfg)
    return head_class(name)(info, config)
