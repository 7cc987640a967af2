"""The one training loop of every trained stage (train-gate, distill, pretrain-standins).

A stage gives its model, optimizer and a ``Stage``: the batches of an epoch and
the step that turns one batch into a loss and the scalars it logs. The loop
owns the rest, the same for every stage: the cosine learning-rate schedule
over all steps, the optimizer step, restoring a checkpoint (``--resume``),
the epoch's log row, and its hooks (``hooks``: progress, the NaN stop, the
epoch's checkpoint in the ``RunDir``, the log line), the precision (the model put in its memory format; a stage runs its
forward under ``precision.autocast()`` and its losses in float32), and the
device side: the epoch's sums stay on the device (float64,
as Python floats would add them) and, off the CPU, the loss is checked for
NaN at the epoch's end instead of after each step, so a step never waits for
the device. Either way the run stops naming the first bad batch, before that
epoch's checkpoint, so the last good one stays.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from featcache.training.precision import Precision
from featcache.training.hooks import Checkpointer, EpochLogger, Hook, NanStop, ProgressBar, TensorBoard, added_hooks
from featcache.training.rundir import Checkpoint, RunDir
from featcache.training.schedule import cosine_lr, set_lr
from featcache.training.stage import Epoch, Stage, Step

logger = logging.getLogger(__name__)

#: check the loss for NaN at the end of each epoch instead of each step (no per-step wait for the device); None:
#: on every device but the CPU, where a check costs nothing and the run stops at once
DEFER_NAN_CHECK: bool | None = None

#: Adam as one fused kernel; None: on every device but the CPU. Off the CPU the default (foreach) Adam launches
#: several kernels per parameter group; on the CPU the unfused default is what the distill runs of record used.
FUSED_ADAM: bool | None = None

def adam(params, lr: float, weight_decay: float, device: torch.device, fused: bool | None = None) -> torch.optim.Adam:
    """The trained stages' optimizer: Adam, fused where ``fused`` (or ``FUSED_ADAM``, or the device) says so."""
    if fused is None:
        fused = FUSED_ADAM if FUSED_ADAM is not None else device.type != "cpu"
    # unfused: torch's own default (no fused= at all), as the runs before this function were built
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def per_batch_on_device(device: torch.device, sizes: list[int], *arrays: np.ndarray) -> list[tuple[torch.Tensor, ...]]:
    """Index arrays of a whole epoch (its batches one after another) copied to the device once and cut into the
    batches' ``sizes``: one tuple of views a batch. A copy a step would make the host wait for the device each step."""
    on_device = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]
    return list(zip(*(t.split(sizes) for t in on_device)))


@dataclass
class Schedule:
    """Epochs, steps per epoch and the cosine decay from ``lr`` to ``lr_min`` over all their steps."""

    epochs: int
    steps_per_epoch: int
    lr: float
    lr_min: float

    def lr_at(self, epoch: int, i: int) -> float:
        return cosine_lr(self.lr, self.lr_min, epoch * self.steps_per_epoch + i, self.steps_per_epoch * self.epochs)


class Loop:
    """Train ``model`` with ``opt`` through a stage's epochs; ``run`` (a run directory) gets the log and checkpoints,
    ``checkpoint`` (from ``RunDir.start`` on ``--resume``) is restored first. Without a run directory the rows are
    only returned (stand-ins keep them in their own metadata). ``hooks`` run after the loop's own (``hooks``
    module), and so do those a caller adds around it with ``hooks.added``; ``tensorboard`` adds the curves'
    hook last (with a run directory)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, schedule: Schedule, rng: np.random.Generator,
                 device: torch.device, *, run: RunDir | None = None, checkpoint: Checkpoint | None = None,
                 precision: Precision | None = None, desc: str = "train", hooks: tuple[Hook, ...] = (),
                 tensorboard: bool = False) -> None:
        self.model, self.opt, self.schedule, self.rng, self.device = model, opt, schedule, rng, device
        self.run, self.desc = run, desc
        self.precision = precision or Precision()
        self.precision.prepare(model)
        self.start = checkpoint.restore(model, opt, rng, device) if checkpoint else 0
        self.defer_nan_check = DEFER_NAN_CHECK if DEFER_NAN_CHECK is not None else device.type != "cpu"
        own: list[Hook] = [ProgressBar(), NanStop(self.defer_nan_check)]
        self.hooks = own + ([Checkpointer()] if run is not None else []) + [EpochLogger(), *hooks, *added_hooks()]
        if tensorboard and run is not None:
            self.hooks.append(TensorBoard())
        self.stage: Stage | None = None

    def _call(self, point: str, *args: Any) -> None:
        for h in self.hooks:
            getattr(h, point)(self, *args)

    def fit(self, stage: Stage) -> list[dict[str, Any]]:
        """Run the epochs left; returns their log rows."""
        self.stage = stage
        rows = []
        self._call("before_train")
        try:
            for epoch in range(self.start, self.schedule.epochs):
                rows.append(self.epoch(stage, epoch))
        finally:
            self._call("after_train")
        self.model.eval()
        return rows

    def epoch(self, stage: Stage, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.model.train()
        plan = stage.begin_epoch(epoch, self.rng)
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in stage.columns}
        seen: set[str] = set()
        self._call("before_epoch", epoch, plan)
        n = 0
        for i, batch in enumerate(plan.batches):
            set_lr(self.opt, self.schedule.lr_at(epoch, i))
            self._call("before_step", epoch, i)
            out = stage.step(batch)
            self.opt.zero_grad(set_to_none=True)
            out.loss.backward()
            self.opt.step()
            self._call("after_step", epoch, i, out)
            for key, v in (("loss", out.loss), *out.logged.items()):  # the sums stay on the device
                sums[key] += v.detach().double()
                seen.add(key)
            n += 1
        means = {k: (float(v) / max(1, n) if k in seen else "") for k, v in sums.items()}  # waits for the device
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, **means, "lr": self.opt.param_groups[0]["lr"], "seconds": seconds,
               "images_per_s": plan.images / max(seconds, 1e-9), **stage.end_epoch(epoch)}
        self._call("after_epoch", epoch, row)
        return row

__all__ = ["Epoch", "Loop", "Schedule", "Stage", "Step", "adam", "per_batch_on_device"]
