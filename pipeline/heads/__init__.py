"""Heads trained on cached tokens, behind a registry in timm's style.

One file per head holds its config dataclass, its module and its training recipe;
importing this package imports every module in its folder, which registers every head.
Adding a head means adding one file here that defines a config, a ``Head`` subclass
decorated with ``@register_head("name")`` and its ``fit(ctx)`` recipe (README: "Adding a head").
"""

import importlib
import pkgutil

from ._registry import config_keys, create_head, head_class, list_heads, register_head, resolve_config
from .base import SMALL_DATA, Head, StoreInfo, auto_batch_size, grid_map, scaled_epochs, store_info
from .infodisent import InfoDisent, InfoDisentConfig
from .linear import LinearConfig, LinearProbe
from .protopool import ProtoPool, ProtoPoolConfig
from .protoquant import ProtoQuant, ProtoQuantConfig

# Every other module of this folder is a head too: importing it registers it.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Head", "StoreInfo", "store_info", "register_head", "create_head", "list_heads", "head_class", "resolve_config",
    "config_keys", "grid_map", "scaled_epochs", "auto_batch_size", "SMALL_DATA",
    "LinearProbe", "LinearConfig", "ProtoQuant", "ProtoQuantConfig", "ProtoPool", "ProtoPoolConfig",
    "InfoDisent", "InfoDisentConfig",
]
