"""What every section of gpu_check shares: the sizes of a mode, the result table, timing and verdicts, and the
host-sync counter (a training-loop hook)."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featcache.training.hooks import Hook


@dataclass(frozen=True)
class Setup:
    """Sizes of one mode: the GPU figures, or the CPU check of the script itself."""

    device: torch.device
    clip: str
    align: str
    small: tuple[int, int]      # CLIP alone
    large: tuple[int, int]      # CLIP + ALIGN
    rows: int                   # views per timed batch
    iters: int
    ids: int                    # identities of the pipeline's synthetic dataset
    batch_size: int             # images per extraction batch
    equal_ids: int
    disk_mib: int
    eval_sizes: tuple[int, int, int]    # the Market-size evaluation: queries, gallery, dim
    scale_sizes: tuple[int, int, int]   # the large-gallery evaluation (10,000 x 1,000,000 x 512 on a GPU)
    gate_ids: tuple[int, int]           # identities x images of the gate's feature cache
    distill: tuple[int, tuple[int, int], int]  # identities, image size, batch of the student's run

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


GPU = dict(clip="clip-vit-b16", align="align-b7", small=(224, 224), large=(256, 256), rows=256, iters=10, ids=600,
           batch_size=64, equal_ids=6, disk_mib=1024, eval_sizes=(3368, 15913, 2048), scale_sizes=(10_000, 1_000_000, 512),
           gate_ids=(751, 17), distill=(2400, (256, 256), 128))
CPU = dict(clip="clip-tiny", align="align-tiny", small=(64, 32), large=(64, 64), rows=16, iters=2, ids=6,
           batch_size=8, equal_ids=4, disk_mib=16, eval_sizes=(200, 1500, 64), scale_sizes=(100, 20_000, 32),
           gate_ids=(40, 6), distill=(12, (64, 32), 16))


@dataclass
class Context:
    """One run: its sizes, the table it fills, rates the sections share, and a scratch folder."""

    setup: Setup
    table: "Table"
    tmp: Path
    rates: dict = field(default_factory=dict)


@dataclass
class Table:
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, what: str, ours: str, ref: str, ratio: str = "", verdict: str = "") -> None:
        self.rows.append((what, ours, ref, ratio, verdict))
        print(f"| {what} | {ours} | {ref} | {ratio} | {verdict} |", flush=True)
        if verdict.startswith("FAIL"):
            self.failed.append(what)

    def markdown(self, header: list[str]) -> str:
        out = header + ["", "| check | featcache | reference | ratio | target |", "|---|---|---|---|---|"]
        out += [f"| {' | '.join(r)} |" for r in self.rows]
        return "\n".join(out + [""] + [f"- {n}" for n in self.notes]) + "\n"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # that GPU's work, not the current device's


def timed(fn, x, device: torch.device, iters: int) -> float:
    """Seconds per call, after two warm-up calls."""
    for _ in range(2):
        fn(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    sync(device)
    return (time.perf_counter() - t0) / iters


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def verdict(ratio: float, target: float, s: Setup) -> str:
    if not s.gpu:
        return f">= {target} (CPU mode: not judged)"
    return f"{'PASS' if ratio >= target else 'FAIL'} (>= {target})"


def at_most(value: float, limit: float, s: Setup, unit: str = "") -> str:
    if not s.gpu:
        return f"<= {limit}{unit} (CPU mode: not judged)"
    return f"{'PASS' if value <= limit else 'FAIL'} (<= {limit}{unit})"


class HostSyncs(Hook):
    """A training-loop hook that counts the operations making the host wait for the GPU
    (``torch.cuda.set_sync_debug_mode``) inside each step: the stage's forward and losses, backward and the
    optimizer step; and the steps themselves. Epoch ends and checkpoints wait a few times an epoch, by design, and
    are not counted. Nothing to count on CPU (the CPU tests count host reads instead). Add it around a stage's run
    with ``featcache.training.hooks.added``."""

    def __init__(self, device: torch.device) -> None:
        self.on, self.count, self.steps = device.type == "cuda", 0, 0
        self._seen: list = []

    def before_step(self, loop, epoch: int, i: int) -> None:
        self.steps += 1
        if self.on:
            self._catch = warnings.catch_warnings(record=True)
            self._seen_now = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def after_step(self, loop, epoch: int, i: int, out) -> None:
        if self.on:
            torch.cuda.set_sync_debug_mode("default")
            self.count += sum("synchronizing" in str(w.message) for w in self._seen_now)
            self._catch.__exit__(None, None, None)

    def note(self, what: str) -> str:
        if not self.on:
            return f"{what}: host syncs not counted on CPU ({self.steps} training steps watched)"
        return (f"{what}: {self.count} host syncs inside {self.steps} training steps (forward, losses, backward, "
                f"optimizer; {self.count / max(1, self.steps):.2f} a step)")
