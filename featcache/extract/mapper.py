"""Mapper: runs every backbone on a batch of uint8 views and hands back only what the cache stores.

The overlapped path (``Mapper``, the default) keeps everything on the device until the last moment: it selects
the rows each array keeps (token arrays of ``--tokens view0`` keep view 0 of each image; what ``--tokens none``
drops is never copied), checks every value (NaN or inf from the backbone; a finite value beyond float16's range
in an array stored as float16), casts to the stored dtype there, and copies the result into one of a few
reusable host buffers (pinned on CUDA) without waiting. The writer thread waits for that batch's copy to finish
(a CUDA event), writes it, and gives the buffer back; meanwhile the next batch runs. So the GPU never waits
for a host-side cast and no buffer is refilled before its batch is written.

``PlainMapper`` is the reference it must equal: forward, every kept output to float32 on the host, cast by
NumPy, checked by NumPy (``--mapper plain``; ``benchmarks/gpu_check`` compares the two).
"""

from __future__ import annotations

import contextlib
import logging
import queue
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from featcache.backbones import Backbone

logger = logging.getLogger(__name__)

OK, NONFINITE, OVERFLOW = 0, 1, 2  # per row and stored array: what the value check found
F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Stored:
    """One array the cache stores for a backbone output: its dtype and whether it keeps a row per view or one
    per image (view 0: token arrays under ``--tokens view0``). Read from the cache, so a resumed run keeps the
    dtypes its cache was created with."""

    dtype: np.dtype
    per: str            # "view" or "image"
    tail: tuple[int, ...]


@dataclass
class Mapped:
    """One batch's kept outputs on the host, the value-check codes, and how to wait for and give back its buffers.

    ``outputs[b][o]`` has one row per view row of the batch (per image for ``per == 'image'`` arrays);
    ``codes[:, k]`` is the check of ``keys[k]`` for each view row (an image-row array's code sits on the
    image's first view row)."""

    outputs: dict[str, dict[str, np.ndarray]]
    codes: np.ndarray
    keys: list[tuple[str, str]]
    _wait: Callable[[], None] = field(default=lambda: None, repr=False)
    _release: Callable[[], None] = field(default=lambda: None, repr=False)

    def wait(self) -> None:
        """Block until the batch's copies have landed (a no-op on CPU)."""
        self._wait()

    def release(self) -> None:
        """Give the host buffers back for a later batch: call after the batch is written (or dropped)."""
        self._release()


def stored_layout(arrays: dict[str, dict[str, dict]]) -> dict[str, dict[str, Stored]]:
    """``CacheReader``'s output_info per backbone and output -> what the mapper keeps."""
    return {b: {o: Stored(np.dtype(i["dtype"]), i["rows"], tuple(i["shape"][1:])) for o, i in outs.items()}
            for b, outs in arrays.items()}


def stored_from_specs(specs: dict[str, dict], tokens: str) -> dict[str, dict[str, Stored]]:
    """What a cache created from backbone ``specs`` with ``--tokens`` would store (for benchmarks without a cache;
    extraction reads it from its cache)."""
    from featcache.cache.store import run_arrays  # the one rule for which arrays a cache holds, per view or image

    out: dict[str, dict[str, Stored]] = {b: {} for b in specs}
    for arr in run_arrays(specs, tokens):
        if arr.output is not None:
            b, o = arr.output
            out[b][o] = Stored(np.dtype(arr.dtype), arr.per, tuple(arr.tail))
    return out


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_channels_last(bb: Backbone, device: torch.device) -> bool:
    """EfficientNet (ALIGN) on CUDA: channels_last ran 2,780 views/s against 1,630 (featcache's forward, H200,
    bf16, 2026-12-04, docs/benchmarks.md); ViTs gain nothing from it."""
    return device.type == "cuda" and bb.family == "align"


class _Base:
    def __init__(self, backbones: dict[str, Backbone], stored: dict[str, dict[str, Stored]], device: torch.device) -> None:
        self.device = device
        self.backbones = {k: b.to(device).eval() for k, b in backbones.items()}
        self.channels_last = {k: uses_channels_last(b, device) for k, b in self.backbones.items()}
        for k, b in self.backbones.items():
            if self.channels_last[k]:
                b.to(memory_format=torch.channels_last)
        self.stored = stored
        self.keys = [(b, o) for b, outs in stored.items() for o in outs]
        self.bytes_out = 0      # bytes of stored outputs copied off the device, counted at the copy calls
        self.check_bytes = 0    # bytes of value-check codes copied off the device

    def _forward(self, views: torch.Tensor):
        nhwc = views.permute(0, 2, 3, 1)
        if nhwc.is_contiguous():  # the loader's (pinned) layout: copy it as it is, permute on the device
            x = nhwc.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        else:
            x = views.to(self.device, non_blocking=True)
        for name, bb in self.backbones.items():
            inp = bb.normalize(x)
            if self.channels_last[name]:
                inp = inp.contiguous(memory_format=torch.channels_last)
            with _autocast(self.device):  # the forward only: nothing yields inside it, so no error leaves it on
                out = bb(inp)
            yield name, out


