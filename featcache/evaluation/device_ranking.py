"""The exact rank of every positive, computed where the scores are: on the GPU, with torch.

``ranking.block_ranks`` does this on the CPU with a sort of the few entries that can outrank a positive. On a
GPU the scores of a block stay on the device and this module counts, for each positive of each query, the
entries ranked before it, under the same rule (``metrics`` module doc):

- an entry ranks before a positive when its score is higher, or equal and it comes earlier in the gallery
  (the protocol's tie rule, as a stable sort has it);
- junk entries (the query's identity seen by its own camera) are not counted.

The work is a fixed number of passes over each query's row, whatever its number of positives:

1. each (score, gallery index) becomes one order-preserving int64 key, larger for an entry ranked earlier, so
   the tie rule is a single comparison;
2. the row's positive keys are sorted, and ``torch.searchsorted`` places every entry of the row among them: an
   entry placed after k of them ranks before exactly those k;
3. one ``bincount`` of the placements per row, and a cumulative sum from the top, give each positive the number
   of entries before it. Junk entries get the smallest key first (from the short junk lists), so they rank
   before no positive.

Rows go in chunks within ``budget`` bytes; only the ranks (one int64 per positive) leave the device. The same
code runs on CPU torch, where the tests hold it equal to ``ranking.block_ranks``, ties and junk included.
"""

from __future__ import annotations

import numpy as np
import torch

from featcache.evaluation.ranking import GalleryIndex

#: bytes per score of a chunk at its peak (measured 28.25): the float32 copy, the int64 monotonic bits, the shifted
#: temporary and the int64 keys (the placements reuse the freed temporaries)
BYTES_PER_SCORE = 28
LOWEST = torch.iinfo(torch.int64).min
HIGHEST = torch.iinfo(torch.int64).max


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """(rows, gallery) float32 scores -> int64 keys, larger for an entry ranked earlier: the score's bits made
    monotonic (negative floats' magnitude bits flipped; -0.0 counted as 0.0), then the gallery index reversed in
    the low 32 bits, so that of equal scores the earlier entry has the larger key."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0, as == sees them
    monotonic = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    order = torch.arange(scores.shape[1], device=scores.device, dtype=torch.int64)
    return (monotonic << 32) | ((1 << 32) - 1 - order)


def device_block_ranks(scores: torch.Tensor, first: int, index: GalleryIndex,
                       budget: int = 256 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """``ranking.block_ranks`` for a (rows, gallery) float tensor on any device: (1-based ranks sorted within each
    query and concatenated in query order, the number of positives of each query)."""
    n_rows, n_gal = scores.shape
    counts = np.diff(index.pos_start[first: first + n_rows + 1])
    if not counts.any():
        return np.zeros(0, np.int64), counts
    left = max(budget - scores.numel() * scores.element_size(), budget // 8)  # the block's scores count against it too
    chunk = max(1, left // max(1, n_gal * BYTES_PER_SCORE))
    out = [_chunk_ranks(scores[a: a + chunk], first + a, index) for a in range(0, n_rows, chunk)]
    return np.concatenate(out), counts


def _chunk_ranks(scores: torch.Tensor, first: int, index: GalleryIndex) -> np.ndarray:
    """The ranks of one chunk of rows, each row's sorted ascending, rows in order."""
    n_rows, n_gal = scores.shape
    dev = scores.device
    counts = np.diff(index.pos_start[first: first + n_rows + 1])
    keys = order_keys(scores)
    ja, jb = index.junk_start[first], index.junk_start[first + n_rows]
    if jb > ja:  # junk ranks before no positive: the lowest key, set from the short junk lists
        jrow = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(index.junk_start[first: first + n_rows + 1]))
        keys[torch.from_numpy(jrow).to(dev), torch.from_numpy(index.junk_col[ja:jb]).to(dev)] = LOWEST
    width = int(counts.max()) if n_rows else 0
    row_np = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    slot_np = np.arange(len(row_np), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    col_np = index.pos_col[index.pos_start[first]: index.pos_start[first + n_rows]]
    row, slot, col = (torch.from_numpy(a).to(dev) for a in (row_np, slot_np, col_np))
    positives = torch.full((n_rows, max(width, 1)), HIGHEST, dtype=torch.int64, device=dev)  # padding sorts last
    positives[row, slot] = keys[row, col]
    positives = positives.sort(dim=1).values
    placed = torch.searchsorted(positives, keys)  # per entry: how many of its row's positives it ranks before
    bins = width + 1
    placed += torch.arange(n_rows, device=dev)[:, None] * bins  # one bin range per row, in place
    hist = torch.bincount(placed.reshape(-1), minlength=n_rows * bins).reshape(n_rows, bins)
    before = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # before[r, k]: entries placed after the k-th smallest positive
    # the k-th smallest key is the (count - k)-th best positive; rows ascending by rank = keys descending
    ranks = before[row, (torch.from_numpy(counts).to(dev)[row] - 1 - slot)] + 1
    return ranks.cpu().numpy()
