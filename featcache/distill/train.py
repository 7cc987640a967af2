"""The distillation stage: its inputs checked, the student trained on the shared loop, then validated.

``DistillStage`` is distillation's side of the loop: PK batches of (image, cached view) keys, their pixels and
the teacher's side from an input path (``featcache.distill.inputs``), and L_total
(``featcache.distill.objective``). The run directory, checkpoints, resume and the NaN stop are the shared
training core's.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from featcache.cache.pixelcache import build_pixel_cache
from featcache.distill.config import LOSSES, DistillConfig
from featcache.distill.data import Teacher, ViewDataset, attention_names, check_coverage, check_image_files, load_teacher
from featcache.distill.inputs import DeviceInput, InputPath, ResidentViews, WorkerInput
from featcache.distill.objective import total_loss
from featcache.distill.students import Student, build_student, normalize
from featcache.distill.validate import log_validation, validate
from featcache.errors import InputError
from featcache.runtime import Ranks, rank_device, ranks_from_env, resolve_device, resolve_workers
from featcache.training.distributed import TrainingGroup
from featcache.training.hooks import tensorboard_available, tensorboard_once
from featcache.training.loop import Epoch, Loop, Schedule, Step, adam
from featcache.training.options import check_identities
from featcache.training.precision import Precision
from featcache.training.rundir import VAL, Checkpoint, RunDir
from featcache.training.sampling import pk_batches, steps_per_epoch

logger = logging.getLogger(__name__)


def run_meta(cfg: DistillConfig, teacher: Teacher) -> dict:
    """What the run was trained from: a resume must match it; ``student:`` and ``profile`` read it."""
    return {"cache_identity": teacher.identity.digest(), "n_classes": teacher.n_classes,
            "pids": teacher.targets.label_pids.tolist(), "image_size": list(teacher.identity.preprocessing["image_size"]),
            "experts": teacher.experts, "teacher": teacher.digests,
            **({"partial": teacher.partial} if teacher.partial else {})}  # absent for a whole cache: older runs resume


def load_inputs(cfg: DistillConfig) -> tuple[Teacher, ViewDataset]:
    """The teacher's targets and the dataset of views, each checked (teacher, P x K, dataset root)."""
    teacher = load_teacher(cfg.gate, cfg.cache)
    teacher.partial = check_coverage(teacher, cfg.cache, cfg.allow_partial)
    check_identities(teacher.n_classes, cfg.batch_size, cfg.instances, cfg.cache)
    if cfg.kd_space == "retrieval" and teacher.targets.retrieval is None and set(cfg.losses) & {"feat", "rel"}:
        raise InputError(f"{teacher.targets.path} predates the teacher's retrieval feature (teacher-targets version 1): "
                         "train the gate again, or compare raw features with --kd-space literal")
    dataset = ViewDataset(cfg.cache, cfg.root, None)
    val = teacher.targets.val
    check_image_files(dataset.views, teacher.images if val is None else np.concatenate([teacher.images, val.image]))
    return teacher, dataset


def with_pixel_cache(cfg: DistillConfig, dataset: ViewDataset) -> ViewDataset:
    """The dataset reading from ``--pixel-cache``, built or resumed first; unchanged without one."""
    if cfg.pixel_cache is None:
        return dataset
    build_pixel_cache(cfg.pixel_cache, cfg.cache, dataset.views.root)
    return ViewDataset(cfg.cache, cfg.root, cfg.pixel_cache)


def prepare(cfg: DistillConfig) -> tuple[Teacher, ViewDataset]:
    """Every input checked, the pixel cache ready."""
    teacher, dataset = load_inputs(cfg)
    return teacher, with_pixel_cache(cfg, dataset)


