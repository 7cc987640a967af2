"""A pipeline file: one typed section per stage, checked as a whole before any stage runs.

``pipelines/NAME.yaml`` has a ``pipeline:`` section (``PipelineConfig``: the
output folder, seeds, which fusions and models to run) and one section per
stage, each the stage's own config (``synth``, ``pretrain-standins``,
``extract``, ``train-gate``, ``distill``, ``eval``) less the keys the pipeline sets itself (where the cache,
runs and reports go, the seed, the fusion). ``--set section.key=value``
overrides any key. Every section is built into its dataclass at load time, so
an unknown key (with the nearest suggested), a wrong type or a dataset root
that does not exist fails before anything runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from featcache.config import StageConfig, parse_set, read_sections
from featcache.distill.config import DistillConfig, ProfileConfig
from featcache.errors import ConfigError, InputError
from featcache.evaluation.runner import EvalConfig
from featcache.extract.config import ExtractConfig
from featcache.gate.config import GateConfig
from featcache.registry import nearest
from featcache.runtime import check_device_name
from featcache.standins.config import StandinConfig
from featcache.synth import SynthConfig


@dataclasses.dataclass(frozen=True)
class PipelineConfig(StageConfig):
    """``pipeline:``: what to run, and where its outputs go."""

    command = "pipeline"

    out: Path = Path("outputs/pipeline")
    seeds: tuple[int, ...] = (42,)          # each gate and student is trained once per seed; the report gives mean ± std
    fusions: tuple[str, ...] = ("moe-top1",)  # one train-gate run per fusion (and seed), each a row of the report
    teacher: str = "moe-top1"               # the fusion whose gate the student distils
    experts_alone: bool = True              # evaluate each cached backbone alone (backbone:PRESET rows)
    concat: bool = True                     # evaluate the raw concatenation of the backbones (concat: row)
    distill: bool = True                    # train and evaluate the student(s)
    # students to train, by report label: each a set of distill keys over the distill section (empty: one student,
    # labelled after its architecture); "teacher" picks another fusion's gate as that student's teacher
    students: dict[str, dict] = dataclasses.field(default_factory=dict)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # report labels of fusions (and experts) by name
    profile: bool = True                    # parameters, FLOPs and latency of the teacher and the student
    profile_batch: tuple[int, ...] = ProfileConfig.batch      # the defaults of `featcache profile`
    profile_repeats: int = ProfileConfig.repeats
    profile_device: str = ProfileConfig.device
    profile_precision: str = ProfileConfig.precision  # the teacher and the student at the same precision
    ranked_lists: bool = True               # ranked-list grids of the teacher and the student in the report

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"pipeline.seeds {list(self.seeds)}: expected one or more distinct seeds")
        if not self.fusions:
            raise ConfigError("pipeline.fusions: expected at least one fusion")
        if (self.distill or self.profile) and self.teacher not in self.fusions:
            raise ConfigError(f"pipeline.teacher {self.teacher!r} must be one of pipeline.fusions {list(self.fusions)}")
        for name, over in self.students.items():
            if not isinstance(over, dict):
                raise ConfigError(f"pipeline.students.{name}: expected a mapping of distill keys, got {over!r}")
            teacher = over.get("teacher", self.teacher)
            if teacher not in self.fusions:
                raise ConfigError(f"pipeline.students.{name}.teacher {teacher!r} must be one of pipeline.fusions {list(self.fusions)}")
        if not self.profile_batch or min(self.profile_batch) < 1 or self.profile_repeats < 1:
            raise ConfigError("pipeline.profile_batch and profile_repeats: expected positive numbers")
        check_device_name(self.profile_device)

    def profile_config(self, models: list[str], image_size: tuple[int, int]) -> ProfileConfig:
        """The profile stage's config: `featcache profile`'s, with this pipeline's batch, repeats and device."""
        return ProfileConfig(tuple(models), self.profile_device, image_size, tuple(self.profile_batch), self.profile_repeats,
                             self.profile_precision)


