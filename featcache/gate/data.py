"""Training data from the cache alone: every cached view's pooled feature of each expert, in memory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.cache import CacheIdentity, EmptySplit, CacheReader, known_route, training_coverage
from featcache.errors import InputError
from featcache.training.validation import val_identities, val_queries

logger = logging.getLogger(__name__)


@dataclass
class TrainData:
    experts: list[str]
    families: list[str]
    weights: list[str]
    feats: list[np.ndarray]   # per expert: (rows, d) float32, every cached view of every training image
    row_start: np.ndarray     # per image: first row
    n_views: np.ndarray       # per image
    labels: np.ndarray        # per image: 0..C-1
    pids: np.ndarray          # label -> dataset pid
    camids: np.ndarray        # per image
    images: np.ndarray        # per image: row in the cache's images/
    identity: CacheIdentity
    route: np.ndarray | None = None  # per row: the expert known to be reliable (synthetic caches), for moe-oracle
    val: "ValData | None" = None     # the identities held out for validation (--set val_ids=N)
    partial: dict | None = None      # trained on part of an unfinished cache (--allow-partial): cache.training_coverage

    @property
    def dims(self) -> list[int]:
        return [f.shape[1] for f in self.feats]

    def batch(self, images: np.ndarray, views: np.ndarray) -> list[np.ndarray]:
        rows = self.row_start[images] + views
        return [f[rows] for f in self.feats]


@dataclass
class ValData:
    """The held-out identities' images (featcache.training.validation): view 0 of each, per expert."""

    feats: list[np.ndarray]   # per expert: (images, d) float32
    pids: np.ndarray
    camids: np.ndarray
    query: np.ndarray         # mask: the validation queries
    route: np.ndarray | None  # per image: the known reliable expert (synthetic caches)
    images: np.ndarray        # per image: its row in the cache's images/ (distillation embeds the same images)


def load_train(cache: Path, experts: list[str], val_ids: int = 0, allow_partial: bool = False,
               oracle: dict[str, str] | None = None) -> TrainData:
    """The training split's views, less the ``val_ids`` identities held out for validation (in ``val``); a cache whose
    extraction has not finished is refused unless ``allow_partial`` (then ``partial`` records what was used)."""
    with CacheReader(cache) as c:  # one open: the split, its coverage and its features read through it
        try:
            split = c.split("train")
        except EmptySplit:
            raise InputError(f"{cache} holds no cached training images: train-gate needs the training split") from None
        ident = split.identity
        partial = training_coverage(c, allow_partial, "train", split)
        missing = [e for e in experts if e not in ident.backbones]
        if missing:
            raise InputError(f"{cache} lacks the expert(s) {missing}; it holds: {', '.join(ident.backbones)}")
        families = [ident.backbones[e]["family"] for e in experts]
        weights = [ident.weights(e) for e in experts]
        held = np.isin(split.pids, val_identities(split.pids, val_ids))
        val = None
        if held.any():
            vrows = split.view_start[held]
            val = ValData([c.read(e, "pooled", vrows).astype(np.float32) for e in experts], split.pids[held],
                          split.camids[held], val_queries(split.pids[held], split.camids[held]), known_route(c, vrows, experts, oracle),
                          split.images[held])
            split = split.subset(~held)
        rows = np.concatenate([np.arange(s, s + n) for s, n in zip(split.view_start, split.n_views)])
        feats = [c.read(e, "pooled", rows).astype(np.float32) for e in experts]
        route = known_route(c, rows, experts, oracle)
    local_start = np.concatenate([[0], np.cumsum(split.n_views)[:-1]]).astype(np.int64)
    pids, labels = np.unique(split.pids, return_inverse=True)
    logger.info("training data: %d images, %d views, %d identities; experts %s (%s)", len(split.images), len(rows), len(pids),
                experts, ", ".join(f"{e} {f.shape[1]}-d" for e, f in zip(experts, feats)))
    if val is not None:
        logger.info("validation: %d identities held out (%d images, %d queries)", len(np.unique(val.pids)), len(val.pids),
                    int(val.query.sum()))
    return TrainData(experts, families, weights, feats, local_start, split.n_views.astype(np.int64), labels.astype(np.int64),
                     pids, split.camids, split.images, ident, route, val, partial)
