"""``featcache distill``: train the student from images and cached teacher targets, then write its final weights."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from featcache.distill.config import DistillConfig
from featcache.distill.train import train
from featcache.training.rundir import LOG

logger = logging.getLogger(__name__)


@dataclass
class DistillResult:
    run: Path
    last: dict  # the log row of the last epoch
    val: dict | None = None  # the student on the teacher's held-out identities (RUN/val.json), if it held some out


def run_distill(cfg: DistillConfig, resume: bool = False) -> DistillResult:
    model, rd, val = train(cfg, resume)
    rd.finish(model.state_dict(), note=f"{cfg.student} student distilled from {Path(cfg.gate).resolve()}")
    with (rd.path / LOG).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return DistillResult(rd.path, rows[-1] if rows else {}, val)
