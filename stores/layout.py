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

Compression (``compression``): none, zstd:LEVEL or blosc:CNAME:LEVEL (byte shuffle, typesize 2
for float16) for every array, before the checksum, so the CRC covers the compressed bytes as
they sit on disk. Each inner chunk (8 images) is compressed on its own, so the sharding index
holds chunks of varying length. `parse_compression` turns what a user typed into that
canonical form; `auto` is decided by the extractor from its probe tokens (`choose_compression`).
Layouts written before the field was renamed say ``compressor`` (None = none).
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
COMPRESSION_CHOICES = "auto | none | zstd[:level 1-22] | blosc[:cname[:level 0-9]]"
ZSTD_DEFAULT_LEVEL = 1  # ~9x on lite0's ReLU6 tokens at ~450 MB/s encode, ~850 MB/s decode per core
ZSTD_LEVELS = (1, 22)
BLOSC_CNAMES = ("lz4", "lz4hc", "blosclz", "zstd", "zlib")
BLOSC_DEFAULT = ("lz4", 5)  # blosc's own default: fastest decode, ~4x on lite0 tokens with byte shuffle
BLOSC_LEVELS = (0, 9)
AUTO_CODEC = f"zstd:{ZSTD_DEFAULT_LEVEL}"
AUTO_MIN_RATIO = 1.3
"""`auto` compresses when raw / zstd-1 bytes of the probe tokens reach this: lite0's ReLU6 tokens give
~9x, dense ViT float16 tokens ~1.1x, where decoding would cost more than the bytes it saves."""


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
    compression: str = "none"
    """Codec of every array, canonical: none | zstd:LEVEL | blosc:CNAME:LEVEL (see `parse_compression`)."""
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
        if "compressor" in d:  # written before the field was called compression (None = raw)
            d["compression"] = d.pop("compressor")
        d["compression"] = parse_compression(d.get("compression") or "none", allow_auto=False)
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
    compressors = zarr_compressors(layout.compression, layout.checksum)
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


def parse_compression(spec: str | None, allow_auto: bool = True, what: str = "") -> str:
    """What a user typed -> the canonical codec name (none, zstd:LEVEL, blosc:CNAME:LEVEL) or auto.

    A bad value is one line saying what is wrong and what would do."""
    text = str(spec).strip().lower() if spec is not None else ""
    parts = text.split(":")
    kind, args = parts[0], parts[1:]
    choices = COMPRESSION_CHOICES if allow_auto else COMPRESSION_CHOICES.replace("auto | ", "")

    def bad(why: str) -> ProtocacheError:
        return ProtocacheError(f"{what + ': ' if what else ''}--compression {spec!r}: {why}; use {choices}, "
                               "e.g. --compression zstd:3")

    def level(value: str, lo: int, hi: int) -> int:
        try:
            number = int(value)
        except ValueError:
            raise bad(f"the level must be an integer {lo}..{hi}") from None
        if not lo <= number <= hi:
            raise bad(f"the level must be {lo}..{hi}, got {number}")
        return number

    if kind in ("auto", "none") and not args:
        if kind == "auto" and not allow_auto:
            raise bad("auto is decided when a store is created; a store's layout names its codec")
        return kind
    if kind == "zstd" and len(args) <= 1:
        return f"zstd:{level(args[0], *ZSTD_LEVELS) if args else ZSTD_DEFAULT_LEVEL}"
    if kind == "blosc" and len(args) <= 2:
        cname = args[0] if args and args[0] else BLOSC_DEFAULT[0]
        if cname not in BLOSC_CNAMES:
            raise bad(f"blosc compressors are {', '.join(BLOSC_CNAMES)}")
        return f"blosc:{cname}:{level(args[1], *BLOSC_LEVELS) if len(args) > 1 else BLOSC_DEFAULT[1]}"
    if kind in ("auto", "none", "zstd", "blosc"):
        raise bad("too many ':' parts")
    raise bad("unknown compression")


def compression_codecs(codec: str) -> list:
    """The zarr v3 bytes-to-bytes codecs of a canonical codec name (none: no codec)."""
    kind, *args = parse_compression(codec, allow_auto=False).split(":")
    if kind == "zstd":
        return [zarr.codecs.ZstdCodec(level=int(args[0]))]
    if kind == "blosc":  # byte shuffle over 2-byte float16 values groups their exponent bytes
        return [zarr.codecs.BloscCodec(cname=args[0], clevel=int(args[1]), shuffle="shuffle", typesize=2)]
    return []


