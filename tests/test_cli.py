"""The command line end to end on synthetic data, through click's CliRunner."""

from __future__ import annotations

import json

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


def test_bad_input_gets_clear_errors(tmp_path, market_root):
    r = CliRunner()
    base = ["extract", "--dataset", "market1501", "--root", str(market_root), "--out", str(tmp_path / "x.h5")]
    res = r.invoke(main, base + ["--backbone", "clip-tiny", "--weights", "clip-tiny"])
    assert res.exit_code == 2 and "PRESET=PATH" in res.output
    res = r.invoke(main, base + ["--backbone", "clip-tiny", "--weights", "align-tiny=/x"])
    assert res.exit_code == 2 and "not among the --backbone presets" in res.output
    res = r.invoke(main, base + ["--backbone", "vit-giant"])
    assert res.exit_code == 2 and "available: align-b7" in res.output
    res = r.invoke(main, base + ["--backbone", "clip-vit-b16"])
    assert res.exit_code == 1 and "--weights clip-vit-b16=PATH" in res.output
    res = r.invoke(main, ["info", str(tmp_path / "missing.h5")])
    assert res.exit_code == 1 and "does not exist" in res.output
    (tmp_path / "plain.h5").write_bytes(b"not hdf5")
    res = r.invoke(main, ["info", str(tmp_path / "plain.h5")])
    assert res.exit_code == 1 and "not a readable HDF5 file" in res.output


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