def input_path_rate(cfg: DistillConfig, seed: int = 0) -> float:
    """Images/s of the device input path alone (resident pixels, views replayed; no model) over one epoch of the
    PK batches training draws: what a training epoch on the device input path can reach at most, the reference of
    ``benchmarks/gpu_check``'s distill section. Needs ``cfg.pixel_cache``."""
    import time

    if cfg.pixel_cache is None:
        raise InputError("input_path_rate: the device input path replays views from a pixel cache; give pixel_cache")
    teacher, dataset = prepare(cfg)
    device = resolve_device(cfg.device)
    views = ResidentViews(dataset, teacher.images, device)
    rng = np.random.default_rng(seed)
    keys = [[(int(teacher.images[i]), int(rng.integers(0, teacher.n_views[i]))) for i in b]
            for b in pk_batches(teacher.labels, cfg.batch_size // cfg.instances, cfg.instances, rng)]
    for _ in views.epoch(keys[:1]):  # warm-up
        pass
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # this GPU, not cuda:0
    sync()
    t0 = time.perf_counter()
    for _ in views.epoch(keys):
        pass
    sync()
    return sum(map(len, keys)) / (time.perf_counter() - t0)


def input_path(cfg: DistillConfig, teacher: Teacher, dataset: ViewDataset, maps: dict[str, list[str]] | None,
               device: torch.device) -> InputPath:
    """The input path ``--input-path`` names; auto: the device path on CUDA with a pixel cache, else workers."""
    if cfg.input_path == "device" or (cfg.input_path == "auto" and device.type == "cuda" and dataset.pixels is not None):
        return DeviceInput(dataset, teacher, cfg.cache, maps, device, cfg.kd_space)
    return WorkerInput(dataset, teacher, cfg.cache, maps, device, cfg.kd_space, resolve_workers(cfg.workers, device), cfg.batch_size)


class DistillStage:
    """Distillation's side of the shared loop: PK batches of (image, cached view) keys, their pixels and the
    teacher's side from the input path, and every term of L_total (a term switched off with ``--losses`` is
    computed without gradient and logged)."""

    columns = ("loss", *LOSSES, "acc")

    def __init__(self, cfg: DistillConfig, model: Student, teacher: Teacher, inputs: InputPath, device: torch.device,
                 precision: Precision, group: TrainingGroup | None = None) -> None:
        self.cfg, self.model, self.teacher, self.inputs = cfg, model, teacher, inputs
        self.device, self.precision = device, precision
        self.p = cfg.batch_size // cfg.instances
        self.group = group or TrainingGroup(Ranks(), device)
        self.outputs = self.group.wrap(model, model.outputs)  # under torchrun: gradients averaged across ranks

    def begin_epoch(self, epoch: int, rng: np.random.Generator) -> Epoch:
        cfg, teacher = self.cfg, self.teacher
        batches = pk_batches(teacher.labels, self.p, cfg.instances, rng)
        views = [rng.integers(0, teacher.n_views[b]) if cfg.views == "cached" else np.zeros(len(b), np.int64) for b in batches]
        batches, views = self.group.share(batches), self.group.share(views)  # this rank's share (all of it alone)
        return Epoch(self.inputs.epoch(batches, views), len(batches), sum(map(len, batches)))

    def step(self, batch) -> Step:
        pixels, b = batch
        with self.precision.autocast():
            out = self.outputs(self.precision.images(normalize(pixels.to(self.device, non_blocking=True))))
        return Step(*total_loss(out, b, self.cfg))

    def end_epoch(self, epoch: int) -> dict:
        return {}


def train(cfg: DistillConfig, resume: bool = False) -> tuple[Student, RunDir, dict | None]:
    """Train the student of ``cfg``; returns it (in eval mode), its run directory and its validation (or None).
    Under torchrun each rank trains its share of every epoch (``training.distributed``); rank 0 writes the run."""
    ranks = ranks_from_env()
    group = TrainingGroup(ranks, rank_device(resolve_device(cfg.device), ranks))
    try:
        return _train(cfg, resume, group)
    finally:
        group.close()


def _start(cfg: DistillConfig, teacher: Teacher, dataset: ViewDataset, resume: bool,
           group: TrainingGroup) -> tuple[ViewDataset, RunDir, Checkpoint | None]:
    """The pixel cache and the run directory, made by rank 0; the other ranks read them once it has."""
    meta = {**run_meta(cfg, teacher), **({"world_size": group.world} if group.world > 1 else {})}
    if group.is_main:
        dataset = with_pixel_cache(cfg, dataset)
        rd, ckpt = RunDir.start(cfg.out, cfg, meta, resume)
    group.barrier()
    if not group.is_main:
        dataset = ViewDataset(cfg.cache, cfg.root, cfg.pixel_cache) if cfg.pixel_cache is not None else dataset
        rd = RunDir(cfg.out, cfg.command)
        ckpt = rd.read_checkpoint()
    return dataset, rd, ckpt


def _train(cfg: DistillConfig, resume: bool, group: TrainingGroup) -> tuple[Student, RunDir, dict | None]:
    device = group.device
    precision = Precision.resolve(cfg.precision, device, convolutional=True)
    if group.is_main:  # the run folder is rank 0's: the others may already see the one it made
        RunDir.refuse_existing(cfg.out, resume)  # before the slow checks and builds below
    teacher, dataset = load_inputs(cfg)
    maps = attention_names(cfg.cache, teacher.experts, required="att" in cfg.losses)
    student = build_student(cfg.student, teacher.n_classes, cfg.student_init, seed=cfg.seed)  # before the pixel cache's build
    dataset, rd, ckpt = _start(cfg, teacher, dataset, resume, group)
    if rd.is_finished():  # a finished run resumed as it was (an extension removes its final weights): nothing to build
        student.load_state_dict(rd.weights())
        return student.to(device).eval(), rd, rd.val()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # the same on every rank: each draws the epoch, then takes its share
    model = student.to(device)
    opt = adam(model.parameters(), cfg.lr, cfg.weight_decay, device)  # fused off the CPU
    steps = steps_per_epoch(teacher.labels, cfg.batch_size // cfg.instances, cfg.instances) // group.world
    if steps == 0:
        raise InputError(f"an epoch of {cfg.out} has fewer PK batches than the {group.world} ranks: use a smaller "
                         "--batch-size, or fewer ranks")
    schedule = Schedule(cfg.epochs, steps, cfg.lr, cfg.lr_min)
    tensorboard = group.is_main and tensorboard_available(cfg.tensorboard)
    loop = Loop(model, opt, schedule, rng, device, run=rd if group.is_main else None, checkpoint=ckpt, precision=precision,
                desc="distill", tensorboard=tensorboard)
    logger.info("training on %s: %s, %s", device, precision.name, "channels_last" if precision.channels_last else "default layout")
    stage = DistillStage(cfg, model, teacher, input_path(cfg, teacher, dataset, maps, device), device, precision, group)
    loop.fit(stage)
    model.eval()
    if not group.is_main:  # rank 0 validates and writes the run
        return model, rd, None
    val = validate(model, teacher, dataset, device)
    if val is not None:
        rd.write_json(VAL, val)  # the student on the gate's held-out identities: mAP, agreement with the teacher
        log_validation(val)
        if tensorboard and val["mAP"] is not None:
            a = val["agreement"]
            tensorboard_once(rd, "distill", {"val_mAP": val["mAP"], f"val_top{a['k']}_overlap_with_teacher": a["top_k_overlap"],
                                             "val_rank_correlation_with_teacher": a["rank_correlation"]}, cfg.epochs)
    return model, rd, val
