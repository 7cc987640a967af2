"""ONNX export of students (every architecture, checked by ONNX Runtime, a check that can fail) and profiling
of students and of the whole teacher (parameters, FLOPs against an independent MAC count, timing keys)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from featcache.distill import export as export_mod
from featcache.distill.export import ATOL, MIN_COSINE, check_onnx, export_onnx
from featcache.distill.load import load_student
from featcache.distill.profile import format_profile, profile_model
from featcache.distill.students import build_student, count_parameters, known_students, normalize
from featcache.errors import ConfigError, InputError, RunError

SIZE = (64, 32)


def make_run(path: Path, arch: str, n_classes: int = 5) -> Path:
    """A finished student run: config.yaml, run.json, model.safetensors of a random student.

    Each batch norm's running statistics are set, in one eval-mode pass, to those of its actual input, so the
    activations are of order 1 at every layer, as in a trained network (torchvision's fresh statistics shrink
    mobilenet's and efficientnet's embeddings to 1e-9), and the folded batch norm is not the identity."""
    model = build_student(arch, n_classes, "random", seed=0).eval()

    def calibrate(bn, inputs):
        x = inputs[0].transpose(0, 1).flatten(1)  # channels first
        bn.running_mean.copy_(x.mean(1))
        bn.running_var.copy_(x.var(1, unbiased=False))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model(images(16, seed=0))
    for h in hooks:
        h.remove()
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"distill": {"student": arch, "epochs": 1}}))
    (path / "run.json").write_text(json.dumps({"n_classes": n_classes, "image_size": list(SIZE)}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="session")  # session: kept while other modules interleave (a module scope is redone each time)
def runs(tmp_path_factory) -> dict:
    """arch -> (run, exported file, export result), made on first use and shared by the tests."""
    return {"root": tmp_path_factory.mktemp("students")}


def student_run(runs: dict, arch: str) -> Path:
    """A finished student run of `arch`, made once (no export: the export's tracing costs seconds)."""
    run = runs["root"] / arch
    if not run.is_dir():
        make_run(run, arch)
    return run


def exported(runs: dict, arch: str) -> tuple[Path, Path, dict]:
    if arch not in runs:
        run = student_run(runs, arch)
        out = runs["root"] / f"{arch}.onnx"
        runs[arch] = (run, out, export_onnx(run, out))
    return runs[arch]


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, (n, 3, *SIZE), generator=g, dtype=torch.uint8))


# Each case takes 4-8 s on 2 cores (the dynamo exporter's tracing is most of it), so all four are in the slow set
# (`pytest -m slow`); every suite still exports resnet18 with its ORT check through the command line (test_cli.py)
# and makes the check fail here.
@pytest.mark.slow
@pytest.mark.parametrize("arch", known_students())
def test_export_passes_the_ort_check_and_matches_pytorch(runs, arch):
    import onnx
    import onnxruntime as ort

    run, out, res = exported(runs, arch)
    assert out.is_file() and not out.with_name(out.name + ".tmp").exists()
    assert res["checked"] and res["batch_sizes"] == [1, 3] and res["exporter"] in ("dynamo", "torchscript")
    assert all(res["max_abs_diff_scaled"][b] <= ATOL and res["min_cosine"][b] >= MIN_COSINE for b in (1, 3))
    proto = onnx.load(str(out))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["arch"] == arch and json.loads(props["image_size"]) == list(SIZE)
    assert "ImageNet-normalised float32 NCHW" in props["input"] and props["featcache_version"]
    assert json.loads(props["mean"]) == [0.485, 0.456, 0.406]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert proto.graph.input[0].name == "images" and not dims[0].HasField("dim_value") and [d.dim_value for d in dims[1:]] == [3, *SIZE]
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded: eval-mode statistics
    # independently of check_onnx: other images, both batch sizes, the documented tolerance
    model, _, _ = load_student(run, "cpu")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = images(n, seed=7 + n)
        with torch.inference_mode():
            ref = model(x).numpy().astype(np.float64)
        got = session.run(["embedding"], {"images": x.numpy()})[0].astype(np.float64)
        assert got.shape == (n, 2048)
        assert 1e-3 < np.abs(ref).max() < 1e4  # real-valued embeddings, so the relative tolerance means something
        assert np.abs(got - ref).max() <= ATOL * np.abs(ref).max()
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() >= MIN_COSINE


