"""The ``gate:RUN_DIR`` model kind: a trained teacher's BN-neck feature of the fused experts, from cached features.

Registered from the gate package, so evaluation needs no knowledge of the
gate. Rows are read and pushed through the model in blocks on the chosen
device, so memory stays at the output features plus one block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.cache import CacheSplit, known_route
from featcache.errors import InputError
from featcache.evaluation.features import FeatureContext, FeatureSource, RunFeatures, register_kind, register_run_model
from featcache.evaluation.search import l2_normalize


@dataclass
class GateFeatures(RunFeatures):
    """A trained teacher's fused BN-neck feature over cached backbone features."""

    def load(self, device: str) -> tuple:
        from featcache.gate.train import load_run

        return load_run(self.run, device=device)

    def features(self, split: CacheSplit, ctx: FeatureContext) -> np.ndarray:
        import torch

        from featcache.gate.model import DIM
        from featcache.runtime import resolve_device

        device = resolve_device(ctx.device)
        model, cfg, meta = self._load(device)
        oracle = cfg.fusion == "moe-oracle"
        by_condition = cfg.oracle_by_condition() if oracle else None
        for name, w in zip(meta["experts"], meta["expert_weights"]):
            have = split.identity.weights(name)
            if have is None:
                raise InputError(f"{split.cache} has no backbone {name}, an expert of {self.run}; it holds: {', '.join(split.identity.backbones)}")
            if have != w:
                raise InputError(f"{split.cache}: expert {name} has weights {have}, but {self.run} was trained on {w}")
        views = (0, 1) if ctx.flip else (0,)
        # per row: the experts' inputs, the adapters' and gate's activations, the output (float32)
        per_row = 4 * (sum(meta["dims"]) + 4 * DIM * len(meta["experts"]) + 2 * DIM)
        block = ctx.rows_per_block(per_row)
        out = np.zeros((len(split), DIM), dtype=np.float32)
        with split.open() as c, torch.inference_mode():
            for v in views:
                rows = split.rows(v)
                for s in range(0, len(rows), block):
                    xs = [torch.from_numpy(c.read(e, "pooled", rows[s: s + block]).astype(np.float32)).to(device)
                          for e in meta["experts"]]
                    route = known_route(c, rows[s: s + block], meta["experts"], by_condition) if oracle else None
                    if oracle and (route is None or (route < 0).any()):
                        raise InputError(f"{self.run} routes by known experts (moe-oracle), which {split.cache} does not record")
                    rt = torch.from_numpy(route).to(device) if route is not None else None
                    out[s: s + block] += model(xs, rt)[1].float().cpu().numpy()
        out /= len(views)
        return l2_normalize(out, inplace=True)

    def backbones(self) -> list[str]:
        from featcache.training.rundir import RunDir

        return list(RunDir(self.run, "train-gate").meta()["experts"])

    def describe(self) -> dict:
        from featcache.training.rundir import RunDir

        rd = RunDir(self.run, "train-gate")
        return {"kind": "gate", "run": str(self.run), "feature": "BN-neck feature of the fused experts",
                "trained_on": {"cache": rd.read_config().get("cache"), "identity": rd.meta().get("cache_identity"),
                               "partial": rd.meta().get("partial")}}


@register_kind("gate", "RUN_DIR (a train-gate run: the teacher's retrieval feature)")
def _gate(ref: str) -> FeatureSource:
    return GateFeatures(Path(ref))


@register_run_model("train-gate", "a trained teacher: its experts' backbones, adapters, gate and BN neck")
def _teacher_model(run: Path, device: str):
    from featcache.gate.embedder import load_teacher_model  # torch and the backbones: only when a model is loaded

    return load_teacher_model(run, device)
