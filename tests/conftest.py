"""Shared fixtures. The digits store of the default backbone is built once per session (~2 min on 2 cores)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def store_path(tmp_path_factory):
    """The small store of the tiny random test backbone (120 digits, 5x5 tokens, D=256, 8 shards)."""
    from test_codebook import small_store_path

    return small_store_path(tmp_path_factory)


@pytest.fixture(scope="session")
def digits_lite0_store(tmp_path_factory):
    """Path of a complete digits store extracted with the default backbone and its shipped weights."""
    from protocache.pipeline.extract import ExtractConfig, run_extract

    out = tmp_path_factory.mktemp("digits") / "digits_tf_efficientnet_lite0.zarr"
    run_extract(ExtractConfig(dataset="digits", out=str(out), progress=False))
    return out
