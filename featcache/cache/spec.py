"""The contract between a backbone and the cache: one stored array per output, its shape, dtype and meaning."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OutputSpec:
    """One cached array per image view: its per-item shape, stored dtype and what it is."""

    shape: tuple[int, ...]
    dtype: str
    doc: str
    token: bool = False  # token features: stored only for the token views (see --tokens)
