"""The command line end to end on synthetic data, through click's CliRunner."""

from __future__ import annotations

import json
import re

import pytest

import yaml
from click.testing import CliRunner

from featcache.cli import main


def test_synth_extract_info_end_to_end(tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["synth", str(tmp_path / "ds"), "--layout", "veri776", "--ids", "6", "--cams", "4", "--seed", "2"])
    assert res.exit_code == 0, res.output
    cache = tmp_path / "veri.h5"
    args = ["extract", "--dataset", "veri776", "--root", str(tmp_path / "ds"), "--backbone", "clip-tiny",
            "--backbone", "align-tiny", "--out", str(cache), "--image-size", "48", "--workers", "0", "--views", "2"]
    res = r.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "failed 0" in res.output
    saved = yaml.safe_load((tmp_path / "veri.h5.config.yaml").read_text())
    assert saved["extract"]["backbones"] == ["clip-tiny", "align-tiny"]

    res = r.invoke(main, ["info", str(cache), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    n = {k: len((tmp_path / "ds" / f"name_{k}.txt").read_text().split()) for k in ("train", "query", "test")}
    assert info["splits"] == {"train": n["train"], "query": n["query"], "gallery": n["test"]}
    assert info["failed"] == []
    arr = info["backbones"]["clip-tiny"]["arrays"]
    assert arr["pooled"]["shape"][1:] == [96] and arr["pooled"]["dtype"] == "float32"
    assert arr["tokens"]["dtype"] == "float16" and arr["tokens"]["rows"] == "image"
    assert info["backbones"]["align-tiny"]["bytes"] > 0

    res = r.invoke(main, ["info", str(cache)])
    assert res.exit_code == 0 and "backbone clip-tiny" in res.output and "cls_attn" in res.output


def test_backbones_lists_presets():
    res = CliRunner().invoke(main, ["backbones"])
    assert res.exit_code == 0
    for name in ("clip-vit-b16", "align-b7", "clip-tiny", "align-tiny"):
        assert name in res.output


def test_yaml_config_sets_defaults_and_rejects_unknown_keys(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"synth": {"layout": "market1501", "ids": 4, "cams": 2, "seed": 9}}))
    r = CliRunner()
    res = r.invoke(main, ["--config", str(cfg), "synth", str(tmp_path / "ds"), "--ids", "6"])
    assert res.exit_code == 0, res.output
    pids = {p.name[:4] for p in (tmp_path / "ds").rglob("*.jpg")} - {"0000", "-1_c"}
    assert len(pids) == 6  # the command line overrode the YAML's ids
    cfg.write_text(yaml.safe_dump({"synth": {"identities": 4}}))
    res = r.invoke(main, ["--config", str(cfg), "synth", str(tmp_path / "ds2")])
    assert res.exit_code == 2 and "unknown key 'identities' for synth" in res.output and "valid keys: out, layout, ids" in res.output


