"""Which shards of a store are on disk, and whether they are sound.

zarr 3.1 reads a missing chunk as its fill value; protocache never does: a shard counts
as written only when its Parquet part and every array's shard file exist, and readers
check that before touching a shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.core.sync import sync

from . import metadata as meta
from .errors import MissingShardError
from .layout import StoreLayout, array_paths, shard_keys

if TYPE_CHECKING:
    from .feature_store import FeatureStore


def shard_is_written(group: zarr.Group, fs, root: str, layout: StoreLayout, shard_index: int) -> bool:
    """True when shard `shard_index`'s Parquet part and all its array shard files exist."""
    if shard_index not in meta.written_parts(fs, root):
        return False
    return all(sync(group.store.exists(k)) for k in shard_keys(layout, shard_index))


def written_shard_set(group: zarr.Group, fs, root: str, layout: StoreLayout) -> set[int]:
    """Every shard whose arrays and Parquet part are all on disk."""
    parts = meta.written_parts(fs, root)
    return {i for i in parts if i < layout.num_shards and shard_is_written(group, fs, root, layout, i)}


def missing_rows_error(path, missing: list[int], start: int, stop: int) -> MissingShardError:
    return MissingShardError(
        f"{path}: shard(s) {missing} (rows {start}..{stop - 1}) are not written. "
        "Re-run the same `protocache extract` command to complete the store."
    )


def remove_partial_writes(path: Path) -> int:
    """Delete leftovers of writes cut short by a kill in a local store (temporary files, never a live shard)."""
    leftovers = list(path.rglob("*.partial")) + list((path / meta.META_DIR).glob(".part-*.tmp-*"))
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


def verify_store(store: "FeatureStore") -> list[str]:
    """Problems found (empty when the store is complete and sound)."""
    problems = []
    missing = store.missing_shards()
    if missing:
        problems.append(f"missing shards: {missing}")
    rows = 0
    for i in store.written_shards():
        start, stop = store.layout.shard_bounds(i)
        try:
            table = meta.read_part(store.fs, store.root, i)
        except Exception as exc:  # noqa: BLE001 - any unreadable part is a problem to report
            problems.append(f"shard {i}: metadata unreadable: {exc}")
            continue
        rows += table.num_rows
        if table.num_rows != stop - start:
            problems.append(f"shard {i}: {table.num_rows} metadata rows, expected {stop - start}")
        if "row" in table.column_names and table.column("row").to_pylist() != list(range(start, stop)):
            problems.append(f"shard {i}: metadata rows are not {start}..{stop - 1}")
        for name in array_paths(store.layout):
            try:
                block = store.group[name][start:stop]
            except Exception as exc:  # noqa: BLE001
                problems.append(f"shard {i}: {name} unreadable: {exc}")
                continue
            if not np.isfinite(block).all():
                problems.append(f"shard {i}: {name} has NaN or Inf values")
    if not missing and rows != store.num_images:
        problems.append(f"metadata has {rows} rows, expected {store.num_images}")
    return problems
