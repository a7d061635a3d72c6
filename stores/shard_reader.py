"""Whole shards of a local store read straight into the caller's arrays, at the speed of memory.

zarr's read of a sharded array passes every inner chunk through its codec pipeline one at a
time, copying it on the way, with the GIL held between the steps. This reader does the same
work in fewer, parallel steps:

- the shard file's index is read and checked once (`shards.ShardIndex`, the one parser of it);
- each run of inner chunks lying back to back in the file is read with one ``preadv``: raw
  chunks land straight in their rows of the output (the call scatters each chunk's bytes to its
  rows and its 4-byte CRC-32C to a side array); compressed ones land in a per-thread buffer;
- every chunk's CRC-32C is checked (what zarr's crc32c codec appends: the little-endian CRC-32C
  of the chunk's stored bytes), and compressed chunks are decompressed into their rows;
- the kernel is asked to read a compressed shard's chunk bytes ahead (``POSIX_FADV_WILLNEED``, one
  call per readahead step: Linux clamps one call to that), so the disk streams while threads decode;
- runs go to a thread pool, and every hot call releases the GIL: the reads, numcodecs' zstd and
  blosc decompress (``with nogil``), and the CRC-32C, computed by the C library google_crc32c
  wraps, called through ctypes (google_crc32c.value holds the GIL for buffers under 1 MB or not
  of type bytes, and an inner chunk of lite0 tokens is 0.96 MB).

It reads exactly what it can decode: raw little-endian bytes, optionally zstd or blosc, optionally
followed by crc32c; compressed chunks only with their checksum, so a damaged frame never decodes
into short rows unnoticed. Anything else (another codec, a store on object storage) is read by
zarr: `ShardReader.for_array` returns None. Damage is reported as the zarr path reports it:
`shards.check_array` diagnoses the file and `shards.corrupt_error` names shard, inner chunk and rows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import zarr

from . import shards
from .layout import shard_keys

if TYPE_CHECKING:
    from .feature_store import FeatureStore

RUN_BYTES = 4 * 2**20
"""File bytes per task: one system call amortised over megabytes, while a shard still spreads over every thread."""
MAX_THREADS = 8
"""Reader threads at most: past this the page cache's memory bandwidth, not the CPUs, is the limit."""
READ_AHEAD_TASK_BYTES = 32 * 2**20
"""File bytes one read-ahead task asks the kernel for: a shard's read-ahead spreads over the pool (one
thread filling the page cache of a 150 MB shard alone lags a fast disk)."""
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024


@lru_cache(maxsize=1)
def _native_crc32c() -> Callable[[int, int], int] | None:
    """`crc32c_value(address, length)` of the C library google_crc32c wraps (ctypes releases the GIL
    around it), checked against google_crc32c on a probe; None when that library is not found."""
    import google_crc32c

    here = os.path.dirname(google_crc32c.__file__)
    candidates = sorted(glob.glob(f"{here}.libs/libcrc32c*")) + sorted(glob.glob(f"{here}/.dylibs/libcrc32c*"))
    system = ctypes.util.find_library("crc32c")
    probe = np.frombuffer(b"protocache" * 1000, dtype=np.uint8)
    for path in candidates + ([system] if system else []):
        try:
            value = ctypes.CDLL(path).crc32c_value
        except (OSError, AttributeError):
            continue
        value.restype, value.argtypes = ctypes.c_uint32, (ctypes.c_void_p, ctypes.c_size_t)
        if value(probe.ctypes.data, probe.nbytes) == google_crc32c.value(probe):
            return value
    return None


def crc32c(data: np.ndarray) -> int:
    """CRC-32C of a contiguous uint8 array (without holding the GIL where the C library is found)."""
    value = _native_crc32c()
    if value is not None:
        return int(value(data.ctypes.data, data.nbytes))
    import google_crc32c

    return int(google_crc32c.value(data))


