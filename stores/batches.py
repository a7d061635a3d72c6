"""Streaming batches out of a feature store, a bounded window of whole shards at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .errors import ProtocacheError
from .layout import ARRAY_NAMES, CLEAN

if TYPE_CHECKING:
    from .feature_store import FeatureStore


def iter_batches(store: "FeatureStore", split: str | None = "train", batch_size: int = 256, *,
                 fields: Sequence[str] = ("tokens", "label"), view: str = CLEAN,
                 shuffle: bool = False, seed: int = 0, shards_in_memory: int = 2,
                 drop_last: bool = False, as_torch: bool = False,
                 prefetch: bool = True) -> Iterator[dict[str, Any]]:
    """Stream batches of one split, holding a bounded number of shards in memory.

    Rows are read a window of `shards_in_memory` shards at a time; with prefetch the
    next window is read in a background thread while the current one is consumed (so
    at most two windows are in memory). With shuffle, the shard order is permuted and
    rows are permuted within each window, all from `seed`. Fields are array names
    ('tokens', 'pooled', 'logits') and the metadata columns 'label' and 'row'. Arrays
    come as float16 numpy (or torch tensors with as_torch=True).
    """
    rows_wanted = store.split_rows(split)
    s = store.layout.shard_size
    by_shard: dict[int, list[int]] = {}
    for r in rows_wanted.tolist():
        by_shard.setdefault(r // s, []).append(r)
    shard_order = sorted(by_shard)
    rng = np.random.default_rng(seed)
    if shuffle:
        shard_order = [shard_order[i] for i in rng.permutation(len(shard_order))]
    step = max(1, shards_in_memory)
    windows = [shard_order[w:w + step] for w in range(0, len(shard_order), step)]
    # Draw every permutation up front so the order never depends on the prefetch thread.
    orders = [rng.permutation(sum(len(by_shard[sh]) for sh in win)) if shuffle else None for win in windows]
    labels = store.labels()
    loaded = (load_window(store, win, by_shard, fields, labels, view) for win in windows)
    if prefetch:
        loaded = prefetched(loaded)
    carry: dict[str, np.ndarray] | None = None
    for (blocks, offsets), order in zip(loaded, orders):
        n = int(offsets[-1])
        order = np.arange(n) if order is None else order

        def take(index: np.ndarray) -> dict[str, np.ndarray]:
            return {f: gather(blocks[f], offsets, index) for f in fields}

        i = 0
        if carry is not None:
            need = min(batch_size - len(carry[fields[0]]), n)
            head = take(order[:need])
            carry = {f: np.concatenate([carry[f], head[f]]) for f in fields}
            i = need
            if len(carry[fields[0]]) < batch_size:
                continue
            yield as_batch(carry, as_torch)
            carry = None
        while i + batch_size <= n:
            yield as_batch(take(order[i:i + batch_size]), as_torch)
            i += batch_size
        if i < n:
            carry = take(order[i:])
    if carry is not None and not drop_last:
        yield as_batch(carry, as_torch)


def load_window(store: "FeatureStore", shards: Sequence[int], by_shard: dict[int, list[int]],
                fields: Sequence[str], labels: np.ndarray, view: str
                ) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    """The wanted rows of a few shards, each shard read whole and in one call per array.

    Returns the per-shard blocks of every field (not concatenated: batches gather from
    them directly) and the row offsets of the blocks within the window.
    """
    parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    for shard in shards:
        rows = np.asarray(by_shard[shard], dtype=np.int64)
        start, stop = store.layout.shard_bounds(shard)
        whole = len(rows) == stop - start
        for f in fields:
            if f in ARRAY_NAMES:
                block = store.read(f, start, stop, view)
                parts[f].append(block if whole else block[rows - start])
            elif f == "label":
                parts[f].append(labels[rows])
            elif f == "row":
                parts[f].append(rows)
            else:
                raise ProtocacheError(f"unknown batch field {f!r}; use tokens, pooled, logits, label or row")
    sizes = [len(by_shard[shard]) for shard in shards]
    return parts, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def gather(blocks: list[np.ndarray], offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows `index` of the virtual concatenation of `blocks` (block b starts at offsets[b])."""
    if len(blocks) == 1:
        return blocks[0][index]
    which = np.searchsorted(offsets, index, side="right") - 1
    out = np.empty((len(index),) + blocks[0].shape[1:], dtype=blocks[0].dtype)
    for b, block in enumerate(blocks):
        mask = which == b
        if mask.any():
            out[mask] = block[index[mask] - offsets[b]]
    return out


def prefetched(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """Produce the next item(s) in a background thread while the caller works on the current one."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, None))
            q.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((done, exc))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)


class NonFiniteValues(ProtocacheError):
    """Store arrays holding NaN or Inf where a consumer needs finite numbers."""


def nonfinite_mask(block: np.ndarray) -> np.ndarray:
    """Per row of `block`, whether any of its values is NaN or +-Inf."""
    flat = block.reshape(len(block), -1)
    if flat.dtype == np.float16:  # exponent bits all ones: ~10x faster than np.isfinite on float16
        return ((flat.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
    if np.issubdtype(flat.dtype, np.floating):
        return ~np.isfinite(flat).all(axis=1)
    return np.zeros(len(flat), dtype=bool)


def has_nonfinite(block: np.ndarray) -> bool:
    """Whether `block` holds any NaN or +-Inf (a fast check of a whole batch)."""
    if block.dtype == np.float16:
        return block.size > 0 and int((block.view(np.uint16) & 0x7C00).max()) == 0x7C00
    if np.issubdtype(block.dtype, np.floating):
        return not np.isfinite(block).all()
    return False


def nonfinite_rows(store: "FeatureStore", rows: Sequence[int] | np.ndarray, name: str, view: str = CLEAN
                   ) -> np.ndarray:
    """Which of `rows` hold NaN or Inf in array `name` (read a whole shard at a time, in row order)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    bad: list[np.ndarray] = []
    for shard in np.unique(rows // store.layout.shard_size).tolist():
        start, stop = store.layout.shard_bounds(shard)
        wanted = rows[(rows >= start) & (rows < stop)]
        mask = nonfinite_mask(store.read(name, start, stop, view))
        bad.append(wanted[mask[wanted - start]])
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def require_finite(store: "FeatureStore", split: str | None, batch: dict[str, np.ndarray], view: str = CLEAN
                   ) -> None:
    """Raise NonFiniteValues naming the rows of `split` whose arrays in `batch` hold NaN or Inf.

    The check of a batch is fast; only when it fails is the split scanned for every bad row.
    """
    for name in ARRAY_NAMES:
        if name in batch and has_nonfinite(np.asarray(batch[name])):
            rows = nonfinite_rows(store, store.split_rows(split), name, view).tolist()
            shown = ", ".join(map(str, rows[:10])) + (f", ... ({len(rows)} in all)" if len(rows) > 10 else "")
            raise NonFiniteValues(
                f"{store.path}: the {name} of {len(rows)} image(s) of split {split!r} hold NaN or Inf values "
                f"(rows {shown}); nothing can be fitted on them. `protocache verify {store.path}` lists them per "
                "shard; re-run the `protocache extract` command that made the store with --repair to re-extract "
                "those shards (if they come back non-finite the backbone overflows: add --precision fp32).")


def as_batch(batch: dict[str, np.ndarray], as_torch: bool) -> dict[str, Any]:
    """The batch as it is, or as torch tensors (torch is imported only then: stores import no models)."""
    if not as_torch:
        return batch
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
