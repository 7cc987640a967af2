"""The stages of a pipeline, in order: synth, extract, train-gate per fusion and seed, distill per seed, eval per
model, profile, report. Each stage's key, outputs and work; paths carry a short key, so an edit trains anew."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from featcache.cache import cache_identity
from featcache.cache.digests import content_digest, file_digests, items_digest
from featcache.cache.store import follow_moved_data
from featcache.datasets import load_listing
from featcache.distill.data import file_digest
from featcache.fileio import atomic_write
from featcache.pipeline.config import Pipeline
from featcache.pipeline.runner import Stage, digest, portable
from featcache.standins.config import META_FILE

logger = logging.getLogger(__name__)

CMC_RANKS = tuple(range(1, 21))
#: extract keys that do not change what the cache holds (left out of its key)
EXTRACT_HOW = ("out", "batch_size", "workers", "device", "overwrite", "repair")
#: what a fusion's row is, for readers of the report (train-gate --fusion)
FUSION_NOTES = {"clip": "CLIP expert, adapted", "align": "ALIGN expert, adapted", "concat": "adapted experts, concatenated + FC",
                "average": "adapted experts, averaged"}


@dataclass
class Row:
    """A model of the report: its label, group, and per seed the eval JSON (and run directory)."""

    label: str
    group: str                     # expert, fusion, teacher, student
    key: str = ""                  # its stable name in report/summary.json (expert:PRESET, fusion:NAME, teacher, student:kd)
    spec: dict[int, str] = field(default_factory=dict)     # seed -> KIND:REF
    json: dict[int, Path] = field(default_factory=dict)    # seed -> eval report
    run: dict[int, Path] = field(default_factory=dict)     # seed -> run directory (gate, student)


@dataclass
class Plan:
    """What the stages computed so far (paths that depend on earlier outputs), shared by the stages after them."""

    pipeline: Pipeline
    out: Path
    root: Path | None = None
    cache: Path | None = None
    cache_id: str = ""
    cache_key: str = ""
    standins: dict[str, Path] = field(default_factory=dict)  # stand-in preset -> its trained weights
    gates: dict[tuple[str, int], Path] = field(default_factory=dict)
    students: dict[tuple[str, int], Path] = field(default_factory=dict)  # (student name, seed) -> run
    rows: list[Row] = field(default_factory=list)
    profile: Path | None = None


def build_stages(pipeline: Pipeline) -> tuple[list[Stage], Plan]:
    s = pipeline.settings
    plan = Plan(pipeline, Path(s.out).absolute())
    stages: list[Stage] = []
    if "synth" in pipeline.sections:
        stages.append(_synth(plan))
    else:
        plan.root = Path(pipeline.sections["extract"]["root"]).absolute()
    backbones = list(pipeline.stage_config("extract", **_extract_managed(plan)).backbones)
    standins = standin_backbones(pipeline)
    if standins:
        stages.append(_standins(plan, standins))
    stages.append(_extract(plan))
    if s.experts_alone:
        plan.rows += [Row(s.labels.get(b, f"{b} alone"), "expert", f"expert:{b}", {0: f"backbone:{b}"}) for b in backbones]
    if s.concat and len(backbones) > 1:
        plan.rows.append(Row("raw concatenation", "fusion", "fusion:raw-concat", {0: "concat:" + ",".join(backbones)}))
    for fusion in s.fusions:
        what = "the teacher" if fusion == s.teacher and s.distill else FUSION_NOTES.get(fusion, "")
        label = s.labels.get(fusion, fusion + (f" ({what})" if what else ""))
        teacher = fusion == s.teacher
        row = Row(label, "teacher" if teacher else "fusion", "teacher" if teacher else f"fusion:{fusion}")
        for seed in s.seeds:
            stages.append(_gate(plan, fusion, seed, row))
        plan.rows.append(row)
    if s.distill:
        for name in student_names(pipeline):
            cfg = pipeline.student_config(name, **_distill_managed())
            label = name if s.students else f"student ({cfg.student}, distilled)"
            kind = "student:kd" if set(cfg.losses) - {"id", "tri"} else "student:task"  # with a teacher's loss, or without
            taken = sum(r.key == kind or r.key.startswith(kind + ":") for r in plan.rows)
            row = Row(label, "student", kind + (f":{taken + 1}" if taken else ""))
            for seed in s.seeds:
                stages.append(_distill(plan, name, seed, row))
            plan.rows.append(row)
    for row in plan.rows:
        for seed in (row.spec or {seed: None for seed in s.seeds}):
            stages.append(_eval(plan, row, seed))
    if s.profile:
        stages.append(_profile(plan))
    stages.append(_report(plan))
    return stages, plan


# ---------------------------------------------------------------------------------------------- data
def _synth(plan: Plan) -> Stage:
    from featcache.synth import generate

    plan.root = plan.out / "data"
    cfg = plan.pipeline.stage_config("synth", out=plan.root)

    def run() -> None:
        if plan.root.exists():  # the pipeline's own folder, from an earlier config: generated anew
            shutil.rmtree(plan.root)
        generate(cfg)

    return Stage("synth", lambda: {"config": unkeyed_defaults(cfg.to_dict(absolute=True))}, lambda: [plan.root], run)


def standin_backbones(pipeline: Pipeline) -> tuple[str, ...]:
    """The extract section's stand-in presets whose weights the section does not give: the pipeline trains them."""
    from featcache.backbones.presets import get_preset

    cfg = pipeline.stage_config("extract", **{"out": Path("cache.h5"), "root": Path("data")})  # parsed: lists or "a,b"
    return tuple(n for n in cfg.backbones if get_preset(n).standin and n not in cfg.weights)


