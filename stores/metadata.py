"""Per-shard Parquet metadata: one file per shard, row i describes image i of the store.

A shard's Parquet file is written last, after all of the shard's arrays, and through a
temporary name renamed into place, so its presence marks the shard as complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

META_DIR = "meta"

# Columns every dataset provides; datasets may add more (bbox, parts, ok, reason, ...).
BASE_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("split", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
    ]
)


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:05d}.parquet"


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Build a table with the base columns first, in a fixed type, then any extra columns."""
    columns: dict[str, list] = {field.name: [r[field.name] for r in rows] for field in BASE_SCHEMA}
    arrays = [pa.array(columns[f.name], type=f.type) for f in BASE_SCHEMA]
    names = [f.name for f in BASE_SCHEMA]
    extra = sorted({k for r in rows for k in r} - set(names))
    for key in extra:
        arrays.append(pa.array([r.get(key) for r in rows]))
        names.append(key)
    return pa.Table.from_arrays(arrays, names=names)


def write_part(fs, root: str, shard_index: int, table: pa.Table) -> str:
    """Write a shard's Parquet part so that it appears whole or not at all.

    Locally through a temporary name renamed into place; on object stores a single PUT
    is already all-or-nothing.
    """
    meta_dir = f"{root}/{META_DIR}"
    final = f"{meta_dir}/{part_name(shard_index)}"
    if _is_local(fs):
        Path(meta_dir).mkdir(parents=True, exist_ok=True)
        tmp = f"{meta_dir}/.{part_name(shard_index)}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
    else:
        pq.write_table(table, final, filesystem=fs)
    return final


def written_parts(fs, root: str) -> set[int]:
    out = set()
    for p in fs.glob(f"{root}/{META_DIR}/part-*.parquet"):
        try:
            out.add(int(p.rsplit("/", 1)[-1][len("part-"):-len(".parquet")]))
        except ValueError:
            continue
    return out


def read_part(fs, root: str, shard_index: int) -> pa.Table:
    path = f"{root}/{META_DIR}/{part_name(shard_index)}"
    if _is_local(fs):
        return pq.read_table(path)
    return pq.read_table(path, filesystem=fs)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
