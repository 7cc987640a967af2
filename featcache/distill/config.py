"""``featcache distill``'s config: the only place its defaults live (torch-free, so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.config import StageConfig, parser
from featcache.errors import ConfigError, check_choice
from featcache.preprocess import parse_size
from featcache.runtime import check_device_name, parse_workers
from featcache.training.options import TRAIN_PRECISIONS, check_training

#: the loss terms of Eq. 13: the task terms (ID, triplet) and the four KD terms
LOSSES = ("id", "tri", "kd", "feat", "att", "rel")
#: the students (the registry lives with the models, in featcache.distill.students; kept here torch-free)
STUDENT_NAMES = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0")
VIEW_MODES = ("cached", "view0")
INPUT_PATHS = ("auto", "workers", "device")
#: where L_feat and L_rel compare student and teacher (``kd_space``; docs/distill.md)
KD_SPACES = ("retrieval", "literal")
#: lambda_feat where none is given: literal, the paper's 0.3 (on a sum over 2048 raw dimensions); retrieval, 30,
#: chosen on the demo's validation split by mean validation mAP over three seeds among 10, 30 and 100, after a
#: one-seed screen of 0.3, 3, 30, 100 and 300 (docs/notes/distill-weights.md)
LAMBDA_FEAT = {"retrieval": 30.0, "literal": 0.3}


def parse_losses(value) -> tuple[str, ...]:
    """``id,tri,kd`` (or a list) -> the terms, each known, none twice."""
    items = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    bad = [v for v in items if v not in LOSSES]
    if bad:
        raise ConfigError(f"--losses {','.join(map(str, items))}: unknown term(s) {', '.join(map(str, bad))}; terms are {','.join(LOSSES)}")
    if len(set(items)) != len(items) or not items:
        raise ConfigError(f"--losses {','.join(items)}: expected each of {','.join(LOSSES)} at most once, at least one")
    return tuple(items)


@dataclass(frozen=True)
class DistillConfig(StageConfig):
    """``featcache distill``: a student trained from images, its teacher targets read from the cache (§3.1, §3.3)."""

    command = "distill"

    cache: Path
    gate: Path                           # the train-gate run (the teacher) whose targets are distilled
    out: Path
    root: Path | None = None             # the dataset folder; default: the one the cache was extracted from
    student: str = "resnet18"
    student_init: str = "imagenet"       # imagenet, random (tests, demo) or a weights file
    epochs: int = 80
    seed: int = 42
    device: str = "auto"
    pixel_cache: Path | None = None      # decoded, letterboxed images in HDF5 (built on first use)
    losses: tuple[str, ...] = parser(parse_losses, default=LOSSES)
    views: str = "cached"                # cached: a random cached view per step; view0: the clean view only (ablation)
    batch_size: int = 32                 # P x K with K = instances
    instances: int = 4
    lr: float = 3e-4
    lr_min: float = 3e-6
    weight_decay: float = 5e-4
    beta: float = 0.5                    # triplet weight in L_task = L_id + beta L_tri
    margin: float = 0.3
    lambda_kd: float = 0.5
    lambda_feat: float | None = None     # None: the kd_space's own (LAMBDA_FEAT)
    lambda_att: float = 0.1
    lambda_rel: float = 0.1
    kd_temperature: float = 4.0          # T of Eq. 16
    kd_space: str = "retrieval"          # retrieval: L_feat and L_rel between the L2-normalised retrieval features (the
                                         # student's BN output, the teacher's ranked feature): scale-free, so a lambda
                                         # means the same for every teacher; literal: Eq. 10 and 12 on the raw F_t
    workers: int | None = parser(parse_workers, default=None)  # None: auto (featcache.runtime.resolve_workers)
    # where views are replayed: workers (DataLoader processes), device (the pixel cache's images resident on the
    # training device, views replayed there by distill.replay), auto (device on CUDA with a pixel cache)
    input_path: str = "auto"
    allow_partial: bool = False          # distill from a gate, or a cache, covering part of the training images (run.json)
    tensorboard: bool | None = None      # curves in RUN/tb as training goes; None: when the package is installed
    precision: str = "auto"              # auto: bf16 autocast and channels_last on CUDA, float32 on the CPU; fp32; bf16

    def __post_init__(self) -> None:
        check_choice(self.precision, TRAIN_PRECISIONS, "--precision",
                     note=" (no fp16: it needs loss scaling, and bf16 keeps float32's range)")
        check_choice(self.input_path, INPUT_PATHS, "--input-path")
        if self.input_path == "device" and self.pixel_cache is None:
            raise ConfigError("--input-path device replays views from the pixel cache's images: give --pixel-cache PIXELS.h5")
        object.__setattr__(self, "losses", parse_losses(self.losses))  # also when built directly from a string
        check_device_name(self.device)
        if self.student not in STUDENT_NAMES:
            from featcache.registry import nearest

            check_choice(self.student, STUDENT_NAMES, "--student", what=f"--student {self.student!r}{nearest(self.student, STUDENT_NAMES)}")
        check_choice(self.kd_space, KD_SPACES, "--kd-space")
        if self.kd_temperature <= 0:
            raise ConfigError(f"--kd-temperature {self.kd_temperature}: expected a positive temperature")
        check_choice(self.views, VIEW_MODES, "--views")
        check_training(self.epochs, self.batch_size, self.instances, self.lr, self.lr_min)
        for k in ("weight_decay", "beta", "margin", "lambda_kd", "lambda_feat", "lambda_att", "lambda_rel"):
            if getattr(self, k) is not None and getattr(self, k) < 0:
                raise ConfigError(f"--{k.replace('_', '-')} {getattr(self, k)}: expected 0 or more")
        if "id" not in self.losses and "tri" not in self.losses and not set(self.losses) & {"kd", "feat", "rel"}:
            raise ConfigError(f"--losses {','.join(self.losses)}: the attention term alone trains no embedding; add id, tri, kd, feat or rel")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers {self.workers}: expected 0 or more, or auto")

    @property
    def feat_weight(self) -> float:
        """lambda_feat as given, else the kd_space's own: resolved here, not stored, so that a config saved with
        the default and run again with another --kd-space gets that space's weight."""
        return self.lambda_feat if self.lambda_feat is not None else LAMBDA_FEAT[self.kd_space]

    #: keys that configs saved before they existed lack, with the value those runs trained with (resume reads them)
    legacy = {"kd_space": "literal", "kd_temperature": 4.0, "precision": "auto"}

    def weight(self, term: str) -> float:
        """The weight of a term in L_total (0 when switched off with --losses)."""
        if term not in self.losses:
            return 0.0
        return {"id": 1.0, "tri": self.beta, "kd": self.lambda_kd, "feat": self.feat_weight,
                "att": self.lambda_att, "rel": self.lambda_rel}[term]


