"""Stand-in experts: their views, the pre-training set, training once per key, loading through --weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featcache.backbones import WeightsNotFoundError, build_backbone
from featcache.cli import main
from featcache.errors import ConfigError
from featcache.standins.config import META_FILE, StandinConfig
from featcache.standins.shipped import ARITHMETIC
from featcache.standins.worker import FIXED_KERNELS, worker_env
from featcache.standins.runner import run_pretrain_standins, standin_key
from featcache.standins.views import VIEWS

TINY = dict(ids=16, cams=3, per_id=4, image_size=(64, 32), epochs=1, batch_size=16, instances=4, device="cpu")


def test_colour_jitter_hides_colour_and_blur_removes_detail():
    g = torch.Generator().manual_seed(0)
    red = torch.zeros(64, 3, 16, 8)
    red[:, 0] = 0.8
    out = VIEWS.get("colour-jitter")(red, g)
    lead = out.mean((2, 3)).argmax(1)
    assert len(set(lead.tolist())) == 3  # the red channel lands anywhere: colour tells nothing
    assert (out[:, 0] == out[:, 1]).all((1, 2)).sum() > 10  # and about half the images are gray
    checker = (torch.arange(128)[:, None] + torch.arange(64)[None, :]) % 2  # at the demo's size: blur scales with width
    x = checker.float().expand(4, 3, 128, 64).clone()
    y = VIEWS.get("blur")(x, torch.Generator().manual_seed(0))
    assert y.diff(dim=-1).abs().mean() < 0.1 * x.diff(dim=-1).abs().mean()
    assert torch.allclose(y.mean(), x.mean(), atol=0.05)  # colour (here: gray level) kept
    a = VIEWS.get("colour-jitter")(x, torch.Generator().manual_seed(3))
    b = VIEWS.get("colour-jitter")(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # seeded: the same images for the same seed


def test_config_refuses_what_is_not_a_stand_in():
    with pytest.raises(ConfigError, match="clip-tiny: not a stand-in preset"):
        StandinConfig(presets=("clip-tiny",))
    with pytest.raises(ConfigError, match="ids 4: fewer than the 8 identities of a batch"):
        StandinConfig(ids=4)


def test_key_follows_the_recipe_not_where_or_how(tmp_path):
    a = StandinConfig(root=tmp_path, **TINY)
    assert standin_key(a, "clip-mini") == standin_key(a.replace(root=tmp_path / "x", device="auto", force=True), "clip-mini")
    assert standin_key(a, "clip-mini") != standin_key(a.replace(epochs=2), "clip-mini")
    assert standin_key(a, "clip-mini") != standin_key(a, "align-mini")


def test_a_stand_in_without_weights_says_how_to_make_them():
    with pytest.raises(WeightsNotFoundError, match="featcache pretrain-standins"):
        build_backbone("align-mini", (32, 16))


@pytest.mark.heavy  # four worker processes, each starting torch
def test_pretrain_once_load_through_weights_and_repeat_exactly(tmp_path, monkeypatch):
    """Each stand-in trains in a worker process of the recipe's arithmetic (one thread, AVX2 kernels), so a run
    asking for other threads repeats the weights exactly."""
    import json
    import os

    cfg = StandinConfig(root=tmp_path / "a", **TINY)
    old = os.umask(0o027)
    try:
        paths = run_pretrain_standins(cfg)
    finally:
        os.umask(old)
    assert set(paths) == {"clip-mini", "align-mini"} and all((p / "standin.json").is_file() for p in paths.values())
    modes = {f.name: oct(f.stat().st_mode & 0o777) for p in paths.values() for f in p.iterdir()}
    assert set(modes.values()) == {"0o640"}, modes  # the umask's, weights included (safetensors writes 0600)
    assert (paths["clip-mini"] / "open_clip_model.safetensors").is_file() and (paths["align-mini"] / "config.json").is_file()
    x = torch.rand(2, 3, 64, 32)
    for name, path in paths.items():
        trained = build_backbone(name, (64, 32), weights=str(path))
        assert trained.weights_id.startswith(("file:", "dir:"))
        random = build_backbone(name, (64, 32), random_init=True)
        with torch.no_grad():
            assert not torch.allclose(trained(x)["pooled"], random(x)["pooled"])  # trained weights, not the random init
    stamp = {n: (p / "standin.json").stat().st_mtime_ns for n, p in paths.items()}
    assert run_pretrain_standins(cfg) == paths  # the same key: reused, not trained again
    assert {n: (p / "standin.json").stat().st_mtime_ns for n, p in paths.items()} == stamp
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the workers' arithmetic is the recipe's, not their parent's
    again = run_pretrain_standins(cfg.replace(root=tmp_path / "b", presets=("align-mini",)))  # the one that drifts most
    from safetensors.torch import load_file

    first, second = (load_file(str(run["align-mini"] / "model.safetensors")) for run in (paths, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)  # deterministic
    assert not list((tmp_path / "a").glob(".*tmp*"))  # published whole, nothing half-written left behind
    fixed = torch.backends.cpu.get_cpu_capability() in FIXED_KERNELS  # a CPU that runs the recipe's kernels
    for run in (paths, again):
        seen = [json.loads((p / META_FILE).read_text())["arithmetic"] for p in run.values()]
        assert all(a["threads"] == 1 and a["device"] == "cpu" for a in seen), seen
        assert not fixed or all(a["environment"] == ARITHMETIC and a["cpu_capability"] == "AVX2" for a in seen), seen


@pytest.mark.heavy
def test_cli_prints_the_weights_options(tmp_path):
    args = ["pretrain-standins", "--root", str(tmp_path), "--preset", "clip-mini", "--epochs", "1"]
    args += [a for k, v in TINY.items() if k not in ("epochs", "image_size") for a in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(main, [*args, "--set", "image_size=64x32"])
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("--weights clip-mini=") and Path(line.split("=", 1)[1]).is_dir()
    res = CliRunner().invoke(main, ["pretrain-standins", "--preset", "clip-tiny"])
    assert res.exit_code == 2 and "clip-tiny: not a stand-in preset" in res.output


def test_pretraining_set_is_other_people(tmp_path):
    from featcache.standins.data import render_pretraining_set

    imgs, labels = render_pretraining_set(4, 2, 3, seed=0, size=(32, 16))
    assert imgs.shape == (12, 32, 16, 3) and imgs.dtype == np.uint8 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    again, _ = render_pretraining_set(4, 2, 3, seed=0, size=(32, 16))
    assert np.array_equal(imgs, again)


def test_a_pipeline_trains_only_the_stand_ins_it_is_not_given(tmp_path):
    from featcache.pipeline.config import load_pipeline
    from featcache.pipeline.stages import build_stages, standin_backbones

    demo = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
    p = load_pipeline(demo, ("extract.backbones=clip-mini,align-mini",), out=tmp_path / "o")  # a string, as --set gives it
    assert standin_backbones(p) == ("clip-mini", "align-mini")
    given = tmp_path / "w"
    given.mkdir()
    p = load_pipeline(demo, (f"extract.weights={{clip-mini: {given}}}",), out=tmp_path / "o")
    assert standin_backbones(p) == ("align-mini",)
    names = [st.name for st in build_stages(p)[0]]
    assert names[:3] == ["synth", "pretrain-standins", "extract"]
    p = load_pipeline(demo, (f"extract.weights={{clip-mini: {given}, align-mini: {given}}}",), out=tmp_path / "o")
    assert "pretrain-standins" not in [st.name for st in build_stages(p)[0]]


def test_a_failed_worker_is_one_line_naming_its_stand_in_and_stops_the_others(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    from featcache.errors import RunError
    from featcache.standins import worker

    started = {}

    def fake_start(job, cfg, data, device, env):
        assert np.load(data)["images"].shape[0] == cfg.ids * cfg.per_id  # the rendered set, handed over by file
        assert env["OMP_NUM_THREADS"] == "1"
        job.out.mkdir(parents=True)  # a folder half written, as a worker leaves it
        code = ("import sys, time; print('warming up', file=sys.stderr); time.sleep(60)" if job.name == "clip-mini" else
                f"import sys; print('error: {job.name}: the loss became NaN at epoch 1', file=sys.stderr); sys.exit(1)")
        job.proc = started[job.name] = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)

    monkeypatch.setattr(worker.Job, "start", fake_start)
    monkeypatch.setattr("featcache.standins.runner.usable_cores", lambda: 2)
    cfg = StandinConfig(root=tmp_path, presets=("clip-mini", "align-mini"), **{**TINY, "ids": 8})
    t0 = time.monotonic()
    with pytest.raises(RunError, match=r"^pretrain-standins align-mini: the loss became NaN at epoch 1$"):
        run_pretrain_standins(cfg)
    assert time.monotonic() - t0 < 30 and started["clip-mini"].returncode == -9  # stopped, not waited for
    assert not list(tmp_path.iterdir())  # neither worker's folder left behind


def test_a_killed_worker_says_which_stand_in_and_how():
    import subprocess
    import sys

    from featcache.standins.worker import Job

    job = Job("align-mini", "k", Path("unused"), subprocess.Popen([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]))
    job.proc.wait()
    job.tail = ["align-mini epoch 3/12:  20%"]
    assert job.failure() == "align-mini: its training process killed by SIGKILL (last output: align-mini epoch 3/12:  20%)"


def test_a_cpu_without_avx2_keeps_one_thread_but_its_own_kernels(monkeypatch, caplog):
    """Asking torch for AVX2 kernels on a CPU without them would not be a fallback: the worker is left the CPU's own
    kernels, one thread, and the user a warning that its weights differ."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with caplog.at_level("WARNING", logger="featcache.standins.worker"):
        env = worker_env("cpu")
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert all(env.get(k) == os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA"))
    assert "this CPU has no AVX2 (torch reports DEFAULT kernels)" in caplog.text
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert {k: worker_env("cpu")[k] for k in ARITHMETIC} == ARITHMETIC
    assert worker_env("cuda") == dict(os.environ)  # a GPU's arithmetic is not the CPU recipe's
