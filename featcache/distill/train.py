"""The distillation loop: PK batches of cached views, the student on their pixels, the teacher's targets from the cache.

L_total = L_id + beta L_tri + lambda_kd L_KD + lambda_feat L_feat + lambda_att L_att + lambda_rel L_rel
(Eq. 13-16 with the readings of ``featcache.distill.losses``). Every term is
computed and logged each epoch, also when ``--losses`` switches it off (then
without gradient), so runs with and without a term compare in their logs.
The run directory, checkpoints, resume and the NaN stop are the shared
training core's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from featcache.distill.config import LOSSES, DistillConfig
from featcache.distill.data import (Teacher, ViewDataset, attention_names, check_coverage, check_image_files, load_teacher,
                                    read_teacher_maps)
from featcache.distill.losses import attention_loss, feature_loss, kd_loss, relation_loss
from featcache.cache.pixelcache import build_pixel_cache
from featcache.distill.students import Student, StudentOutputs, build_student, normalize
from featcache.errors import InputError
from featcache.evaluation.heldout import evaluate_split
from featcache.evaluation.metrics import agreement
from featcache.evaluation.search import l2_normalize
from featcache.progress import progress
from featcache.runtime import loader_options, on_device, resolve_device, resolve_workers
from featcache.training.losses import batch_hard_triplet, id_loss
from featcache.training.options import check_identities
from featcache.training.loop import Epoch, Loop, Schedule, Step, adam, per_batch_on_device
from featcache.training.precision import Precision
from featcache.training.rundir import VAL, RunDir
from featcache.training.sampling import pk_batches, steps_per_epoch

logger = logging.getLogger(__name__)


@dataclass
class TeacherBatch:
    """The teacher's side of a batch: labels, the feature L_feat and L_rel compare with, logits z_t, gate weights,
    attention maps."""

    y: torch.Tensor
    f_t: torch.Tensor | None  # kd_space retrieval: the L2-normalised retrieval feature (None: version-1 targets);
                              # literal: the fused F_t before BN. Only the one used is read and moved each step
    z_t: torch.Tensor
    gates: torch.Tensor
    maps: list[list[torch.Tensor]] | None  # maps[stage][expert], (N, H, W)


def teacher_batch(teacher: Teacher, imgs: np.ndarray, views: np.ndarray, cache: Path, maps: dict[str, list[str]] | None,
                  device: torch.device, kd_space: str) -> TeacherBatch:
    """Targets of the training images ``imgs`` (indices into ``teacher.images``) at cached views ``views``."""
    t = teacher.targets
    rows = t.rows(teacher.images[imgs], views)
    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)
    t_maps = None
    if maps is not None:
        t_maps = [[m.to(device) for m in stage] for stage in read_teacher_maps(cache, teacher.view_start[imgs] + views, maps)]
    feature = t.retrieval if kd_space == "retrieval" else t.feature
    f_t = dev(feature[rows]) if feature is not None else None
    return TeacherBatch(dev(teacher.labels[imgs]), f_t, dev(t.logits[rows]), dev(t.gates[rows]), t_maps)


class ResidentTeacher:
    """The teacher's side of every training view resident on the training device: targets (labels, the KD feature,
    logits, gates) and the experts' attention maps, read from the cache once, so a step gathers its batch there
    with no HDF5 read. Equal to ``teacher_batch``'s values (the same arrays, indexed alike)."""

    def __init__(self, teacher: Teacher, cache: Path, maps: dict[str, list[str]] | None, device: torch.device,
                 kd_space: str) -> None:
        t = teacher.targets
        self.teacher, self.device = teacher, device
        feature = t.retrieval if kd_space == "retrieval" else t.feature
        self.f_t = torch.from_numpy(feature).to(device) if feature is not None else None
        self.z_t, self.gates = torch.from_numpy(t.logits).to(device), torch.from_numpy(t.gates).to(device)
        self.labels = torch.from_numpy(teacher.labels).to(device)
        self.maps = None
        if maps is not None:
            rows = np.concatenate([s + np.arange(n) for s, n in zip(teacher.view_start, teacher.n_views)])
            self.pos = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
            self.pos[rows] = np.arange(len(rows))
            self.maps = [[m.to(device) for m in stage] for stage in read_teacher_maps(cache, rows, maps)]
            mib = sum(m.numel() * m.element_size() for stage in self.maps for m in stage) / 2**20
            logger.info("teacher targets and attention maps resident on %s (%.1f MiB of maps)", device, mib)

    def epoch(self, batches: list[np.ndarray], views: list[np.ndarray]) -> Iterator[TeacherBatch]:
        """The teacher's side of each batch (training-image indices and their cached views), gathered on the
        device from indices copied there once for the epoch."""
        imgs, vv = np.concatenate(batches).astype(np.int64), np.concatenate(views)
        indices = [self.teacher.targets.rows(self.teacher.images[imgs], vv), imgs]
        if self.maps is not None:
            indices.append(self.pos[self.teacher.view_start[imgs] + vv])
        for r, i, *at in per_batch_on_device(self.device, [len(b) for b in batches], *indices):
            t_maps = [[m[at[0]] for m in stage] for stage in self.maps] if self.maps is not None else None
            yield TeacherBatch(self.labels[i], self.f_t[r] if self.f_t is not None else None, self.z_t[r], self.gates[r], t_maps)