@pytest.mark.heavy
def test_a_failing_check_names_the_batch_and_writes_nothing(runs, tmp_path, monkeypatch, caplog):
    """Also the fallback: when the dynamo exporter fails, the torchscript one exports (and is 3x faster here)."""
    run = student_run(runs, "resnet18")
    real = export_mod._run_onnx

    def dynamo_fails(*args):
        raise RuntimeError("an operator it cannot trace")

    monkeypatch.setattr(export_mod, "_dynamo", dynamo_fails)

    def off_at_three(session, x):  # ONNX Runtime "disagrees" at batch 3 by 1 % of the embedding's scale
        y = real(session, x)
        return y + 0.01 * np.abs(y).max() if len(x) == 3 else y

    monkeypatch.setattr(export_mod, "_run_onnx", off_at_three)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an older file")
    with pytest.raises(RunError, match=r"not written: .*at batch 3: max \|difference\|"):
        export_onnx(run, out)
    assert out.read_bytes() == b"an older file" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert "the dynamo ONNX exporter did not work (RuntimeError: an operator it cannot trace); trying the next" in caplog.text


@pytest.mark.slow  # about 7 s; the default suite makes the ORT check refuse an export in the test above
def test_check_catches_a_model_that_differs_from_the_file(runs):
    run, out, _ = exported(runs, "resnet18")
    model, _, _ = load_student(run, "cpu")
    assert [r["batch"] for r in check_onnx(model, out, SIZE)] == [1, 3]
    with torch.no_grad():
        model.bn.bias += 0.05 * model.bn.weight.abs().mean()  # a small shift, as a lost or stale parameter would give
    with pytest.raises(RunError, match="at batch 1"):
        check_onnx(model, out, SIZE)
    model.train()  # batch norm in training mode: the classic export mistake
    with pytest.raises(RunError, match="at batch"):
        check_onnx(model, out, SIZE, batch_sizes=(3,))


def conv_linear_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d and Linear that runs, from their output shapes (forward hooks)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def test_profile_of_a_student(runs):
    run = student_run(runs, "resnet18")
    row = profile_model(f"student:{run}", "cpu", batch_sizes=(1, 4), repeats=2)
    for key in ("parameters", "parameters_parts", "parameters_used", "flops_per_image", "flops_note", "latency_ms", "images_per_s",
                "peak_memory_mib", "peak_memory_kind", "device", "torch_threads", "image_size", "image_size_source", "weights"):
        assert key in row, key
    model, _, _ = load_student(run, "cpu")
    assert row["parameters"] == count_parameters(model) == sum(row["parameters_parts"].values())
    assert row["parameters_used"] == count_parameters(model) - model.classifier.weight.numel()
    macs = conv_linear_macs(model, images(1, 0))
    assert 2 * macs / 1.5 <= row["flops_per_image"] <= 2 * macs * 1.5, (row["flops_per_image"], macs)
    assert "not MACs" in row["flops_note"]
    assert row["image_size"] == list(SIZE) and "run.json" in row["image_size_source"]
    assert set(row["latency_ms"]) == {1, 4} and all(v > 0 for v in row["latency_ms"].values())
    assert row["images_per_s"][4] == pytest.approx(4000 / row["latency_ms"][4])
    assert set(row["peak_memory_mib"]) == {1, 4} and min(row["peak_memory_mib"].values()) > 10 and "RSS" in row["peak_memory_kind"] and row["device"].startswith("cpu")
    table = format_profile([row])
    assert f"student:{run}" in table and "ms@b4" in table and "img/s@b4" in table and "not MACs" in table
    assert row["precision"] == "fp32"
    bf16 = profile_model(f"student:{run}", "cpu", batch_sizes=(1,), repeats=1, precision="bf16")  # deployment precision
    assert bf16["precision"] == "bf16" and "bf16 autocast" in bf16["timing"] and bf16["latency_ms"][1] > 0
    with pytest.raises(ConfigError, match="--precision fp8: expected one of fp32, bf16, fp16"):
        profile_model(f"student:{run}", "cpu", precision="fp8")


@pytest.fixture(scope="session")  # session: kept while other modules interleave (a module scope is redone each time)
def gate_run(market_cache, tmp_path_factory) -> Path:
    from featcache.gate.config import GateConfig
    from featcache.gate.runner import run_train_gate

    out = tmp_path_factory.mktemp("gate") / "run"
    cfg = GateConfig.from_dict(dict(cache=market_cache, out=out, experts=("clip-tiny", "align-tiny"), epochs=1, batch_size=8, instances=2, device="cpu"))
    return run_train_gate(cfg).run