class PlainMapper(_Base):
    """The reference path: forward, then every kept output to float32 on the host, cast and checked by NumPy."""

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor, first_view: np.ndarray) -> Mapped:
        rows = views.shape[0]
        codes = np.zeros((rows, len(self.keys)), np.uint8)
        outputs: dict[str, dict[str, np.ndarray]] = {}
        for name, res in self._forward(views):
            outputs[name] = {}
            for oname, spec in self.stored.get(name, {}).items():
                v = res[oname].float().cpu().numpy()
                self.bytes_out += v.nbytes
                at = first_view if spec.per == "image" else np.arange(rows)
                v = v[at] if spec.per == "image" else v
                flat = v.reshape(len(v), -1)
                bad = ~np.isfinite(flat).all(1)
                over = ~bad & (np.abs(flat) > F16_MAX).any(1) if spec.dtype == np.float16 else np.zeros(len(v), bool)
                k = self.keys.index((name, oname))
                codes[at[bad], k] = NONFINITE
                codes[at[over], k] = OVERFLOW
                with np.errstate(over="ignore", invalid="ignore"):
                    outputs[name][oname] = v.astype(spec.dtype, copy=False)
        return Mapped(outputs, codes, self.keys)


class _HostPool:
    """A few sets of host buffers (pinned on CUDA), handed out round the writer: ``acquire`` blocks until the
    writer has given one back, so a buffer is never refilled before its batch is written."""

    def __init__(self, slots: int, pinned: bool) -> None:
        self.pinned = pinned
        self.free: queue.Queue[int] = queue.Queue()
        self.buffers: list[dict[tuple[str, str], torch.Tensor]] = [{} for _ in range(slots)]
        for i in range(slots):
            self.free.put(i)

    def acquire(self) -> int:
        return self.free.get()

    def release(self, slot: int) -> None:
        self.free.put(slot)

    def buffer(self, slot: int, key: tuple[str, str], rows: int, tail: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A (rows, *tail) view of the slot's buffer for ``key``, grown (never shrunk) when a batch needs more."""
        have = self.buffers[slot].get(key)
        if have is None or have.shape[0] < rows or have.dtype != dtype:
            have = torch.empty((max(rows, 1), *tail), dtype=dtype, pin_memory=self.pinned)
            self.buffers[slot][key] = have
        return have[:rows]


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
            np.dtype(np.float64): torch.float64}[np.dtype(dt)]


class Mapper(_Base):
    """The overlapped path (module doc): kept rows only, checked and cast on the device, copied asynchronously
    into reusable host buffers."""

    def __init__(self, backbones: dict[str, Backbone], stored: dict[str, dict[str, Stored]], device: torch.device,
                 slots: int = 4) -> None:
        super().__init__(backbones, stored, device)
        self.pool = _HostPool(slots, pinned=device.type == "cuda")

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor, first_view: np.ndarray) -> Mapped:
        rows = views.shape[0]
        slot = self.pool.acquire()
        try:
            return self._map(views, first_view, slot, rows)
        except BaseException:
            self.pool.release(slot)
            raise

    def _map(self, views: torch.Tensor, first_view: np.ndarray, slot: int, rows: int) -> Mapped:
        dev = self.device
        first = torch.from_numpy(np.asarray(first_view, dtype=np.int64)).to(dev, non_blocking=True)
        codes = torch.zeros((rows, len(self.keys)), dtype=torch.uint8, device=dev)
        kept: list[tuple[str, str, torch.Tensor]] = []
        for name, res in self._forward(views):
            for oname, spec in self.stored.get(name, {}).items():
                v = res[oname]
                if spec.per == "image":
                    v = v.index_select(0, first)
                flat = v.reshape(v.shape[0], -1)
                bad = ~torch.isfinite(flat).all(1)
                k = self.keys.index((name, oname))
                at = first if spec.per == "image" else None
                code = bad.to(torch.uint8) * NONFINITE
                if spec.dtype == np.float16:  # compared in float32: under bf16 autocast 65504 rounds to 65536, which passed
                    over = ~bad & (flat.abs().amax(1).float() > F16_MAX)  # a row's largest |value|: exact in bf16
                    code = code + over.to(torch.uint8) * OVERFLOW
                if at is None:
                    codes[:, k] = code
                else:
                    codes[:, k].index_copy_(0, at, code)
                kept.append((name, oname, v.to(_torch_dtype(spec.dtype))))  # cast on the device
        host_codes = self.pool.buffer(slot, ("", "codes"), rows, (len(self.keys),), torch.uint8)
        outputs: dict[str, dict[str, np.ndarray]] = {name: {} for name in self.backbones}
        for name, oname, v in kept:
            dst = self.pool.buffer(slot, (name, oname), v.shape[0], tuple(v.shape[1:]), v.dtype)
            dst.copy_(v, non_blocking=True)
            self.bytes_out += v.numel() * v.element_size()
            outputs[name][oname] = dst.numpy()
        host_codes.copy_(codes, non_blocking=True)
        self.check_bytes += codes.numel()
        return Mapped(outputs, host_codes.numpy(), self.keys, copies_done(dev), lambda: self.pool.release(slot))


def copies_done(dev: torch.device) -> Callable[[], None]:
    """How the writer thread waits for the copies just queued on ``dev``: an event recorded on that device's current
    stream, the one its kernels and copies ran on. ``torch.cuda.Event().record()`` alone would record on the
    *current* device's stream, which for ``--device cuda:1`` is GPU 0's: the event would complete at once and the
    writer would read the buffers before their copies landed. Blocking, so that waiting sleeps instead of spinning
    on a core the decoding workers need. Nothing here changes the caller's current device."""
    if dev.type != "cuda":
        return lambda: None
    event = torch.cuda.Event(blocking=True)
    event.record(torch.cuda.current_stream(dev))
    return event.synchronize


def make_mapper(kind: str, backbones: dict[str, Backbone], stored: dict[str, dict[str, Stored]], device: torch.device):
    """``overlapped`` (the default) or ``plain`` (the reference path)."""
    return PlainMapper(backbones, stored, device) if kind == "plain" else Mapper(backbones, stored, device)
