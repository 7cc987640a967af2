"""The shared training loop on a toy stage: schedule, log columns, resume, the NaN stop (immediate and deferred),
precision choices, and the gate's route loss without a host round trip. The stages' own tests run it for real."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.config import StageConfig
from featcache.errors import ConfigError, RunError
from featcache.training import loop as loop_mod
from featcache.training.loop import Epoch, Loop, Schedule, Step
from featcache.training.precision import Precision
from featcache.training.rundir import RunDir


class Toy:
    """A linear model on fixed random data; ``poison`` makes the loss of one (epoch, batch) NaN."""

    columns = ("loss", "mse", "never")

    def __init__(self, model: torch.nn.Module, poison: tuple[int, int] | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(24, 4, generator=g), torch.randn(24, 1, generator=g)
        self.model, self.poison, self.epoch = model, poison, 0

    def begin_epoch(self, epoch: int, rng: np.random.Generator) -> Epoch:
        self.epoch = epoch
        order = rng.permutation(24)
        batches = [order[i: i + 8] for i in range(0, 24, 8)]
        return Epoch(list(enumerate(batches)), len(batches), 24)

    def step(self, batch) -> Step:
        i, idx = batch
        mse = ((self.model(self.x[idx]) - self.y[idx]) ** 2).mean()
        if self.poison == (self.epoch, i):
            mse = mse * float("nan")
        return Step(mse * 2, {"mse": mse})

    def end_epoch(self, epoch: int) -> dict:
        return {"extra": epoch * 10}


@dataclass(frozen=True)
class ToyConfig(StageConfig):
    command = "toy"

    seed: int = 0


def fit(out: Path | None, epochs: int = 3, poison=None, resume: bool = False) -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    rd = ckpt = None
    if out is not None:
        rd, ckpt = RunDir.start(out, ToyConfig(), {"toy": 1}, resume)
    loop = Loop(model, opt, Schedule(epochs, 3, 0.1, 0.001), np.random.default_rng(0), torch.device("cpu"), run=rd,
                checkpoint=ckpt, desc="toy")
    return model, loop.fit(Toy(model, poison))


def test_rows_schedule_and_columns(tmp_path):
    _, rows = fit(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["extra"] for r in rows] == [0, 10, 20]
    assert all(r["never"] == "" and r["loss"] == pytest.approx(2 * r["mse"]) and r["images_per_s"] > 0 for r in rows)
    assert rows[-1]["lr"] == pytest.approx(Schedule(3, 3, 0.1, 0.001).lr_at(2, 2)) and rows[0]["lr"] < 0.1
    assert rows[-1]["mse"] < rows[0]["mse"]  # it trains
    with open(tmp_path / "run" / "log.csv") as fh:
        logged = list(csv.DictReader(fh))
    assert list(logged[0]) == ["epoch", "loss", "mse", "never", "lr", "seconds", "images_per_s", "extra"] and len(logged) == 3


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from conftest import interrupt_after_epoch

    whole, _ = fit(tmp_path / "whole")
    undo = interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut")
    undo()
    cut, rows = fit(tmp_path / "cut", resume=True)
    assert [r["epoch"] for r in rows] == [3]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), cut.state_dict().values()))


def test_nan_stops_naming_the_batch_deferred_or_not(tmp_path, monkeypatch):
    with pytest.raises(RunError, match=r"loss became nan at epoch 2, batch 3: stopped; the last good checkpoint \(after epoch 1\)") as now:
        fit(tmp_path / "now", poison=(1, 2))
    monkeypatch.setattr(loop_mod, "DEFER_NAN_CHECK", True)  # the GPU's way: no wait per step, checked at the epoch's end
    with pytest.raises(RunError) as deferred:
        fit(tmp_path / "deferred", poison=(1, 2))
    assert str(deferred.value).replace("deferred", "now") == str(now.value)
    assert (tmp_path / "deferred" / "ckpt" / "last").read_text().strip() == "1"
    with pytest.raises(RunError, match=r"^toy: loss became nan at epoch 1, batch 2: stopped$"):  # no run directory
        fit(None, poison=(0, 1))


def test_precision_follows_the_device_and_refuses_what_it_cannot_train():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Precision.resolve("auto", cpu, convolutional=True) == Precision(None, False, "cpu")
    assert Precision.resolve("auto", cuda, convolutional=True) == Precision(torch.bfloat16, True, "cuda")
    assert Precision.resolve("auto", cuda) == Precision(torch.bfloat16, False, "cuda")
    assert Precision.resolve("fp32", cuda, convolutional=True) == Precision(None, True, "cuda")
    assert Precision.resolve("bf16", cpu).name == "bf16"
    with pytest.raises(ConfigError, match="--precision 'fp16': expected one of auto, fp32, bf16"):
        Precision.resolve("fp16", cpu)


def test_route_loss_needs_no_host_round_trip_and_is_zero_without_targets():
    from featcache.gate.route_targets import NO_TARGET
    from featcache.gate.objective import route_loss

    logits = torch.randn(6, 2, requires_grad=True)
    some = torch.tensor([0, 1, NO_TARGET, 1, NO_TARGET, 0])
    want = torch.nn.functional.cross_entropy(logits, some, ignore_index=NO_TARGET)
    assert torch.equal(route_loss(logits, some), want)
    none = torch.full((6,), NO_TARGET)
    loss = route_loss(logits, none)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))  # not NaN


@pytest.mark.heavy
def test_a_gate_epoch_reads_nothing_back_to_the_host_per_step(tmp_path, monkeypatch):
    """On a GPU a value read back (a loss printed, a condition on a tensor) or a tensor made of host data makes the
    host wait for the device. Their count while the loop runs does not grow with the steps: the same for 6 steps
    an epoch as for 1 (log sums and the NaN check at the epoch's end), for route targets of both kinds and for
    noisy gating with its load loss."""
    from conftest import count_host_reads, logged_steps
    from featcache.gate.config import GateConfig
    from featcache.gate.runner import run_train_gate
    from featcache.synth_cache import write_feature_cache

    cache = write_feature_cache(tmp_path / "cam.h5", ids=12, per_id=4, cams=4, views=2, kind="camera")
    reads = count_host_reads(monkeypatch)
    for name, kw in {"loss": {}, "retrieval": {"route_target": "retrieval"}, "noise": {"gate_noise": 1.0, "load": 0.1}}.items():
        seen, steps = [], []
        for batch in (8, 32):  # 6 steps an epoch and 1
            before = reads["n"]
            run = run_train_gate(GateConfig.from_dict(dict(cache=cache, out=tmp_path / f"{name}-{batch}", epochs=2, batch_size=batch, instances=4 if batch > 8 else 2, **kw))).run
            seen.append(reads["n"] - before)
            steps.append(sum(logged_steps(run, batch)))
        assert steps[0] > steps[1] and seen[0] == seen[1], (name, steps, seen)


def test_a_log_begun_with_other_columns_is_resumed_under_both_headers(tmp_path, monkeypatch):
    """A run resumed by a featcache whose log rows have other columns (the shared loop added images/s): no value
    lands under another column's name."""
    from conftest import interrupt_after_epoch

    undo = interrupt_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "run")
    undo()
    log = tmp_path / "run" / "log.csv"
    with open(log, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    old = {k: v for k, v in row.items() if k not in ("images_per_s", "never")}  # as an older version wrote it
    with open(log, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(old))
        w.writeheader()
        w.writerow(old)
    fit(tmp_path / "run", resume=True)
    with open(log, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and None not in rows[0]
    assert rows[0]["images_per_s"] == "" and float(rows[1]["images_per_s"]) > 0 and rows[0]["extra"] == "0" and rows[2]["extra"] == "20"
    assert set(list(rows[0])[-2:]) == {"images_per_s", "never"}  # the old header first, then the new columns


def test_hooks_run_at_the_loops_fixed_points_in_order_and_can_be_added_from_outside(tmp_path):
    """fast-reid's HookBase shape: the loop's own hooks (progress, NaN stop, checkpoint, log line) then the caller's,
    and hooks added around a stage's run (how gpu_check counts host syncs) without patching anything."""
    from featcache.training.hooks import Checkpointer, EpochLogger, Hook, NanStop, ProgressBar, added

    calls = []

    class Spy(Hook):
        def __init__(self, name):
            self.name = name

        def before_train(self, loop):
            calls.append((self.name, "before_train"))

        def before_epoch(self, loop, epoch, plan):
            calls.append((self.name, "before_epoch", epoch, plan.steps))

        def before_step(self, loop, epoch, i):
            calls.append((self.name, "before_step", epoch, i))

        def after_step(self, loop, epoch, i, out):
            calls.append((self.name, "after_step", epoch, i, round(float(out.loss.detach()), 6) > 0))

        def after_epoch(self, loop, epoch, row):
            calls.append((self.name, "after_epoch", epoch, row["epoch"]))

        def after_train(self, loop):
            calls.append((self.name, "after_train"))

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    rd, _ = RunDir.start(tmp_path / "run", ToyConfig(), {"toy": 1}, False)
    with added(Spy("outside")):
        loop = Loop(model, torch.optim.Adam(model.parameters(), lr=0.1), Schedule(2, 3, 0.1, 0.001),
                    np.random.default_rng(0), torch.device("cpu"), run=rd, desc="toy", hooks=(Spy("mine"),))
    assert [type(h) for h in loop.hooks[:4]] == [ProgressBar, NanStop, Checkpointer, EpochLogger]
    loop.fit(Toy(model))
    mine = [c[1:] for c in calls if c[0] == "mine"]
    assert mine[0] == ("before_train",) and mine[1] == ("before_epoch", 0, 3) and mine[-1] == ("after_train",)
    assert mine[2:8] == [("before_step", 0, 0), ("after_step", 0, 0, True), ("before_step", 0, 1), ("after_step", 0, 1, True),
                         ("before_step", 0, 2), ("after_step", 0, 2, True)]
    assert ("after_epoch", 1, 2) in mine and len(mine) == 2 + 2 * (1 + 6 + 1)
    assert [c[1:] for c in calls if c[0] == "outside"] == mine  # the added hook saw the same points
    # a loop built after the block runs without it
    calls.clear()
    Loop(model, torch.optim.Adam(model.parameters(), lr=0.1), Schedule(1, 3, 0.1, 0.001), np.random.default_rng(0),
         torch.device("cpu")).fit(Toy(model))
    assert calls == []


def test_after_train_runs_when_the_run_stops(tmp_path):
    from featcache.training.hooks import Hook

    ended = []

    class End(Hook):
        def after_train(self, loop):
            ended.append(True)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    loop = Loop(model, torch.optim.Adam(model.parameters(), lr=0.1), Schedule(3, 3, 0.1, 0.001), np.random.default_rng(0),
                torch.device("cpu"), desc="toy", hooks=(End(),))
    with pytest.raises(RunError, match="loss became nan at epoch 2, batch 2"):
        loop.fit(Toy(model, poison=(1, 1)))
    assert ended == [True]


def test_no_benchmark_patches_the_training_loop():
    """Benchmarks watch training through hooks: none assigns to Loop.fit, an optimizer's step or Tensor.backward."""
    import ast

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in ("fit", "step", "backward", "epoch"):
                    bad.append(f"{path.name}:{node.lineno} assigns .{t.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "setattr":
                if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in ("fit", "step", "backward"):
                    bad.append(f"{path.name}:{node.lineno} setattr {node.args[1].value}")
    assert not bad, bad


def test_a_checkpoint_with_channels_last_moments_resumes_into_a_contiguous_model():
    """A GPU run saves Adam's moments in its weights' channels_last layout, and fused. Resumed on the CPU, into a model
    in the default layout, fused Adam paired each moment with the wrong elements, silently. The moments now take
    their weight's layout: the step equals the one from the same moments saved contiguous."""
    from featcache.training.rundir import Checkpoint, training_state

    def conv():
        torch.manual_seed(0)
        return torch.nn.Conv2d(3, 8, 3)

    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(8, 3, 3, 3, generator=g), torch.rand(8, 3, 3, 3, generator=g)
    grads = [torch.randn(8, 3, 3, 3, generator=g), torch.randn(8, generator=g)]

    def checkpoint(layout) -> Checkpoint:
        model = conv().to(memory_format=layout)
        opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
        for p, gr in zip(model.parameters(), grads):
            p.grad = torch.empty_like(p).copy_(gr)  # in the weight's layout, as autograd gives it
        opt.step()  # the state exists; then the moments of interest, in this layout
        opt.state[model.weight]["exp_avg"] = m1.contiguous(memory_format=layout)
        opt.state[model.weight]["exp_avg_sq"] = m2.contiguous(memory_format=layout)
        return Checkpoint(1, {k: v.contiguous() for k, v in model.state_dict().items()}, training_state(opt, np.random.default_rng(0)))

    steps = []
    for layout in (torch.channels_last, torch.contiguous_format):
        ckpt = checkpoint(layout)
        model = conv()
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        ckpt.restore(model, opt, np.random.default_rng(0), torch.device("cpu"))
        for p, gr in zip(model.parameters(), grads):
            p.grad = gr.clone()
        opt.step()
        steps.append(model.weight.detach().clone())
    assert torch.equal(steps[0], steps[1]), (steps[0] - steps[1]).abs().max()


def test_rundir_reads_its_own_files_and_refuses_unfinished_weights(tmp_path):
    from featcache.errors import InputError
    from featcache.training.rundir import GATE_STATS, VAL

    rd, _ = RunDir.start(tmp_path / "run", ToyConfig(), {"toy": 1}, resume=False)
    assert rd.is_started() and not rd.is_finished() and rd.log_rows() == [] and rd.val() is None and rd.gate_stats() is None
    with pytest.raises(InputError, match="unfinished run \\(it reached epoch 0\\)"):
        rd.weights()
    model, rows = fit(tmp_path / "run", resume=True)
    assert [r["epoch"] for r in rd.log_rows()] == ["1", "2", "3"] and rd.read_config() == {"seed": 0}
    rd.write_json(VAL, {"mAP": 0.5})
    assert rd.val() == {"mAP": 0.5} and rd.artifact(GATE_STATS).parent == rd.path and rd.meta() == {"toy": 1}
    rd.finish(model.state_dict())
    assert rd.is_finished() and torch.equal(rd.weights()["weight"], model.weight.detach())
    rd.artifact(VAL).write_text("{not json")
    with pytest.raises(InputError, match="val.json: cannot read it"):
        rd.val()