def loss_terms(out: StudentOutputs, b: TeacherBatch, cfg: DistillConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """Each term of L_total, computed on demand (so a switched-off term can run without gradient).

    With ``kd_space`` retrieval, L_feat and L_rel compare the L2-normalised retrieval features (the student's BN
    output, the teacher's ranked feature); with literal, the student's FC output and the teacher's raw F_t."""
    emb, logits = out.embedding.float(), out.logits.float()
    s_kd = F.normalize(out.feature.float(), dim=1) if cfg.kd_space == "retrieval" else emb
    t_kd = b.f_t
    terms = {
        "id": lambda: id_loss(logits, b.y),
        "tri": lambda: batch_hard_triplet(emb, b.y, cfg.margin),
        "kd": lambda: kd_loss(logits, b.z_t, cfg.kd_temperature),
    }
    if t_kd is not None:  # None: version-1 targets, no retrieval feature (then feat and rel are off, checked at load)
        terms["feat"] = lambda: feature_loss(s_kd, t_kd)
        terms["rel"] = lambda: relation_loss(s_kd, t_kd)
    if b.maps is not None:
        terms["att"] = lambda: attention_loss([m.float() for m in out.maps], b.maps, b.gates)
    return terms


@torch.inference_mode()
def measure_terms(model: Student, teacher: Teacher, dataset: ViewDataset, cache: Path, cfg: DistillConfig, device: torch.device,
                  batch: int = 32) -> dict[str, float]:
    """Each term's mean over every cached training view, in eval mode, in fixed batches: comparable between
    models (before and after training, with and without a term), unlike the training log's running means."""
    model.eval()
    imgs = np.repeat(np.arange(len(teacher.images)), teacher.n_views)
    views = np.concatenate([np.arange(n) for n in teacher.n_views])
    maps = attention_names(cache, teacher.experts, required=False)
    sums: dict[str, float] = {}
    n = 0
    for s in range(0, len(imgs), batch):
        i, v = imgs[s: s + batch], views[s: s + batch]
        pixels = torch.stack([dataset[(int(teacher.images[a]), int(b))] for a, b in zip(i, v)])
        out = model.outputs(normalize(pixels.to(device)))
        for name, fn in loss_terms(out, teacher_batch(teacher, i, v, cache, maps, device, cfg.kd_space), cfg).items():
            sums[name] = sums.get(name, 0.0) + float(fn()) * len(i)
        n += len(i)
    return {k: v / n for k, v in sums.items()}


AGREE_K = 10


@torch.inference_mode()
def validate(model: Student, teacher: Teacher, dataset: ViewDataset, device: torch.device, batch: int = 64) -> dict | None:
    """The student on the identities its teacher held out (view 0 of each image, under the test protocol): mAP,
    CMC, mINP, and its agreement with the teacher's ranking of the same images (top-10 overlap, rank correlation
    of similarities); None when the teacher held none out or its targets predate the record (version 1)."""
    val = teacher.targets.val
    if val is None:
        return None
    was = model.training
    model.eval()
    feats = []
    for s in range(0, len(val.image), batch):
        pixels = torch.stack([dataset[(int(i), 0)] for i in val.image[s: s + batch]])
        feats.append(model(normalize(pixels.to(device))).float().cpu().numpy())
    model.train(was)
    f = l2_normalize(np.concatenate(feats))
    report = evaluate_split(f, val.pid, val.camid, val.query)
    if report["mAP"] is not None:
        q, g = val.query, ~val.query
        report["agreement"] = {"with": "teacher", "k": AGREE_K, **agreement(
            f[q], f[g], val.retrieval[q], val.retrieval[g], val.pid[q], val.camid[q], val.pid[g], val.camid[g], AGREE_K)}
    return report


def run_meta(cfg: DistillConfig, teacher: Teacher) -> dict:
    """What the run was trained from: a resume must match it; ``student:`` and ``profile`` read it."""
    return {"cache_identity": teacher.identity.digest(), "n_classes": teacher.n_classes,
            "pids": teacher.targets.label_pids.tolist(), "image_size": list(teacher.identity.preprocessing["image_size"]),
            "experts": teacher.experts, "teacher": teacher.digests,
            **({"partial": teacher.partial} if teacher.partial else {})}  # absent for a whole cache: older runs resume


class ResidentViews:
    """The training images' letterboxed pixels (from the pixel cache) and every view's parameters, resident on the
    training device; a batch of (image, view) keys is replayed there (``distill.replay``), with no DataLoader,
    no decoding and no per-step image reads (``ResidentTeacher`` does the same for the teacher's side). The pixels
    equal the workers' path byte for byte."""

    def __init__(self, dataset: ViewDataset, images: np.ndarray, device: torch.device) -> None:
        from featcache.distill.replay import replay_views

        self.replay = replay_views
        images = np.asarray(images, dtype=np.int64)
        self.slot = {int(img): k for k, img in enumerate(images)}
        base = np.stack([dataset.pixels.base(int(img)) for img in progress(images, desc="pixels to the device", unit="img", leave=False)])
        self.base = torch.from_numpy(base).to(device)
        self.params = torch.from_numpy(dataset.views.params).to(device)
        self.view_start = dataset.views.view_start
        self.device = device
        logger.info("training images resident on %s: %d images, %.1f MiB", device, len(images), base.nbytes / 2**20)

    def epoch(self, keys: list[list[tuple[int, int]]]) -> Iterator[torch.Tensor]:
        """Each batch of (image, view) keys replayed on the device, in order; the epoch's indices are copied there
        once (a copy per step would wait for the device each time)."""
        flat = [k for batch in keys for k in batch]
        idx = np.array([self.slot[i] for i, _ in flat], dtype=np.int64)
        rows = np.array([int(self.view_start[i]) + v for i, v in flat], dtype=np.int64)
        for i, r in per_batch_on_device(self.device, [len(b) for b in keys], idx, rows):
            yield self.replay(self.base[i], self.params[r])


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


class DistillStage:
    """Distillation's side of the shared loop: PK batches of (image, cached view) keys, their pixels (from the
    workers' DataLoader, or replayed on the device from resident pixels), the teacher's side of the batch, and
    every term of L_total (a term switched off with ``--losses`` is computed without gradient and logged)."""

    columns = ("loss", *LOSSES, "acc")

    def __init__(self, cfg: DistillConfig, model: Student, teacher: Teacher, dataset: ViewDataset,
                 maps: dict[str, list[str]] | None, device: torch.device, precision: Precision) -> None:
        self.cfg, self.model, self.teacher, self.dataset, self.maps = cfg, model, teacher, dataset, maps
        self.device, self.precision = device, precision
        self.p = cfg.batch_size // cfg.instances
        self.workers = resolve_workers(cfg.workers, device)
        resident = cfg.input_path == "device" or (cfg.input_path == "auto" and device.type == "cuda" and dataset.pixels is not None)
        self.resident = ResidentViews(dataset, teacher.images, device) if resident else None
        # on a GPU the teacher's side is resident whatever the pixels' path: read per step, it would copy from pageable
        # host memory and wait for the device every step
        self.resident_teacher = (ResidentTeacher(teacher, cfg.cache, maps, device, cfg.kd_space)
                                 if resident or device.type == "cuda" else None)

    def begin_epoch(self, epoch: int, rng: np.random.Generator) -> Epoch:
        cfg, teacher = self.cfg, self.teacher
        batches = pk_batches(teacher.labels, self.p, cfg.instances, rng)
        views = [rng.integers(0, teacher.n_views[b]) if cfg.views == "cached" else np.zeros(len(b), np.int64) for b in batches]
        keys = [[(int(teacher.images[i]), int(v)) for i, v in zip(b, vv)] for b, vv in zip(batches, views)]
        images = sum(map(len, batches))
        if self.resident is not None:  # the epoch's indices go to the device once; a step gathers and replays there
            pixels = self.resident.epoch(keys)
            targets = self.resident_teacher.epoch(batches, views)
            return Epoch(zip(batches, views, pixels, targets), len(batches), images)
        h, w = teacher.identity.preprocessing["image_size"]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=keys,
                                             **loader_options(self.device, self.workers, cfg.batch_size * 3 * h * w))
        targets = self.resident_teacher.epoch(batches, views) if self.resident_teacher is not None else [None] * len(batches)
        with on_device(self.device):  # zip starts the loader's workers and pinning thread, on the training GPU
            return Epoch(zip(batches, views, loader, targets), len(batches), images)

    def step(self, batch) -> Step:
        imgs, vv, pixels, b = batch
        cfg = self.cfg
        if b is None:
            b = teacher_batch(self.teacher, imgs, vv, cfg.cache, self.maps, self.device, cfg.kd_space)
        with self.precision.autocast():
            out = self.model.outputs(self.precision.images(normalize(pixels.to(self.device, non_blocking=True))))
        values = {}
        loss = b.z_t.new_zeros(())
        for name, fn in loss_terms(out, b, cfg).items():
            w = cfg.weight(name)
            if w:
                values[name] = fn()
                loss = loss + w * values[name]
            else:  # switched off: logged, not trained
                with torch.no_grad():
                    values[name] = fn()
        values["acc"] = (out.logits.argmax(1) == b.y).float().mean()
        return Step(loss, values)

    def end_epoch(self, epoch: int) -> dict:
        return {}


