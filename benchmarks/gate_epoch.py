"""What the cache buys train-gate: training steps from cached features vs. with the backbones online.

Cached side: one full epoch of ``featcache train-gate`` (moe-top1) over a
synthetic feature cache of Market-1501's training size (12,936 images,
751 identities, 4 views) with the real widths of the cached CLIP (768) and
ALIGN-B7 (640) pooled features; the epoch time is the one the training log
records (target: under 1 s on 2 CPU cores).

Online side: the same training step through the same training loop, but each
batch's features come from running the tiny presets (clip-tiny, align-tiny) on
32 decoded, letterboxed, augmented synthetic images. A full online epoch takes
minutes here, so it is timed over ``--online-batches`` batches and both sides
are compared per batch;
the online epoch time printed is that per-batch time times the batches of an
epoch (an extrapolation, and labelled as one).

    python benchmarks/gate_epoch.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchkit import device_line  # noqa: E402  (first: offline hubs)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from featcache.backbones import build_backbone  # noqa: E402
from featcache.training.rundir import RunDir  # noqa: E402
from featcache.datasets import load_listing  # noqa: E402
from featcache.training.losses import batch_hard_triplet  # noqa: E402
from featcache.gate.model import GateModel  # noqa: E402
from featcache.gate.config import GateConfig  # noqa: E402
from featcache.gate.train import train  # noqa: E402
from featcache.preprocess import apply_view, letterbox, view_params  # noqa: E402
from featcache.synth import SynthConfig, generate  # noqa: E402
from featcache.synth_cache import write_feature_cache  # noqa: E402
from featcache.training.loop import Epoch, Loop, Schedule, Step, adam  # noqa: E402


class OnlineStage:
    """The gate's training step with the backbones online: each batch decodes, letterboxes and augments 32 images and
    runs clip-tiny and align-tiny on them before the same gate forward and losses as train-gate."""

    columns = ("loss",)

    def __init__(self, model: GateModel, listing, size: tuple[int, int], batches: int, dev: torch.device) -> None:
        self.model, self.listing, self.size, self.batches, self.dev = model, listing, size, batches, dev
        self.items = [it for it in listing.items if it.split == "train"]
        self.backbones = [build_backbone(n, size).eval().to(dev) for n in ("clip-tiny", "align-tiny")]

    @staticmethod
    def dims(size: tuple[int, int]) -> list[int]:
        return [build_backbone(n, size).output_specs()["pooled"].shape[0] for n in ("clip-tiny", "align-tiny")]

    def begin_epoch(self, epoch: int, rng: np.random.Generator) -> Epoch:
        picks = [rng.choice(len(self.items), 32) for _ in range(self.batches)]
        return Epoch([(p, rng.integers(0, 4, 32), rng.integers(0, 751, 32)) for p in picks], self.batches, 32 * self.batches)

    def step(self, batch) -> Step:
        pick, view, labels = batch
        views = []
        for i, v in zip(pick, view):
            base = letterbox(Image.open(self.listing.root / self.items[i].path), self.size)
            dx, dy, flip = view_params(4, 0, int(i))[v][:3]
            views.append(apply_view(base, int(dx), int(dy), int(flip)))
        x = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).to(self.dev)
        with torch.inference_mode():
            xs = [bb(bb.normalize(x))["pooled"] for bb in self.backbones]
        xs = [v.clone() for v in xs]
        y = torch.from_numpy(labels).to(self.dev)
        fo, _, logits = self.model(xs)
        return Step(F.cross_entropy(logits, y) + 0.5 * batch_hard_triplet(fo.feature, y, 0.3))

    def end_epoch(self, epoch: int) -> dict:
        return {}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp:
        run(Path(tmp))


def run(tmp: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--online-batches", type=int, default=30)
    ap.add_argument("--device", default="auto", help="where both sides run (auto: CUDA when torch sees it)")
    args = ap.parse_args()
    from featcache.runtime import resolve_device

    dev = resolve_device(args.device)
    cache = write_feature_cache(tmp / "market-sized.h5", ids=751, per_id=17, cams=6, views=4)
    cfg = GateConfig.from_dict(dict(cache=cache, out=tmp / "run", experts=("clip-sim", "align-sim"), fusion="moe-top1", epochs=1, seed=42, device=str(dev)))
    train(cfg)
    row = RunDir(tmp / "run").log_rows()[0]
    epoch_cached = float(row["seconds"])
    n_batches = 751 * 17 // 32  # PK batches in an epoch, about images / 32
    per_batch_cached = epoch_cached / n_batches

    # online: tiny backbones on images, then the same gate step, through the training loop every stage uses
    generate(SynthConfig(tmp / "imgs", "market1501", ids=100, cams=6, seed=0))
    model = GateModel(["open_clip", "align"], OnlineStage.dims((256, 256)), "moe-top1", n_classes=751).to(dev)
    stage = OnlineStage(model, load_listing("market1501", tmp / "imgs"), (256, 256), args.online_batches, dev)
    loop = Loop(model, adam(model.parameters(), 3e-4, 5e-4, dev), Schedule(1, args.online_batches, 3e-4, 3e-4),
                np.random.default_rng(0), dev, desc="online")
    row = loop.fit(stage)[0]
    per_batch_online = row["seconds"] / args.online_batches

    print(f"device: {device_line(dev)}, both sides (the cached epoch includes its start-up on this device)")
    print(f"cached : one epoch of {n_batches} batches (12,767 images x 4 views cached, 768-d + 640-d) in {epoch_cached:.2f} s "
          f"= {1000 * per_batch_cached:.1f} ms a batch (target: epoch under 1 s)")
    print(f"online : {1000 * per_batch_online:.1f} ms a batch over {args.online_batches} batches (clip-tiny + align-tiny on 256x256 images); "
          f"an epoch extrapolates to {per_batch_online * n_batches:.0f} s")
    print(f"ratio online/cached per batch: {per_batch_online / per_batch_cached:.1f}x")


if __name__ == "__main__":
    main()