def weights_identity(path: str) -> Any:
    """What a --weights path is, for a stage key: a file's size; a folder's files and sizes, and the content of its
    ``standin.json`` (a stand-in trained again with --force is another input, though its path is the same)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        files = sorted((f.name, f.stat().st_size) for f in p.iterdir() if f.is_file())
        meta = p / META_FILE
        return {"files": files, "standin": file_digest(meta) if meta.is_file() else None}
    return None


def _standins(plan: Plan, names: tuple[str, ...]) -> Stage:
    """Pre-train the stand-in experts, once per machine (their weights live in the user's cache, keyed by recipe),
    or take the ones shipped with featcache for the default recipe."""
    from featcache.standins.runner import run_pretrain_standins, shipped_of, standin_paths

    cfg = plan.pipeline.stage_config("pretrain-standins", presets=names)  # at the extract section's size

    def key() -> dict:
        plan.standins = standin_paths(cfg)  # each folder is named by its stand-in's key
        return {name: path.name for name, path in plan.standins.items()}

    def outputs() -> list[Path]:
        return [p / META_FILE for p in plan.standins.values()]

    def note() -> str:
        shipped = shipped_of(plan.standins)
        return f"the stand-ins shipped with featcache were used ({', '.join(shipped)}): nothing trained" if shipped else ""

    return Stage("pretrain-standins", key, outputs, lambda: plan.standins.update(run_pretrain_standins(cfg)), note=note)


def _extract_managed(plan: Plan) -> dict[str, Any]:
    managed: dict[str, Any] = {"out": plan.out / "cache.h5"}
    if "synth" in plan.pipeline.sections:
        managed["root"] = plan.out / "data"
    if plan.standins:
        section = plan.pipeline.sections.get("extract", {}).get("weights", {})
        from featcache.extract.config import parse_weights

        managed["weights"] = {**parse_weights(section), **{k: str(v) for k, v in plan.standins.items()}}
    return managed


#: config fields added after stages were first keyed: left out of a key while at their default, so that adding them
#: does not make finished stages run again
LATER_FIELDS = {"allow_partial": False, "oracle_route": (), "train_ids": 0, "test_ids": 0, "tensorboard": None}


def unkeyed_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the later fields that hold their default."""
    def default(k: str, v: Any) -> bool:
        d = LATER_FIELDS.get(k, object())
        return v == d or (isinstance(d, tuple) and v == list(d))
    return {k: v for k, v in config.items() if not default(k, v)}


def _extract(plan: Plan) -> Stage:
    from featcache.extract.runner import run_extract

    state: dict[str, Any] = {}

    def key() -> dict:
        base = plan.pipeline.stage_config("extract", **_extract_managed(plan))
        files = load_listing(base.dataset, base.root, strict=not base.skip_bad_names)
        # the data by what it is (names, labels and the files' bytes), not where it lies: a moved dataset keeps
        # its cache (featcache.cache.identity)
        state["digests"] = file_digests(files)  # hashed once: the extraction, if it runs, reuses them
        listing = {"items": items_digest(files), "contents": content_digest(files, state["digests"])}
        # what the cache's content depends on; not how it is computed (batch size, workers, device) or what to do
        # with an existing file (overwrite, repair: `featcache extract` does those)
        content = {k: v for k, v in base.to_dict(absolute=True).items() if k not in EXTRACT_HOW and k != "root"}
        content["weights"] = {k: [v, weights_identity(v)] for k, v in base.weights.items()}
        plan.cache_key = digest(portable({"content": content, "listing": listing}, plan.out))[:8]
        state["cfg"] = base.replace(out=plan.out / f"cache-{plan.cache_key}.h5")
        plan.cache = state["cfg"].out
        state["root"] = files.root
        return {"content": content, "listing": listing}  # computing a key changes no file

    def run() -> None:
        run_extract(state["cfg"], state["digests"])

    def outputs() -> list[Path]:
        from featcache.cache.shards import shard_status

        # a sharded cache (torchrun) is its master and every shard: a lost shard makes the stage run again
        return [plan.cache] + ([p for p, _ in shard_status(plan.cache)] if plan.cache.is_file() else [])

    def reuse() -> None:  # the same data found elsewhere: the skipped stage's cache points at its new place
        follow_moved_data(plan.cache, state["root"])

    return Stage("extract", key, outputs, run, sharded=True, reuse=reuse)


def _cache_id(plan: Plan) -> str:
    return cache_identity(plan.cache).digest()


# ---------------------------------------------------------------------------------------------- training
def _trained(plan: Plan, name: str, folder: str, row: Row, seed: int, kind: str,
             build: Callable[[], tuple[Any, dict]], register: Callable[[Path], None], train: Callable[..., Any],
             sharded: bool = False) -> Stage:
    """A stage that trains a run: ``build()`` gives its config and key; the run's folder is ``folder`` plus a short
    key (an edit trains a new run beside the old one), and a run a kill left behind is resumed. ``sharded``: under
    torchrun every rank trains it together (distillation's data-parallel training)."""
    state: dict[str, Any] = {}

    def key() -> dict:
        cfg, k = build()
        out = Path(f"{folder}-{digest(portable(k, plan.out))[:8]}")
        state["cfg"] = cfg.replace(out=out)
        register(out)
        row.run[seed] = out
        row.spec[seed] = f"{kind}:{out}"
        return k

    def run() -> None:
        cfg = state["cfg"]
        train(cfg, resume=_run_dir(cfg.out).is_started())

    return Stage(name, key, lambda: [_run_dir(state["cfg"].out).weights_file], run, sharded=sharded)


def _run_dir(path: Path | str):
    """A trained stage's run folder (imported here: torch only where a run is touched)."""
    from featcache.training.rundir import RunDir

    return RunDir(Path(path))


def _gate(plan: Plan, fusion: str, seed: int, row: Row) -> Stage:
    from featcache.gate.runner import run_train_gate

    def build() -> tuple[Any, dict]:
        cfg = plan.pipeline.stage_config("train-gate", cache=plan.cache, out=Path("gate"), fusion=fusion, seed=seed)
        from featcache.cache.fileformat import TARGETS_VERSION  # a gate whose targets predate this version trains again

        config = {k: v for k, v in cfg.to_dict(absolute=True).items() if k != "out"}
        config.update(config.pop("routing"))  # keyed flat, as before the routing was a map: old runs are found
        return cfg, {"config": unkeyed_defaults(config), "cache": _cache_id(plan), "targets_version": TARGETS_VERSION}

    return _trained(plan, f"train-gate {fusion} seed {seed}", str(plan.out / "gate" / f"{fusion}-seed{seed}"), row, seed,
                    "gate", build, lambda out: plan.gates.__setitem__((fusion, seed), out), run_train_gate)


def _distill_managed() -> dict[str, Any]:
    return {"cache": Path("cache.h5"), "gate": Path("gate"), "out": Path("student"), "seed": 0}


def student_names(pipeline: Pipeline) -> list[str]:
    """The students to train: those listed in pipeline.students, or one (named "student")."""
    return list(pipeline.settings.students) or ["student"]


def teacher_of(pipeline: Pipeline, name: str) -> str:
    return pipeline.settings.students.get(name, {}).get("teacher", pipeline.settings.teacher)


def _distill(plan: Plan, name: str, seed: int, row: Row) -> Stage:
    from featcache.distill.runner import run_distill

    def build() -> tuple[Any, dict]:
        gate = plan.gates[(teacher_of(plan.pipeline, name), seed)]
        cfg = plan.pipeline.student_config(name, cache=plan.cache, gate=gate, out=Path("student"), seed=seed)
        if cfg.pixel_cache is not None and not cfg.pixel_cache.is_absolute():  # one per cache: an edited extract makes its own
            px = cfg.pixel_cache
            cfg = cfg.replace(pixel_cache=plan.out / px.with_name(f"{px.stem}-{plan.cache_key}{px.suffix}"))
        # precision auto and no --allow-partial are how every student before the fields trained: keys stay as they were
        config = {k: v for k, v in cfg.to_dict(absolute=True).items()
                  if k not in ("out", "gate", "tensorboard") and not (k == "precision" and v == "auto") and not (k == "allow_partial" and not v)}
        return cfg, {"config": config, "cache": _cache_id(plan), "teacher": file_digest(_run_dir(gate).weights_file)}

    stage = f"distill {name} seed {seed}" if plan.pipeline.settings.students else f"distill seed {seed}"
    return _trained(plan, stage, str(plan.out / "student" / f"{_safe(name)}-seed{seed}"), row, seed, "student", build,
                    lambda out: plan.students.__setitem__((name, seed), out), run_distill, sharded=True)


# ---------------------------------------------------------------------------------------------- measuring
def _model_digest(spec: str) -> str:
    kind, _, ref = spec.partition(":")
    if kind in ("gate", "student"):
        return file_digest(_run_dir(ref).weights_file)
    return ""


def _eval(plan: Plan, row: Row, seed: int) -> Stage:
    from featcache.evaluation.runner import run_eval

    s = plan.pipeline.settings
    state: dict[str, Any] = {}
    label = row.label.split(" (")[0]

    def key() -> dict:
        spec = row.spec[seed]
        agree = f"gate:{plan.gates[(s.teacher, seed)]}" if row.group == "student" else None  # agreement with the main teacher
        first = seed in (s.seeds[0], 0)
        plots = plan.out / "report" / "ranked" / _safe(label) if s.ranked_lists and first and row.group in ("teacher", "student") else None
        path = plan.out / "eval" / f"{_safe(label)}-seed{seed}.json"
        cfg = plan.pipeline.stage_config("eval", cache=plan.cache, model=spec, json_out=path, plots=plots, agree_with=agree,
                                         ranks=CMC_RANKS)
        row.json[seed] = path
        state["cfg"] = cfg
        return {"config": cfg.to_dict(absolute=True), "cache": _cache_id(plan), "model": _model_digest(spec),
                "agree": _model_digest(agree) if agree else ""}

    name = f"eval {label}" + (f" seed {seed}" if row.group in ("teacher", "student") or (row.group == "fusion" and not row.spec) else "")
    return Stage(name, key, lambda: [state["cfg"].json_out], lambda: run_eval(state["cfg"]))


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def _profile(plan: Plan) -> Stage:
    from featcache.distill.profile import profile_models

    s = plan.pipeline.settings
    plan.profile = plan.out / "profile.json"

    def specs() -> list[str]:
        """Every row's model at the first seed (the raw concatenation is its backbones' rows together)."""
        out = [row.spec.get(s.seeds[0], row.spec.get(0)) for row in plan.rows]
        return [m for m in out if m and not m.startswith("concat:")]

    def image_size() -> tuple[int, int]:
        return tuple(cache_identity(plan.cache).preprocessing["image_size"])

    def config():
        return s.profile_config(specs(), image_size())

    def key() -> dict:
        from featcache.runtime import resolve_device, torch_device_name

        cfg = config()
        machine = resolve_device(cfg.device)  # auto on a GPU machine is another measurement than auto on a CPU one
        key = {"models": {m: _model_digest(m) for m in cfg.models}, "batch": list(cfg.batch), "repeats": cfg.repeats,
               "device": torch_device_name(machine), "image_size": list(cfg.image_size)}
        if cfg.precision != "fp32":  # keys of fp32 profiles stay as they were
            key["precision"] = cfg.precision
        return key

    def run() -> None:
        cfg = config()
        rows = profile_models(cfg.models, cfg.device, image_size=cfg.image_size, batch_sizes=cfg.batch, repeats=cfg.repeats,
                              precision=cfg.precision)
        atomic_write(plan.profile, lambda p: p.write_text(json.dumps(rows, indent=1, default=str)))

    return Stage("profile", key, lambda: [plan.profile], run)


def _report(plan: Plan) -> Stage:
    from featcache.pipeline.report import write_report

    def inputs() -> list[Path]:
        files = [p for row in plan.rows for p in row.json.values()]
        return files + ([plan.profile] if plan.profile else [])

    def key() -> dict:
        return {"inputs": {str(p): p.read_text() for p in inputs()}, "settings": plan.pipeline.settings.to_dict(absolute=True)}

    return Stage("report", key, lambda: [plan.out / "report" / name for name in ("index.md", "index.html", "summary.json")],
                 lambda: write_report(plan))
