"""Everything protocache keeps on disk: feature stores (Zarr v3 + Parquet) and run directories."""

from .errors import FingerprintMismatch, MissingShardError, ProtocacheError, StoreNotFound
from .feature_store import FeatureStore
from .fingerprint import compare_fingerprints, describe_difference
from .layout import CLEAN, FORMAT_VERSION, StoreLayout, default_shard_size

__all__ = [
    "CLEAN",
    "FORMAT_VERSION",
    "FeatureStore",
    "FingerprintMismatch",
    "MissingShardError",
    "ProtocacheError",
    "StoreLayout",
    "StoreNotFound",
    "compare_fingerprints",
    "default_shard_size",
    "describe_difference",
]
