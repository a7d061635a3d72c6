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
    except RuntimeError:
        raise ProtocacheError(f"bad --device {device!r}; use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """torch's deterministic kernels (a warning where an op has none) and no cuDNN autotuning inside
    the block; the caller's settings after it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read when it starts)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


@contextlib.contextmanager
def fit_settings(threads: int | None) -> Iterator[None]:
    """What a fit runs under (`pinned_threads`, `deterministic_kernels`), set back when it ends."""
    with pinned_threads(threads), deterministic_kernels():
        yield


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ProtocacheError(f"--threads must be >= 1, got {threads}")


def pin_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count for the rest of the process (a dask worker's task); None keeps it."""
    check_threads(threads)
    if threads:
        torch.set_num_threads(int(threads))


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` (part of what makes CPU float results repeatable)
    inside the block and set back after it: a fit or extraction called from Python leaves the caller's
    count as it was. None keeps the count."""
    check_threads(threads)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


WAIT_FOR_WORKERS_S = 60
"""How long a run on an existing cluster waits for its first worker."""


def _cluster_errors() -> tuple[type[BaseException], ...]:
    """The dask errors of a cluster that fails under its tasks (scheduler gone, workers killed)."""
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    return FutureCancelledError, KilledWorker, CommClosedError


def check_scheduler(scheduler: str | None) -> None:
    """A --scheduler address dask can parse (tcp://HOST:PORT), or None; else one line saying so."""
    if not scheduler:
        return
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(scheduler)
        if scheme in ("tcp", "tls", "ucx", "ws", "wss"):
            parse_host_port(location)
    except ValueError as exc:
        raise ProtocacheError(f"bad --scheduler {scheduler!r} ({exc}); give the scheduler's address, "
                              "e.g. tcp://10.0.0.5:8786") from None


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator["object"]:
    """A dask.distributed client: on the running cluster at `scheduler`, or on a local cluster of
    `workers` single-threaded worker processes started here and closed on exit."""
    from dask.distributed import Client, LocalCluster

    cluster = None
    if scheduler:
        check_scheduler(scheduler)
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ProtocacheError(f"cannot reach the dask scheduler at {scheduler} ({str(exc).splitlines()[0][:120]}); "
                                  "start it (`dask scheduler`, and workers with `dask worker ADDRESS`) or check "
                                  "--scheduler") from None
        try:  # a scheduler without workers would take the tasks and never run them
            client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        except (TimeoutError, OSError):
            client.close()
            raise ProtocacheError(f"the dask scheduler at {scheduler} has no workers (waited {WAIT_FOR_WORKERS_S} s); "
                                  f"start some with `dask worker {scheduler}`") from None
    else:
        cluster = LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        yield client
    except _cluster_errors() as exc:  # the cluster failed under the tasks: what is written stays, a re-run resumes
        raise ProtocacheError(f"the dask cluster failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                              "what was finished is kept: run the same command again (on a working cluster) "
                              "to do the rest") from None
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