def train(cfg: DistillConfig, resume: bool = False) -> tuple[Student, RunDir, dict | None]:
    device = resolve_device(cfg.device)
    precision = Precision.resolve(cfg.precision, device, convolutional=True)
    RunDir.refuse_existing(cfg.out, resume)  # before the slow checks and builds below
    teacher, dataset = load_inputs(cfg)
    maps = attention_names(cfg.cache, teacher.experts, required="att" in cfg.losses)
    student = build_student(cfg.student, teacher.n_classes, cfg.student_init, seed=cfg.seed)  # before the pixel cache's build
    dataset = with_pixel_cache(cfg, dataset)
    rd, ckpt = RunDir.start(cfg.out, cfg, run_meta(cfg, teacher), resume)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = student.to(device)
    opt = adam(model.parameters(), cfg.lr, cfg.weight_decay, device)  # fused off the CPU
    schedule = Schedule(cfg.epochs, steps_per_epoch(teacher.labels, cfg.batch_size // cfg.instances, cfg.instances), cfg.lr, cfg.lr_min)
    loop = Loop(model, opt, schedule, rng, device, run=rd, checkpoint=ckpt, precision=precision, desc="distill")
    logger.info("training on %s: %s, %s", device, precision.name, "channels_last" if precision.channels_last else "default layout")
    loop.fit(DistillStage(cfg, model, teacher, dataset, maps, device, precision))
    model.eval()
    val = validate(model, teacher, dataset, device)
    if val is not None:
        rd.write_json(VAL, val)  # the student on the gate's held-out identities: mAP, agreement with the teacher
        if val["mAP"] is None:
            logger.warning("validation: nothing to evaluate: %s", val["reason"])
        else:
            a = val["agreement"]
            logger.info("validation (%d identities held out by the teacher): mAP %.4f; agreement with the teacher: "
                        "top-%d overlap %.4f, rank correlation %.4f", val["identities"], val["mAP"], a["k"],
                        a["top_k_overlap"], a["rank_correlation"])
    return model, rd, val

