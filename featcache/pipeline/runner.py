"""``featcache run``: the stages of a pipeline, each skipped when its inputs and config are unchanged.

A stage's key is the SHA-256 of its resolved config, the identities of its
inputs (the dataset listing, the cache's identity digest, the digest of the
weights it reads) and the featcache version: never timestamps. After a stage
succeeds its key is recorded in ``OUT/.stages/``; the next run skips a stage
whose key and outputs are unchanged, and says why it runs one. Trained runs
live in folders named with their key, so an edited option trains anew beside
the old run (nothing is lost), and a run killed half-way resumes from its
last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click
import yaml

from featcache import __version__
from featcache.errors import RunError
from featcache.fileio import atomic_write
from featcache.pipeline.config import Pipeline

if TYPE_CHECKING:
    from featcache.extract.distributed import Group, Ranks

logger = logging.getLogger(__name__)

STAGES_DIR = ".stages"


@dataclass
class Stage:
    """One step: its name, what decides its key (computed when its turn comes), its outputs and its work."""

    name: str
    key: Callable[[], dict[str, Any]]
    outputs: Callable[[], list[Path]]
    run: Callable[[], None]
    sharded: bool = False  # under torchrun every rank runs it (extraction); other stages run on rank 0
    reuse: Callable[[], None] | None = None  # what a skipped stage's outputs need before later stages read them
    note: Callable[[], str] | None = None  # a word on what the run did, after its "done" line


@dataclass
class StageLog:
    name: str
    status: str       # ran or skipped
    reason: str
    seconds: float


@dataclass
class PipelineResult:
    out: Path
    stages: list[StageLog] = field(default_factory=list)

    @property
    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "ran"]


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def portable(data: Any, out: Path) -> Any:
    """``data`` as plain JSON values with the output folder written ``$OUT``: keys survive moving the folder."""
    text = json.dumps(data, sort_keys=True, default=str)
    return json.loads(text.replace(json.dumps(str(Path(out).absolute()))[1:-1], "$OUT"))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def changes(old: Any, new: Any, prefix: str = "") -> str:
    """What differs between a stage's recorded inputs and today's, as dotted names (e.g. ``config.lambda_kd``)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return prefix or "its inputs (no record of them)"
    diff = []
    for k in sorted(set(old) | set(new), key=str):
        if old.get(k) != new.get(k):
            name = f"{prefix}.{k}" if prefix else str(k)
            sub = changes(old.get(k), new.get(k), name) if isinstance(old.get(k), dict) and isinstance(new.get(k), dict) else name
            diff.append(sub)
    return ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "") if diff else "nothing recorded differs"


def execute(pipeline: Pipeline, stages: list[Stage], echo: Callable[[str], None] = click.echo) -> PipelineResult:
    """Run ``stages`` in order, skipping those whose key and outputs are unchanged.

    Under torchrun, every rank runs the sharded stages (extraction) together; rank 0 alone runs the others
    and decides what to skip, and the other ranks wait for it between stages, then stop after the last
    sharded stage."""
    from featcache.extract.distributed import Group, ranks_from_env

    ranks = ranks_from_env()
    if not ranks.distributed:
        return _execute(pipeline, stages, echo, None, ranks)
    with Group(ranks) as group:
        return _execute(pipeline, stages, echo, group, ranks)


def _execute(pipeline: Pipeline, stages: list[Stage], echo: Callable[[str], None], group: "Group | None", ranks: "Ranks") -> PipelineResult:
    out = pipeline.out
    records = out / STAGES_DIR
    lead = ranks.rank == 0
    together = max((i for i, s in enumerate(stages) if s.sharded), default=-1) if group else -1
    if lead:
        records.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "pipeline.yaml", lambda p: p.write_text(yaml.safe_dump(pipeline.resolved(), sort_keys=False)))
    else:
        echo = lambda text: None  # noqa: E731  (rank 0 reports)
    result = PipelineResult(out)
    for i, stage in enumerate(stages, 1):
        if not lead and i - 1 > together:
            click.echo(f"rank {ranks.rank}: the sharded stages are done; rank 0 runs the rest")
            break
        shared = group is not None and i - 1 <= together
        inputs = portable({"featcache": __version__, **stage.key()}, out)  # every rank: keys set the plan's state
        key = digest({"stage": stage.name, **inputs})
        rec_path = records / f"{_slug(stage.name)}.json"
        decision = None
        if lead:
            rec = json.loads(rec_path.read_text()) if rec_path.is_file() else None
            missing = [p for p in stage.outputs() if not p.exists()]
            if rec is not None and rec.get("key") == key and not missing:
                decision = ("skipped", "unchanged: same config, inputs and featcache version")
            else:
                decision = ("ran", "first run" if rec is None else f"changed: {changes(rec.get('inputs'), inputs)}"
                            if rec.get("key") != key else f"outputs missing ({missing[0]})")
        if shared:
            decision = group.share(decision)
        status, reason = decision
        if status == "skipped":
            echo(f"[{i}/{len(stages)}] {stage.name}: skipped ({reason})")
            result.stages.append(StageLog(stage.name, "skipped", reason, 0.0))
            if lead and stage.reuse is not None:
                stage.reuse()
            continue
        echo(f"[{i}/{len(stages)}] {stage.name}: running ({reason}) ...")
        t0 = time.perf_counter()
        if lead or stage.sharded:
            stage.run()
        seconds = time.perf_counter() - t0
        if lead:
            atomic_write(rec_path, lambda p: p.write_text(json.dumps({"stage": stage.name, "key": key, "inputs": inputs, "seconds": seconds,
                                                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1)))
        if shared and not group.all_true(True):  # the others wait here for rank 0's stage
            raise RunError(f"stage {stage.name} did not finish on every rank")
        note = stage.note() if stage.note is not None else ""
        echo(f"[{i}/{len(stages)}] {stage.name}: done in {seconds:.1f} s" + (f"; {note}" if note else ""))
        result.stages.append(StageLog(stage.name, "ran", reason, seconds))
    return result
