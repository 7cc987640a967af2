"""Approximate search (``--search approx``): a FAISS IVF-PQ, IVF-Flat or HNSW index over the gallery.

Exact search sees every score, so mAP and mINP count every positive.
An approximate index returns each query's top ``k`` only; positives
outside them are not seen. The metrics are then computed on the returned
list (junk removed, as the protocol says) and are *not* the protocol's:

- AP@k: the sum over retrieved positives of precision at each hit, divided
  by all of the query's positives (a positive beyond k adds nothing);
- CMC@K: as exact, for K <= k (a query whose first positive is beyond k
  counts as a miss);
- INP: n / r_n when all n positives are within k, else 0.

Reports say so (``search.mode`` is ``approx``, with the index and k), and
the table labels the numbers. ``benchmarks/gallery_scale.py`` measures
recall@10 against exact search and the speed-up.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from featcache.errors import ConfigError, InputError, check_choice
from featcache.evaluation.ranking import GalleryIndex

logger = logging.getLogger(__name__)

APPROX_INDEXES = ("ivf-pq", "ivf-flat", "hnsw")


@dataclass(frozen=True)
class ApproxSpec:
    kind: str = "ivf-pq"
    k: int = 100          # length of each query's returned list
    nprobe: int = 32      # IVF lists visited per query
    nlist: int = 0        # IVF lists; 0: about 4 sqrt(gallery), a power of two
    m: int = 0            # PQ sub-quantizers; 0: d / 8 rounded down to a divisor of d
    ef_search: int = 128  # HNSW

    def __post_init__(self) -> None:
        check_choice(self.kind, APPROX_INDEXES, "--approx-index")
        if self.k < 1 or self.nprobe < 1 or self.nlist < 0 or self.m < 0 or self.ef_search < 1:
            raise ConfigError("approximate search: expected --approx-k, --nprobe and ef_search >= 1, nlist and m >= 0")


def _nlist(n: int, spec: ApproxSpec) -> int:
    if spec.nlist:
        return spec.nlist
    return max(1, min(2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))), n // 39))  # FAISS wants >= 39 points a list


def _pq_m(d: int, spec: ApproxSpec) -> int:
    if spec.m:
        if d % spec.m:
            raise ConfigError(f"PQ sub-quantizers m={spec.m} must divide the feature dimension {d}")
        return spec.m
    return max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)


class ApproxIndex:
    """The gallery in a trained FAISS index (on the GPU where FAISS sees one, for the IVF kinds)."""

    def __init__(self, gallery: np.ndarray, spec: ApproxSpec, device: str = "auto", seed: int = 0) -> None:
        import faiss

        t0 = time.perf_counter()
        n, d = gallery.shape
        self.spec = spec
        if spec.kind == "hnsw":
            factory = "HNSW32,Flat"
        else:
            nlist = _nlist(n, spec)
            # IVF-PQ's short list is re-scored exactly (RFlat, k_factor x k candidates): PQ codes rank coarsely
            factory = f"IVF{nlist},{'Flat' if spec.kind == 'ivf-flat' else f'PQ{_pq_m(d, spec)}x8,RFlat'}"
        if spec.kind == "ivf-pq" and n < 256:
            raise InputError(f"--approx-index ivf-pq: the gallery has {n} images, and PQ trains 256 centroids per "
                             "sub-quantizer; use --search exact (fast at this size), or --approx-index ivf-flat or hnsw")
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            sample = gallery
            limit = max(64 * _nlist(n, spec), 256 * 39)  # FAISS asks for 39 to 256 training points a centroid
            if n > limit:
                sample = gallery[np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))]
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        self.backend = "faiss-cpu"
        if spec.kind != "hnsw" and (device in ("auto", "cuda") or device.startswith("cuda:")) and faiss.get_num_gpus() > 0:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, int(device[5:]) if device.startswith("cuda:") else 0, index)
            self.backend = "faiss-gpu"
        index.add(np.ascontiguousarray(gallery, dtype=np.float32))
        if spec.kind == "hnsw":
            index.hnsw.efSearch = max(spec.ef_search, spec.k)
        else:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", spec.nprobe)
        if spec.kind == "ivf-pq":
            faiss.downcast_index(index).k_factor = 4
        self.index = index
        self.description = (factory + ("" if spec.kind == "hnsw" else f", nprobe {spec.nprobe}")
                            + (", k_factor 4" if spec.kind == "ivf-pq" else "") + f", top {spec.k}")
        self.build_seconds = time.perf_counter() - t0
        logger.info("approximate index %s built in %.1f s (%s)", self.description, self.build_seconds, self.backend)

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        """(len(q), k) gallery indices, best first; -1 where the index returned fewer."""
        _, idx = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        return idx


def truncated_ranks(found: np.ndarray, first: int, index: GalleryIndex, n_gallery: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From returned lists (rows = queries ``first ..``): ranks of the positives among the first ``k`` non-junk
    entries (sorted within each query), how many were found, and how many positives each query has."""
    rows = np.arange(len(found), dtype=np.int64)[:, None]
    keys = rows * n_gallery + np.maximum(found, 0)

    def pair_keys(start: np.ndarray, col: np.ndarray) -> np.ndarray:
        bounds = start[first: first + len(found) + 1]
        r = np.repeat(np.arange(len(found), dtype=np.int64), np.diff(bounds))
        return r * n_gallery + col[bounds[0]: bounds[-1]]

    junk = np.isin(keys, pair_keys(index.junk_start, index.junk_col)) | (found < 0)
    rank = np.cumsum(~junk, axis=1)
    hit = np.isin(keys, pair_keys(index.pos_start, index.pos_col)) & ~junk & (rank <= k)
    n_pos = np.diff(index.pos_start[first: first + len(found) + 1])
    return rank[hit].astype(np.int64), hit.sum(1), n_pos