#: the stage sections and their configs, in the order they run
SECTIONS: dict[str, type[StageConfig]] = {
    "synth": SynthConfig, "pretrain-standins": StandinConfig, "extract": ExtractConfig, "train-gate": GateConfig, "distill": DistillConfig, "eval": EvalConfig,
}
#: keys each section may not set: the pipeline sets them (placeholders stand in while checking)
MANAGED: dict[str, dict[str, Any]] = {
    "synth": {"out": Path("data")},
    "pretrain-standins": {"presets": ("clip-mini",)},  # the extract section's stand-in backbones
    "extract": {"out": Path("cache.h5")},
    "train-gate": {"cache": Path("cache.h5"), "out": Path("gate"), "seed": 0, "fusion": "moe-top1"},
    "distill": {"cache": Path("cache.h5"), "gate": Path("gate"), "out": Path("student"), "seed": 0},
    "eval": {"cache": Path("cache.h5"), "model": "backbone:x", "json_out": None, "plots": None, "agree_with": None,
             "save_features": None, "ranks": tuple(range(1, 21))},
}


@dataclasses.dataclass
class Pipeline:
    """A loaded pipeline: its settings, each section's own values (checked), and the file it came from."""

    source: Path
    settings: PipelineConfig
    sections: dict[str, dict[str, Any]]

    @property
    def out(self) -> Path:
        return self.settings.out

    def stage_config(self, section: str, **managed: Any) -> StageConfig:
        """The section's config with the pipeline's own values filled in. Stand-ins are pre-trained at the extract
        section's image size unless their section gives one: they run at the size they were trained at."""
        given = self.sections.get(section, {})
        if section == "pretrain-standins" and "image_size" not in given and "image_size" not in managed and "extract" in self.sections:
            size = self.stage_config("extract", **_placeholders("extract", self.sections)).image_size
            given = {**given, "image_size": size}
        return SECTIONS[section].build((f"{self.source} [{section}]", given), ("pipeline", managed))

    def student_config(self, name: str, **managed: Any) -> StageConfig:
        """The distill config of student ``name``: the distill section, then that student's own keys."""
        over = {k: v for k, v in self.settings.students.get(name, {}).items() if k != "teacher"}
        taken = sorted(set(over) & set(MANAGED["distill"]))
        if taken:
            raise ConfigError(f"{self.source} [pipeline.students.{name}]: {', '.join(taken)} set by the pipeline")
        return DistillConfig.build((f"{self.source} [distill]", self.sections.get("distill", {})),
                                   (f"{self.source} [pipeline.students.{name}]", over), ("pipeline", managed))

    def resolved(self) -> dict[str, Any]:
        """The pipeline as run: settings and every section with its defaults filled in (saved beside the outputs)."""
        out: dict[str, Any] = {"pipeline": self.settings.to_dict(absolute=True)}
        for name in self.sections:
            cfg = self.stage_config(name, **_placeholders(name, self.sections)).to_dict(absolute=True)
            out[name] = {k: v for k, v in cfg.items() if k not in _placeholders(name, self.sections)}
        return out


BUNDLED = Path(__file__).resolve().parents[1] / "pipelines"


def bundled_pipelines() -> dict[str, Path]:
    """The pipelines featcache ships, by name (``demo``, ``market1501``, ...)."""
    return {p.stem: p for p in sorted(BUNDLED.glob("*.yaml"))}


def resolve_pipeline(arg: str | Path) -> Path:
    """A pipeline file: the path given when it exists, else a bundled pipeline of that name (``market1501`` or
    ``market1501.yaml``); otherwise one line listing the bundled ones."""
    path = Path(arg)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    bundled = bundled_pipelines()
    if len(path.parts) <= 1 or str(path.parent) == "pipelines":
        if name in bundled:
            return bundled[name]
    raise ConfigError(f"pipeline file {arg} does not exist (or name a bundled pipeline: {', '.join(bundled)})")


