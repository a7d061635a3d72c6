"""Codebook stage: k-means on a seeded sample of cached tokens.

The sample is drawn uniformly over the (image, token) pairs of a split and read shard
by shard, so at most one shard's selected rows are in memory next to the sample; the
whole cache never is (FAISS copies its input to contiguous float32, so sampling first
is what keeps this bounded). FAISS runs on the GPU when it sees one, else on the CPU;
scikit-learn's KMeans is the fallback only when faiss is not importable.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError

BACKENDS = ("auto", "faiss", "sklearn")


@dataclass
class KMeansConfig:
    num_codes: int
    sample_size: int = 100_000  # tokens drawn from the split (fewer if the split has fewer)
    iters: int = 20
    spherical: bool = True  # cosine codebooks: cluster unit vectors, unit centroids
    seed: int = 0
    split: str | None = "train"
    view: str = "clean"
    backend: str = "auto"  # auto (faiss, GPU if it sees one) | faiss | sklearn


@dataclass
class TokenSample:
    """Tokens drawn from a store, with where each came from and what it cost to read."""

    tokens: np.ndarray  # [n, D] float32
    rows: np.ndarray  # [n] store row of each token
    cells: np.ndarray  # [n] token index (grid cell, row-major) of each token
    rows_read: int  # distinct images read from the store
    shards_read: list[int] = field(default_factory=list)
    max_rows_in_memory: int = 0  # the most images held at once while sampling


@dataclass
class KMeansReport:
    backend: str
    num_codes: int
    num_samples: int
    objective: float  # faiss: final sum of squared distances (of unit vectors when spherical)
    cluster_sizes: list[int]
    empty_clusters: int
    seconds: float
    rows_read: int
    shards_read: list[int]
    config: dict[str, Any]


@dataclass
class KMeansResult:
    centroids: np.ndarray  # [K, D] float32 (unit rows when spherical)
    member_norm: np.ndarray  # [K] mean raw norm of the sampled tokens in each cluster (0 if empty)
    report: KMeansReport


def sample_tokens(store: FeatureStore, num_tokens: int, seed: int = 0, split: str | None = "train",
                  view: str = "clean", drop_zero: bool = False) -> TokenSample:
    """Draw `num_tokens` (image, cell) pairs uniformly without replacement from a split.

    Shards are visited in order and only the chosen rows of each are read, so memory
    holds the sample plus one shard's chosen rows. The same seed gives the same sample.
    """
    rows = np.asarray(store.split_rows(split), dtype=np.int64)
    if rows.size == 0:
        raise ProtocacheError(f"{store.path}: split {split!r} has no images to sample tokens from")
    t, d = store.layout.num_tokens, store.layout.dim
    total = rows.size * t
    n = int(min(max(1, num_tokens), total))
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=n, replace=False))
    pick_rows, pick_cells = rows[picks // t], picks % t
    s = store.layout.shard_size
    out = np.empty((n, d), dtype=np.float32)
    shard_of = pick_rows // s
    shards = np.unique(shard_of)
    rows_read, most = 0, 0
    for shard in shards:
        sel = np.flatnonzero(shard_of == shard)
        wanted, inverse = np.unique(pick_rows[sel], return_inverse=True)
        block = read_chunk_runs(store, wanted, view=view)  # [u, T, D] float16
        out[sel] = block[inverse, pick_cells[sel]].astype(np.float32)
        rows_read += wanted.size
        most = max(most, wanted.size)
        del block
    keep = np.ones(n, dtype=bool)
    if drop_zero:  # a zero token has no direction; it cannot join a cosine cluster
        keep = np.linalg.norm(out, axis=1) > 0
    return TokenSample(out[keep], pick_rows[keep], pick_cells[keep], rows_read,
                       [int(x) for x in shards], most)


def read_chunk_runs(store: FeatureStore, rows: np.ndarray, name: str = "tokens", view: str = "clean") -> np.ndarray:
    """store arrays at sorted `rows` (all in one shard), read as runs of whole inner chunks.

    zarr's orthogonal selection decodes per row (~20 ms a row on a sharded array);
    slicing the runs of inner chunks that hold the rows reads each chunk once, and never
    more than the rows' shard.
    """
    c = store.layout.chunk_size
    chunks = np.unique(rows // c)
    breaks = np.flatnonzero(np.diff(chunks) > 1) + 1
    out = []
    for run in np.split(chunks, breaks):
        start, stop = int(run[0]) * c, min(int(run[-1] + 1) * c, store.num_images)
        block = store.read(name, start, stop, view)
        out.append(block[rows[(rows >= start) & (rows < stop)] - start])
    return np.concatenate(out)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ProtocacheError(f"unknown k-means backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "sklearn":
        return "sklearn"
    if not faiss_available():
        if backend == "faiss":
            raise ProtocacheError("k-means backend 'faiss' asked for but faiss is not installed; "
                                  "pip install the [cpu] or [gpu] extra (faiss-cpu / faiss-gpu)")
        return "sklearn"
    import faiss

    return "faiss-gpu" if faiss.get_num_gpus() > 0 else "faiss-cpu"


def kmeans(points: np.ndarray, num_codes: int, iters: int = 20, seed: int = 0, spherical: bool = True,
           backend: str = "auto") -> tuple[np.ndarray, float, str]:
    """Cluster rows of `points`; returns (centroids [K, D] float32, objective, backend used).

    With spherical=True the points are L2-normalised first and the centroids are unit
    vectors (spherical k-means, the right geometry for a cosine codebook).
    """
    x = np.ascontiguousarray(points, dtype=np.float32)
    if spherical:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if x.shape[0] < num_codes:
        raise ProtocacheError(f"k-means needs at least {num_codes} points for {num_codes} codes, got {x.shape[0]}; "
                              "lower the codebook size or raise the sample size")
    used = resolve_backend(backend)
    if used.startswith("faiss"):
        import faiss

        km = faiss.Kmeans(x.shape[1], num_codes, niter=iters, seed=int(seed) % (2**31), spherical=spherical,
                          gpu=used == "faiss-gpu", verbose=False,
                          max_points_per_centroid=max(256, -(-x.shape[0] // num_codes)))  # use the whole sample
        km.train(x)
        centroids = np.asarray(km.centroids, dtype=np.float32).reshape(num_codes, -1)
        objective = float(km.obj[-1]) if len(km.obj) else float("nan")
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=num_codes, n_init=1, max_iter=iters, random_state=int(seed) % (2**31))
        km.fit(x)
        centroids = km.cluster_centers_.astype(np.float32)
        if spherical:
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        objective = float(km.inertia_)
    return centroids, objective, used


def assign(points: np.ndarray, centroids: np.ndarray, spherical: bool = True, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centroid for each point (max cosine when spherical, else min L2)."""
    c = np.asarray(centroids, dtype=np.float32)
    out = np.empty(points.shape[0], dtype=np.int64)
    for i in range(0, points.shape[0], chunk):
        x = np.asarray(points[i:i + chunk], dtype=np.float32)
        if spherical:
            out[i:i + chunk] = np.argmax(x @ c.T, axis=1)  # row norms of x do not change the argmax
        else:
            d = (x * x).sum(1, keepdims=True) - 2 * x @ c.T + (c * c).sum(1)[None]
            out[i:i + chunk] = np.argmin(d, axis=1)
    return out


def fit_codebook(store: FeatureStore, config: KMeansConfig) -> KMeansResult:
    """K-means of a seeded token sample of `store`: centroids plus a report."""
    started = time.perf_counter()
    sample = sample_tokens(store, config.sample_size, seed=config.seed, split=config.split, view=config.view,
                           drop_zero=config.spherical)
    centroids, objective, used = kmeans(sample.tokens, config.num_codes, iters=config.iters, seed=config.seed,
                                        spherical=config.spherical, backend=config.backend)
    labels = assign(sample.tokens, centroids, spherical=config.spherical)
    sizes = np.bincount(labels, minlength=config.num_codes)
    norms = np.linalg.norm(sample.tokens, axis=1)
    member_norm = np.bincount(labels, weights=norms, minlength=config.num_codes) / np.maximum(sizes, 1)
    report = KMeansReport(backend=used, num_codes=config.num_codes, num_samples=int(sample.tokens.shape[0]),
                          objective=objective, cluster_sizes=[int(v) for v in sizes],
                          empty_clusters=int((sizes == 0).sum()), seconds=time.perf_counter() - started,
                          rows_read=sample.rows_read, shards_read=sample.shards_read, config=asdict(config))
    return KMeansResult(centroids, member_norm.astype(np.float32), report)
