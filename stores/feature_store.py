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

The pieces live beside this class: `layout` (shapes, keys, codecs), `fingerprint` (what
differs), `shards` (which shards exist, verify) and `batches` (the batch iterator).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import zarr

from . import batches
from . import metadata as meta
from . import owned
from . import shards
from .errors import FingerprintMismatch, MissingShardError, ProtocacheError, StoreNotFound
from .fingerprint import compare_fingerprints, describe_difference, describe_layout_difference
from .layout import (ARRAY_NAMES, ATTRS_KEY, CLEAN, FORMAT_VERSION, StoreLayout, array_path, array_paths, create_arrays,
                     default_shard_size, layout_matches, stored_arrays, zarr_store)

__all__ = ["FeatureStore", "StoreLayout", "CLEAN", "FORMAT_VERSION", "default_shard_size"]


def _checked_attrs(path: str | Path, attrs: Any) -> dict:
    """The store's protocache attributes, with a layout that parses and a fingerprint mapping (else one error)."""
    def damaged(what: str) -> ProtocacheError:
        return ProtocacheError(f"{path} is damaged: its zarr.json attributes hold {what}; restore zarr.json from a "
                               f"copy, or delete {path} and run `protocache extract` again")

    if not isinstance(attrs, dict):
        raise damaged(f"a {type(attrs).__name__} where the '{ATTRS_KEY}' mapping belongs")
    for key in ("layout", "fingerprint"):
        if not isinstance(attrs.get(key), dict):
            raise damaged(f"no '{key}' mapping")
    try:
        layout = StoreLayout.from_json(attrs["layout"])
    except (KeyError, TypeError, ValueError, ProtocacheError) as exc:
        raise damaged(f"a layout that does not parse ({type(exc).__name__}: {str(exc)[:100]})") from None
    numbers = {"num_images": layout.num_images, "dim": layout.dim, "shard_size": layout.shard_size,
               "chunk_size": layout.chunk_size, "grid": min(layout.grid) if len(layout.grid) == 2 else 0}
    bad = [k for k, v in numbers.items() if not isinstance(v, int) or v < 1]
    if bad or not isinstance(layout.num_logits, int) or layout.num_logits < 0:
        raise damaged(f"a layout with impossible numbers ({', '.join(bad) or 'num_logits'})")
    return dict(attrs)


