"""Which shards of a store are on disk, and whether they are sound.

zarr 3.1 reads a missing chunk as its fill value; protocache never does: a shard counts
as written only when its Parquet part and every array's shard file exist (a zero-byte
file, which zarr would also read as fill values, counts as missing), and readers check
that before touching a shard.

Soundness. Every inner chunk carries a CRC-32C (the layout's ``checksum``, see
``layout.py``) and every shard index its own, checked on each read (by zarr, or by
`shard_reader`, which parses the index with `ShardIndex` as `check_array` does). A read that
fails is diagnosed here (`check_array`) and raised as `CorruptShardError`, one line naming
the shard, the inner chunk (its image rows) and the repair. `check_shard` reads a shard's
files directly (the zarr v3 sharding format: chunk bytes, then an index of (offset, length)
little-endian uint64 pairs and its CRC-32C) so it can say which chunk is bad:

- quick (``extract`` by default, on every written shard): each tokens shard file is long
  enough for its index, the index passes its checksum, every chunk lies inside the file;
  the small pooled/logits chunk files pass their checksums; the Parquet part's footer
  holds the shard's row count. Reads a few KB per tokens shard: catches truncated files,
  files overwritten (with zeros or anything else) and half-copied stores.
- full (``verify``, ``extract --repair``): also every inner chunk's checksum, then every
  array decoded and checked for NaN/Inf, and the metadata rows.

Stores written before checksums (layout ``checksum`` None) get the same structural
checks; their chunks are checked by decoding them (no checksum to compare).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import zarr
from zarr.core.sync import sync

from . import metadata as meta
from .errors import MissingShardError, ProtocacheError
from .layout import StoreLayout, array_paths, shard_keys

if TYPE_CHECKING:
    from .feature_store import FeatureStore

EMPTY_CHUNK = 2**64 - 1  # the sharding index's (offset, length) of a chunk that was never written


class CorruptShardError(ProtocacheError):
    """A written shard whose bytes fail their checksums (or do not decode)."""


@dataclass(frozen=True)
class Fault:
    """One thing wrong with one shard: which file (array or metadata), which inner chunk, why."""

    shard: int
    array: str
    """Group path of the array ("tokens", "views/noise/pooled", ...) or "metadata"."""
    what: str
    chunk: int | None = None
    """Inner chunk within the shard (tokens), None for the whole file."""
    rows: tuple[int, int] | None = None
    """First and last image row the fault covers."""

    def __str__(self) -> str:
        where = self.array + (f" inner chunk {self.chunk}" if self.chunk is not None else "")
        rows = f" (rows {self.rows[0]}..{self.rows[1]})" if self.rows else ""
        return f"shard {self.shard}: {where}{rows}: {self.what}"


def _key_size(group: zarr.Group, key: str) -> int:
    """Bytes of a store key, 0 when it is absent."""
    try:
        return int(sync(group.store.getsize(key)))
    except (FileNotFoundError, KeyError):
        return 0


def shard_is_written(group: zarr.Group, fs, root: str, layout: StoreLayout, shard_index: int) -> bool:
    """True when shard `shard_index`'s Parquet part and all its array shard files exist (and are not empty)."""
    if shard_index not in meta.written_parts(fs, root):
        return False
    return all(_key_size(group, k) > 0 for k in shard_keys(layout, shard_index))


def written_shard_set(group: zarr.Group, fs, root: str, layout: StoreLayout) -> set[int]:
    """Every shard whose arrays and Parquet part are all on disk."""
    parts = meta.written_parts(fs, root)
    return {i for i in parts if i < layout.num_shards and shard_is_written(group, fs, root, layout, i)}


