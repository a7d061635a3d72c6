"""Everything protocache keeps on disk: feature stores (Zarr v3 + Parquet) and run directories."""

from .errors import FingerprintMismatch, MissingShardError, ProtocacheError, StoreNotFound
from .feature_store import CLEAN, FeatureStore, StoreLayout, default_shard_size

__all__ = [
    "CLEAN",
    "FeatureStore",
    "FingerprintMismatch",
    "MissingShardError",
    "ProtocacheError",
    "StoreLayout",
    "StoreNotFound",
    "default_shard_size",
]
