"""What distillation reads: the teacher's targets and attention maps from the cache, the student's pixels from images.

Every training step picks one cached view of each image and rebuilds its
pixels from the stored parameters (crop, flip, erasing), so the student's
input and the teacher's targets belong to the same pixels. Pixels come from
the image files (``featcache.cache.pixels.ViewPixels``, decoding each time)
or from a pixel cache (``featcache.cache.pixelcache``), in DataLoader
workers; targets come from the gate run's ``teacher_targets.h5``; the
teacher's attention maps from the cache's ``attn_*`` arrays.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featcache.cache import CacheIdentity, CacheReader
from featcache.cache.pixels import ViewPixels
from featcache.cache.pixelcache import PixelReader
from featcache.errors import InputError
from featcache.cache.targets import TARGETS, TeacherTargets
from featcache.preprocess import view_of
from featcache.progress import progress
from featcache.training.rundir import RunDir, state_digest

logger = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Teacher:
    """A finished gate run's targets, checked against the cache; per training image: cache row, label, views."""

    run: Path
    targets: TeacherTargets
    experts: list[str]
    images: np.ndarray        # cache image rows of the training images
    labels: np.ndarray        # per image, 0..C-1 (the teacher's label order, so logits compare)
    n_views: np.ndarray       # per image: cached views with a target
    view_start: np.ndarray    # per image: its first row in the cache's views
    identity: CacheIdentity
    digests: dict[str, str]   # the gate's final weights and targets, so a resumed run reads the same teacher
    partial: dict | None = None  # the gate trained on part of an unfinished cache (cache.training_coverage's record)

    @property
    def n_classes(self) -> int:
        return len(self.targets.label_pids)


def load_teacher(gate: Path, cache: Path) -> Teacher:
    """The targets of gate run ``gate``, refused when unfinished, missing, or made from another cache."""
    rd, _, meta, weights = RunDir.open(Path(gate), "train-gate", "distilling from it")
    with CacheReader(cache) as c:
        ident = c.identity
        view_start_all = c.table("view_start")
    if meta["cache_identity"] != ident.digest():
        theirs = rd.read_config().get("cache", "another cache")
        if Path(str(theirs)).resolve() == Path(cache).resolve():
            raise InputError(f"--gate {gate} was trained on {cache} as it was then; the cache has changed since (identity "
                             f"{meta['cache_identity'][:12]} then, {ident.digest()[:12]} now): train the gate again on it")
        raise InputError(f"--gate {gate} was trained on the cache {theirs}, not on --cache {cache} (their identities differ: "
                         f"{meta['cache_identity'][:12]} against {ident.digest()[:12]}): distill with --cache {theirs}, "
                         f"or train a gate on {cache} first")
    path = rd.artifact(TARGETS)
    targets = TeacherTargets.load(path, ident.digest())
    if targets.experts != list(meta["experts"]) or targets.label_pids.tolist() != list(meta["pids"]):
        raise InputError(f"{path} belongs to another gate run than {gate} (experts or identities differ); train the gate again")
    if targets.weights_digest is not None and targets.weights_digest != state_digest(weights):
        raise InputError(f"{path} was made by other weights than {rd.weights_file} (another run's targets, or the "
                         "weights were replaced); train the gate again")
    images, first = np.unique(targets.image, return_index=True)
    labels = targets.label[first]
    n_views = np.bincount(np.searchsorted(images, targets.image), minlength=len(images))
    digests = {"gate_weights": file_digest(rd.weights_file), "targets": file_digest(path)}
    return Teacher(Path(gate), targets, list(meta["experts"]), images, labels, n_views, view_start_all[images], ident, digests,
                   meta.get("partial"))


def check_coverage(teacher: Teacher, cache: Path, allow_partial: bool) -> dict | None:
    """The training images a student learns from are its teacher's: refused when the gate, or the cache, covers only
    part of them, unless ``allow_partial``; returns the record the student's run keeps (None: all of them)."""
    from featcache.cache import partial_note, training_coverage

    in_cache = training_coverage(cache, allow_partial, "distill")
    if not teacher.partial:
        return in_cache
    note = partial_note(f"--gate {teacher.run}", teacher.partial)
    if not allow_partial:
        raise InputError(f"{note}: a student distilled from it learns from those images only. Train the gate again on "
                         "the finished cache, or pass --allow-partial to distill from it (recorded in the run)")
    logger.warning("%s: this student learns from those images only (recorded in its run.json)", note)
    return teacher.partial


def attention_names(cache: Path, experts: list[str], required: bool = True) -> dict[str, list[str]] | None:
    """Each expert's four cached attention maps, shallowest first (paired with the student's stages 1-4);
    None when some expert lacks them and they are not ``required``."""
    out = {}
    with CacheReader(cache) as c:
        for e in experts:
            names = sorted(k for k in c.outputs(e) if k.startswith("attn_"))
            if len(names) != 4:
                if not required:
                    return None
                raise InputError(f"{cache}: expert {e} has {len(names)} attention maps ({', '.join(names) or 'none'}); "
                                 "L_att pairs four with the student's four stages (drop att from --losses)")
            out[e] = names
    return out


class ViewDataset(torch.utils.data.Dataset):
    """Item ``(cache image row, view)`` -> (3, H, W) uint8: the view as extraction fed it to the backbones."""

    def __init__(self, cache: Path, root: Path | None, pixels: Path | None) -> None:
        self.views = ViewPixels(cache, root)
        self.pixels = PixelReader(pixels) if pixels is not None else None

    def __len__(self) -> int:  # indexed by keys, not positions
        return len(self.views.paths)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        image, view = int(key[0]), int(key[1])
        if self.pixels is None:
            return self.views.image_views(image, [view])[0]
        row = self.views.view_start[image] + view
        arr = view_of(self.pixels.base(image), self.views.params[row])
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def check_image_files(views: ViewPixels, rows: np.ndarray) -> None:
    """Refuse, before training starts, a dataset root that lacks the cache's images or holds changed ones
    (their SHA-1 differs from the one extraction recorded): all of them named, not the first one met mid-run."""
    missing, changed = [], []
    for i in progress(rows, desc="checking images", unit="img", leave=False):
        data, problem = views.file(i)
        if problem:
            (changed if problem == "changed" else missing).append(views.paths[i])
    if missing:
        raise InputError(f"--root {views.root} is not the folder {views.cache} was extracted from: {len(missing)} of its "
                         f"{len(rows)} training images are missing there (first: {missing[0]})")
    if changed:
        raise InputError(f"{len(changed)} training image(s) under {views.root} changed since they were extracted into "
                         f"{views.cache} (their SHA-1 differs): {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}; "
                         "extract again, or point --root at the images that were extracted")
