"""``featcache train-gate``: train, recalibrate the BN neck, then write the final weights, statistics and teacher targets."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from featcache.gate.diagnostics import evaluate_val
from featcache.gate.outputs import collapse_note, gate_statistics, recalibrate_bn
from featcache.gate.targets import TARGETS, write_targets
from featcache.gate.train import GateConfig, check_experts, default_experts, train
from featcache.training.rundir import VAL

logger = logging.getLogger(__name__)


@dataclass
class GateResult:
    run: Path
    stats: dict
    targets: Path
    finished_before: bool = False  # resumed a run that had finished its epochs: nothing was done

    def describe(self, fusion: str) -> str:
        """One line for the command line: the gate's routing, or that the fusion has none."""
        if self.finished_before:
            return f"{self.run}: nothing to do: the run has finished its epochs (give a larger --epochs to extend it)"
        if self.stats.get("gated", self.stats.get("routed_share") is not None):  # stats of older runs lack "gated"
            return (f"{self.run}: gate mean weights {self.stats['mean_weight']}; routed {self.stats['routed_share']}; "
                    f"teacher targets {self.targets}")
        return f"{self.run}: fusion {fusion} (no gate); teacher targets {self.targets}"  # weighs the experts equally


def run_train_gate(cfg: GateConfig, resume: bool = False) -> GateResult:
    if not cfg.experts:
        experts = default_experts(cfg.cache)
        check_experts(cfg.fusion, experts)
        cfg = cfg.replace(experts=list(experts))
    model, data, rd = train(cfg, resume)  # checks the config and inputs against the run's, finished or not
    if resume and rd.is_finished():  # its outputs were written before its final weights (an extension removes them)
        logger.info("%s is a finished run: nothing to resume", rd.path)
        return GateResult(rd.path, rd.gate_stats(), rd.artifact(TARGETS), finished_before=True)
    recalibrate_bn(model, data)  # the BN neck must see the features inference produces
    stats = gate_statistics(model, data, rd)
    if data.val is not None:  # what a recipe is chosen on: never the test split
        val = evaluate_val(model, data.val)
        rd.write_json(VAL, val)
        if val["mAP"] is None:
            logger.warning("validation (%d identities): nothing to evaluate: %s", val["identities"], val["reason"])
        else:
            logger.info("validation (%d identities): mAP %.4f; true matches embedded by the query's expert %s, by another %s",
                        val["identities"], val["mAP"], val["mAP_same"], val["mAP_cross"])
    targets = write_targets(model, data, cfg.cache, rd.path)
    rd.finish(model.state_dict(), note="BN recalibrated on inference-mode features")  # last: the run is now finished
    logger.info("gate: mean weights %s, routed %s; teacher targets in %s", stats["mean_weight"], stats["routed_share"], targets)
    if collapse_note(stats):
        logger.warning("%s: %s", rd.path, collapse_note(stats))
    return GateResult(rd.path, stats, targets)
