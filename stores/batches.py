"""Streaming batches out of a feature store, a bounded window of whole shards at a time.

A window of `shards_in_memory` shards is read into one of two sets of arrays allocated once
per iteration and refilled (the window being consumed and the one being prefetched: memory
stays at two windows however long the split is), straight from the shard files by
`shard_reader` where it can decode them (local stores, raw or zstd/blosc chunks), through zarr
otherwise. A batch is then one gather from the window's arrays, the same work as indexing
arrays held in RAM.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .errors import ProtocacheError
from .layout import ARRAY_NAMES, CLEAN, array_path
from .shard_reader import ShardReader, read_shards

if TYPE_CHECKING:
    from .feature_store import FeatureStore

FIELDS = ARRAY_NAMES + ("label", "row")
PREFETCH_THREAD = "protocache-prefetch"


def iter_batches(store: "FeatureStore", split: str | None = "train", batch_size: int = 256, *,
                 fields: Sequence[str] = ("tokens", "label"), view: str = CLEAN,
                 shuffle: bool = False, seed: int = 0, shards_in_memory: int = 2,
                 drop_last: bool = False, as_torch: bool = False,
                 prefetch: bool = True) -> Iterator[dict[str, Any]]:
    """Stream batches of one split, holding a bounded number of shards in memory.

    Rows are read a window of `shards_in_memory` whole shards at a time; with prefetch the
    next window is read in a background thread while the current one is consumed (so at
    most two windows are in memory). With shuffle, the shard order is permuted and rows are
    permuted within each window, all from `seed`. Fields are array names ('tokens',
    'pooled', 'logits') and the metadata columns 'label' and 'row'. Arrays come as float16
    numpy (or torch tensors with as_torch=True); every batch is a fresh array the caller owns.
    """
    if isinstance(fields, str) or not fields:
        raise ProtocacheError(f"fields is a non-empty list of names, e.g. ('tokens', 'label'), got {fields!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ProtocacheError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    fields = tuple(fields)
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ProtocacheError(f"unknown batch field {unknown[0]!r}; use tokens, pooled, logits, label or row")
    rows_wanted = store.split_rows(split)  # (an unknown split fails here, not at the first batch)
    return _batches(store, rows_wanted, batch_size, fields, view, shuffle, seed, shards_in_memory, drop_last,
                    as_torch, prefetch)


def _batches(store: "FeatureStore", rows_wanted: np.ndarray, batch_size: int, fields: tuple[str, ...], view: str,
             shuffle: bool, seed: int, shards_in_memory: int, drop_last: bool, as_torch: bool,
             prefetch: bool) -> Iterator[dict[str, Any]]:
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
    source = WindowSource(store, fields, view, windows)
    loaded = (source.load(win, by_shard, labels) for win in windows)
    if prefetch:
        loaded = prefetched(loaded)
    carry: dict[str, np.ndarray] | None = None
    try:
        for window, order in zip(loaded, orders):
            n = len(window.rows)
            order = np.arange(n) if order is None else order
            i = 0
            if carry is not None:
                need = min(batch_size - len(carry[fields[0]]), n)
                head = window.take(order[:need])
                carry = {f: np.concatenate([carry[f], head[f]]) for f in fields}
                i = need
                if len(carry[fields[0]]) < batch_size:
                    window.release()
                    continue
                yield as_batch(carry, as_torch)
                carry = None
            while i + batch_size <= n:
                yield as_batch(window.take(order[i:i + batch_size]), as_torch)
                i += batch_size
            if i < n:
                carry = window.take(order[i:])
            window.release()  # every row it holds has been copied out: the producer may refill it
    finally:
        source.close()
        loaded.close()
    if carry is not None and not drop_last:
        yield as_batch(carry, as_torch)


@dataclass
class Window:
    """The wanted rows of a few shards, in memory: batches gather from it."""

    arrays: dict[str, np.ndarray]
    """Array field -> every row of the window's shards, shard after shard (a view of a slot)."""
    rows: np.ndarray
    """Store rows of the wanted rows, shard after shard: what the permutation `order` indexes."""
    positions: np.ndarray | None
    """Where each wanted row sits in `arrays` (None: all rows of every shard, in order)."""
    labels: np.ndarray
    fields: tuple[str, ...]
    source: "WindowSource"
    slot: dict[str, np.ndarray]

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Wanted rows `index` of every field (fresh arrays)."""
        at = index if self.positions is None else self.positions[index]
        out = {}
        for f in self.fields:
            if f in self.arrays:
                out[f] = self.arrays[f][at]
            elif f == "label":
                out[f] = self.labels[self.rows[index]]
            else:
                out[f] = self.rows[index]
        return out

    def release(self) -> None:
        self.source.release(self.slot)


class IteratorClosed(Exception):
    """The consumer of a batch iterator stopped while a window was being read for it."""


class WindowSource:
    """Reads windows of shards into two slots (sets of arrays), each allocated on first use and
    refilled: a window is read only into a slot the consumer has released."""

    def __init__(self, store: "FeatureStore", fields: tuple[str, ...], view: str, windows: list[list[int]]):
        self.store, self.view, self.fields = store, view, fields
        self.names = [f for f in fields if f in ARRAY_NAMES]
        arrays = {f: store.array(f, view) for f in self.names}  # checks the view and that logits exist
        self.shapes = {f: tuple(a.shape[1:]) for f, a in arrays.items()}
        self.dtypes = {f: np.dtype(a.dtype) for f, a in arrays.items()}
        self.readers = {f: ShardReader.for_array(store, array_path(f, view)) for f in self.names}
        bounds = store.layout.shard_bounds
        self.capacity = max((sum(bounds(sh)[1] - bounds(sh)[0] for sh in win) for win in windows), default=0)
        self.free: queue.LifoQueue = queue.LifoQueue()  # LIFO: without prefetch one slot is reused
        for _ in range(2):
            self.free.put({})
        self.closed = False

    def acquire(self) -> dict[str, np.ndarray]:
        slot = self.free.get()
        if self.closed:
            self.free.put(slot)  # wake any other waiter too
            raise IteratorClosed("the batch iterator was closed")
        for f in self.names:
            if f not in slot:
                slot[f] = np.empty((self.capacity,) + self.shapes[f], dtype=self.dtypes[f])
        return slot

    def release(self, slot: dict[str, np.ndarray]) -> None:
        self.free.put(slot)

    def close(self) -> None:
        """Unblock a producer waiting for a slot (the consumer stopped early)."""
        self.closed = True
        self.free.put({})

    def load(self, shards: Sequence[int], by_shard: dict[int, list[int]], labels: np.ndarray) -> Window:
        """The window of `shards` (each read whole, every array's chunks in parallel), in a free slot."""
        layout = self.store.layout
        for shard in shards:  # missing shards raise before anything is read
            self.store.require_rows(*layout.shard_bounds(shard))
        slot = self.acquire()
        try:
            jobs, base, wanted, positions = [], 0, [], []
            for shard in shards:
                start, stop = layout.shard_bounds(shard)
                for f in self.names:
                    region = slot[f][base:base + stop - start]
                    if self.readers[f] is not None:
                        jobs.append((self.readers[f], shard, region))
                    else:  # zarr decodes what the fast reader does not
                        region[...] = self.store.read(f, start, stop, self.view)
                rows = np.asarray(by_shard[shard], dtype=np.int64)
                wanted.append(rows)
                positions.append(rows - start + base)
                base += stop - start
            read_shards(jobs)
        except BaseException:
            self.release(slot)
            raise
        rows = np.concatenate(wanted)
        whole = len(rows) == base
        return Window({f: slot[f][:base] for f in self.names}, rows, None if whole else np.concatenate(positions),
                      labels, self.fields, self, slot)


def prefetched(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """Produce the next item(s) in a background thread while the caller works on the current one."""
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

    thread = threading.Thread(target=produce, daemon=True, name=PREFETCH_THREAD)
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
