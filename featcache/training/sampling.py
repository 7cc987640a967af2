"""PK sampling: batches of P identities with K images each, the batches the triplet loss needs."""

from __future__ import annotations

import numpy as np


def pk_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of PK batches (torchreid's RandomIdentitySampler): P identities x K images each.

    Each identity's images are shuffled and cut into groups of K (sampling
    with replacement when it has fewer); batches draw P identities that still
    have a group, until fewer than P remain.
    """
    groups: dict[int, list[np.ndarray]] = {}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = rng.choice(idx, size=k, replace=True) if len(idx) < k else rng.permutation(idx)
        groups[int(c)] = [idx[i: i + k] for i in range(0, len(idx) - len(idx) % k, k)]
    batches = []
    avail = [c for c in groups if groups[c]]
    while len(avail) >= p:
        chosen = rng.choice(avail, size=p, replace=False)
        batches.append(np.concatenate([groups[int(c)].pop() for c in chosen]))
        avail = [c for c in avail if groups[c]]
    return batches


def steps_per_epoch(labels: np.ndarray, p: int, k: int) -> int:
    """Batches in an epoch as the schedule counts them: seed 0's. Another seed's epoch can hold a batch or two
    more or fewer (identities run out of groups in another order); the schedule stops at its end."""
    return len(pk_batches(labels, p, k, np.random.default_rng(0)))
