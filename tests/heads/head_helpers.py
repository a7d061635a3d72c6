"""Small heads on random tokens, shared by the per-head tests."""

from __future__ import annotations

import torch

from protocache.pipeline import heads as H

DIM, GRID, CLASSES = 12, (3, 4), 4
SMALL = {
    "linear": {},
    "protoquant": {"codebook_size": 9},
    "protopool": {"num_prototypes": 7, "slots_per_class": 3, "proto_dim": 5},
    "infodisent": {},
}


def make(name: str, **cfg) -> H.Head:
    torch.manual_seed(0)
    return H.create_head(name, dim=DIM, grid=GRID, num_classes=CLASSES, **{**SMALL[name], **cfg})


def tokens(n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, GRID[0] * GRID[1], DIM, generator=g) * 3