def missing_rows_error(path, layout: StoreLayout, missing: list[int]) -> MissingShardError:
    """Shards that are not written, each with the rows it holds."""
    def rows(shard: int) -> str:
        start, stop = layout.shard_bounds(shard)
        return f"{shard} (rows {start}..{stop - 1})"

    shown = ", ".join(rows(s) for s in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return MissingShardError(
        f"{path}: shard{'s' if len(missing) > 1 else ''} {shown} {'are' if len(missing) > 1 else 'is'} not written. "
        "Re-run the same `protocache extract` command to complete the store."
    )


def remove_partial_writes(path: Path) -> int:
    """Delete leftovers of writes cut short by a kill in a local store (temporary files, never a live shard)."""
    leftovers = list(path.rglob("*.partial")) + list((path / meta.META_DIR).glob(".part-*.tmp-*"))
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


def _crc32c(data) -> bytes:
    import google_crc32c  # zarr's own dependency for its crc32c codec

    return np.uint32(google_crc32c.value(bytes(data))).tobytes()


def chunk_codecs(array: zarr.Array):
    """(sharding codec or None, the chunk codecs, whether the chunks carry a crc32c)."""
    codecs = tuple(array.metadata.codecs)
    sharding = codecs[0] if isinstance(codecs[0], zarr.codecs.ShardingCodec) else None
    inner = tuple(sharding.codecs) if sharding is not None else codecs
    return sharding, inner, any(isinstance(c, zarr.codecs.Crc32cCodec) for c in inner)


@dataclass(frozen=True)
class ShardIndex:
    """The index of a sharded array's file (zarr v3 sharding): an (offset, length) pair of
    little-endian uint64 per inner chunk, then their CRC-32C when `checksummed`, at the file's
    end (or start). Read here by `check_array` and by the fast reader (`shard_reader`)."""

    num_chunks: int
    checksummed: bool
    at_end: bool

    @classmethod
    def of(cls, array: zarr.Array, sharding) -> "ShardIndex":
        n = int(np.prod([s // k for s, k in zip(array.shards, sharding.chunk_shape)]))
        checksummed = any(isinstance(k, zarr.codecs.Crc32cCodec) for k in sharding.index_codecs)
        return cls(n, checksummed, sharding.index_location.value == "end")

    @property
    def size(self) -> int:
        return 16 * self.num_chunks + 4 * self.checksummed

    def span(self, file_size: int) -> tuple[int, int]:
        """Byte range [lo, hi) of the index in a file of `file_size` bytes."""
        return (file_size - self.size, file_size) if self.at_end else (0, self.size)

    def data_span(self, file_size: int) -> tuple[int, int]:
        """Byte range [lo, hi) where the chunks lie."""
        return (0, file_size - self.size) if self.at_end else (self.size, file_size)

    def parse(self, index) -> np.ndarray | None:
        """(offset, length) of each inner chunk, [num_chunks, 2] uint64; None when the index fails its checksum."""
        if self.checksummed and _crc32c(index[:-4]) != bytes(index[-4:]):
            return None
        return np.frombuffer(bytes(index[:16 * self.num_chunks]), dtype="<u8").reshape(self.num_chunks, 2)


def _decode_fault(store: "FeatureStore", name: str, shard: int, chunk: int | None, lo: int, hi: int) -> Fault | None:
    """Decode rows [lo, hi) through zarr; a Fault when that fails."""
    try:
        store.group[name][lo:hi]
    except Exception as exc:  # noqa: BLE001 - any decode failure is the finding
        return Fault(shard, name, f"does not decode ({type(exc).__name__}: {exc})", chunk, (lo, hi - 1))
    return None


def check_array(store: "FeatureStore", name: str, shard: int, full: bool = True) -> list[Fault]:
    """Faults of one array's file of one shard (see the module docstring for quick vs full)."""
    layout = store.layout
    start, stop = layout.shard_bounds(shard)
    array = store.group[name]
    key = next(k for k in shard_keys(layout, shard) if k.startswith(f"{name}/c/"))
    path = f"{store.root}/{key}"
    size = _key_size(store.group, key)
    if size == 0:
        return [Fault(shard, name, "shard file is missing or empty", None, (start, stop - 1))]
    sharding, inner, checksummed = chunk_codecs(array)
    blob = store.fs.cat_file(path) if (full or sharding is None and checksummed) else None
    if blob is not None:
        size = len(blob)
    if sharding is None:  # pooled / logits: one chunk per shard
        if checksummed and _crc32c(blob[:-4]) != bytes(blob[-4:]):
            return [Fault(shard, name, "checksum mismatch (its bytes changed on disk)", None, (start, stop - 1))]
        if not checksummed and full:
            fault = _decode_fault(store, name, shard, None, start, stop)
            return [fault] if fault else []
        return []
    c = sharding.chunk_shape[0]
    index_format = ShardIndex.of(array, sharding)
    n = index_format.num_chunks
    if size < index_format.size:
        return [Fault(shard, name, f"shard file is {size} bytes, shorter than its own index ({index_format.size} "
                      "bytes): truncated", None, (start, stop - 1))]
    lo_data, hi_data = index_format.data_span(size)
    lo_index, hi_index = index_format.span(size)
    index = store.fs.cat_file(path, start=lo_index, end=hi_index) if blob is None else blob[lo_index:hi_index]
    table = index_format.parse(index)
    if table is None:
        return [Fault(shard, name, "shard index fails its checksum (the file was overwritten or truncated)",
                      None, (start, stop - 1))]
    faults = []
    for k in range(n):
        lo, hi = start + k * c, min(start + (k + 1) * c, layout.num_images)
        if lo >= layout.num_images:
            break  # a chunk wholly past the last image holds nothing
        offset, length = (int(v) for v in table[k])
        if offset == EMPTY_CHUNK:
            continue  # never written: all fill values (zarr skips all-zero chunks), read as zeros
        if offset < lo_data or offset + length > hi_data or length < 4 * checksummed:
            faults.append(Fault(shard, name, f"chunk bytes {offset}..{offset + length} lie outside the file "
                                f"({size} bytes): truncated or overwritten", k, (lo, hi - 1)))
        elif full and checksummed:
            data = blob[offset:offset + length]
            if _crc32c(data[:-4]) != bytes(data[-4:]):
                faults.append(Fault(shard, name, "checksum mismatch (its bytes changed on disk)", k, (lo, hi - 1)))
        elif full:
            fault = _decode_fault(store, name, shard, k, lo, hi)
            if fault:
                faults.append(fault)
    return faults


def _check_part(store: "FeatureStore", shard: int, full: bool) -> tuple[list[Fault], int]:
    """Faults of a shard's Parquet part, and its row count."""
    import pyarrow.parquet as pq

    start, stop = store.layout.shard_bounds(shard)
    path = f"{store.root}/{meta.META_DIR}/{meta.part_name(shard)}"
    try:
        if full:
            table = meta.read_part(store.fs, store.root, shard)
            num_rows = table.num_rows
        else:
            with store.fs.open(path, "rb") as fh:
                num_rows = pq.ParquetFile(fh).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - any unreadable part is a fault to report
        return [Fault(shard, "metadata", f"unreadable: {exc}")], 0
    faults = []
    if num_rows != stop - start:
        faults.append(Fault(shard, "metadata", f"{num_rows} rows, expected {stop - start}"))
    elif full and "row" in table.column_names and table.column("row").to_pylist() != list(range(start, stop)):
        faults.append(Fault(shard, "metadata", f"rows are not {start}..{stop - 1}"))
    return faults, num_rows


def _nonfinite_fault(store: "FeatureStore", name: str, shard: int) -> Fault | None:
    start, stop = store.layout.shard_bounds(shard)
    block = store.group[name][start:stop]
    bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
    if not bad.any():
        return None
    rows = (np.flatnonzero(bad) + start).tolist()
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    return Fault(shard, name, f"NaN or Inf values in {len(rows)} row(s): {shown}")


def check_shard(store: "FeatureStore", shard: int, full: bool = True) -> tuple[list[Fault], int]:
    """Every fault of one written shard (quick or full, see the module docstring), and its metadata row count."""
    faults, num_rows = _check_part(store, shard, full)
    for name in array_paths(store.layout):
        found = check_array(store, name, shard, full)
        if not found and full:
            try:
                nonfinite = _nonfinite_fault(store, name, shard)
            except Exception as exc:  # noqa: BLE001 - a shard that passes its checks but will not decode
                nonfinite = Fault(shard, name, f"does not decode ({type(exc).__name__}: {exc})")
            found = [nonfinite] if nonfinite else []
        faults.extend(found)
    return faults, num_rows


def damaged_shards(store: "FeatureStore", full: bool = False) -> dict[int, list[Fault]]:
    """Written shards that fail `check_shard`, with their faults."""
    out = {}
    for shard in store.written_shards(refresh=True):
        faults, _ = check_shard(store, shard, full)
        if faults:
            out[shard] = faults
    return out


def shards_to_write(store: "FeatureStore", full: bool, log: Callable[[str], None]) -> list[int]:
    """What `extract` writes into an existing store: its missing shards, and every written shard
    that fails `check_shard` (quick by default, full with --repair), discarded first with a line
    saying so (so a kill during the rewrite leaves it missing, never half-replaced)."""
    damaged = damaged_shards(store, full)
    if full and store.written_shards():
        log(f"{store.path}: verified every chunk of {len(store.written_shards())} written shard(s): "
            f"{len(damaged)} damaged.")
    for shard, faults in sorted(damaged.items()):
        shown = "; ".join(str(f) for f in faults[:3]) + (f"; and {len(faults) - 3} more" if len(faults) > 3 else "")
        log(f"{store.path}: {shown}: rewriting shard {shard}.")
        discard_shard(store, shard)
    return store.missing_shards()


def discard_shard(store: "FeatureStore", shard: int) -> None:
    """Remove a shard so it counts as missing: its Parquet part first (a kill leaves it missing), then its files."""
    part = f"{store.root}/{meta.META_DIR}/{meta.part_name(shard)}"
    if store.fs.exists(part):
        store.fs.rm(part)
    for key in shard_keys(store.layout, shard):
        if store.fs.exists(f"{store.root}/{key}"):
            store.fs.rm(f"{store.root}/{key}")
    if store._written is not None:
        store._written.discard(shard)
    store._metadata = None


def repair_hint(store: "FeatureStore") -> str:
    return (f"re-run the `protocache extract` command that made {store.path} with --repair "
            "(it rewrites every damaged shard)")


def corrupt_error(store: "FeatureStore", faults: list[Fault]) -> CorruptShardError:
    shown = "; ".join(str(f) for f in faults[:3]) + (f"; and {len(faults) - 3} more" if len(faults) > 3 else "")
    return CorruptShardError(f"{store.path} is damaged: {shown}. To repair it, {repair_hint(store)}.")


def checked_read(store: "FeatureStore", name: str, start: int, stop: int, read: Callable[[], np.ndarray]) -> np.ndarray:
    """`read()` of rows [start, stop) of array `name`; a failure to decode becomes a CorruptShardError naming
    the shard, the inner chunk and the repair (the original error when the files look sound)."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - diagnosed below, re-raised as is when not corruption
        faults = [f for shard in store.layout.shards_of_rows(start, stop)
                  for f in check_array(store, name, shard, full=True)]
        if not faults:
            raise
        raise corrupt_error(store, faults) from exc


def verify_store(store: "FeatureStore") -> list[str]:
    """Problems found (empty when the store is complete and sound): a full check of every written shard."""
    problems = []
    missing = store.missing_shards()
    if missing:
        problems.append(f"missing shards: {missing}")
        for shard in missing:  # a file that is there but empty (zarr would read it as zeros)
            for key in shard_keys(store.layout, shard):
                if sync(store.group.store.exists(key)) and _key_size(store.group, key) == 0:
                    problems.append(f"shard {shard}: {key} is an empty file")
    rows = 0
    for shard in store.written_shards():
        faults, num_rows = check_shard(store, shard, full=True)
        rows += num_rows
        problems.extend(str(f) for f in faults)
    if not missing and rows != store.num_images:
        problems.append(f"metadata has {rows} rows, expected {store.num_images}")
    return problems
