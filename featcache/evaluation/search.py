"""Exact inner-product search in query blocks: GPU FAISS, else torch on CUDA, else CPU FAISS.

Features are L2-normalised, so the inner product is the cosine similarity.
Only a (block x gallery) slice of scores exists at a time; the block size is
chosen from a memory budget, so galleries of millions never need the full
query x gallery matrix, while every score of a query is still seen (mAP and
mINP need the rank of every positive, not a top-k).
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from featcache.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 256 * 2**20  # bytes of scores (and their masks) per block
#: where each positive's rank is counted: auto (on the device when the scores are on a GPU), sort (on the CPU,
#: ``ranking.block_ranks``), device (where the scores are computed, ``device_ranking``)
RANKINGS = ("auto", "sort", "device")


def l2_normalize(x: np.ndarray, inplace: bool = False, block: int = 65536) -> np.ndarray:
    """Rows scaled to unit length (float32); blockwise, so no temporary of the whole array is made."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = x if inplace else np.empty_like(x)
    for s in range(0, len(x), block):
        b = x[s: s + block]
        n = np.sqrt(np.einsum("ij,ij->i", b, b))[:, None]
        np.divide(b, np.maximum(n, 1e-12), out=out[s: s + block])
    return out


class Scorer:
    """Holds the gallery on the chosen backend; ``scores(q)`` returns (len(q), G) similarities."""

    def __init__(self, gallery: np.ndarray, device: str = "auto", torch_scores: bool = False) -> None:
        """``torch_scores``: compute scores with torch on a GPU when there is one, even where GPU FAISS is installed,
        so that they stay on the device for device ranking."""
        import faiss
        import torch

        self.gallery = np.ascontiguousarray(gallery, dtype=np.float32)
        want_gpu = device in ("auto", "cuda") or device.startswith("cuda:")
        if device.startswith("cuda") and faiss.get_num_gpus() == 0 and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: neither faiss nor torch sees a GPU on this machine (use --device cpu or auto)")
        if device.startswith("cuda:") or (torch_scores and want_gpu and torch.cuda.is_available()):  # torch on that GPU
            from featcache.runtime import resolve_device

            self.backend = "torch-cuda"
            self._dev = resolve_device(device if device.startswith("cuda") else "cuda")
            self._g = torch.from_numpy(self.gallery).to(self._dev)
        elif want_gpu and faiss.get_num_gpus() > 0:
            self.backend = "faiss-gpu"
            self._res = faiss.StandardGpuResources()
        elif want_gpu and torch.cuda.is_available():
            self.backend = "torch-cuda"
            self._dev = torch.device("cuda")
            self._g = torch.from_numpy(self.gallery).to(self._dev)
        else:
            self.backend = "faiss-cpu"
        logger.info("search backend: %s (gallery %d x %d)", self.backend, *self.gallery.shape)

    def scores(self, q: np.ndarray) -> np.ndarray:
        import faiss

        q = np.ascontiguousarray(q, dtype=np.float32)
        if self.backend == "faiss-gpu":
            return faiss.pairwise_distance_gpu(self._res, q, self.gallery, metric=faiss.METRIC_INNER_PRODUCT)
        if self.backend == "torch-cuda":
            return self.device_scores(q).cpu().numpy()
        return faiss.pairwise_distances(q, self.gallery, metric=faiss.METRIC_INNER_PRODUCT)

    def device_scores(self, q: np.ndarray):
        """(len(q), G) similarities as a torch tensor where they were computed (the GPU for torch-cuda), so that
        ranking can run there too; on the other backends, the CPU scores as a tensor."""
        import torch

        if self.backend == "torch-cuda":
            return torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self._dev) @ self._g.T
        return torch.from_numpy(self.scores(q))


def block_size(n_gallery: int, budget: int = DEFAULT_BUDGET) -> int:
    """Queries per block so that scores plus per-query masks stay within ``budget`` bytes."""
    return max(1, budget // max(1, n_gallery * 6))


def score_blocks(query: np.ndarray, scorer: Scorer, block: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first query index, scores of the block) over all queries."""
    for s in range(0, len(query), block):
        yield s, scorer.scores(query[s: s + block])
