"""featcache's HDF5 files behind one interface: the file formats and their one door (``fileformat``), creating
a feature cache (``store``), writing it (``writer``), reading it (``reader``), describing it (``describe``), its identity (``identity``),
checksums (``checksum``), shards (``shards``), the pixels a backbone saw (``pixels``), the pixel cache
(``pixelcache``) and teacher targets (``targets``). No module outside this package names a path inside these files.
"""

from featcache.cache.identity import CacheIdentity
from featcache.cache.describe import summary
from featcache.cache.reader import (CacheReader, CacheSplit, cache_identity, known_route, partial_note, status_counts,
                                    training_coverage)
from featcache.cache.writer import BatchResult, CacheWriter
from featcache.cache.fileformat import CacheBusy, EmptySplit, NotResumable, open_featcache
from featcache.cache.store import (
    DONE,
    FAILED,
    FORMAT_VERSION,
    PENDING,
    CacheError,
    check_identity,
    create_cache,
    make_identity,
    open_cache_file,
    read_checked,
    read_identity,
    read_rows,
)

__all__ = [
    "DONE", "FAILED", "FORMAT_VERSION", "PENDING", "BatchResult", "CacheError", "CacheIdentity", "CacheReader", "CacheSplit",
    "cache_identity", "known_route", "open_featcache", "CacheBusy", "EmptySplit", "NotResumable",
    "CacheWriter", "check_identity", "create_cache", "make_identity", "open_cache_file", "read_checked", "read_identity", "read_rows", "status_counts", "summary", "training_coverage", "partial_note",
]