STANDARD_SPLITS = ("train", "val", "test")
"""Splits a reader may ask for on any store (empty where the store has none)."""


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
        overwrite=True (CLI: --overwrite) to delete the old store first: only a protocache
        store holding nothing but its own files (or an empty folder) is deleted, anything
        else is refused with what it holds.
        """
        fs, root = fsspec.core.url_to_fs(str(path))
        if overwrite and fs.exists(root):
            owned.check_store_replaceable(fs, root, str(path))  # only a store of ours (or an empty folder) goes
            owned.remove_store(fs, root)
        if fs.exists(f"{root}/zarr.json"):
            store = cls.open(path, mode="r+")
            differ = compare_fingerprints(store.fingerprint, fingerprint)
            if differ:
                raise FingerprintMismatch(
                    f"{path} was extracted with other inputs; fields that differ:\n"
                    f"{describe_difference(store.fingerprint, fingerprint, differ)}\n"
                    "Write to a new --out path, or pass --overwrite to replace this store."
                )
            if not layout_matches(store.layout, layout):  # an older store keeps its own checksum codecs
                raise FingerprintMismatch(
                    f"{path} has another layout ({describe_layout_difference(store.layout, layout)}). "
                    "Use the same options or a new --out path."
                )
            return store
        if fs.exists(root) and fs.ls(root):
            raise ProtocacheError(f"{path} exists, is not empty and is not a protocache store; choose another --out.")
        return cls._create(path, layout, fingerprint, extra_attrs or {})

    @classmethod
    def _create(cls, path: str | Path, layout: StoreLayout, fingerprint: dict, extra_attrs: dict) -> "FeatureStore":
        if layout.shard_size % layout.chunk_size:
            raise ProtocacheError(f"shard size {layout.shard_size} must be a multiple of chunk size {layout.chunk_size}")
        group = zarr.open_group(zarr_store(str(path), read_only=False), mode="w", zarr_format=3)
        create_arrays(group, layout)
        attrs = {"format_version": FORMAT_VERSION, "layout": layout.to_json(),
                 "fingerprint": fingerprint, **extra_attrs}
        group.attrs[ATTRS_KEY] = attrs
        return cls(path, group, attrs)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "FeatureStore":
        if mode not in ("r", "r+"):
            raise ProtocacheError(f"FeatureStore.open: mode is 'r' (read) or 'r+' (append shards), not {mode!r}")
        fs, root = fsspec.core.url_to_fs(str(path))
        if not fs.exists(f"{root}/zarr.json"):
            raise StoreNotFound(f"no feature store at {path} (expected {root}/zarr.json); "
                                "create one with `protocache extract`.")
        try:
            group = zarr.open_group(zarr_store(str(path), read_only=(mode == "r")), mode=mode)
        except zarr.errors.ContainsArrayError:
            raise StoreNotFound(f"{path} is one array of a Zarr store, not a protocache store; pass the store's own "
                                "folder (the one holding meta/ and tokens/)") from None
        except (ValueError, KeyError, TypeError) as exc:  # zarr.json that is not valid JSON or Zarr metadata
            raise ProtocacheError(f"{root}/zarr.json is damaged ({type(exc).__name__}: {str(exc)[:100]}): the store's "
                                  "description (layout, fingerprint) cannot be read, though its shards may be whole; "
                                  f"restore that file from a copy, or delete {path} and run `protocache extract` "
                                  "again") from None
        attrs = group.attrs.get(ATTRS_KEY)
        if not attrs:
            raise StoreNotFound(f"{path} is a Zarr group but not a protocache store (no '{ATTRS_KEY}' attributes).")
        store = cls(path, group, _checked_attrs(path, attrs))
        store._check_arrays()
        return store

    def _check_arrays(self) -> None:
        """Every array the layout names is there with the layout's row count (else one error naming it)."""
        for name in array_paths(self.layout):
            try:
                rows = self.group[name].shape[0]
            except (KeyError, ValueError, TypeError) as exc:  # a missing or unreadable array zarr.json
                why = "missing" if isinstance(exc, KeyError) else f"unreadable ({type(exc).__name__})"
                raise ProtocacheError(f"{self.path} is damaged: the array {name} ({name}/zarr.json) is {why}; "
                                      f"restore it from a copy, or delete {self.path} and run `protocache extract` "
                                      "again") from None
            if rows != self.layout.num_images:
                raise ProtocacheError(f"{self.path} is damaged: the array {name} has {rows} rows where the store's "
                                      f"layout says {self.layout.num_images}; delete it and run `protocache extract` "
                                      "again")

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

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def shard_exists(self, shard_index: int) -> bool:
        return shards.shard_is_written(self.group, self.fs, self.root, self.layout, shard_index)

    def written_shards(self, refresh: bool = False) -> list[int]:
        """Shards whose arrays and Parquet part are all on disk."""
        if self._written is None or refresh:
            self._written = shards.written_shard_set(self.group, self.fs, self.root, self.layout)
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
        needed = self.layout.shards_of_rows(start, stop)
        have = set(self.written_shards())
        if not all(i in have for i in needed):
            have = set(self.written_shards(refresh=True))
        missing = [i for i in needed if i not in have]
        if missing:
            raise shards.missing_rows_error(self.path, self.layout, missing)

    def write_shard(self, shard_index: int, arrays: dict[str, dict[str, np.ndarray]],
                    rows: Sequence[dict[str, Any]] | pa.Table) -> None:
        """Write one whole shard: arrays[view][name] holds the shard's rows of that array.

        Each array's shard goes to disk in one call; the Parquet part, written last,
        marks the shard complete.
        """
        start, stop = self.layout.shard_bounds(shard_index)
        for view in self.views:
            for name in stored_arrays(self.layout):
                data = arrays[view][name]
                if data.shape[0] != stop - start:
                    raise ValueError(f"shard {shard_index} {view}/{name}: {data.shape[0]} rows, expected {stop - start}")
                array = self.group[array_path(name, view)].with_config({"write_empty_chunks": True})  # zeros too
                array[start:stop] = np.asarray(data, dtype=np.float16)
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
        return shards.remove_partial_writes(self.path)

    # ------------------------------------------------------------------ readers
    def array(self, name: str, view: str = CLEAN) -> zarr.Array:
        if view not in self.views:
            raise ProtocacheError(f"{self.path} has no view {view!r}; it has {list(self.views)}")
        if name not in ARRAY_NAMES:
            raise ProtocacheError(f"{self.path} has no array {name!r}; its arrays are {', '.join(ARRAY_NAMES)} "
                                  "(labels and splits are in `metadata()`)")
        if name == "logits" and not self.has_logits:
            raise ProtocacheError(f"{self.path} has no logits (the backbone has no classifier)")
        return self.group[array_path(name, view)]

    def _check_range(self, start: Any, stop: Any) -> None:
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, stop)):
            raise ProtocacheError(f"read: start and stop are row numbers (integers), got {start!r}, {stop!r}")
        if start < 0 or stop > self.num_images:
            raise ProtocacheError(f"read: rows {start}..{stop - 1} are outside {self.path}'s rows "
                                  f"0..{self.num_images - 1}")

    def read(self, name: str, start: int, stop: int, view: str = CLEAN) -> np.ndarray:
        """Rows [start, stop) of array `name` (tokens, pooled, logits) of a view, as stored (float16)."""
        self._check_range(start, stop)
        arr = self.array(name, view)
        self.require_rows(start, stop)
        return shards.checked_read(self, array_path(name, view), start, stop, lambda: arr[start:stop])

    def row_numbers(self, rows: Any) -> np.ndarray:
        """`rows` as int64 store rows: a 1-D sequence of integers in 0..N-1, or a boolean mask of length N."""
        given = np.asarray(rows)
        if given.dtype == bool:
            if given.shape != (self.num_images,):
                raise ProtocacheError(f"a boolean row mask needs one entry per image ({self.num_images}), "
                                      f"got shape {given.shape}")
            return np.flatnonzero(given)
        if given.ndim != 1 or (given.size and given.dtype.kind not in "iu"):
            raise ProtocacheError(f"rows are a 1-D list of integer row numbers (or a boolean mask), got "
                                  f"{given.dtype} of shape {given.shape}")
        if given.size and (given.min() < 0 or given.max() >= self.num_images):
            bad = given[(given < 0) | (given >= self.num_images)]
            raise ProtocacheError(f"row {int(bad[0])} is outside {self.path}'s rows "
                                  f"0..{self.num_images - 1}")
        return given.astype(np.int64)

    def read_rows(self, name: str, rows: Sequence[int] | np.ndarray, view: str = CLEAN) -> np.ndarray:
        """The given rows (any order, repeats allowed; or a boolean mask) of array `name`, as stored."""
        rows = self.row_numbers(rows)
        if rows.size == 0:
            arr = self.array(name, view)
            return np.zeros((0,) + arr.shape[1:], dtype=arr.dtype)
        self.require_rows(int(rows.min()), int(rows.max()) + 1)
        arr = self.array(name, view)
        return shards.checked_read(self, array_path(name, view), int(rows.min()), int(rows.max()) + 1,
                                   lambda: arr.get_orthogonal_selection((rows,) + (slice(None),) * (arr.ndim - 1)))

    def metadata(self) -> pa.Table:
        """All metadata rows in row order (raises if a shard is missing)."""
        if self._metadata is None:
            self.require_rows(0, self.num_images)
            tables = [self._metadata_part(i) for i in range(self.layout.num_shards)]
            self._metadata = pa.concat_tables(tables, promote_options="permissive")
        return self._metadata

    def _metadata_part(self, shard: int) -> pa.Table:
        try:
            return meta.read_part(self.fs, self.root, shard)
        except (OSError, pa.ArrowException) as exc:  # a damaged part: the shard's error, with the repair
            start, stop = self.layout.shard_bounds(shard)
            fault = shards.Fault(shard, "metadata", f"unreadable ({str(exc)[:100]})", None, (start, stop - 1))
            raise shards.corrupt_error(self, [fault]) from None

    def labels(self) -> np.ndarray:
        return self.metadata().column("label").to_numpy()

    def split_rows(self, split: str | None) -> np.ndarray:
        """Row indices of one split ('train', 'test', ...), or all rows for None. A split the store does
        not have is empty if it is one of train/val/test (e.g. no val split), else an error (a typo)."""
        table = self.metadata()
        if split is None:
            return np.arange(self.num_images)
        if split not in STANDARD_SPLITS:
            self.require_split(split, "split")
        splits = np.asarray(table.column("split").to_pylist())
        rows = np.flatnonzero(splits == split)
        if "ok" in table.column_names:  # images that failed to decode carry no features
            ok = np.asarray(table.column("ok").to_pylist(), dtype=bool)
            rows = rows[ok[rows]]
        return rows

    def require_split(self, split: str, option: str) -> None:
        """Raise, naming the option and the splits the store has, unless it has `split`."""
        splits = sorted(set(self.metadata().column("split").to_pylist()))
        if split not in splits:
            raise ProtocacheError(f"{self.path} has no split {split!r} ({option}); it has {', '.join(splits)}")

    def with_splits(self, splits: Sequence[str] | np.ndarray) -> "FeatureStore":
        """A read-only view of this store whose metadata `split` column is `splits` (one name per
        row), e.g. a validation split carved out of train; arrays and shards are shared, so
        `split_rows`, `iter_batches` and every reader see the new splits. Nothing is written."""
        table = self.metadata()
        if len(splits) != table.num_rows:
            raise ProtocacheError(f"{self.path}: {len(splits)} split names for {table.num_rows} rows")
        column = pa.array([str(s) for s in splits], type=pa.string()).cast(table.schema.field("split").type)
        view = FeatureStore(self.location, self.group, self.attrs)
        view._metadata = table.set_column(table.column_names.index("split"), "split", column)
        view._written = None if self._written is None else set(self._written)
        return view

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
        for name in stored_arrays(self.layout):
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

        See `protocache.stores.batches.iter_batches` (rows are read a window of
        `shards_in_memory` whole shards at a time, the next window prefetched).
        """
        return batches.iter_batches(self, split, batch_size, fields=fields, view=view, shuffle=shuffle, seed=seed,
                                    shards_in_memory=shards_in_memory, drop_last=drop_last, as_torch=as_torch,
                                    prefetch=prefetch)

    # ------------------------------------------------------------------ reports
    def bytes_on_disk(self) -> int:
        return int(self.fs.du(self.root))

    def raw_bytes(self) -> int:
        """Logical float16 bytes of every array (all views) over the written shards: what the store would take raw."""
        per_row = sum(int(np.prod(self.group[p].shape[1:])) * 2 for p in array_paths(self.layout))
        bounds = [self.layout.shard_bounds(s) for s in self.written_shards(refresh=True)]
        return per_row * sum(stop - start for start, stop in bounds)

    def info(self) -> dict[str, Any]:
        lay = self.layout
        on_disk, raw = self.bytes_on_disk(), self.raw_bytes()
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
            "bytes_on_disk": on_disk,
            "raw_bytes": raw,
            "stored_over_raw": on_disk / raw if raw else None,
            "compression": lay.compression,
            "compression_choice": self.attrs.get("compression"),
            "fingerprint": self.fingerprint,
        }

    def verify(self) -> list[str]:
        """Problems found (empty when the store is complete and sound)."""
        return shards.verify_store(self)
