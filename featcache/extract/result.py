"""What an extraction run did: the cache, the images it processed and how fast, and what the cache holds now."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    cache: Path
    processed: int
    seconds: float
    summary: dict[str, Any]
    bytes_out: int = 0       # stored outputs copied off the device, counted at the copy calls
    check_bytes: int = 0     # value-check codes copied off the device
    stored_bytes: int = 0    # what the cache's arrays hold for the images processed (decoded ones)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def describe(self, rank: str | None = None, cache: Path | None = None) -> str:
        """One line for the command line: what the cache holds now, and this run's work (``cache``: the path to
        name, when it is not the file this run wrote, a rank's shard)."""
        s = self.summary
        return ((f"rank {rank}: " if rank is not None else "") + f"{cache or self.cache}: cached train {s['splits']['train']}, "
                f"query {s['splits']['query']}, gallery {s['splits']['gallery']}; failed {len(s['failed'])}; "
                f"{self.processed} images this run at {self.images_per_second:.1f} img/s")

    def log(self) -> None:
        """The run's summary in the log, with the failed images (the first 50)."""
        s = self.summary
        logger.info(
            "extracted %d images in %.1f s (%.1f img/s); cached per split: %s; failed: %d; pending: %d",
            self.processed, self.seconds, self.images_per_second, s["splits"], len(s["failed"]), s["pending"],
        )
        for rec in s["failed"][:50]:
            logger.warning("failed: %s (%s)", rec["path"], rec["reason"])
        if len(s["failed"]) > 50:
            logger.warning("... and %d more failures (featcache info %s)", len(s["failed"]) - 50, self.cache)
