"""The shape of a feature store on disk: its layout, array paths, shard keys and Zarr codecs.

Pure key and shape arithmetic plus the one place that creates the Zarr arrays, so the
bytes a store is made of are decided here and nowhere else.

Checksums: every array ends its codec chain with zarr v3's ``crc32c`` codec, so each inner
chunk of a tokens shard (and each pooled/logits chunk, one per shard) carries a CRC-32C of
its bytes that zarr checks on every read; the sharding codec's index carries its own. The
layout records it (``checksum: "crc32c"``). A store written before checksums existed has no
``checksum`` key in its layout (read as None) and no crc32c codec in its arrays' zarr.json;
zarr reads each array with the codecs its zarr.json names, so such a store still opens and
reads, and resuming it keeps its own codecs (see `layout_matches`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import fsspec
import zarr

from . import metadata as meta
from .errors import ProtocacheError

FORMAT_VERSION = 1
ATTRS_KEY = "protocache"
CLEAN = "clean"
ARRAY_NAMES = ("tokens", "pooled", "logits")
TARGET_SHARD_BYTES = 150 * 2**20
CHECKSUM = "crc32c"
CHECKSUMS = (CHECKSUM, None)


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and chunking of a store; decided before the first write, never changed."""

    num_images: int
    """Rows of every array (one per image of the dataset)."""
    grid: tuple[int, int]
    """Token grid (H, W) of the backbone's feature map; tokens are stored row-major."""
    dim: int
    """Channels of one token (the backbone's feature dimension D)."""
    num_logits: int = 0
    """Classes of the backbone's own classifier; 0 when it has none (no logits array then)."""
    shard_size: int = 0
    """Images per shard: the unit of writing, of work and of resume."""
    chunk_size: int = 8
    """Images per inner Zarr chunk of the tokens array (shard_size is a multiple of it)."""
    views: tuple[str, ...] = (CLEAN,)
    """Views cached: clean, and optional hflip / noise copies of the same arrays."""
    compressor: str | None = None
    """none | zstd[:level] for every array."""
    checksum: str | None = CHECKSUM
    """crc32c: a CRC-32C per inner chunk of every array, checked on read; None: a store written
    before checksums (its layout has no `checksum` key)."""

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_bounds(self, shard_index: int) -> tuple[int, int]:
        start = shard_index * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def shards_of_rows(self, start: int, stop: int) -> range:
        """The shards holding rows [start, stop) (empty when stop <= start)."""
        if stop <= start:
            return range(0)
        s = self.shard_size
        return range(start // s, (stop - 1) // s + 1)

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
        d.setdefault("checksum", None)  # written before per-chunk checksums
        return cls(**d)


def layout_matches(existing: StoreLayout, wanted: StoreLayout) -> bool:
    """True when a store of layout `existing` can take the writes of `wanted`.

    Everything must be equal except the checksum: a store keeps the codecs it was created
    with (each array's zarr.json names them), so an older store without checksums is resumed
    as it is, and its new shards are written exactly like its old ones.
    """
    return existing == replace(wanted, checksum=existing.checksum)


def default_shard_size(num_tokens: int, dim: int, chunk_size: int = 8,
                       target_bytes: int = TARGET_SHARD_BYTES) -> int:
    """Images per shard so that one tokens shard is about `target_bytes` of float16."""
    per_image = num_tokens * dim * 2
    images = max(chunk_size, target_bytes // per_image)
    return int(images // chunk_size * chunk_size)


def array_path(name: str, view: str = CLEAN) -> str:
    return name if view == CLEAN else f"views/{view}/{name}"


def stored_arrays(layout: StoreLayout) -> tuple[str, ...]:
    """Names of the arrays a store of this layout holds per view (logits only with a classifier)."""
    return ("tokens", "pooled") + (("logits",) if layout.num_logits > 0 else ())


def array_paths(layout: StoreLayout) -> list[str]:
    """Group paths of every array of the store, all views."""
    return [array_path(n, v) for v in layout.views for n in stored_arrays(layout)]


def shard_keys(layout: StoreLayout, shard_index: int) -> list[str]:
    """Zarr keys of the shard files of one shard, one per array (`tokens/c/i/0/0`, `pooled/c/i/0`, ...)."""
    keys = []
    for name in array_paths(layout):
        ndim = 3 if name.endswith("tokens") else 2
        keys.append(f"{name}/c/{shard_index}" + "/0" * (ndim - 1))
    return keys


def create_arrays(group: zarr.Group, layout: StoreLayout) -> None:
    """Create every (empty) array of the layout in `group`."""
    compressors = zarr_compressors(layout.compressor, layout.checksum)
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


def zarr_store(location: str, read_only: bool):
    """zarr's LocalStore for paths (atomic file writes), its fsspec store for URLs."""
    fs, root = fsspec.core.url_to_fs(location)
    if meta._is_local(fs):
        return zarr.storage.LocalStore(root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(location, read_only=read_only)


def zarr_compressors(name: str | None, checksum: str | None = None):
    """The bytes-to-bytes codecs of every array: the compressor, then the checksum (last, so it
    covers the bytes exactly as they sit on disk)."""
    if checksum not in CHECKSUMS:
        raise ProtocacheError(f"unknown checksum {checksum!r}; use {CHECKSUM} or none")
    tail = [zarr.codecs.Crc32cCodec()] if checksum else []
    if not name or name == "none":
        return tail or None
    if name.startswith("zstd"):
        level = int(name.split(":")[1]) if ":" in name else 1
        return [zarr.codecs.ZstdCodec(level=level)] + tail
    raise ProtocacheError(f"unknown compressor {name!r}; use none or zstd[:level]")
