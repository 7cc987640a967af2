"""The exact rank of every positive, computed where the scores are: on the GPU, with torch.

``ranking.block_ranks`` does this on the CPU with a sort of the few entries that can outrank a positive. On a
GPU the scores of a block stay on the device and this module counts, for each positive of each query, the
entries ranked before it, under the same rule (``metrics`` module doc):

- an entry ranks before a positive when its score is higher, or equal and it comes earlier in the gallery
  (the protocol's tie rule, as a stable sort has it);
- junk entries (the query's identity seen by its own camera) are not counted.

Positives are handled in chunks so that the (chunk x gallery) comparisons fit ``budget`` bytes; only the ranks
(one int64 per positive) leave the device. The same code runs on CPU torch, where the tests hold it equal to
``ranking.block_ranks``, ties and junk included.
"""

from __future__ import annotations

import numpy as np
import torch

from featcache.evaluation.ranking import GalleryIndex


def device_block_ranks(scores: torch.Tensor, first: int, index: GalleryIndex,
                       budget: int = 256 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """``ranking.block_ranks`` for a (rows, gallery) float tensor on any device: (1-based ranks sorted within each
    query and concatenated in query order, the number of positives of each query)."""
    n_rows, n_gal = scores.shape
    dev = scores.device
    counts = np.diff(index.pos_start[first: first + n_rows + 1])
    if not counts.any():
        return np.zeros(0, np.int64), counts
    row_np = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    col_np = index.pos_col[index.pos_start[first]: index.pos_start[first + n_rows]]
    row = torch.from_numpy(row_np).to(dev)
    col = torch.from_numpy(col_np).to(dev)
    junk = None
    ja, jb = index.junk_start[first], index.junk_start[first + n_rows]
    if jb > ja:
        jrow = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(index.junk_start[first: first + n_rows + 1]))
        junk = torch.zeros((n_rows, n_gal), dtype=torch.bool, device=dev)
        junk[torch.from_numpy(jrow).to(dev), torch.from_numpy(index.junk_col[ja:jb]).to(dev)] = True
    gallery = torch.arange(n_gal, device=dev)
    chunk = max(1, budget // max(1, n_gal * 12))  # a row of scores (4 bytes) and three boolean masks
    before = torch.empty(len(row_np), dtype=torch.int64, device=dev)
    for a in range(0, len(row_np), chunk):
        r, c = row[a: a + chunk], col[a: a + chunk]
        s = scores[r]                                   # (chunk, gallery)
        own = s.gather(1, c[:, None])                   # each positive's score
        ahead = (s > own) | ((s == own) & (gallery[None, :] < c[:, None]))
        if junk is not None:
            ahead &= ~junk[r]
        before[a: a + chunk] = ahead.sum(1)
    ranks = before.cpu().numpy() + 1
    return ranks[np.lexsort((ranks, row_np))], counts
