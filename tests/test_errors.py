"""Every known bad input: one line naming the option or file, no traceback, exit 2 (usage) or 1 (failure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from featcache.cli import main


@pytest.fixture(scope="session")  # session: kept while other modules interleave (a module scope is redone each time)
def env(tmp_path_factory, market_root, market_cache) -> dict[str, Path]:
    from featcache.synth_cache import write_feature_cache

    tmp = tmp_path_factory.mktemp("errors")
    (tmp / "plain.h5").write_bytes(b"not hdf5")
    (tmp / "garbage.pt").write_bytes(b"\x80\x04not a checkpoint")
    (tmp / "bad.yaml").write_text(yaml.safe_dump({"train-gate": {"epoch": 3}}))
    (tmp / "badsection.yaml").write_text(yaml.safe_dump({"train_gate": {"epochs": 3}}))
    (tmp / "info.yaml").write_text(yaml.safe_dump({"info": {"bogus": 1}}))
    feat = write_feature_cache(tmp / "feat.h5", ids=16, per_id=4, cams=4, views=2)
    one = write_feature_cache(tmp / "one.h5", ids=16, per_id=4, cams=4, views=2, experts={"clip-sim": ("open_clip", 32)})
    # a cache whose queries have no match in another camera: every query is skipped
    solo = tmp / "solo"
    solo.mkdir()
    img = next((market_root / "query").glob("*.jpg"))
    (solo / "a.jpg").write_bytes(img.read_bytes())
    (solo / "b.jpg").write_bytes(img.read_bytes())
    (solo / "manifest.csv").write_text("path,pid,camid,split\na.jpg,1,1,query\na.jpg,1,1,gallery\nb.jpg,2,2,gallery\n")
    r = CliRunner().invoke(main, ["extract", "--dataset", "csv", "--root", str(solo), "--backbone", "clip-tiny",
                                  "--out", str(tmp / "solo.h5"), "--image-size", "32", "--workers", "0"])
    assert r.exit_code == 0, r.output
    # an unfinished gate run (killed after its first checkpoint)
    from featcache.gate.config import GateConfig
    from featcache.gate.train import train

    train(GateConfig.from_dict(dict(cache=feat, out=tmp / "unfinished", experts=("clip-sim", "align-sim"), fusion="average", epochs=1)))
    (tmp / "unfinished" / "config.yaml").write_text(
        (tmp / "unfinished" / "config.yaml").read_text().replace("epochs: 1", "epochs: 5"))
    train(GateConfig.from_dict(dict(cache=feat, out=tmp / "featgate", experts=("clip-sim", "align-sim"), fusion="average", epochs=1)))  # finished, on another cache
    from featcache.gate.runner import run_train_gate

    run_train_gate(GateConfig.from_dict(dict(cache=feat, out=tmp / "featgate", experts=("clip-sim", "align-sim"), fusion="average", epochs=1)), resume=True)
    return {"tmp": tmp, "root": market_root, "cache": market_cache, "feat": feat, "one": one}


def X(env, *parts):  # noqa: N802 - a short name for the argument builder
    return [str(p).format(**{k: str(v) for k, v in env.items()}) for p in parts]


DISTILL = ["distill", "--cache", "{cache}", "--gate", "{tmp}/featgate", "--out", "{tmp}/d0"]
EXTRACT = ["extract", "--dataset", "market1501", "--root", "{root}", "--out", "{tmp}/x.h5"]
CASES = [
    # (id, argv, exit code, text the message must hold)
    ("views-0", EXTRACT + ["--backbone", "clip-tiny", "--views", "0"], 2, "--views 0: expected 1 to 64"),
    ("epochs-0", ["train-gate", "--cache", "{feat}", "--out", "{tmp}/r0", "--epochs", "0"], 2, "--epochs 0: expected at least 1"),
    ("device-cuda", ["eval", "--cache", "{cache}", "--model", "backbone:clip-tiny", "--device", "cuda"], 2, "--device cuda"),
    ("device-cuda-train", ["train-gate", "--cache", "{feat}", "--out", "{tmp}/rc", "--device", "cuda", "--epochs", "1"], 2, "--device cuda"),
    ("device-bad", ["eval", "--cache", "{cache}", "--model", "backbone:clip-tiny", "--set", "device=tpu"], 2, "--device 'tpu'"),
    ("unknown-preset", EXTRACT + ["--backbone", "clip-tinny"], 2, "unknown backbone preset 'clip-tinny' (did you mean 'clip-tiny'"),
    ("weights-syntax", EXTRACT + ["--backbone", "clip-tiny", "--weights", "clip-tiny"], 2, "expected PRESET=PATH"),
    ("weights-other", EXTRACT + ["--backbone", "clip-tiny", "--weights", "align-tiny=/x"], 2, "not among the --backbone presets"),
    ("image-size", EXTRACT + ["--backbone", "clip-tiny", "--image-size", "big"], 2, "image size 'big': expected N or HxW"),
    ("workers", EXTRACT + ["--backbone", "clip-tiny", "--workers", "many"], 2, "expected a number of processes or auto"),
    ("missing-required", ["extract", "--dataset", "market1501", "--root", "{root}", "--backbone", "clip-tiny"], 2, "missing --out"),
    ("dataset-root", ["extract", "--dataset", "market1501", "--root", "{tmp}/nope", "--backbone", "clip-tiny", "--out", "{tmp}/x.h5"], 1, "does not exist"),
    ("no-weights", EXTRACT + ["--backbone", "clip-vit-b16"], 1, "--weights clip-vit-b16=PATH"),
    ("bad-checkpoint", EXTRACT + ["--backbone", "clip-tiny", "--weights", "clip-tiny={tmp}/garbage.pt"], 1, "is not an open_clip checkpoint"),
    ("cache-missing", ["info", "{tmp}/missing.h5"], 1, "does not exist"),
    ("cache-not-hdf5", ["info", "{tmp}/plain.h5"], 1, "not a readable HDF5 file"),
    ("resume-other-backbones", ["extract", "--dataset", "market1501", "--root", "{root}", "--backbone", "clip-tiny",
                                "--out", "{cache}", "--image-size", "64x32", "--views", "3", "--batch-size", "8", "--workers", "0"],
     1, "backbones: the cache holds align-tiny, clip-tiny; this run asks for clip-tiny"),
    ("model-kind", ["eval", "--cache", "{cache}", "--model", "resnet:50"], 2, "unknown --model kind 'resnet'"),
    ("model-syntax", ["eval", "--cache", "{cache}", "--model", "clip-tiny"], 2, "expected KIND:REF"),
    ("model-backbone", ["eval", "--cache", "{cache}", "--model", "backbone:clip-vit-b16"], 1, "has no backbone 'clip-vit-b16'"),
    ("no-valid-query", ["eval", "--cache", "{tmp}/solo.h5", "--model", "backbone:clip-tiny"], 1, "no query has a valid match"),
    ("ranks", ["eval", "--cache", "{cache}", "--model", "backbone:clip-tiny", "--ranks", "1,x"], 2, "expected an integer, got 'x'"),
    ("budget", ["eval", "--cache", "{cache}", "--model", "backbone:clip-tiny", "--budget-mb", "0"], 2, "--budget-mb 0"),
    ("gate-missing", ["eval", "--cache", "{feat}", "--model", "gate:{tmp}/nowhere"], 1, "is not a train-gate run directory"),
    ("gate-unfinished", ["eval", "--cache", "{feat}", "--model", "gate:{tmp}/unfinished"], 1, "unfinished run (it reached epoch 1 of 5)"),
    ("single-expert-gate", ["train-gate", "--cache", "{one}", "--out", "{tmp}/r1", "--fusion", "moe-top1"], 2, "needs at least two"),
    ("single-expert-listed", ["train-gate", "--cache", "{feat}", "--out", "{tmp}/r2", "--experts", "clip-sim"], 2, "needs at least two"),
    ("fusion", ["train-gate", "--cache", "{feat}", "--out", "{tmp}/r3", "--fusion", "moe"], 2, "'moe'"),
    ("set-unknown", ["train-gate", "--cache", "{feat}", "--out", "{tmp}/r4", "--set", "learning_rate=1"], 2, "unknown key 'learning_rate'"),
    ("set-type", ["train-gate", "--cache", "{feat}", "--out", "{tmp}/r5", "--set", "lr=fast"], 2, "lr: expected a number, got 'fast'"),
    ("set-twice", ["train-gate", "--cache", "{feat}", "--out", "{tmp}/r6", "--epochs", "2", "--set", "epochs=3"], 2, "--epochs given twice"),
    ("batch-size", ["train-gate", "--cache", "{feat}", "--out", "{tmp}/r7", "--set", "batch_size=30"], 2, "--batch-size 30: a batch is P identities x K images"),
    ("yaml-key", ["--config", "{tmp}/bad.yaml", "train-gate", "--cache", "{feat}", "--out", "{tmp}/r8"], 2, "unknown key 'epoch' for train-gate (did you mean 'epochs'"),
    ("yaml-section", ["--config", "{tmp}/badsection.yaml", "info", "{cache}"], 2, "unknown section 'train_gate' (did you mean 'train-gate'"),
    ("run-exists", ["train-gate", "--cache", "{feat}", "--out", "{tmp}/unfinished", "--fusion", "average"], 1, "pass --resume"),
    ("yaml-info-key", ["--config", "{tmp}/info.yaml", "info", "{cache}"], 2, "[info]: unknown key 'bogus'"),
    ("synth-set", ["synth", "{tmp}/s", "--set", "cams_per_id=5,1"], 2, "cams_per_id 5,1: expected two numbers"),
    ("fusion-family", ["train-gate", "--cache", "{one}", "--out", "{tmp}/r9", "--fusion", "align"], 2, "needs an expert of the align family"),
    ("run-missing", ["run", "{tmp}/nope.yaml"], 2, "nope.yaml does not exist (or name a bundled pipeline: ablation-veri776, cross-domain, demo"),
    ("distill-student", DISTILL + ["--student", "resnet19"], 2, "'resnet19' is not one of 'resnet18', 'resnet50'"),
    ("distill-losses", DISTILL + ["--losses", "id,kl"], 2, "--losses id,kl: unknown term(s) kl"),
    ("distill-lambda", DISTILL + ["--lambda-kd", "-1"], 2, "--lambda-kd -1.0: expected 0 or more"),
    ("distill-gate-unfinished", ["distill", "--cache", "{feat}", "--gate", "{tmp}/unfinished", "--out", "{tmp}/d1"], 1, "unfinished run"),
    ("distill-gate-other-cache", ["distill", "--cache", "{cache}", "--gate", "{tmp}/featgate", "--out", "{tmp}/d2"], 1, "or train a gate on"),
    ("distill-not-gate", ["distill", "--cache", "{cache}", "--gate", "{tmp}", "--out", "{tmp}/d3"], 1, "is not a train-gate run directory"),
    ("export-kind", ["export", "--model", "gate:{tmp}/featgate", "--onnx", "{tmp}/x.onnx"], 2, "expected student:RUN_DIR"),
    ("export-not-run", ["export", "--model", "student:{tmp}", "--onnx", "{tmp}/x.onnx"], 1, "is not a distill run directory"),
    ("profile-kind", ["profile", "--model", "concat:a,b"], 2, "concat"),
    ("profile-batch", ["profile", "--model", "student:{tmp}", "--batch", "1,x"], 2, "batch: expected an integer, got 'x'"),
    ("profile-repeats", ["profile", "--model", "student:{tmp}", "--repeats", "0"], 2, "--repeats 0, --batch 1,64: expected positive numbers"),
    ("eval-agree", ["eval", "--cache", "{cache}", "--model", "backbone:clip-tiny", "--agree-with", "nope:x"], 2, "unknown --model kind 'nope'"),
    ("typo-command", ["exract"], 2, "no command 'exract' (did you mean 'extract'"),
]


@pytest.mark.parametrize("argv, code, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_exit_code(env, argv, code, text):
    if "cuda" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: --device cuda is valid here")
    res = CliRunner().invoke(main, X(env, *argv))
    out = res.output
    assert res.exit_code == code, out
    assert text in out, out
    assert "Traceback" not in out and (res.exception is None or isinstance(res.exception, SystemExit)), out
    error_lines = [ln for ln in out.splitlines() if ln.startswith("Error")]
    assert len(error_lines) == 1 and text in error_lines[0], out


def test_debug_shows_the_traceback(env):
    res = CliRunner().invoke(main, X(env, "--debug", "eval", "--cache", "{cache}", "--model", "resnet:50"))
    assert res.exit_code != 0 and type(res.exception).__name__ == "ConfigError"


def test_a_refused_train_gate_leaves_no_run_directory(env):
    """A configuration error found while starting must not leave a run that then blocks the corrected command."""
    import torch

    for case in ("fusion-family",) + (() if torch.cuda.is_available() else ("device-cuda-train",)):
        argv = next(c[1] for c in CASES if c[0] == case)
        out = Path(X(env, argv[argv.index("--out") + 1])[0])
        res = CliRunner().invoke(main, X(env, *argv))
        assert res.exit_code == 2 and not out.exists(), (case, res.output)


def test_info_describes_a_synthetic_feature_cache(env):
    res = CliRunner().invoke(main, ["info", str(env["feat"])])
    assert res.exit_code == 0 and "synthetic features" in res.output and "backbone clip-sim" in res.output


class _Refusing:
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from featcache.errors import InputError

        raise InputError(f"image{i}.jpg changed since it was extracted")


def test_an_error_raised_in_a_dataloader_worker_prints_its_own_line():
    import torch

    from featcache.errors import InputError, one_line

    batches = iter(torch.utils.data.DataLoader(_Refusing(), num_workers=1))
    try:
        with pytest.raises(InputError) as exc:
            next(batches)
    finally:  # left to the garbage collector, an iterator whose worker raised stalls a later collection for 5 s
        batches._shutdown_workers()
    assert "Original Traceback" in str(exc.value)  # what torch hands back
    assert one_line(exc.value) == "image0.jpg changed since it was extracted"
