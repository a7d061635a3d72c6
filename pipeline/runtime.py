"""Runtime: the device, the seeds, the thread count and the dask client, each decided in one place."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

from protocache.stores.errors import ProtocacheError


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` is CUDA when torch sees it, else the CPU; asking for CUDA without one is a clear error."""
    device = (device or "auto").strip()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ProtocacheError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ProtocacheError(f"bad --device {device!r} ({exc}); use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and ask torch for deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def pin_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count (part of what makes CPU float results repeatable)."""
    if threads:
        if threads < 1:
            raise ProtocacheError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator["object"]:
    """A dask.distributed client: on the running cluster at `scheduler`, or on a local cluster of
    `workers` single-threaded worker processes started here and closed on exit."""
    from dask.distributed import Client, LocalCluster

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
