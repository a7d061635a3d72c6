"""Errors a user can act on. The CLI prints their message without a traceback."""


class ProtocacheError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class FingerprintMismatch(ProtocacheError):
    """An existing store was made from other inputs than the ones given now."""


class MissingShardError(ProtocacheError):
    """A reader asked for rows whose shard was never written (or was removed)."""


class StoreNotFound(ProtocacheError):
    """No feature store at the given path."""
