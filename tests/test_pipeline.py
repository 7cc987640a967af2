"""featcache run and demo: shipped pipelines validate, bad pipelines fail before any stage, unchanged stages skip."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from featcache.cli import main
from featcache.errors import ConfigError, InputError
from featcache.pipeline.config import load_pipeline

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
#: the demo, shrunk to seconds: the same stages on a smaller synthetic set, with the stand-ins shipped with featcache
#: (at the demo's image size: they were trained at it)
SMALL = ["--set", "synth.ids=16", "--set", "synth.cams=3", "--set", "synth.night_cams=[2]", "--set", "synth.blur_cams=[3]", "--set", "extract.views=3",
         "--set", "train-gate.epochs=2", "--set", "train-gate.batch_size=16", "--set", "train-gate.val_ids=2", "--set", "distill.epochs=1",
         "--set", "distill.batch_size=16", "--set", "pipeline.profile=false", "--set", "pipeline.fusions=[concat,moe-top1]",
         "--set", "pipeline.students={}"]


@pytest.mark.parametrize("name", sorted(p.name for p in PIPELINES.glob("*.yaml")))
def test_every_shipped_pipeline_loads_and_validates(name):
    from featcache.pipeline.cross import is_cross, load_cross

    if is_cross(PIPELINES / name):
        cross = load_cross(PIPELINES / name, check_paths=False)
        assert [p.source.name for p in cross.parts] == ["veri776.yaml", "market1501.yaml"]
        return
    p = load_pipeline(PIPELINES / name, check_paths=False)
    assert p.settings.seeds and "extract" in p.sections
    if name in ("market1501.yaml", "veri776.yaml"):  # the paper's protocol
        assert p.settings.seeds == (42, 1337, 2024) and p.stage_config("distill", cache=Path("c"), gate=Path("g"), out=Path("o"), seed=1).epochs == 80
        assert p.stage_config("train-gate", cache=Path("c"), out=Path("o"), seed=1, fusion="moe-top1").epochs == 60
    if name.endswith("-paper.yaml"):  # the paper's equations as written, otherwise the same file as the default recipe's
        gate = p.stage_config("train-gate", cache=Path("c"), out=Path("o"), seed=1, fusion="moe-top1")
        student = p.stage_config("distill", cache=Path("c"), gate=Path("g"), out=Path("o"), seed=1)
        assert gate.gate_recipe == "paper" and student.kd_space == "literal" and student.feat_weight == 0.3
        base = load_pipeline(PIPELINES / name.replace("-paper", ""), check_paths=False)
        assert {k: v for k, v in p.sections.items() if k not in ("train-gate", "distill")} == \
            {k: v for k, v in base.sections.items() if k not in ("train-gate", "distill")}
        assert p.settings.seeds == base.settings.seeds and p.settings.fusions == base.settings.fusions


def test_the_demo_plans_tables_3_and_5():
    from featcache.pipeline.stages import build_stages

    stages, plan = build_stages(load_pipeline(PIPELINES / "demo.yaml"))
    names = [st.name for st in stages]
    assert names[:3] == ["synth", "pretrain-standins", "extract"] and names[-2:] == ["profile", "report"]
    assert [n for n in names if n.startswith("distill")] == [
        "distill student, task loss only (Table 5's base, ResNet-18 here) seed 42", "distill student, distilled (MoE-KD) seed 42"]
    groups = [r.group for r in plan.rows]
    assert groups.count("expert") == 2 and groups.count("teacher") == 1 and groups.count("student") == 2
    assert [r.label for r in plan.rows if r.group == "fusion"][0] == "raw concatenation"
    assert [r.key for r in plan.rows] == ["expert:clip-mini", "expert:align-mini", "fusion:raw-concat", "fusion:clip", "fusion:align",
                                          "fusion:average", "fusion:concat", "teacher", "student:task", "student:kd"]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"pipeline": {"out": "OUT"}, "synth": {"ids": 8}, "extract": {"dataset": "market1501", "backbones": ["clip-tiny"]}}


@pytest.mark.parametrize("change, sets, error, text", [
    ({"distil": {}}, (), ConfigError, "unknown section 'distil' (did you mean 'distill'"),
    ({"distill": {"epoch": 3}}, (), ConfigError, "unknown key 'epoch' for distill (did you mean 'epochs'"),
    ({"train-gate": {"cache": "x.h5"}}, (), ConfigError, "[train-gate]: cache is set by the pipeline"),
    ({}, ("distill.epochs=many",), ConfigError, "epochs: expected an integer, got 'many'"),
    ({}, ("epochs=3",), ConfigError, "expected SECTION.KEY=VALUE"),
    ({"pipeline": {"out": "OUT", "teacher": "average"}}, (), ConfigError, "pipeline.teacher 'average' must be one of"),
    ({"synth": None}, (), InputError, "root data/nowhere does not exist"),
    ({"pipeline": {"out": "OUT", "distill": False, "fusions": ["average"]}}, (), ConfigError, "pipeline.teacher 'moe-top1' must be one of"),
    ({"pipeline": {"out": "OUT", "labels": {"moe-top2": "x"}}}, (), ConfigError, "labels for moe-top2, which is neither"),
    ({"distill": {"student_init": "/nowhere/w.pt"}}, (), InputError, "student_init /nowhere/w.pt is not a file"),
    ({"train-gate": {"fusion": "moe"}}, (), ConfigError, "[train-gate]: fusion is set by the pipeline"),
    ({}, ("train-gate.epochs=0",), ConfigError, "p.yaml: --epochs 0: expected at least 1"),
])
def test_a_bad_pipeline_fails_before_any_stage_runs(tmp_path, change, sets, error, text):
    data = {k: dict(v) for k, v in BASE.items()}
    for k, v in change.items():
        if v is None:
            data.pop(k)
            data["extract"]["root"] = "data/nowhere"
        else:
            data[k] = dict(v)
    data["pipeline"]["out"] = str(tmp_path / "out")  # after the change, so no case writes outside tmp_path
    with pytest.raises(error) as exc:
        load_pipeline(write(tmp_path, data), tuple(sets))
    assert text in str(exc.value)
    res = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == error.exit_code and text in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.heavy
def test_demo_runs_to_a_report_then_skips_and_reruns_only_what_changed(tmp_path):
    r = CliRunner()
    out = tmp_path / "demo"
    res = r.invoke(main, ["demo", "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    assert "[1/" in res.output and "synth: done in" in res.output
    assert "the stand-ins shipped with featcache were used (align-mini, clip-mini): nothing trained" in res.output
    md = (out / "report" / "index.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert links and all((out / "report" / link).is_file() for link in links), [x for x in links if not (out / "report" / x).is_file()]
    page = (out / "report" / "index.html").read_text()
    srcs, hrefs = re.findall(r'src="([^"]+)"', page), re.findall(r'href="([^"]+)"', page)
    assert sorted(set(links)) == sorted(srcs) == sorted(hrefs)  # every figure shown and linked, in both renderings
    assert "## Dataset" in md and "| train |" in md
    assert "are synthetic stand-ins, not CLIP and ALIGN" in md and "moe-top1 (the teacher)" in md and "student (resnet18, distilled)" in md
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert list(summary["rows"]) == ["expert:clip-mini", "expert:align-mini", "fusion:raw-concat", "fusion:concat", "teacher", "student:kd"]
    teacher = summary["rows"]["teacher"]
    assert teacher["seeds"] == [42] and teacher["mAP"]["per_seed"] == [teacher["mAP"]["mean"]]
    assert teacher["mAP"]["mean"] == pytest.approx(100 * json.loads((out / "eval" / "moe-top1-seed42.json").read_text())["mAP"], abs=1e-3)
    assert set(summary["teacher_gate_per_camera"]) == {"1", "2", "3"} and summary["standins"] == ["align-mini", "clip-mini"]
    val = json.loads((next((out / "gate").glob("moe-top1-seed42-*")) / "val.json").read_text())
    assert teacher["val_mAP"]["per_seed"] == [pytest.approx(100 * val["mAP"], abs=1e-3)] and val["identities"] == 2
    assert "validation mAP" in md and "## By camera condition (validation identities)" in md
    student = summary["rows"]["student:kd"]  # the student on the identities its teacher held out, and its agreement
    s_val = json.loads((next((out / "student").glob("*seed42*")) / "val.json").read_text())
    assert student["val_mAP"]["per_seed"] == [pytest.approx(100 * s_val["mAP"], abs=1e-3)]
    assert student["val_agreement"]["rank_correlation"]["per_seed"] == [pytest.approx(s_val["agreement"]["rank_correlation"], abs=1e-4)]
    assert "top_k_overlap" in student["agreement"] and "rank correlation with the teacher (validation)" in md
    by_cond = summary["by_condition"]
    assert set(by_cond["teacher"]) <= {"day", "night", "blur"} and "gate_weight" in next(iter(by_cond["teacher"].values()))
    assert (out / "pipeline.yaml").is_file()
    # every row names the recipe that produced it, in the table and in summary.json
    assert teacher["recipe"] == {"gate_recipe": "routed"} and summary["rows"]["expert:clip-mini"]["recipe"] == {}
    assert student["recipe"] == {"losses": "id,tri,kd,feat,att,rel", "kd_space": "retrieval", "lambda_feat": 30.0}
    assert "| moe-top1 (the teacher) | routed (featcache's default) |" in md
    assert "| retrieval space (featcache's default), λ_feat 30 |" in md and "gate_recipe=paper" in md

    res = r.invoke(main, ["demo", "--out", str(out), *SMALL])  # nothing changed: every stage skipped
    assert res.exit_code == 0, res.output
    assert "0 stage(s) ran" in res.output and "running" not in res.output

    res = r.invoke(main, ["demo", "--out", str(out), *SMALL, "--set", "distill.lambda_kd=1.0"])
    assert res.exit_code == 0, res.output
    ran = re.findall(r"\] (.+): running", res.output)
    assert ran == ["distill seed 42", "eval student seed 42", "report"], res.output
    assert "distill seed 42: running (changed: config.lambda_kd)" in res.output
    assert len(list((out / "student").iterdir())) == 2  # the first student is kept beside the new one

    moved = tmp_path / "moved"
    out.rename(moved)  # keys name the output folder $OUT: a moved folder is still up to date
    res = r.invoke(main, ["demo", "--out", str(moved), *SMALL, "--set", "distill.lambda_kd=1.0"])
    assert res.exit_code == 0, res.output
    assert re.findall(r"\] (.+): running", res.output) == ["report"], res.output  # only the report, which names the paths


@pytest.mark.slow  # about 30 s: two small pipelines, then each one's models on the other's data
def test_cross_domain_runs_both_pipelines_then_trades_datasets(tmp_path):
    common = {"extract": {"backbones": ["clip-tiny", "align-tiny"], "views": 3, "image_size": "64x32", "batch_size": 16,
                          "workers": 0},
              "train-gate": {"epochs": 2, "batch_size": 16}, "distill": {"student_init": "random", "epochs": 1, "batch_size": 16}}
    for name, layout in (("a", "market1501"), ("b", "veri776")):
        data = {"pipeline": {"out": str(tmp_path / name), "profile": False, "experts_alone": False, "concat": False},
                "synth": {"layout": layout, "ids": 16, "cams": 3, "seed": 2},
                **{k: dict(v) for k, v in common.items()}}
        data["extract"]["dataset"] = layout
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({"cross-domain": {"pipelines": ["a.yaml", "b.yaml"], "out": str(tmp_path / "x")}}))
    r = CliRunner()
    res = r.invoke(main, ["run", str(tmp_path / "x.yaml")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "x" / "report" / "index.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| market1501 → veri776") or ln.startswith("| veri776 → market1501")]
    assert len(rows) == 4  # two directions x (teacher, student)
    for ln in rows:  # degradation = cross mAP - in-domain mAP on the target
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert float(cells[7]) == pytest.approx(float(cells[3]) - float(cells[6]), abs=0.011)
        # each row names its recipe: the teacher's gate recipe, the student's distillation space
        assert cells[2] in ("routed (featcache's default)", "retrieval space (featcache's default), λ_feat 30"), cells[2]
    res = r.invoke(main, ["run", str(tmp_path / "x.yaml")])
    assert res.exit_code == 0 and "0 stage(s) ran" in res.output, res.output


def test_bundled_pipelines_are_found_by_name(tmp_path, monkeypatch):
    from featcache.pipeline.config import bundled_pipelines, resolve_pipeline

    monkeypatch.chdir(tmp_path)  # away from the checkout: names resolve to the package's own files
    bundled = bundled_pipelines()
    assert {"demo", "market1501", "veri776", "cross-domain", "ablation-veri776"} <= set(bundled)
    assert resolve_pipeline("market1501") == resolve_pipeline("market1501.yaml") == resolve_pipeline("pipelines/market1501.yaml")
    (tmp_path / "market1501.yaml").write_text("pipeline: {}\n")
    assert resolve_pipeline("market1501.yaml") == Path("market1501.yaml")  # a file of that name wins
    res = CliRunner().invoke(main, ["run", "nope"])
    assert res.exit_code == 2 and "pipeline file nope does not exist (or name a bundled pipeline: " in res.output


@pytest.mark.slow  # about a minute: builds featcache into a fresh virtual environment, then a small demo from there
def test_a_normal_install_runs_the_demo_outside_the_checkout(tmp_path):
    """``pip install .`` (not editable) ships the bundled pipelines: ``featcache demo`` runs from any folder.
    The fresh environment borrows this one's dependencies (PYTHONPATH) but not its editable featcache."""
    import site
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    deps = os.pathsep.join(site.getsitepackages())
    env = {**os.environ, "PYTHONPATH": deps, "PIP_NO_INDEX": "1"}
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(repo)],
                         env=env, capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import featcache.pipelines as p; print(p.__file__)"],
                           env=env, cwd=work, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(repo) not in where
    res = subprocess.run([str(venv / "bin" / "featcache"), "demo", "--out", "demo", *SMALL], env=env, cwd=work,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (work / "demo" / "report" / "index.html").is_file()
    assert "the stand-ins shipped with featcache were used (align-mini, clip-mini): nothing trained" in res.stdout
    shipped = subprocess.run([str(venv / "bin" / "python"), "-c", "from featcache.standins.shipped import SHIPPED_DIR as d; "
                              "print(sorted(p.name for p in d.iterdir()))"], env=env, cwd=work, capture_output=True, text=True, check=True)
    assert shipped.stdout.strip() == "['align-mini', 'clip-mini', 'probe.npz', 'recipe.json']"  # the wheel carries them


def test_the_profile_stage_config_takes_every_row_a_pipeline_profiles():
    """The demo profiles its experts alone (backbone:PRESET), fusions (gate:) and students: all are valid profile
    models, with the pipeline's batch, repeats, device and precision (a demo run once stopped here)."""
    from featcache.pipeline.config import PipelineConfig

    s = PipelineConfig(profile_precision="bf16", profile_device="cpu")
    cfg = s.profile_config(["backbone:clip-mini", "gate:runs/g", "student:runs/s"], (64, 32))
    assert cfg.models == ("backbone:clip-mini", "gate:runs/g", "student:runs/s") and cfg.precision == "bf16"
    assert cfg.device == "cpu" and cfg.batch == s.profile_batch and cfg.image_size == (64, 32)