def test_profile_of_the_teacher(gate_run, tmp_path):
    from featcache.backbones import build_backbone
    from featcache.gate.train import load_run

    row = profile_model(f"gate:{gate_run}", "cpu", batch_sizes=(1, 2), repeats=2)
    gate, _, meta = load_run(gate_run)
    experts = [build_backbone(n, SIZE, random_init=True) for n in meta["experts"]]
    assert row["parameters"] == count_parameters(gate) + sum(count_parameters(b) for b in experts)
    assert row["parameters"] == sum(row["parameters_parts"].values())
    assert row["parameters_parts"]["backbone clip-tiny"] == count_parameters(experts[0])
    assert row["flops_per_image"] > 0 and row["flops_per_image"] == sum(row["flops_parts"].values())
    assert all(v > 0 for v in row["flops_parts"].values())
    assert row["image_size"] == list(SIZE) and "cache" in row["image_size_source"]
    assert "random (timing only)" in row["weights"] and set(row["latency_ms"]) == {1, 2}
    # the cache gone: the size given is used, and the row says so
    moved = tmp_path / "run"
    shutil.copytree(gate_run, moved)
    saved = yaml.safe_load((moved / "config.yaml").read_text())
    saved["train-gate"]["cache"] = str(tmp_path / "gone.h5")
    (moved / "config.yaml").write_text(yaml.safe_dump(saved))
    row2 = profile_model(f"gate:{moved}", "cpu", image_size=(32, 32), batch_sizes=(1,), repeats=1)
    assert row2["image_size"] == [32, 32] and "--image-size given" in row2["image_size_source"] and "gone.h5" in row2["image_size_source"]
    table = format_profile([row, row2])
    assert table.count("gate:") >= 4 and "ms@b2" in table  # two rows and two notes


@pytest.mark.heavy
def test_bad_input(runs, tmp_path):
    run = student_run(runs, "resnet18")
    with pytest.raises(ConfigError, match="student:RUN_DIR, gate:RUN_DIR or backbone:PRESET"):
        profile_model(f"teacher:{run}")
    with pytest.raises(ConfigError, match="backbone:clip-tinny: .*clip-tiny"):
        profile_model("backbone:clip-tinny", "cpu")
    with pytest.raises(ConfigError, match="student:RUN_DIR"):
        profile_model(str(run))
    with pytest.raises(InputError, match="not a distill run directory"):
        profile_model(f"student:{tmp_path}", "cpu")
    with pytest.raises(InputError, match="not a train-gate run directory"):
        profile_model(f"gate:{run}", "cpu")  # a student run is no teacher
    with pytest.raises(InputError, match="not a distill run directory"):
        export_onnx(tmp_path, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="repeats"):
        profile_model(f"student:{run}", "cpu", repeats=0)
    with pytest.raises(ConfigError, match="batch sizes"):
        profile_model(f"student:{run}", "cpu", batch_sizes=(0,))
    with pytest.raises(ConfigError, match="--device"):
        profile_model(f"student:{run}", "tpu")
    with pytest.raises(ConfigError, match="--opset 3"):
        export_onnx(run, tmp_path / "m.onnx", opset=3)
    with pytest.raises(ConfigError, match="--atol"):
        export_onnx(run, tmp_path / "m.onnx", atol=0)
    with pytest.raises(InputError, match="no such ONNX file"):
        check_onnx(load_student(run)[0], tmp_path / "m.onnx", SIZE)
    assert not (tmp_path / "m.onnx").exists()
    assert format_profile([]) == "(no models profiled)"


@pytest.mark.slow  # about 10 s: each model profiled in a fresh (spawned) process
def test_several_models_on_cpu_are_profiled_in_fresh_processes(runs, gate_run):
    import os

    from featcache.distill.profile import profile_models

    run = student_run(runs, "resnet18")
    rows = profile_models([f"student:{run}", f"gate:{gate_run}"], "cpu", batch_sizes=(1,), repeats=1)
    assert [r["kind"] for r in rows] == ["student", "gate"]
    alone = profile_models([f"student:{run}"], "cpu", batch_sizes=(1,), repeats=1)[0]
    assert rows[0]["parameters"] == alone["parameters"] and rows[0]["flops_per_image"] == alone["flops_per_image"]
    assert len({r["pid"] for r in rows} | {os.getpid()}) == 3  # two fresh processes, neither this one
    assert alone["pid"] == os.getpid()  # one model: profiled here


def test_profile_of_a_backbone_alone_and_of_a_single_expert_fusion(gate_run, tmp_path):
    from featcache.backbones import build_backbone
    from featcache.gate.config import GateConfig
    from featcache.gate.runner import run_train_gate

    row = profile_model("backbone:clip-tiny", "cpu", image_size=(64, 32), batch_sizes=(1,), repeats=1)
    assert row["parameters"] == count_parameters(build_backbone("clip-tiny", (64, 32))) and row["image_size"] == [64, 32]
    cache = yaml.safe_load((gate_run / "config.yaml").read_text())["train-gate"]["cache"]
    clip_only = run_train_gate(GateConfig.from_dict(dict(cache=Path(cache), out=tmp_path / "clip", fusion="clip", epochs=1, batch_size=16, device="cpu"))).run
    one = profile_model(f"gate:{clip_only}", "cpu", batch_sizes=(1,), repeats=1)
    both = profile_model(f"gate:{gate_run}", "cpu", batch_sizes=(1,), repeats=1)
    assert [k for k in one["parameters_parts"] if k.startswith("backbone")] == ["backbone clip-tiny"]  # the expert it runs
    assert len([k for k in both["parameters_parts"] if k.startswith("backbone")]) == 2
    assert one["flops_per_image"] < both["flops_per_image"]