def test_train_gate_then_eval_through_the_command_line(tmp_path):
    from featcache.synth_cache import write_feature_cache

    cache = write_feature_cache(tmp_path / "f.h5", ids=16, per_id=4, cams=4, views=2)
    r = CliRunner()
    res = r.invoke(main, ["train-gate", "--cache", str(cache), "--out", str(tmp_path / "run"), "--epochs", "2", "--fusion", "moe-top2"])
    assert res.exit_code == 0, res.output
    assert "teacher targets" in res.output and (tmp_path / "run" / "gate_hist.png").is_file()
    res = r.invoke(main, ["train-gate", "--cache", str(cache), "--out", str(tmp_path / "run"), "--epochs", "2"])
    assert res.exit_code == 1 and "--resume" in res.output
    res = r.invoke(main, ["eval", "--cache", str(cache), "--model", f"gate:{tmp_path / 'run'}", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["model"]["kind"] == "gate"


def test_every_field_settable_and_resolved_config_saved_and_reusable(tmp_path):
    """YAML < --set < options; the run's config.yaml, given back with --config, reproduces the run."""
    from featcache.synth_cache import write_feature_cache

    cache = write_feature_cache(tmp_path / "f.h5", ids=16, per_id=4, cams=4, views=2)
    cfg = tmp_path / "gate.yaml"
    cfg.write_text(yaml.safe_dump({"train-gate": {"cache": str(cache), "epochs": 3, "lr": 1e-3, "margin": 0.5, "fusion": "average"}}))
    r = CliRunner()
    res = r.invoke(main, ["--config", str(cfg), "train-gate", "--out", str(tmp_path / "a"), "--set", "lr=2e-4",
                          "--set", "instances=2", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["train-gate"]
    assert (saved["epochs"], saved["lr"], saved["margin"], saved["instances"], saved["fusion"]) == (2, 2e-4, 0.5, 2, "average")
    assert saved["experts"] == ["align-sim", "clip-sim"] and saved["batch_size"] == 32  # defaults, resolved
    # the saved config is a valid --config file: the same run again gives the same weights
    res = r.invoke(main, ["--config", str(tmp_path / "a" / "config.yaml"), "train-gate", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_help_lists_registered_kinds_and_choices():
    r = CliRunner()
    res = r.invoke(main, ["eval", "--help"])
    assert res.exit_code == 0 and "gate:RUN_DIR" in res.output and "backbone:PRESET" in res.output
    assert "[default: 256]" in res.output  # --budget-mb's default, read from EvalConfig
    res = r.invoke(main, ["train-gate", "--help"])
    assert res.exit_code == 0 and "moe-top1" in res.output and "[default: 60]" in res.output and "--set KEY=VALUE" in res.output


def test_logs_only_with_verbose_and_never_carriage_returns(tmp_path):
    """Not a terminal (as in a log file): no progress frames; INFO lines only with -v."""
    from featcache.synth_cache import write_feature_cache

    cache = write_feature_cache(tmp_path / "f.h5", ids=16, per_id=4, cams=4, views=2)
    args = ["train-gate", "--cache", str(cache), "--fusion", "average", "--epochs", "2"]
    r = CliRunner()
    quiet = r.invoke(main, args + ["--out", str(tmp_path / "q")])
    assert quiet.exit_code == 0, quiet.output
    assert "\r" not in quiet.output and "INFO" not in quiet.output
    loud = r.invoke(main, ["-v", *args, "--out", str(tmp_path / "v")])
    assert loud.exit_code == 0 and "\r" not in loud.output
    assert any(ln.startswith("INFO featcache.training.hooks: train-gate epoch 2") for ln in loud.output.splitlines()), loud.output


def test_progress_lines_in_a_file():
    import io

    from featcache.progress import progress

    buf = io.StringIO()
    for _ in progress(range(5), desc="work", file=buf):
        pass
    for _ in progress(range(3), desc="transient", file=buf, leave=False):
        pass
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("work: 100%|") and "5/5" in lines[0] and "\r" not in buf.getvalue()


@pytest.mark.heavy
def test_extract_gate_distill_eval_export_profile_through_the_command_line(market_root, tmp_path):
    """The whole method on a synthetic Market-1501 with tiny presets, every stage through the command line."""
    import onnx

    r = CliRunner()
    cache, gate, student = tmp_path / "c.h5", tmp_path / "gate", tmp_path / "student"

    def ok(*argv: str) -> str:
        res = r.invoke(main, [str(a) for a in argv])
        assert res.exit_code == 0, res.output
        return res.output

    ok("extract", "--dataset", "market1501", "--root", market_root, "--backbone", "clip-tiny", "--backbone", "align-tiny",
       "--out", cache, "--views", "3", "--image-size", "64x32", "--workers", "0", "--batch-size", "16")
    ok("train-gate", "--cache", cache, "--out", gate, "--epochs", "1", "--set", "batch_size=16")
    out = ok("distill", "--cache", cache, "--gate", gate, "--out", student, "--student-init", "random", "--epochs", "1",
             "--set", "batch_size=16", "--pixel-cache", tmp_path / "px.h5")
    assert "resnet18 after epoch 1" in out and (student / "model.safetensors").is_file()
    ok("eval", "--cache", cache, "--model", f"student:{student}", "--agree-with", f"gate:{gate}", "--json", tmp_path / "e.json", "--flip")
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["model"]["kind"] == "student" and rep["feature_dim"] == 2048 and 0 <= rep["agreement"]["top_k_overlap"] <= 1
    assert rep["random_init_backbones"] == ["align-tiny", "clip-tiny"]  # the teacher's experts: labelled as random
    out = ok("export", "--model", f"student:{student}", "--onnx", tmp_path / "s.onnx")
    assert "checked with ONNX Runtime" in out
    assert onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch axis
    # one model per call: several are profiled in fresh processes on CPU (tests/test_profile_export.py, slow set)
    rows = json.loads(ok("profile", "--model", f"gate:{gate}", "--batch", "1,2", "--repeats", "1", "--json"))
    assert len(rows) == 1 and rows[0]["flops_per_image"] > 0 and rows[0]["kind"] == "gate"
    assert "student" in ok("profile", "--model", f"student:{student}", "--batch", "1", "--repeats", "1")


def test_set_takes_option_spellings_help_examples_fit_the_command_and_every_command_takes_cuda_n(tmp_path):
    from featcache.cli import main

    r = CliRunner()
    for cmd in ("extract", "eval", "train-gate", "distill", "profile", "export", "synth", "pretrain-standins"):
        text = r.invoke(main, [cmd, "--help"]).output
        example = re.search(r"--set\s+([a-z_]+)=", text)
        assert example, cmd
        fields = re.search(r"Fields:\s+(.*?)\.\s", text.replace("\n", " "), re.S).group(1).replace(" ", "").split(",")
        assert example.group(1) in fields, (cmd, example.group(1))  # never lr= for a command without lr
    # --set lambda=... is --lambda's field (lambda_); --set json=... is --json's (json_out): taken, so the missing
    # cache is what stops the run, while a key that is no field's is refused first
    res = r.invoke(main, ["eval", "--cache", str(tmp_path / "none.h5"), "--model", "backbone:x", "--set", "lambda=0.5",
                          "--set", "json=r.json"])
    assert res.exit_code == 1 and "does not exist" in res.output, res.output
    res = r.invoke(main, ["eval", "--cache", str(tmp_path / "none.h5"), "--model", "backbone:x", "--set", "lambda_x=0.5"])
    assert res.exit_code == 2 and "lambda_x" in res.output
    for cmd in (["eval", "--cache", "x.h5", "--model", "backbone:x"], ["train-gate", "--cache", "x.h5", "--out", "r"],
                ["profile", "--model", "student:r"], ["extract", "--dataset", "market1501", "--root", ".", "--backbone", "clip-tiny", "--out", "x.h5"]):
        bad = r.invoke(main, [*cmd, "--device", "cuda:x"])
        assert bad.exit_code == 2 and "expected auto, cpu, cuda or cuda:N" in bad.output, cmd
        good = r.invoke(main, [*cmd, "--device", "cuda:1"])
        assert "expected auto, cpu, cuda or cuda:N" not in good.output, cmd


def test_train_gate_has_batch_size_and_says_a_batch_is_p_by_k(tmp_path):
    from featcache.cli import main
    from featcache.synth_cache import write_feature_cache

    cache = write_feature_cache(tmp_path / "f.h5", ids=6, per_id=4, cams=2)
    r = CliRunner()
    res = r.invoke(main, ["train-gate", "--cache", str(cache), "--out", str(tmp_path / "g"), "--batch-size", "30"])
    assert res.exit_code == 2 and "--batch-size 30: a batch is P identities x K images each (K = --instances 4)" in res.output
    res = r.invoke(main, ["train-gate", "--cache", str(cache), "--out", str(tmp_path / "g"), "--batch-size", "64"])
    assert res.exit_code == 1 and "fewer than P = 16" in res.output and "lower --batch-size to at most 24" in res.output
    res = r.invoke(main, ["train-gate", "--cache", str(cache), "--out", str(tmp_path / "g"), "--batch-size", "12",
                          "--instances", "2", "--epochs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("command, says", [
    ("extract", "the images written so far are kept; rerun the same command to extract the rest."),
    ("train-gate", "rerun the same command with --resume to continue from the last finished epoch."),
])
def test_ctrl_c_says_how_to_continue(monkeypatch, tmp_path, command, says):
    """Ctrl-C printed only click's 'Aborted!'."""
    from featcache.extract import runner as extract_runner
    from featcache.gate import runner as gate_runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_runner, "run_extract", interrupted)
    monkeypatch.setattr(gate_runner, "run_train_gate", interrupted)
    args = {"extract": ["--dataset", "market1501", "--root", str(tmp_path), "--backbone", "clip-tiny", "--out", str(tmp_path / "c.h5")],
            "train-gate": ["--cache", str(tmp_path / "c.h5"), "--out", str(tmp_path / "run")]}[command]
    res = CliRunner().invoke(main, [command, *args])
    assert res.exit_code == 1 and [ln for ln in res.output.splitlines() if ln][-2:] == [f"Stopped: {says}", "Aborted!"], res.output


def test_export_spells_model_as_eval_and_the_old_positional_form_still_works_with_a_warning(tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["export", "gate:somewhere", "--onnx", str(tmp_path / "m.onnx")])  # the old spelling
    assert "`featcache export MODEL` is deprecated: use `featcache export --model gate:somewhere`" in res.output
    assert res.exit_code == 2 and "--model 'gate:somewhere': expected student:RUN_DIR" in res.output  # then read as --model
    res = r.invoke(main, ["export", "student:a", "--model", "student:b", "--onnx", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and "MODEL student:a and --model student:b differ" in res.output
