"""Cross-domain pipelines (the paper's Table 6): two dataset pipelines, then each one's models on the other's data.

A cross-domain file names two pipeline files (``cross-domain: {pipelines: [a.yaml, b.yaml]}``). Both run as
usual (each in its own folder, each stage skipped when unchanged), then the teacher and every student of each
is evaluated on the other's query and gallery (``eval --gallery-cache``), seed by seed. Degradation has one
rule for both directions: the cross-domain mAP minus the same model's in-domain mAP on the *target* dataset
(mAP points). The paper mixes two rules (against the source once, the target once); featcache does not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from featcache.config import StageConfig, read_sections
from featcache.errors import ConfigError
from featcache.fileio import atomic_write
from featcache.pipeline.config import Pipeline, load_pipeline
from featcache.pipeline.runner import PipelineResult, Stage, execute
from featcache.pipeline.stages import Plan, build_stages
from featcache.pipeline.recipes import RECIPE_NOTE, recipe_label, recipe_of
from featcache.registry import nearest

SECTION = "cross-domain"


@dataclasses.dataclass(frozen=True)
class CrossConfig(StageConfig):
    """``cross-domain:``: the two pipelines whose models trade datasets, and where the Table 6 report goes."""

    command = SECTION

    pipelines: tuple[str, ...]
    out: Path = Path("outputs/cross-domain")

    def __post_init__(self) -> None:
        if len(self.pipelines) != 2:
            raise ConfigError(f"{SECTION}.pipelines: expected two pipeline files, got {list(self.pipelines)}")


@dataclasses.dataclass
class CrossPipeline:
    """What ``execute`` needs of a pipeline: its source, output folder and resolved form."""

    source: Path
    cfg: CrossConfig
    parts: list[Pipeline]

    @property
    def out(self) -> Path:
        return self.cfg.out

    def resolved(self) -> dict[str, Any]:
        return {SECTION: self.cfg.to_dict(absolute=True), "pipelines": [p.resolved() for p in self.parts]}


def is_cross(path: Path) -> bool:
    return SECTION in read_sections(path, str(path), "the pipeline file", "sections to mappings of keys")


def load_cross(path: Path, out: Path | None = None, check_paths: bool = True) -> CrossPipeline:
    path = Path(path)
    sections = read_sections(path, str(path), "the pipeline file", "sections to mappings of keys")
    extra = sorted(set(sections) - {SECTION})
    if extra:
        raise ConfigError(f"{path}: unknown section {extra[0]!r}{nearest(extra[0], [SECTION])}; a cross-domain file has "
                          f"only {SECTION}: (the two pipelines carry the stage sections)")
    values = dict(sections[SECTION])
    if out is not None:
        values["out"] = str(out)
    cfg = CrossConfig.build((f"{path} [{SECTION}]", values))
    parts = [load_pipeline((path.parent / p) if not Path(p).is_absolute() else Path(p), check_paths=check_paths)
             for p in cfg.pipelines]
    return CrossPipeline(path, cfg, parts)


def run_cross(cross: CrossPipeline) -> list[PipelineResult]:
    """Both pipelines, then the cross evaluations and the Table 6 report."""
    plans: list[Plan] = []
    results = []
    for part in cross.parts:
        stages, plan = build_stages(part)
        results.append(execute(part, stages))
        plans.append(plan)
    stages = []
    pairs = [(plans[0], plans[1]), (plans[1], plans[0])]
    out_rows: list[dict] = []
    for src, tgt in pairs:
        for row in [r for r in src.rows if r.group in ("teacher", "student")]:
            tgt_row = next((r for r in tgt.rows if r.label == row.label), None)
            if tgt_row is None:
                raise ConfigError(f"{cross.source}: {row.label!r} of {src.pipeline.source} has no row of the same name in "
                                  f"{tgt.pipeline.source} (give both pipelines the same fusions, teacher and students)")
            for seed in sorted(row.spec):
                stages.append(_cross_eval(cross, src, tgt, row, tgt_row, seed, out_rows))
    stages.append(_table6(cross, out_rows))
    results.append(execute(cross, stages))
    return results


def _dataset(plan: Plan) -> str:
    return plan.pipeline.stage_config("extract", out=Path("c.h5"), **({"root": Path("d")} if "synth" in plan.pipeline.sections else {})).dataset


def _cross_eval(cross: CrossPipeline, src: Plan, tgt: Plan, row, tgt_row, seed: int, out_rows: list[dict]) -> Stage:
    from featcache.evaluation.runner import EvalConfig, run_eval
    from featcache.pipeline.stages import _model_digest, _safe

    name = f"{_dataset(src)} -> {_dataset(tgt)}"
    path = cross.out / "eval" / f"{_safe(name)}-{_safe(row.label)}-seed{seed}.json"
    cfg = EvalConfig(cache=src.cache, gallery_cache=tgt.cache, model=row.spec[seed], json_out=path)
    out_rows.append({"direction": name, "model": row.label, "seed": seed, "cross": path, "in_domain": tgt_row.json[seed], "row": row})

    def key() -> dict:
        return {"config": cfg.to_dict(absolute=True), "model": _model_digest(row.spec[seed])}

    return Stage(f"eval {name}: {row.label} seed {seed}", key, lambda: [path], lambda: run_eval(cfg))


def _table6(cross: CrossPipeline, out_rows: list[dict]) -> Stage:
    md = cross.out / "report" / "index.md"

    def key() -> dict:
        return {"inputs": {str(r[k]): Path(r[k]).read_text() for r in out_rows for k in ("cross", "in_domain")}}

    def run() -> None:
        lines = ["# featcache report: cross-domain (the paper's Table 6)", "",
                 "Degradation: the cross-domain mAP minus the same model's in-domain mAP on the target dataset "
                 "(mAP points; one rule for both directions). Mean ± std over seeds where more than one.", "",
                 "| train → test | model | recipe | mAP | R1 | R5 | in-domain mAP on the target | degradation |", "|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in out_rows:
            groups.setdefault((r["direction"], r["model"]), []).append(r)
        random = set()
        for (direction, model), rs in groups.items():
            cross_reps = [json.loads(Path(r["cross"]).read_text()) for r in rs]
            home = [json.loads(Path(r["in_domain"]).read_text())["mAP"] for r in rs]
            random |= {b for rep in cross_reps for b in rep.get("random_init_backbones", [])}
            m = [rep["mAP"] for rep in cross_reps]
            cols = [_ms(m), _ms([rep["cmc"]["1"] for rep in cross_reps]), _ms([rep["cmc"]["5"] for rep in cross_reps]),
                    _ms(home), _ms(list(np.subtract(m, home)), signed=True)]
            lines.append(f"| {direction.replace(' -> ', ' → ')} | {model} | {recipe_label(recipe_of(rs[0]['row']))} | " + " | ".join(cols) + " |")
        lines += ["", RECIPE_NOTE]
        if random:
            lines[1:1] = ["", f"> **{', '.join(sorted(random))} have random weights.** These numbers measure the pipeline, "
                              "not the method.", ""]
        md.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(md, lambda p: p.write_text("\n".join(lines) + "\n"))
        from featcache.pipeline.page import to_html

        atomic_write(md.with_suffix(".html"), lambda p: p.write_text(to_html("\n".join(lines), "featcache: cross-domain")))

    return Stage("report (Table 6)", key, lambda: [md, md.with_suffix(".html")], run)


def _ms(values: list[float], signed: bool = False) -> str:
    v = np.asarray(values, dtype=float) * 100
    head = f"{v.mean():+.2f}" if signed else f"{v.mean():.2f}"
    return head if len(v) == 1 else f"{head} ± {v.std(ddof=1):.2f}"