def probe_ratio(tokens, codec: str = AUTO_CODEC) -> float:
    """raw / compressed bytes of `tokens` (float16, [B, T, D]) compressed as one chunk by `codec`
    (numcodecs' codecs, which zarr's own zstd and blosc codecs call)."""
    import numcodecs
    import numpy as np

    data = np.ascontiguousarray(tokens, dtype=np.float16)
    kind, *args = parse_compression(codec, allow_auto=False).split(":")
    if kind == "none":
        return 1.0
    coder = (numcodecs.Zstd(level=int(args[0])) if kind == "zstd"
             else numcodecs.Blosc(cname=args[0], clevel=int(args[1]), shuffle=numcodecs.Blosc.SHUFFLE))
    return data.nbytes / max(1, len(coder.encode(data)))


def resumed_compression(location, requested: str, overwrite: bool = False) -> str | None:
    """The codec of the store at `location` when an extraction resumes it (None: a new store is
    made). `requested` auto adopts it; another explicit codec is refused in one line, before any work."""
    fs, root = fsspec.core.url_to_fs(str(location))
    if overwrite or not fs.exists(f"{root}/zarr.json"):
        return None
    attrs = zarr.open_group(zarr_store(str(location), read_only=True), mode="r").attrs.get(ATTRS_KEY)
    if not attrs:
        return None  # not a protocache store: creating it says what is wrong
    have = StoreLayout.from_json(attrs["layout"]).compression
    wanted = parse_compression(requested, what="extract")
    if wanted not in ("auto", have):
        raise ProtocacheError(f"extract: {location} is stored with compression {have}, not --compression {wanted}; "
                              f"pass --compression auto (keeps the store's) or {have}, write to a new --out, or "
                              "pass --overwrite to replace the store")
    return have


def choose_compression(requested: str, resumed: str | None = None, probe_tokens=None) -> dict:
    """The codec a store gets, and why (kept in the store's attrs as `compression`): a resumed
    store's own codec (`resumed`); an explicit codec as given; for auto, zstd:1 when the probe tokens
    (float16 [B, T, D], in the store's precision) compress by AUTO_MIN_RATIO or more, else none."""
    requested = parse_compression(requested, what="extract")
    if resumed is not None or requested != "auto":
        return {"requested": requested, "codec": resumed or requested, "probe_ratio": None}
    ratio = None if probe_tokens is None else round(probe_ratio(probe_tokens), 3)
    codec = AUTO_CODEC if ratio is not None and ratio >= AUTO_MIN_RATIO else "none"
    return {"requested": "auto", "codec": codec, "probe_ratio": ratio,
            "probe_images": None if probe_tokens is None else int(len(probe_tokens)),
            "rule": f"{AUTO_CODEC} when raw / {AUTO_CODEC} bytes of the probe tokens >= {AUTO_MIN_RATIO}"}


def describe_compression(codec: str, choice: dict | None = None) -> str:
    """`zstd:1 (auto: 4 probe images' tokens 9.59x with zstd:1, >= 1.3)`, for logs and `protocache info`."""
    if not choice or choice.get("requested") != "auto" or choice.get("probe_ratio") is None:
        return codec
    verdict = ">=" if choice["probe_ratio"] >= AUTO_MIN_RATIO else "<"
    return (f"{codec} (auto: {choice.get('probe_images')} probe images' tokens {choice['probe_ratio']:.2f}x "
            f"with {AUTO_CODEC}, {verdict} {AUTO_MIN_RATIO})")


def zarr_compressors(name: str | None, checksum: str | None = None):
    """The bytes-to-bytes codecs of every array: the compression, then the checksum (last, so it
    covers the bytes exactly as they sit on disk)."""
    if checksum not in CHECKSUMS:
        raise ProtocacheError(f"unknown checksum {checksum!r}; use {CHECKSUM} or none")
    codecs = compression_codecs(name or "none") + ([zarr.codecs.Crc32cCodec()] if checksum else [])
    return codecs or None