PRECISIONS = ("fp32", "bf16", "fp16")
#: the ONNX Runtime check's tolerance: max |onnx - torch| / max |torch|
ATOL = 1e-3
MODEL_KINDS_PROFILED = ("student", "gate", "backbone")


@dataclass(frozen=True)
class ProfileConfig(StageConfig):
    """``featcache profile``: parameters, FLOPs, latency, images/s and peak memory of students or whole teachers.
    The pipeline's profile stage builds the same config from its ``profile`` settings."""

    command = "profile"

    models: tuple[str, ...]
    device: str = "auto"
    image_size: tuple[int, int] | None = parser(lambda v: None if v in (None, "") else parse_size(v), default=None)
    batch: tuple[int, ...] = (1, 64)
    repeats: int = 5
    precision: str = "fp32"              # fp32, or bf16 / fp16 autocast (how a model is deployed on a GPU)

    def __post_init__(self) -> None:
        check_device_name(self.device)
        check_choice(self.precision, PRECISIONS, "--precision", what=f"--precision {self.precision}")
        if not self.models:
            raise ConfigError("--model: give at least one student:RUN_DIR, gate:RUN_DIR or backbone:PRESET")
        bad = [m for m in self.models if m.partition(":")[0] not in MODEL_KINDS_PROFILED or not m.partition(":")[2]]
        if bad:
            raise ConfigError(f"--model {bad[0]!r}: expected student:RUN_DIR, gate:RUN_DIR (the whole teacher) or backbone:PRESET")
        if self.repeats < 1 or not self.batch or min(self.batch) < 1:
            raise ConfigError(f"--repeats {self.repeats}, --batch {','.join(map(str, self.batch))}: expected positive numbers")


@dataclass(frozen=True)
class ExportConfig(StageConfig):
    """``featcache export``: a student to ONNX (dynamic batch), checked against PyTorch with ONNX Runtime."""

    command = "export"

    model: str
    onnx: Path
    opset: int = 18
    atol: float = ATOL

    def __post_init__(self) -> None:
        kind, _, ref = self.model.partition(":")
        if kind != "student" or not ref:
            raise ConfigError(f"--model {self.model!r}: expected student:RUN_DIR (only students are exported)")
        if self.atol <= 0:
            raise ConfigError(f"--atol {self.atol}: expected a positive tolerance")

    @property
    def run(self) -> Path:
        return Path(self.model.partition(":")[2])
