"""Cold reads for the scale benchmark: drop a store's files from the page cache, check that they
are gone (mincore), read them as `cat` does, and the process's memory as /proc reports it.

`posix_fadvise(POSIX_FADV_DONTNEED)` after `fsync` evicts a file's clean pages without root; it
cannot on tmpfs (the pages are the file), which `resident_fraction` then shows.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

MB = 1e6


def store_files(root: str | Path) -> list[str]:
    """Every file of a store (arrays, metadata, zarr.json)."""
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file())


def token_shard_files(root: str | Path) -> list[str]:
    """The tokens shard files in shard order: what an epoch reads."""
    files = [p for p in (Path(root) / "tokens" / "c").glob("*/0/0") if p.is_file()]
    return [str(p) for p in sorted(files, key=lambda p: int(p.parent.parent.name))]


def drop_page_cache(files: list[str]) -> None:
    """Flush each file and drop its pages from the page cache (no root needed)."""
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(files: list[str]) -> float | None:
    """Share of the files' pages in the page cache (mincore(2) over a shared read-only mapping);
    None where the C library's mmap/mincore cannot be called."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for name in files:
        size = os.path.getsize(name)
        if not size:
            continue
        fd = os.open(name, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = np.zeros(-(-size // page), dtype=np.uint8)
                if libc.mincore(addr, size, vec.ctypes.data) != 0:
                    return None
                resident += int((vec & 1).sum())
                total += len(vec)
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def sequential_read(files: list[str], buffer_bytes: int = 2**20) -> dict[str, float]:
    """Read the files front to back in big reads, as `cat` does: bytes, seconds, MB/s."""
    buf = bytearray(buffer_bytes)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for name in files:
        with open(name, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "mb_per_s": total / MB / seconds if seconds > 0 else float("inf")}


def memory_total() -> int | None:
    """Bytes of RAM (MemTotal), None where /proc/meminfo is not there."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def status_kib(key: str) -> int | None:
    """A memory line of /proc/self/status in KiB (VmRSS, VmHWM = peak RSS); None where it is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
