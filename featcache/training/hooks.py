"""What the training loop does around its steps, as hooks (fast-reid's ``HookBase``): progress, the NaN stop, the
epoch's checkpoint and its log line. A benchmark adds its own (``added``) instead of patching the loop.

Each hook is called at fixed points of ``Loop.fit``, in the order the loop holds them:

- ``before_train`` / ``after_train`` (the latter always, also when the run stops with an error);
- ``before_epoch`` (with the epoch's plan) / ``after_epoch`` (with its log row, before the next epoch);
- ``before_step`` (before the stage's forward) / ``after_step`` (after the optimizer step, with the ``Step``).

The loop's own hooks come first, in this order: ``ProgressBar``, ``NanStop``, ``Checkpointer`` (with a run
directory), ``EpochLogger``. So a NaN stop is raised before that epoch's checkpoint, and the last good one stays.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Any, Iterator

import torch

from featcache.errors import ConfigError, RunError
from featcache.progress import progress
from featcache.training.rundir import training_state

from featcache.training.stage import Epoch, LoopState, Step

logger = logging.getLogger(__name__)


class Hook:
    """A part of training that runs at the loop's fixed points; every method does nothing unless overridden."""

    def before_train(self, loop: LoopState) -> None:
        """Before the first epoch left to run."""

    def before_epoch(self, loop: LoopState, epoch: int, plan: Epoch) -> None:
        """After the stage drew the epoch's batches, before its first step."""

    def before_step(self, loop: LoopState, epoch: int, i: int) -> None:
        """Before the stage's forward pass of batch ``i``."""

    def after_step(self, loop: LoopState, epoch: int, i: int, out: Step) -> None:
        """After backward and the optimizer step of batch ``i``."""

    def after_epoch(self, loop: LoopState, epoch: int, row: dict[str, Any]) -> None:
        """With the epoch's log row, once its means are on the host."""

    def after_train(self, loop: LoopState) -> None:
        """After the last epoch, or when the run stops with an error."""


class ProgressBar(Hook):
    """One bar over the whole run's steps left, with its ETA, naming the epoch (a plain line every few seconds when
    stderr is a file)."""

    def __init__(self) -> None:
        self.bar = None

    def before_train(self, loop: LoopState) -> None:
        steps = loop.schedule.steps_per_epoch * max(0, loop.schedule.epochs - loop.start)
        self.bar = progress(total=steps, desc=loop.desc, unit="batch", leave=False) if steps else None

    def before_epoch(self, loop: LoopState, epoch: int, plan: Epoch) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{loop.desc} epoch {epoch + 1}/{loop.schedule.epochs}")

    def after_step(self, loop: LoopState, epoch: int, i: int, out: Step) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def after_train(self, loop: LoopState) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class NanStop(Hook):
    """A NaN or infinite loss stops the run, naming the first bad batch. ``defer``: remember it on the device and
    stop at the epoch's end, so a step never waits for the device (off the CPU); else check each step."""

    def __init__(self, defer: bool) -> None:
        self.defer = defer
        self.bad = self.bad_value = None

    def before_epoch(self, loop: LoopState, epoch: int, plan: Epoch) -> None:
        self.bad = torch.full((), -1, dtype=torch.int64, device=loop.device)  # the first batch whose loss was not finite
        self.bad_value = torch.zeros((), dtype=torch.float32, device=loop.device)

    def after_step(self, loop: LoopState, epoch: int, i: int, out: Step) -> None:
        loss = out.loss.detach()
        if not self.defer:
            self.check(loop, loss, epoch, i)
            return
        first = (self.bad < 0) & ~torch.isfinite(loss)
        self.bad = torch.where(first, torch.full_like(self.bad, i), self.bad)
        self.bad_value = torch.where(first, loss.float(), self.bad_value)

    def after_epoch(self, loop: LoopState, epoch: int, row: dict[str, Any]) -> None:
        if int(self.bad) >= 0:  # raised before this epoch's checkpoint: the last good one stays
            self.check(loop, self.bad_value, epoch, int(self.bad))

    @staticmethod
    def check(loop: LoopState, loss: torch.Tensor, epoch: int, batch: int) -> None:
        if torch.isfinite(loss):
            return
        stop = f"loss became {loss.item()} at epoch {epoch + 1}, batch {batch + 1}: stopped"
        if loop.run is None:
            raise RunError(f"{loop.desc}: {stop}")
        raise RunError(f"{stop}; the last good checkpoint (after epoch {epoch}) is kept in {loop.run.path}")


