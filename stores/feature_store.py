"""The feature store: one Zarr v3 group per cache of backbone tokens.

Layout of a store directory::

    zarr.json                  group; attrs["protocache"] holds layout + fingerprint
    tokens/                    [N, T, D] float16, inner chunks (c, T, D), shards (S, T, D)
    pooled/                    [N, D]    float16, chunks (S, D)   (CLS token or mean token)
    logits/                    [N, C0]   float16, chunks (S, C0)  (backbone's own classifier)
    views/<view>/{tokens,pooled,logits}   the same arrays for extra views (hflip, noise)
    meta/part-XXXXX.parquet    metadata of shard XXXXX; written last = the shard is complete

A shard is rows [i*S, (i+1)*S) of every array. Writers own whole shards and write each
array's shard in one call (zarr's local store writes a file atomically), then the
Parquet part; a shard counts as written only when its Parquet part and all its array
shards exist. Readers check that before touching a shard, so a missing shard raises
instead of silently reading the fill value.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import zarr
from zarr.core.sync import sync

from . import metadata as meta
from .errors import FingerprintMismatch, MissingShardError, ProtocacheError, StoreNotFound

FORMAT_VERSION = 1
ATTRS_KEY = "protocache"
CLEAN = "clean"
ARRAY_NAMES = ("tokens", "pooled", "logits")
TARGET_SHARD_BYTES = 150 * 2**20


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and chunking of a store; decided before the first write, never changed."""

    num_images: int
    grid: tuple[int, int]
    dim: int
    num_logits: int = 0
    shard_size: int = 0
    chunk_size: int = 8
    views: tuple[str, ...] = (CLEAN,)
    compressor: str | None = None

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_bounds(self, shard_index: int) -> tuple[int, int]:
        start = shard_index * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def to_json(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["views"] = list(self.views)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StoreLayout":
        d = dict(d)
        d["grid"] = tuple(d["grid"])
        d["views"] = tuple(d["views"])
        return cls(**d)


def default_shard_size(num_tokens: int, dim: int, chunk_size: int = 8,
                       target_bytes: int = TARGET_SHARD_BYTES) -> int:
    """Images per shard so that one tokens shard is about `target_bytes` of float16."""
    per_image = num_tokens * dim * 2
    images = max(chunk_size, target_bytes // per_image)
    return int(images // chunk_size * chunk_size)


def array_path(name: str, view: str = CLEAN) -> str:
    return name if view == CLEAN else f"views/{view}/{name}"


def compare_fingerprints(existing: dict, wanted: dict) -> list[str]:
    """Names of the fingerprint fields whose values differ (missing counts as different)."""
    keys = sorted(set(existing) | set(wanted))
    return [k for k in keys if existing.get(k) != wanted.get(k)]


def _describe_difference(existing: dict, wanted: dict, keys: Sequence[str]) -> str:
    def short(v: Any) -> str:
        s = json.dumps(v, sort_keys=True, default=str)
        return s if len(s) <= 80 else s[:77] + "..."

    lines = []
    for k in keys:
        a, b = existing.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):  # name the differing sub-fields
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    lines.append(f"  {k}.{sub}: store has {short(a.get(sub))}, now {short(b.get(sub))}")
        else:
            lines.append(f"  {k}: store has {short(a)}, now {short(b)}")
    return "\n".join(lines)


class FeatureStore:
    """A cache of one backbone's tokens over one dataset (see the module docstring)."""

    def __init__(self, location: str | Path, group: zarr.Group, attrs: dict):
        self.location = str(location)
        self.fs, self.root = fsspec.core.url_to_fs(self.location)
        self.is_local = meta._is_local(self.fs)
        # A local store is a Path; a store on object storage keeps its fsspec URL.
        self.path: Path | str = Path(self.root) if self.is_local else self.location
        self.group = group
        self.attrs = attrs
        self.layout = StoreLayout.from_json(attrs["layout"])
        self.fingerprint: dict = attrs["fingerprint"]
        self._written: set[int] | None = None
        self._metadata: pa.Table | None = None
        self._row_of_id: dict[str, int] | None = None

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create_or_open(cls, path: str | Path, layout: StoreLayout, fingerprint: dict,
                       extra_attrs: dict | None = None, overwrite: bool = False) -> "FeatureStore":
        """Create a new store, or reopen an existing one made from exactly the same inputs.

        `path` is a local path or an fsspec URL (s3://..., gs://..., memory://...).
        Raises FingerprintMismatch naming the differing fields otherwise; pass
        overwrite=True (CLI: --overwrite) to delete the old store first.
        """
        fs, root = fsspec.core.url_to_fs(str(path))
        if overwrite and fs.exists(root):
            fs.rm(root, recursive=True)
        if fs.exists(f"{root}/zarr.json"):
            store = cls.open(path, mode="r+")
            differ = compare_fingerprints(store.fingerprint, fingerprint)
            if differ:
                raise FingerprintMismatch(
                    f"{path} was extracted with other inputs; fields that differ:\n"
                    f"{_describe_difference(store.fingerprint, fingerprint, differ)}\n"
                    "Write to a new --out path, or pass --overwrite to replace this store."
                )
            if store.layout != layout:
                differ = [k for k, v in layout.to_json().items() if store.layout.to_json().get(k) != v]
                raise FingerprintMismatch(
                    f"{path} has another layout ({', '.join(differ)} differ: store "
                    f"{ {k: store.layout.to_json()[k] for k in differ} }, now "
                    f"{ {k: layout.to_json()[k] for k in differ} }). Use the same options or a new --out path."
                )
            return store
        if fs.exists(root) and fs.ls(root):
            raise ProtocacheError(f"{path} exists, is not empty and is not a protocache store; choose another --out.")
        return cls._create(path, layout, fingerprint, extra_attrs or {})

    @classmethod
    def _create(cls, path: str | Path, layout: StoreLayout, fingerprint: dict, extra_attrs: dict) -> "FeatureStore":
        if layout.shard_size % layout.chunk_size:
            raise ProtocacheError(f"shard size {layout.shard_size} must be a multiple of chunk size {layout.chunk_size}")
        group = zarr.open_group(_zarr_store(str(path), read_only=False), mode="w", zarr_format=3)
        compressors = _compressors(layout.compressor)
        n, t, d, s, c = layout.num_images, layout.num_tokens, layout.dim, layout.shard_size, layout.chunk_size
        empty_ok = {"write_empty_chunks": True}  # a shard of zeros must still exist on disk
        for view in layout.views:
            group.create_array(array_path("tokens", view), shape=(n, t, d), dtype="float16",
                               chunks=(c, t, d), shards=(s, t, d), compressors=compressors,
                               fill_value=0, config=empty_ok)
            group.create_array(array_path("pooled", view), shape=(n, d), dtype="float16",
                               chunks=(s, d), compressors=compressors, fill_value=0, config=empty_ok)
            if layout.num_logits:
                group.create_array(array_path("logits", view), shape=(n, layout.num_logits), dtype="float16",
                                   chunks=(s, layout.num_logits), compressors=compressors,
                                   fill_value=0, config=empty_ok)
        attrs = {"format_version": FORMAT_VERSION, "layout": layout.to_json(),
                 "fingerprint": fingerprint, **extra_attrs}
        group.attrs[ATTRS_KEY] = attrs
        return cls(path, group, attrs)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "FeatureStore":
        fs, root = fsspec.core.url_to_fs(str(path))
        if not fs.exists(f"{root}/zarr.json"):
            raise StoreNotFound(f"no feature store at {path} (expected {root}/zarr.json); "
                                "create one with `protocache extract`.")
        group = zarr.open_group(_zarr_store(str(path), read_only=(mode == "r")), mode=mode)
        attrs = group.attrs.get(ATTRS_KEY)
        if not attrs:
            raise StoreNotFound(f"{path} is a Zarr group but not a protocache store (no '{ATTRS_KEY}' attributes).")
        return cls(path, group, dict(attrs))

    # ------------------------------------------------------------------ shards
    @property
    def num_images(self) -> int:
        return self.layout.num_images

    @property
    def views(self) -> tuple[str, ...]:
        return self.layout.views

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.grid

    @property
    def has_logits(self) -> bool:
        return self.layout.num_logits > 0

    def _array_names(self) -> list[str]:
        names = ["tokens", "pooled"] + (["logits"] if self.has_logits else [])
        return [array_path(n, v) for v in self.views for n in names]

    def _shard_keys(self, shard_index: int) -> list[str]:
        keys = []
        for name in self._array_names():
            ndim = 3 if name.endswith("tokens") else 2
            keys.append(f"{name}/c/{shard_index}" + "/0" * (ndim - 1))
        return keys

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def shard_exists(self, shard_index: int) -> bool:
        if shard_index not in meta.written_parts(self.fs, self.root):
            return False
        return all(sync(self.group.store.exists(k)) for k in self._shard_keys(shard_index))

    def written_shards(self, refresh: bool = False) -> list[int]:
        """Shards whose arrays and Parquet part are all on disk."""
        if self._written is None or refresh:
            parts = meta.written_parts(self.fs, self.root)
            self._written = {i for i in parts if i < self.layout.num_shards and self.shard_exists(i)}
        return sorted(self._written)

    def missing_shards(self, refresh: bool = True) -> list[int]:
        have = set(self.written_shards(refresh=refresh))
        return [i for i in range(self.layout.num_shards) if i not in have]

    @property
    def is_complete(self) -> bool:
        return not self.missing_shards()

    def require_rows(self, start: int, stop: int) -> None:
        """Raise MissingShardError unless every shard holding rows [start, stop) is written."""
        if stop <= start:
            return
        s = self.layout.shard_size
        needed = range(start // s, (stop - 1) // s + 1)
        have = set(self.written_shards())
        if not all(i in have for i in needed):
            have = set(self.written_shards(refresh=True))
        missing = [i for i in needed if i not in have]
        if missing:
            raise MissingShardError(
                f"{self.path}: shard(s) {missing} (rows {start}..{stop - 1}) are not written. "
                "Re-run the same `protocache extract` command to complete the store."
            )

    def write_shard(self, shard_index: int, arrays: dict[str, dict[str, np.ndarray]],
                    rows: Sequence[dict[str, Any]] | pa.Table) -> None:
        """Write one whole shard: arrays[view][name] holds the shard's rows of that array.

        Each array's shard goes to disk in one call; the Parquet part, written last,
        marks the shard complete.
        """
        start, stop = self.layout.shard_bounds(shard_index)
        for view in self.views:
            for name in ("tokens", "pooled") + (("logits",) if self.has_logits else ()):
                data = arrays[view][name]
                if data.shape[0] != stop - start:
                    raise ValueError(f"shard {shard_index} {view}/{name}: {data.shape[0]} rows, expected {stop - start}")
                self.group[array_path(name, view)][start:stop] = np.asarray(data, dtype=np.float16)
        table = rows if isinstance(rows, pa.Table) else meta.rows_to_table(rows)
        if table.num_rows != stop - start:
            raise ValueError(f"shard {shard_index}: {table.num_rows} metadata rows, expected {stop - start}")
        meta.write_part(self.fs, self.root, shard_index, table)
        if self._written is not None:
            self._written.add(shard_index)
        self._metadata = None

    def remove_partial_writes(self) -> int:
        """Delete leftovers of writes cut short by a kill (temporary files, never a live shard).

        Call only while no other writer is active on this store.
        """
        if not self.is_local:
            return 0
        leftovers = list(self.path.rglob("*.partial")) + list((self.path / meta.META_DIR).glob(".part-*.tmp-*"))
        for p in leftovers:
            p.unlink(missing_ok=True)
        return len(leftovers)

    # ------------------------------------------------------------------ readers
    def array(self, name: str, view: str = CLEAN) -> zarr.Array:
        if view not in self.views:
            raise ProtocacheError(f"{self.path} has no view {view!r}; it has {list(self.views)}")
        if name == "logits" and not self.has_logits:
            raise ProtocacheError(f"{self.path} has no logits (the backbone has no classifier)")
        return self.group[array_path(name, view)]

    def read(self, name: str, start: int, stop: int, view: str = CLEAN) -> np.ndarray:
        self.require_rows(start, stop)
        return self.array(name, view)[start:stop]

    def read_rows(self, name: str, rows: Sequence[int] | np.ndarray, view: str = CLEAN) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            arr = self.array(name, view)
            return np.zeros((0,) + arr.shape[1:], dtype=arr.dtype)
        self.require_rows(int(rows.min()), int(rows.max()) + 1)
        return self.array(name, view).get_orthogonal_selection((rows,) + (slice(None),) * (self.array(name, view).ndim - 1))

    def metadata(self) -> pa.Table:
        """All metadata rows in row order (raises if a shard is missing)."""
        if self._metadata is None:
            self.require_rows(0, self.num_images)
            tables = [meta.read_part(self.fs, self.root, i) for i in range(self.layout.num_shards)]
            self._metadata = pa.concat_tables(tables, promote_options="permissive")
        return self._metadata

    def labels(self) -> np.ndarray:
        return self.metadata().column("label").to_numpy()

    def split_rows(self, split: str | None) -> np.ndarray:
        """Row indices of one split ('train', 'test', ...), or all rows for None."""
        table = self.metadata()
        if split is None:
            return np.arange(self.num_images)
        splits = np.asarray(table.column("split").to_pylist())
        rows = np.flatnonzero(splits == split)
        if "ok" in table.column_names:  # images that failed to decode carry no features
            ok = np.asarray(table.column("ok").to_pylist(), dtype=bool)
            rows = rows[ok[rows]]
        return rows

    def row_of(self, image_id: str) -> int:
        if self._row_of_id is None:
            ids = self.metadata().column("image_id").to_pylist()
            self._row_of_id = {str(i): r for r, i in enumerate(ids)}
        try:
            return self._row_of_id[str(image_id)]
        except KeyError:
            raise ProtocacheError(f"{self.path}: no image with id {image_id!r}") from None

    def get(self, image_id: str, view: str = CLEAN) -> dict[str, Any]:
        """Random access by image id: the metadata row plus its arrays."""
        row = self.row_of(image_id)
        out = {k: v[0] for k, v in self.metadata().slice(row, 1).to_pydict().items()}
        for name in ("tokens", "pooled") + (("logits",) if self.has_logits else ()):
            out[name] = self.read(name, row, row + 1, view)[0]
        return out

    def tokens_dask(self, view: str = CLEAN, name: str = "tokens"):
        """A dask array over a complete store, one dask chunk per shard."""
        import dask.array as da

        missing = self.missing_shards()
        if missing:
            raise MissingShardError(f"{self.path}: shards {missing} are not written; complete the store first.")
        arr = self.array(name, view)
        return da.from_zarr(arr, chunks=(self.layout.shard_size,) + arr.shape[1:])

    def iter_batches(self, split: str | None = "train", batch_size: int = 256, *,
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
        rows_wanted = self.split_rows(split)
        s = self.layout.shard_size
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
        labels = self.labels()
        loaded = (self._load_window(win, by_shard, fields, labels, view) for win in windows)
        if prefetch:
            loaded = _prefetched(loaded)
        carry: dict[str, np.ndarray] | None = None
        for (blocks, offsets), order in zip(loaded, orders):
            n = int(offsets[-1])
            order = np.arange(n) if order is None else order

            def take(index: np.ndarray) -> dict[str, np.ndarray]:
                return {f: _gather(blocks[f], offsets, index) for f in fields}

            i = 0
            if carry is not None:
                need = min(batch_size - len(carry[fields[0]]), n)
                head = take(order[:need])
                carry = {f: np.concatenate([carry[f], head[f]]) for f in fields}
                i = need
                if len(carry[fields[0]]) < batch_size:
                    continue
                yield _as_batch(carry, as_torch)
                carry = None
            while i + batch_size <= n:
                yield _as_batch(take(order[i:i + batch_size]), as_torch)
                i += batch_size
            if i < n:
                carry = take(order[i:])
        if carry is not None and not drop_last:
            yield _as_batch(carry, as_torch)

    def _load_window(self, shards: Sequence[int], by_shard: dict[int, list[int]], fields: Sequence[str],
                     labels: np.ndarray, view: str) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
        """The wanted rows of a few shards, each shard read whole and in one call per array.

        Returns the per-shard blocks of every field (not concatenated: batches gather from
        them directly) and the row offsets of the blocks within the window.
        """
        parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
        for shard in shards:
            rows = np.asarray(by_shard[shard], dtype=np.int64)
            start, stop = self.layout.shard_bounds(shard)
            whole = len(rows) == stop - start
            for f in fields:
                if f in ARRAY_NAMES:
                    block = self.read(f, start, stop, view)
                    parts[f].append(block if whole else block[rows - start])
                elif f == "label":
                    parts[f].append(labels[rows])
                elif f == "row":
                    parts[f].append(rows)
                else:
                    raise ProtocacheError(f"unknown batch field {f!r}; use tokens, pooled, logits, label or row")
        sizes = [len(by_shard[shard]) for shard in shards]
        return parts, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    # ------------------------------------------------------------------ reports
    def bytes_on_disk(self) -> int:
        return int(self.fs.du(self.root))

    def info(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "path": str(self.path),
            "num_images": lay.num_images,
            "num_tokens": lay.num_tokens,
            "dim": lay.dim,
            "grid": list(lay.grid),
            "num_logits": lay.num_logits,
            "shard_size": lay.shard_size,
            "chunk_size": lay.chunk_size,
            "shards_written": len(self.written_shards(refresh=True)),
            "shards_total": lay.num_shards,
            "complete": self.is_complete,
            "views": list(lay.views),
            "bytes_on_disk": self.bytes_on_disk(),
            "fingerprint": self.fingerprint,
        }

    def verify(self) -> list[str]:
        """Problems found (empty when the store is complete and sound)."""
        problems = []
        missing = self.missing_shards()
        if missing:
            problems.append(f"missing shards: {missing}")
        rows = 0
        for i in self.written_shards():
            start, stop = self.layout.shard_bounds(i)
            try:
                table = meta.read_part(self.fs, self.root, i)
            except Exception as exc:  # noqa: BLE001 - any unreadable part is a problem to report
                problems.append(f"shard {i}: metadata unreadable: {exc}")
                continue
            rows += table.num_rows
            if table.num_rows != stop - start:
                problems.append(f"shard {i}: {table.num_rows} metadata rows, expected {stop - start}")
            if "row" in table.column_names and table.column("row").to_pylist() != list(range(start, stop)):
                problems.append(f"shard {i}: metadata rows are not {start}..{stop - 1}")
            for name in self._array_names():
                try:
                    block = self.group[name][start:stop]
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"shard {i}: {name} unreadable: {exc}")
                    continue
                if not np.isfinite(block).all():
                    problems.append(f"shard {i}: {name} has NaN or Inf values")
        if not missing and rows != self.num_images:
            problems.append(f"metadata has {rows} rows, expected {self.num_images}")
        return problems


def _gather(blocks: list[np.ndarray], offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
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


def _prefetched(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
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


def _as_batch(batch: dict[str, np.ndarray], as_torch: bool) -> dict[str, Any]:
    if not as_torch:
        return batch
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def _zarr_store(location: str, read_only: bool):
    """zarr's LocalStore for paths (atomic file writes), its fsspec store for URLs."""
    fs, root = fsspec.core.url_to_fs(location)
    if meta._is_local(fs):
        return zarr.storage.LocalStore(root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(location, read_only=read_only)


def _compressors(name: str | None):
    if not name or name == "none":
        return None
    if name.startswith("zstd"):
        level = int(name.split(":")[1]) if ":" in name else 1
        return [zarr.codecs.ZstdCodec(level=level)]
    raise ProtocacheError(f"unknown compressor {name!r}; use none or zstd[:level]")