@lru_cache(maxsize=None)
def _readahead_step(device: int) -> int:
    """Bytes one POSIX_FADV_WILLNEED call reads ahead on this block device: Linux clamps each call to
    the larger of the device's readahead size and its largest request (read_ahead_kb, max_sectors_kb;
    a partition finds them on its disk); 128 KiB, the kernel's default readahead, where sysfs says nothing."""
    found = []
    for where in ("", "../"):
        for name in ("bdi/read_ahead_kb", "queue/max_sectors_kb"):
            try:
                with open(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/{where}{name}") as fh:
                    found.append(int(fh.read()) * 1024)
            except (OSError, ValueError):
                pass
    return max([128 * 1024] + found)


def read_ahead(fd: int, lo: int, hi: int) -> None:
    """Let the kernel read bytes [lo, hi) of a file into the page cache in the background, so a cold
    shard streams from the disk at its sequential rate while the pool's reads copy what has arrived.
    One WILLNEED call over the whole range would read ahead only its first step (8 MB of a 150 MB
    shard here): so one call per step. A step whose first byte is already cached is skipped (a
    one-byte RWF_NOWAIT read says so without waiting): a warm shard costs ~20 syscalls, not a walk
    of all its pages. No-op without fadvise."""
    if not hasattr(os, "posix_fadvise") or hi <= lo:
        return
    step = _readahead_step(os.fstat(fd).st_dev)
    nowait, probe = getattr(os, "RWF_NOWAIT", None), bytearray(1)
    for offset in range(lo, hi, step):
        if nowait is not None:
            try:
                if os.preadv(fd, [probe], offset, nowait):
                    continue
            except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no way to tell here
                pass
        os.posix_fadvise(fd, offset, min(step, hi - offset), os.POSIX_FADV_WILLNEED)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # a forked child has none of its parent's threads: it starts its own pool
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            _pool = ThreadPoolExecutor(max_workers=max(1, min(MAX_THREADS, cpus)), thread_name_prefix="protocache-read")
        return _pool


_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """This thread's buffer for compressed bytes, grown as needed (at most one run, or one chunk, long)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _local.buf = np.empty(max(nbytes, RUN_BYTES), dtype=np.uint8)
    return buf[:nbytes]


def _decompressors() -> dict[type, Callable[[Any, np.ndarray], Any]]:
    """numcodecs' decompress(source, dest) of each zarr codec decoded here (the functions zarr's own codecs call)."""
    import numcodecs.blosc
    import numcodecs.zstd

    return {zarr.codecs.ZstdCodec: numcodecs.zstd.decompress, zarr.codecs.BloscCodec: numcodecs.blosc.decompress}


def _little_endian(codec) -> bool:
    return isinstance(codec, zarr.codecs.BytesCodec) and getattr(codec.endian, "value", codec.endian) in (None, "little")


@dataclass
class _Plan:
    """One shard file being read: its open descriptor and the runs of chunks to read, as (chunk, offset, length)."""

    reader: "ShardReader"
    shard: int
    out: np.ndarray
    fd: int
    runs: list[list[tuple[int, int, int]]] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    span: tuple[int, int] = (0, 0)
    """File bytes holding the chunks (read ahead by the kernel while the pool's reads copy them)."""


@dataclass(frozen=True)
class ShardReader:
    """Reads whole shards of one array of a local store (see the module docstring)."""

    store: "FeatureStore"
    name: str
    """Group path of the array ("tokens", "views/noise/pooled", ...)."""
    chunk_rows: int
    """Images per inner chunk (the whole shard for pooled and logits: one chunk per shard file)."""
    row_shape: tuple[int, ...]
    dtype: np.dtype
    index: shards.ShardIndex | None
    """The shard index of a sharded array (tokens); None for one chunk per file."""
    decompress: Callable[[Any, np.ndarray], Any] | None
    """numcodecs' decompress(source, dest) of the chunks' codec; None: stored raw."""
    checksummed: bool
    fill_value: Any

    @classmethod
    def for_array(cls, store: "FeatureStore", name: str) -> "ShardReader | None":
        """A reader of array `name` (group path), or None where zarr must read it."""
        if not store.is_local or sys.byteorder != "little":
            return None
        array = store.group[name]
        sharding, inner, checksummed = shards.chunk_codecs(array)
        chunks = tuple(sharding.chunk_shape) if sharding is not None else tuple(array.chunks)
        shard_rows = array.shards[0] if sharding is not None else chunks[0]
        if chunks[1:] != tuple(array.shape[1:]) or shard_rows != store.layout.shard_size:
            return None  # chunks that split an image's row, or shards that are not the layout's
        if sharding is not None and not (_little_endian(sharding.index_codecs[0]) and all(
                isinstance(c, zarr.codecs.Crc32cCodec) for c in sharding.index_codecs[1:])):
            return None
        if not inner or not _little_endian(inner[0]):
            return None
        middle = inner[1:-1] if checksummed and isinstance(inner[-1], zarr.codecs.Crc32cCodec) else inner[1:]
        decompress = None
        if middle:
            decompress = _decompressors().get(type(middle[0]))
            if len(middle) > 1 or decompress is None or not checksummed:
                return None
        index = shards.ShardIndex.of(array, sharding) if sharding is not None else None
        return cls(store, name, int(chunks[0]), tuple(array.shape[1:]), np.dtype(array.dtype), index,
                   decompress, checksummed, array.fill_value)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * int(np.prod(self.row_shape)) * self.dtype.itemsize

    def read(self, shard: int, out: np.ndarray | None = None) -> np.ndarray:
        """All rows of one shard (into `out` when given: C-contiguous, exactly the shard's rows)."""
        if out is None:
            start, stop = self.store.layout.shard_bounds(shard)
            out = np.empty((stop - start,) + self.row_shape, dtype=self.dtype)
        read_shards([(self, shard, out)])
        return out

    # ------------------------------------------------------------------ planning (the caller's thread)
    def _plan(self, shard: int, out: np.ndarray) -> _Plan:
        start, stop = self.store.layout.shard_bounds(shard)
        if out.shape != (stop - start,) + self.row_shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"{self.name} shard {shard}: out is {out.dtype}{out.shape}, expected a C-contiguous "
                             f"{self.dtype}{(stop - start,) + self.row_shape}")
        key = next(k for k in shard_keys(self.store.layout, shard) if k.startswith(f"{self.name}/c/"))
        try:
            fd = os.open(f"{self.store.root}/{key}", os.O_RDONLY)
        except FileNotFoundError:
            raise shards.missing_rows_error(self.store.path, self.store.layout, [shard]) from None
        try:
            plan = _Plan(self, shard, out, fd)
            size = os.fstat(fd).st_size
            if size == 0:  # an empty file counts as missing, never as zeros
                raise shards.missing_rows_error(self.store.path, self.store.layout, [shard])
            self._plan_runs(plan, self._chunk_table(plan, size), size)
            return plan
        except BaseException:
            os.close(fd)
            raise

    def _chunk_table(self, plan: _Plan, size: int) -> np.ndarray:
        """(offset, length) of each inner chunk holding rows of the shard, its index checked."""
        if self.index is None:
            return np.array([[0, size]], dtype=np.uint64)
        if size < self.index.size:
            self._damaged(plan.shard, f"shard file is {size} bytes, shorter than its own index")
        lo, hi = self.index.span(size)
        table = self.index.parse(os.pread(plan.fd, hi - lo, lo))
        if table is None:
            self._damaged(plan.shard, "shard index fails its checksum")
        return table[:-(-len(plan.out) // self.chunk_rows)]

    def _plan_runs(self, plan: _Plan, table: np.ndarray, size: int) -> None:
        lo, hi = self.index.data_span(size) if self.index is not None else (0, size)
        stored = self.chunk_bytes + 4 * self.checksummed
        chunks = []
        for k, (offset, length) in enumerate(table.tolist()):
            if offset == shards.EMPTY_CHUNK:  # never written: fill values, as zarr reads it
                plan.out[k * self.chunk_rows:(k + 1) * self.chunk_rows] = self.fill_value
            elif offset < lo or offset + length > hi or (length != stored if self.decompress is None else length <= 4):
                self._damaged(plan.shard, f"chunk bytes {offset}..{offset + length} do not fit the file", k)
            else:
                chunks.append((k, offset, length))
        per_run = _IOV_MAX // 2 if self.decompress is None else len(chunks)
        for k, offset, length in sorted(chunks, key=lambda c: c[1]):
            run = plan.runs[-1] if plan.runs else None
            if (run and run[-1][1] + run[-1][2] == offset and len(run) < per_run
                    and offset + length - run[0][1] <= RUN_BYTES):
                run.append((k, offset, length))
            else:
                plan.runs.append([(k, offset, length)])
        if plan.runs:
            # A thread decoding a compressed run has no read in flight, so the kernel reads the whole shard
            # ahead. Raw runs keep the disk busy themselves (8 preadv of 4 MB at once); read ahead whole, a
            # raw shard streamed slower where the disk is fast (~1.1 GB/s vs 1.4-2.3), so only the bytes of
            # the first wave of reads are asked for early.
            plan.span = (lo, hi) if self.decompress is not None else (lo, min(hi, lo + RUN_BYTES * MAX_THREADS))

    def _damaged(self, shard: int, what: str, chunk: int | None = None) -> None:
        """Raise the store's CorruptShardError for a shard this reader found damaged: the faults
        `check_array` finds (the same words as any other read), else what was seen here."""
        faults = shards.check_array(self.store, self.name, shard, full=True)
        if not faults:
            start, stop = self.store.layout.shard_bounds(shard)
            rows = (start, stop - 1) if chunk is None else (
                start + chunk * self.chunk_rows, min(start + (chunk + 1) * self.chunk_rows, stop) - 1)
            faults = [shards.Fault(shard, self.name, what, chunk, rows)]
        raise shards.corrupt_error(self.store, faults)

    # ------------------------------------------------------------------ reading (the pool's threads)
    def _target(self, out: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The bytes chunk k decodes into: its rows of `out`, or a scratch chunk when it runs past the
        shard's last row (returned second, to copy from)."""
        lo, hi = k * self.chunk_rows, (k + 1) * self.chunk_rows
        if hi <= len(out):
            return out[lo:hi].reshape(-1).view(np.uint8), None
        scratch = np.empty((self.chunk_rows,) + self.row_shape, dtype=self.dtype)
        return scratch.reshape(-1).view(np.uint8), scratch

    def _read_run(self, plan: _Plan, run: list[tuple[int, int, int]]) -> list[int]:
        """Read, check and decode one run of chunks into `plan.out`; the chunks that fail."""
        first, total = run[0][1], run[-1][1] + run[-1][2] - run[0][1]
        targets = [self._target(plan.out, k) for k, _, _ in run]
        bad = []
        if self.decompress is None:
            crcs = np.empty(len(run), dtype="<u4")
            iov = []
            for i, (target, _) in enumerate(targets):
                iov += [target, crcs[i:i + 1].view(np.uint8)] if self.checksummed else [target]
            if os.preadv(plan.fd, iov, first) != total:
                return [k for k, _, _ in run]  # the file shrank under us
            if self.checksummed:
                bad = [k for (k, _, _), (target, _), crc in zip(run, targets, crcs.tolist()) if crc32c(target) != crc]
        else:
            data = _scratch(total)
            if os.preadv(plan.fd, [data], first) != total:
                return [k for k, _, _ in run]
            for (k, offset, length), (target, _) in zip(run, targets):
                chunk = data[offset - first:offset - first + length]
                if crc32c(chunk[:-4]) != int(chunk[-4:].view("<u4")[0]):
                    bad.append(k)
                    continue
                try:
                    self.decompress(chunk[:-4], target)
                except Exception:  # noqa: BLE001 - a chunk that passes its checksum yet does not decode
                    bad.append(k)
        for (k, _, _), (_, scratch) in zip(run, targets):
            if scratch is not None:
                plan.out[k * self.chunk_rows:] = scratch[:len(plan.out) - k * self.chunk_rows]
        return bad


def read_shards(jobs: Sequence[tuple[ShardReader, int, np.ndarray]]) -> None:
    """Fill each job's `out` with all rows of its shard: every job's runs of chunks in the thread
    pool at once. Raises MissingShardError for a shard file that is not there, CorruptShardError
    (naming shard, inner chunk and rows) for one that fails its checks."""
    plans: list[_Plan] = []
    try:
        for reader, shard, out in jobs:
            plans.append(reader._plan(shard, out))
        pool = _executor()
        # read-ahead first, in the pool, in pieces: it overlaps the reads and itself
        ahead = [pool.submit(read_ahead, plan.fd, lo, min(lo + READ_AHEAD_TASK_BYTES, plan.span[1]))
                 for plan in plans for lo in range(plan.span[0], plan.span[1], READ_AHEAD_TASK_BYTES)]
        tasks = [(plan, pool.submit(plan.reader._read_run, plan, run)) for plan in plans for run in plan.runs]
        wait(ahead + [task for _, task in tasks])  # every task done before any descriptor closes
        for plan, task in tasks:
            plan.bad += task.result()
    finally:
        for plan in plans:
            os.close(plan.fd)
    for plan in plans:
        if plan.bad:
            plan.reader._damaged(plan.shard, "checksum mismatch (its bytes changed on disk)", min(plan.bad))
