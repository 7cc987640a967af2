"""``featcache train-gate``: train, then write gate statistics and the teacher targets."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from featcache.gate.outputs import gate_statistics, recalibrate_bn, write_targets
from featcache.fileio import atomic_write
from featcache.gate.train import WEIGHTS, GateConfig, default_experts, train

logger = logging.getLogger(__name__)


@dataclass
class GateResult:
    run: Path
    stats: dict
    targets: Path


def run_train_gate(cfg: GateConfig, resume: bool = False) -> GateResult:
    if not cfg.experts:
        cfg = GateConfig.from_dict({**cfg.to_dict(), "experts": list(default_experts(Path(cfg.cache)))})
    model, data = train(cfg, resume)
    run = Path(cfg.out)
    recalibrate_bn(model, data)  # the BN neck must see the features inference produces
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run / WEIGHTS, lambda p: save_file(weights, str(p), metadata={"bn": "recalibrated on inference-mode features"}))
    stats = gate_statistics(model, data, run)
    targets = write_targets(model, data, Path(cfg.cache), run)
    logger.info("gate: mean weights %s, routed %s; teacher targets in %s", stats["mean_weight"], stats["routed_share"], targets)
    return GateResult(run, stats, targets)
