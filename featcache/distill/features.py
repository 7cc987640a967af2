"""The ``student:RUN_DIR`` model kind: a distilled student run over the query and gallery images.

Registered from the distill package, as ``gate:`` is from the gate's. The
student sees pixels, not cached features: each image's view 0 (and view 1,
the flip, with ``--flip``) is rebuilt exactly as extraction fed the
backbones, decoded in DataLoader workers, and pushed through the student in
blocks on the chosen device, so memory stays at the output features plus one
block of activations.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.cache import CacheSplit
from featcache.errors import InputError
from featcache.evaluation.features import FeatureContext, FeatureSource, RunFeatures, register_kind, register_run_model
from featcache.evaluation.search import l2_normalize

logger = logging.getLogger(__name__)

#: the most images in one block, whatever the budget (beyond it throughput no longer grows)
MAX_BLOCK = 256


@dataclass
class StudentFeatures(RunFeatures):
    """A distilled student over each image's rebuilt view 0 (and its flip)."""

    def load(self, device: str) -> tuple:
        from featcache.distill.load import load_student

        return load_student(self.run, device=device)

    def features(self, split: CacheSplit, ctx: FeatureContext) -> np.ndarray:
        import torch

        from featcache.distill.data import ViewDataset
        from featcache.distill.students import EMBED_DIM, normalize
        from featcache.progress import progress
        from featcache.runtime import loader_options, on_device, resolve_device, resolve_workers

        device = resolve_device(ctx.device)
        model, _, meta = self._load(device)
        size = list(split.identity.preprocessing["image_size"])
        if size != list(meta["image_size"]):
            raise InputError(f"{self.run} was trained on {meta['image_size'][0]}x{meta['image_size'][1]} images, but "
                             f"{split.cache} holds {size[0]}x{size[1]} ones: evaluate it on a cache extracted at its size")
        h, w = size
        # per image: the uint8 input, its float copy and the activations (about 16 float maps of the input's size)
        per_row = 3 * h * w * (1 + 4 + 16 * 4)
        block = min(MAX_BLOCK, ctx.rows_per_block(per_row))
        dataset = ViewDataset(split.cache, None, None)
        views = (0, 1) if ctx.flip else (0,)
        keys = [[(int(split.images[i]), v) for i in range(s, min(s + block, len(split)))]
                for v in views for s in range(0, len(split), block)]
        workers = resolve_workers(None, device)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, **loader_options(device, workers, block * 3 * h * w))
        out = np.zeros((len(split), EMBED_DIM), dtype=np.float32)
        starts = [s for _ in views for s in range(0, len(split), block)]
        fork_safe = split.fork_safe() if workers else contextlib.nullcontext()  # no open cache crosses the workers' fork
        with fork_safe, torch.inference_mode(), on_device(device):  # the loader's pinning thread pins for this GPU
            for s, pixels in zip(starts, progress(loader, desc=f"student {split.split}", unit="block", leave=False)):
                out[s: s + len(pixels)] += model(normalize(pixels.to(device, non_blocking=True))).float().cpu().numpy()
        out /= len(views)
        return l2_normalize(out, inplace=True)

    def backbones(self) -> list[str]:
        """The teacher's experts: the student reads images, but learnt from these backbones' outputs."""
        from featcache.training.rundir import RunDir

        return list(RunDir(self.run, "distill").meta()["experts"])

    def describe(self) -> dict:
        from featcache.training.rundir import RunDir

        rd = RunDir(self.run, "distill")
        return {"kind": "student", "run": str(self.run), "arch": rd.read_config().get("student"),
                "feature": "the student's 2048-d BN feature, computed from the images",
                "trained_on": {"cache": rd.read_config().get("cache"), "identity": rd.meta().get("cache_identity"),
                               "partial": rd.meta().get("partial")}}


@register_kind("student", "RUN_DIR (a distill run: the student, run over the images)")
def _student(ref: str) -> FeatureSource:
    return StudentFeatures(Path(ref))


@register_run_model("distill", "a distilled student: its BN feature, from the images")
def _student_model(run: Path, device: str):
    from featcache.distill.embedder import load_student_model  # torch: only when a model is loaded

    return load_student_model(run, device)