class Checkpointer(Hook):
    """After every epoch, the run directory's atomic checkpoint and log row."""

    def after_epoch(self, loop: LoopState, epoch: int, row: dict[str, Any]) -> None:
        loop.run.checkpoint(epoch + 1, loop.model.state_dict(), training_state(loop.opt, loop.rng, loop.device), row)


class EpochLogger(Hook):
    """One log line an epoch: ``loss 1.2345 (id 0.5, triplet 0.7) acc 0.312, 1790.2 img/s``."""

    def after_epoch(self, loop: LoopState, epoch: int, row: dict[str, Any]) -> None:
        logger.info("%s epoch %d: %s", loop.desc, epoch + 1, epoch_summary(row, loop.stage.columns))


def epoch_summary(row: dict[str, Any], columns: tuple[str, ...]) -> str:
    """``loss 1.2345 (id 0.5, triplet 0.7) acc 0.312, 1790.2 img/s``: the columns an epoch logged."""
    def fmt(k: str, digits: int = 4) -> str:
        return f"{row[k]:.{digits}f}" if row.get(k, "") != "" else "-"
    terms = ", ".join(f"{k} {fmt(k)}" for k in columns if k not in ("loss", "acc") and row[k] != "")
    acc = f" acc {fmt('acc', 3)}" if "acc" in columns else ""
    return f"loss {fmt('loss')} ({terms}){acc}, {row['images_per_s']:.1f} img/s"


#: hooks that every loop built inside ``added`` runs after its own
_ADDED: list[Hook] = []


@contextlib.contextmanager
def added(*hooks: Hook) -> Iterator[None]:
    """Run ``hooks`` in every training loop built inside this block, after the loop's own: how a benchmark watches
    the training a stage runs (``benchmarks/gpu_check``'s host-sync counter) without patching anything."""
    _ADDED.extend(hooks)
    try:
        yield
    finally:
        for h in hooks:
            _ADDED.remove(h)


def added_hooks() -> list[Hook]:
    return list(_ADDED)


_NOTED: set[str] = set()


def tensorboard_available(wanted: bool | None) -> bool:
    """Whether to write TensorBoard curves: ``wanted`` (``--tensorboard`` / ``--no-tensorboard``), by default when
    the package is importable; without it, one note per process says how to install it."""
    if wanted is False:
        return False
    if importlib.util.find_spec("tensorboard") is None:
        if wanted:
            raise ConfigError("--tensorboard: the tensorboard package is not installed "
                              "(pip install -e '.[tensorboard]', or pip install tensorboard)") from None
        if "tensorboard" not in _NOTED:
            _NOTED.add("tensorboard")
            logger.warning("no TensorBoard curves: the tensorboard package is not installed "
                           "(pip install -e '.[tensorboard]'); log.csv and the plots are written as always")
        return False
    return True


class TensorBoard(Hook):
    """Every epoch's log row as TensorBoard scalars in the run's ``tb/`` folder, as training goes: each loss
    term, the learning rate, images/s, and the validation figures a stage logs. A resumed run continues the
    curves from its checkpoint (later steps of a killed run are purged)."""

    def __init__(self) -> None:
        self.writer = None

    def before_train(self, loop: LoopState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(loop.run.tensorboard_dir), purge_step=loop.start + 1 if loop.start else None)

    def after_epoch(self, loop: LoopState, epoch: int, row: dict[str, Any]) -> None:
        write_scalars(self.writer, loop.desc, row, epoch + 1)

    def after_train(self, loop: LoopState) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_scalars(writer, prefix: str, values: dict[str, Any], step: int) -> None:
    """The numeric ``values`` as scalars ``prefix/name`` at ``step`` (empty log cells and texts left out)."""
    for key, v in values.items():
        if key != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(f"{prefix}/{key}", float(v), step)
    writer.flush()


def tensorboard_once(run, prefix: str, values: dict[str, Any], step: int) -> None:
    """Scalars written after training (a final validation) into the run's ``tb/`` folder."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run.tensorboard_dir)) as writer:
        write_scalars(writer, prefix, values, step)
