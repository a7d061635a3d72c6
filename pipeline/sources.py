"""Batch sources over a store's split: what the training loop and the recipes iterate.

A split that spans at most `shards_in_memory` shards is read once and kept (that many
shards is the memory bound anyway); a larger one is streamed from the store every epoch
with ``FeatureStore.iter_batches``, so memory stays flat as the store grows. Per-image
features derived from frozen parts are kept in RAM while they fit in a budget
(``derive``) and recomputed from the tokens each epoch otherwise.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pyarrow as pa
import torch

from protocache.stores import FeatureStore
from protocache.stores.batches import require_finite


class Batches(Protocol):
    num_rows: int

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        ...


def epoch_seed(seed: int, epoch: int) -> int:
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
            require_finite(self.store, self.split, self._arrays)  # NaN/Inf tokens: an error naming the rows
        return self._arrays

    def batches(self, batch_size: int, epoch: int = 0, shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        seed = epoch_seed(self.seed, epoch)
        if not self.resident:
            for b in self.store.iter_batches(self.split, batch_size=batch_size, fields=self.fields,
                                             shuffle=shuffle, seed=seed, shards_in_memory=self.shards_in_memory):
                require_finite(self.store, self.split, b)  # NaN/Inf tokens: an error naming the rows
                yield b
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
        order = (np.random.default_rng(epoch_seed(self.seed, epoch)).permutation(self.num_rows)
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


def backbone_labelled(store: Any) -> bool:
    """Whether `store` (or the reader wrapping it) is already a `with_backbone_labels` view."""
    return (getattr(store, "attrs", None) or {}).get("labels", {}).get("source") == "backbone"


def with_backbone_labels(store: FeatureStore) -> FeatureStore:
    """A read-only view of `store` whose labels are the backbone's own top-1 (argmax of the cached
    `logits`) and whose classes are the backbone classifier's (ImageNet's names for a 1,000-way
    classifier): what a head trained to explain the pretrained network itself fits and is measured
    on (`target=backbone`), so accuracy on a split is agreement with the backbone. Splits, arrays and
    the fingerprint are the store's; attrs["labels"] records where the labels came from."""
    from protocache.stores.errors import ProtocacheError

    from .backbones import backbone_class_names

    if not isinstance(store, FeatureStore):
        raise ProtocacheError("target=backbone needs the store itself, not a reader wrapping it "
                              "(ablate relabels the store before wrapping it)")
    if not store.has_logits:
        raise ProtocacheError(f"{store.path} holds no logits (its backbone {store.fingerprint.get('backbone')} has "
                              "no classifier), so there is no backbone to explain: use target=labels, or extract "
                              "with a backbone that has a classifier")
    lay = store.layout
    top1 = np.concatenate([store.read("logits", start, min(start + lay.shard_size, lay.num_images)).argmax(1)
                           for start in range(0, lay.num_images, lay.shard_size)]).astype(np.int64)
    names = backbone_class_names(lay.num_logits)
    table = store.metadata()
    table = table.set_column(table.column_names.index("label"), "label", pa.array(top1, type=pa.int64()))
    if "class_name" in table.column_names:
        table = table.set_column(table.column_names.index("class_name"), "class_name",
                                 pa.array([names[k] for k in top1], type=pa.string()))
    attrs = {**store.attrs, "num_classes": lay.num_logits, "class_names": names,
             "labels": {"source": "backbone", "rule": "argmax of the cached logits",
                        "backbone": store.fingerprint.get("backbone"),
                        "weights_sha256": store.fingerprint.get("weights_sha256"),
                        "dataset_class_names": list(store.attrs.get("class_names") or [])}}
    view = FeatureStore(store.location, store.group, attrs)
    view._metadata = table  # as with_splits does: the arrays and shards are shared, only the labels differ
    return view


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        t = t.long() if k in ("label", "row") else t.float()
        out[k] = t.to(device)
    return out
