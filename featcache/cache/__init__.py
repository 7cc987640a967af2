"""The HDF5 feature cache: storage (``store``), identity (``identity``), reading (``reader``), view pixels (``pixels``)."""

from featcache.cache.identity import CacheIdentity
from featcache.cache.reader import CacheSplit, status_counts, summary
from featcache.cache.store import (
    DONE,
    FAILED,
    FORMAT_VERSION,
    PENDING,
    BatchResult,
    CacheError,
    CacheWriter,
    check_identity,
    create_cache,
    make_identity,
    open_cache,
    read_checked,
    read_identity,
    read_rows,
)

__all__ = [
    "DONE", "FAILED", "FORMAT_VERSION", "PENDING", "BatchResult", "CacheError", "CacheIdentity", "CacheSplit",
    "CacheWriter", "check_identity", "create_cache", "make_identity", "open_cache", "read_checked", "read_identity", "read_rows", "status_counts", "summary",
]
