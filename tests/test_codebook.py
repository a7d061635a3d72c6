"""Codebook stage: seeded token sampling across shards and k-means (FAISS, sklearn fallback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protocache.pipeline import codebook as cb
from protocache.stores import FeatureStore
from protocache.stores.errors import ProtocacheError


def small_store_path(tmp_path_factory) -> Path:
    """A 120-image digits store of the tiny random test backbone (5x5 tokens, D=256, 8 shards).

    Built once per session under the session's base temp dir; test_fit.py uses the same one.
    """
    path = tmp_path_factory.getbasetemp() / "small_store" / "s.zarr"
    if not ((path / "zarr.json").exists() and FeatureStore.open(path).is_complete):
        from protocache.pipeline.extract import ExtractConfig, run_extract

        run_extract(ExtractConfig(dataset="digits", backbone="test_efficientnet", weights="random", limit=120,
                                  shard_size=16, out=str(path), progress=False, num_workers=0))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return FeatureStore.open(small_store_path(tmp_path_factory))


def test_sample_is_seeded_and_exact(store):
    a = cb.sample_tokens(store, 300, seed=7)
    b = cb.sample_tokens(store, 300, seed=7)
    c = cb.sample_tokens(store, 300, seed=8)
    assert a.tokens.shape == (300, store.layout.dim) and a.tokens.dtype == np.float32
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert not np.array_equal(a.rows * 100 + a.cells, c.rows * 100 + c.cells)
    train = set(store.split_rows("train").tolist())
    assert set(a.rows.tolist()) <= train  # only the asked-for split
    assert len(set(zip(a.rows.tolist(), a.cells.tolist()))) == 300  # without replacement
    expected = store.read("tokens", 0, store.num_images)[a.rows, a.cells].astype(np.float32)
    np.testing.assert_array_equal(a.tokens, expected)  # each sampled token is the cached one


def test_sampling_reads_a_bounded_amount(store):
    s = cb.sample_tokens(store, 20, seed=0)
    assert s.rows_read <= 20  # never more images than tokens asked for
    assert s.max_rows_in_memory <= store.layout.shard_size  # one shard's chosen rows at a time
    assert len(s.shards_read) >= 2  # drawn across shards, not from the first one
    everything = cb.sample_tokens(store, 10**9, seed=0)  # asking for more than exists: the whole split, once
    n_train = len(store.split_rows("train"))
    assert everything.tokens.shape[0] == n_train * store.layout.num_tokens
    assert everything.rows_read == n_train and everything.max_rows_in_memory <= store.layout.shard_size


def test_fit_codebook_is_deterministic_on_cpu(store):
    cfg = cb.KMeansConfig(num_codes=8, sample_size=1000, iters=10, seed=3)
    r1, r2 = cb.fit_codebook(store, cfg), cb.fit_codebook(store, cfg)
    np.testing.assert_array_equal(r1.centroids, r2.centroids)
    assert r1.report.backend in ("faiss-cpu", "faiss-gpu", "sklearn")
    assert r1.centroids.shape == (8, store.layout.dim)
    np.testing.assert_allclose(np.linalg.norm(r1.centroids, axis=1), 1.0, rtol=1e-4)  # spherical
    rep = r1.report
    assert sum(rep.cluster_sizes) == rep.num_samples and len(rep.cluster_sizes) == 8
    assert rep.seconds >= 0 and np.isfinite(rep.objective)
    assert rep.rows_read <= len(store.split_rows("train"))
    assert (r1.member_norm > 0).sum() == 8 - rep.empty_clusters
    other = cb.fit_codebook(store, cb.KMeansConfig(num_codes=8, sample_size=1000, iters=10, seed=4))
    assert not np.array_equal(other.centroids, r1.centroids)


def _blobs(seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = np.eye(6, 16, dtype=np.float32) * 5
    labels = rng.integers(0, 6, 1200)
    return centers[labels] + rng.normal(0, 0.2, (1200, 16)).astype(np.float32), labels


@pytest.mark.parametrize("backend", ["auto", "sklearn"])
def test_kmeans_recovers_separated_clusters(backend):
    x, labels = _blobs()
    centroids, objective, used = cb.kmeans(x, 6, iters=25, seed=0, spherical=True, backend=backend)
    assert used == "sklearn" if backend == "sklearn" else used.startswith(("faiss", "sklearn"))
    assigned = cb.assign(x, centroids, spherical=True)
    # every true cluster maps to exactly one centroid
    for k in range(6):
        assert len(np.unique(assigned[labels == k])) == 1
    assert len(np.unique(assigned)) == 6


def test_kmeans_refuses_too_few_points_and_unknown_backends():
    x, _ = _blobs()
    with pytest.raises(ProtocacheError, match="at least 50 points"):
        cb.kmeans(x[:10], 50)
    with pytest.raises(ProtocacheError, match="unknown k-means backend"):
        cb.kmeans(x, 4, backend="cuml")
