"""Reading a finished distillation run back: the student in eval mode, its config and what it was trained from."""

from __future__ import annotations

from pathlib import Path

from featcache.distill.students import Student, build_student
from featcache.training.rundir import RunDir

COMMAND = "distill"


def load_student(run: Path, device: str = "cpu") -> tuple[Student, dict, dict]:
    """A finished run: (student in eval mode on ``device``, its saved config, its metadata).

    The config's ``student`` names the architecture; the metadata holds ``n_classes``, ``pids``, ``image_size`` ([H, W], the cache's input size) and
    ``cache_identity``; an unfinished run is refused (``RunDir.open``).
    """
    rd, cfg, meta, weights = RunDir.open(Path(run), COMMAND)
    model = build_student(cfg["student"], int(meta["n_classes"]), "random")
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, meta
