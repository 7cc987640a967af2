"""``featcache distill``: train the student from images and cached teacher targets, then write its final weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from featcache.distill.config import DistillConfig
from featcache.distill.train import train
from featcache.runtime import ranks_from_env

logger = logging.getLogger(__name__)


@dataclass
class DistillResult:
    run: Path
    last: dict  # the log row of the last epoch
    val: dict | None = None  # the student on the teacher's held-out identities (RUN/val.json), if it held some out
    finished_before: bool = False  # resumed a run that had finished its epochs: nothing was done
    secondary: bool = False  # a rank other than 0 of a torchrun launch: it prints nothing

    def describe(self, student: str) -> list[str]:
        """Lines for the command line: the last epoch's losses, and the validation if there was one."""
        if self.secondary:
            return []
        if self.finished_before:
            return [f"{self.run}: nothing to do: the run has finished its epochs (give a larger --epochs to extend it)"]
        last = self.last
        lines = [f"{self.run}: {student} after epoch {last.get('epoch')}: loss {float(last.get('loss', 'nan')):.4f}, "
                 f"kd {float(last.get('kd') or 'nan'):.4f}, train acc {float(last.get('acc', 'nan')):.3f}"]
        if self.val and self.val["mAP"] is None:
            lines.append(f"validation: nothing to evaluate ({self.val['reason']})")
        elif self.val:
            a = self.val["agreement"]
            lines.append(f"validation ({self.val['identities']} identities): mAP {self.val['mAP']:.4f}; with the teacher: "
                         f"top-{a['k']} overlap {a['top_k_overlap']:.4f}, rank correlation {a['rank_correlation']:.4f}")
        return lines


def run_distill(cfg: DistillConfig, resume: bool = False) -> DistillResult:
    model, rd, val = train(cfg, resume)
    if ranks_from_env().rank != 0:  # another rank of a torchrun launch: rank 0 writes the run
        return DistillResult(rd.path, {}, None, secondary=True)
    if resume and rd.is_finished():  # finished before, and not extended (an extension removes the final weights)
        rows = rd.log_rows()
        return DistillResult(rd.path, rows[-1] if rows else {}, val, finished_before=True)
    rd.finish(model.state_dict(), note=f"{cfg.student} student distilled from {Path(cfg.gate).resolve()}")
    rows = rd.log_rows()
    return DistillResult(rd.path, rows[-1] if rows else {}, val)
