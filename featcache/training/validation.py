"""A validation split carved from the training identities, evaluated under the test protocol.

Every value that departs from the paper is chosen on this split, never on the test split. The held-out
identities are a fixed choice (seed 0 over the sorted training identities), the same for every training seed
and every stage, so that a gate and a student tuned on it hold out the same people. Within them, the first
image of each identity in each camera is a query and every other image is in the gallery: a query's true
matches are that identity's images from other cameras, as in Market-1501 and VeRi-776.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import InputError

VAL_SEED = 0


def val_identities(pids: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` training identities held out for validation (sorted); none when ``n`` is 0."""
    unique = np.unique(pids)
    if n < 0:
        raise InputError(f"val_ids {n}: expected 0 or more held-out identities")
    if n and n > len(unique) - 2:
        raise InputError(f"val_ids {n}: the training split has {len(unique)} identities; at most {len(unique) - 2} can be "
                         "held out for validation")
    return np.sort(np.random.default_rng(VAL_SEED).choice(unique, n, replace=False)) if n else unique[:0]


def val_queries(pids: np.ndarray, camids: np.ndarray) -> np.ndarray:
    """Mask of the validation queries: the first image (in cache order) of each identity in each camera."""
    key = pids.astype(np.int64) * (int(camids.max()) + 1) + camids.astype(np.int64)
    _, first = np.unique(key, return_index=True)
    mask = np.zeros(len(pids), dtype=bool)
    mask[first] = True
    return mask