def load_pipeline(path: Path, sets: tuple[str, ...] = (), out: Path | None = None, check_paths: bool = True) -> Pipeline:
    """Read, override (``--set section.key=value``, ``--out``) and check a pipeline file; ``check_paths``: also
    that the dataset root exists (off to validate a shipped pipeline on a machine without the dataset)."""
    path = Path(path)
    sections = read_sections(path, str(path), "the pipeline file", f"sections (pipeline, {', '.join(SECTIONS)}) to mappings of keys")
    known = ["pipeline", *SECTIONS]
    for name in sections:
        if name not in known:
            raise ConfigError(f"{path}: unknown section {name!r}{nearest(name, known)}; sections are {', '.join(known)}")
    for name, values in _parse_sets(sets, known).items():
        sections.setdefault(name, {}).update(values)
    if out is not None:
        sections.setdefault("pipeline", {})["out"] = str(out)
    settings = PipelineConfig.build((f"{path} [pipeline]", sections.pop("pipeline", {})))
    for name, values in sections.items():
        taken = sorted(set(values) & set(MANAGED[name]))
        if taken:
            raise ConfigError(f"{path} [{name}]: {', '.join(taken)} {'is' if len(taken) == 1 else 'are'} set by the pipeline "
                              f"(outputs go under pipeline.out; seeds and fusions are listed in the pipeline section)")
    p = Pipeline(path, settings, sections)
    if "extract" not in sections:
        raise ConfigError(f"{path}: no extract section (dataset, backbones, ...): a pipeline starts from a cache")
    try:  # every section checked now: nothing runs on a half-valid pipeline
        for name in sections:
            p.stage_config(name, **_placeholders(name, sections))
        for fusion in settings.fusions:
            p.stage_config("train-gate", **{**MANAGED["train-gate"], "fusion": fusion})
        students = [p.student_config(name, **MANAGED["distill"]) for name in settings.students] or \
            ([p.stage_config("distill", **MANAGED["distill"])] if settings.distill else [])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
    extract = p.stage_config("extract", **_placeholders("extract", sections))
    unknown = sorted(set(settings.labels) - set(settings.fusions) - set(extract.backbones))
    if unknown:
        raise ConfigError(f"{path} [pipeline]: labels for {', '.join(unknown)}, which is neither a fusion of this pipeline "
                          f"({', '.join(settings.fusions)}) nor a backbone ({', '.join(extract.backbones)})")
    if check_paths:
        for preset, w in extract.weights.items():
            if not Path(w).exists():
                raise InputError(f"{path} [extract]: weights {preset}={w} do not exist")
        for cfg in students:
            if cfg.student_init not in ("imagenet", "random") and not Path(cfg.student_init).is_file():
                raise InputError(f"{path} [distill]: student_init {cfg.student_init} is not a file (expected imagenet, random or a weights file)")
    if "synth" not in sections and check_paths:
        root = Path(sections["extract"].get("root", ""))
        if not root.exists():
            raise InputError(f"{path} [extract]: root {root} does not exist (expected the dataset in its official layout, "
                             "or a synth section that generates one)")
    return p


def _placeholders(name: str, sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    managed = dict(MANAGED[name])
    if name == "extract" and "synth" in sections:
        managed["root"] = Path("data")
    return managed


def _parse_sets(sets: tuple[str, ...], known: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pair in sets:
        key = pair.partition("=")[0]
        section, dot, field = key.partition(".")
        if not dot or not field:
            raise ConfigError(f"--set {pair!r}: expected SECTION.KEY=VALUE, e.g. --set distill.epochs=10 (sections: {', '.join(known)})")
        if section not in known:
            raise ConfigError(f"--set {pair!r}: unknown section {section!r}{nearest(section, known)}; sections are {', '.join(known)}")
        out.setdefault(section, {}).update(parse_set((f"{field}={pair.partition('=')[2]}",)))
    return out
