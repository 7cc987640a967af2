"""Where a distillation step's inputs come from: the pixels of its (image, cached view) keys and the teacher's side
of the batch, by one of two paths behind one ``InputPath`` interface.

- ``WorkerInput``: DataLoader workers decode (or read from the pixel cache) and replay each view on the host; the
  teacher's side is read on the host once per epoch (``HostTeacher``), or resident on a GPU (``ResidentTeacher``).
- ``DeviceInput``: the training images' letterboxed pixels and the teacher's side resident on the training device;
  a batch is gathered and replayed there (``ResidentViews``, ``ResidentTeacher``), with no DataLoader.

Both yield, per step, the batch's uint8 pixels and a ``TeacherBatch``; the values are equal on either path.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from featcache.cache import CacheReader
from featcache.distill.data import Teacher, ViewDataset
from featcache.progress import progress
from featcache.runtime import loader_options, on_device
from featcache.training.loop import per_batch_on_device

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


def read_teacher_maps(cache: Path, rows: np.ndarray, names: dict[str, list[str]]) -> list[list[torch.Tensor]]:
    """``maps[stage][expert]``: (N, H, W) float tensors of the cache's view rows ``rows`` (checksummed), read with
    one open of the cache."""
    experts = list(names)
    with CacheReader(cache) as c:
        per_expert = [[torch.from_numpy(c.read(e, n, rows).astype(np.float32)) for n in names[e]] for e in experts]
    return [[per_expert[k][j] for k in range(len(experts))] for j in range(4)]


class HostTeacher:
    """The teacher's side of each batch from host memory: the targets' arrays, and the attention maps of the
    epoch's views read from the cache a chunk of ``CHUNK`` batches at a time, with one open each (never one per
    step; memory bounded by the chunk). No open HDF5 file crosses the loader workers' fork: the first chunk is
    read, and its file closed, before the workers start, and later chunks open the file after they have."""

    CHUNK = 256

    def __init__(self, teacher: Teacher, cache: Path, maps: dict[str, list[str]] | None, device: torch.device,
                 kd_space: str) -> None:
        self.teacher, self.cache, self.maps, self.device = teacher, cache, maps, device
        self.feature = teacher.targets.retrieval if kd_space == "retrieval" else teacher.targets.feature

    def epoch(self, batches: list[np.ndarray], views: list[np.ndarray]) -> Iterator[TeacherBatch]:
        """The teacher's side of each batch; the first chunk's maps are read now, before this returns."""
        n = self.CHUNK
        first = self._batches(batches[:n], views[:n])  # read now
        rest = (b for s in range(n, len(batches), n) for b in self._batches(batches[s: s + n], views[s: s + n]))  # when reached
        return itertools.chain(first, rest)

    def _batches(self, batches: list[np.ndarray], views: list[np.ndarray]) -> Iterator[TeacherBatch]:
        t, teacher = self.teacher.targets, self.teacher
        maps = None
        if self.maps is not None:  # every view of the chunk in one read; each batch takes its slice
            rows = np.concatenate([teacher.view_start[b] + v for b, v in zip(batches, views)])
            maps = read_teacher_maps(self.cache, rows, self.maps)
        return self._slices(batches, views, maps, t)

    def _slices(self, batches, views, maps, t) -> Iterator[TeacherBatch]:
        start = 0
        for imgs, vv in zip(batches, views):
            rows = t.rows(self.teacher.images[imgs], vv)
            t_maps = None
            if maps is not None:
                t_maps = [[m[start:start + len(imgs)].to(self.device) for m in stage] for stage in maps]
            start += len(imgs)
            f_t = self._dev(self.feature[rows]) if self.feature is not None else None
            yield TeacherBatch(self._dev(self.teacher.labels[imgs]), f_t, self._dev(t.logits[rows]), self._dev(t.gates[rows]), t_maps)

    def _dev(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)


class ResidentTeacher:
    """The teacher's side of every training view resident on the training device: targets (labels, the KD feature,
    logits, gates) and the experts' attention maps, read from the cache once, so a step gathers its batch there
    with no HDF5 read. Equal to ``HostTeacher``'s values (the same arrays, indexed alike)."""

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


class ResidentViews:
    """The training images' letterboxed pixels (from the pixel cache) and every view's parameters, resident on the
    training device; a batch of (image, view) keys is replayed there (``distill.replay``), with no DataLoader,
    no decoding and no per-step image reads. The pixels equal the workers' path byte for byte."""

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


class InputPath(Protocol):
    """What a distillation epoch reads: per batch, its uint8 pixels (N, 3, H, W) and the teacher's side."""

    def epoch(self, batches: list[np.ndarray], views: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, TeacherBatch]]:
        ...


def epoch_keys(teacher: Teacher, batches: list[np.ndarray], views: list[np.ndarray]) -> list[list[tuple[int, int]]]:
    """Each batch's (cache image row, cached view) keys."""
    return [[(int(teacher.images[i]), int(v)) for i, v in zip(b, vv)] for b, vv in zip(batches, views)]


class WorkerInput:
    """Pixels from DataLoader workers (decoded, or read from the pixel cache, and replayed on the host); the
    teacher's side from the host, or resident on a GPU (read per step, it would copy from pageable host memory
    and wait for the device every step)."""

    def __init__(self, dataset: ViewDataset, teacher: Teacher, cache: Path, maps: dict[str, list[str]] | None,
                 device: torch.device, kd_space: str, workers: int, batch_size: int) -> None:
        self.dataset, self.teacher, self.device, self.workers, self.batch_size = dataset, teacher, device, workers, batch_size
        side = ResidentTeacher if device.type == "cuda" else HostTeacher
        self.targets = side(teacher, cache, maps, device, kd_space)

    def epoch(self, batches, views):
        targets = self.targets.epoch(batches, views)  # the host's maps read now, before the workers start
        h, w = self.teacher.identity.preprocessing["image_size"]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=epoch_keys(self.teacher, batches, views),
                                             **loader_options(self.device, self.workers, self.batch_size * 3 * h * w))
        with on_device(self.device):  # zip starts the loader's workers and pinning thread, on the training GPU
            return zip(loader, targets)


class DeviceInput:
    """Pixels and the teacher's side resident on the training device; each batch gathered and replayed there."""

    def __init__(self, dataset: ViewDataset, teacher: Teacher, cache: Path, maps: dict[str, list[str]] | None,
                 device: torch.device, kd_space: str) -> None:
        self.teacher = teacher
        self.views = ResidentViews(dataset, teacher.images, device)
        self.targets = ResidentTeacher(teacher, cache, maps, device, kd_space)

    def epoch(self, batches, views):
        return zip(self.views.epoch(epoch_keys(self.teacher, batches, views)), self.targets.epoch(batches, views))
