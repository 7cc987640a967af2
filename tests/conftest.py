"""Shared fixtures: a small synthetic Market-1501, one extracted cache, and the real material in ../shared/data."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
# One compute thread per process: on a busy 2-core machine torch's thread pool otherwise waits on its own
# barriers (the suite took 152 s with 2 threads and 75 s with 1 while two other processes spun; 46 s vs 50 s idle).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

#: real material (the official VeRi-776 lists, a few real crops): $FEATCACHE_TEST_DATA, else shared/data beside the
#: checkout's folder; tests that need it skip without it
SHARED = Path(os.environ.get("FEATCACHE_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``heavy`` (several seconds each) run first, longest-known first in file order: with
    ``-n 2`` the two workers then share the long tests at the start and finish together on the short ones,
    instead of one worker drawing a 20 s campaign last while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: file order otherwise


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that kept logs (``kept_log``) names them in its report, where the failure is read."""
    outcome = yield
    rep = outcome.get_result()
    logs = getattr(item, "kept_logs", [])
    if rep.failed and logs:
        rep.sections.append(("kept logs", "\n".join(f"{p} (kept with pytest's last 3 temporary folders)"
                                                     for p in logs)))


@pytest.fixture
def kept_log(request, tmp_path) -> Path:
    """A log file in the test's temporary folder that the failure report names: the SIGKILL campaigns write every
    start, kill, check and resume there, with the children's own output, so no failure loses its message."""
    path = tmp_path / "campaign.log"
    request.node.kept_logs = [*getattr(request.node, "kept_logs", []), path]
    return path


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when the material is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real material {p} not present")
    return p


@pytest.fixture(scope="session", autouse=True)
def standin_home(tmp_path_factory) -> Path:
    """Stand-ins trained by tests go to a temporary FEATCACHE_HOME, never the user's cache."""
    home = tmp_path_factory.mktemp("featcache-home")
    old = os.environ.get("FEATCACHE_HOME")
    os.environ["FEATCACHE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("FEATCACHE_HOME", None)
    else:
        os.environ["FEATCACHE_HOME"] = old


@pytest.fixture(autouse=True)
def own_preset_registry(monkeypatch) -> None:
    """Preset files and folders a test adds (``--backbone my.json``) stay that test's: the registry is per process,
    and a later test would otherwise list a preset whose file went with the first test's folder."""
    from featcache.backbones import presets

    monkeypatch.setattr(presets, "_added_files", {})
    monkeypatch.setattr(presets, "_added_dirs", [])


@pytest.fixture(scope="session")
def market_root(tmp_path_factory) -> Path:
    from featcache.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth") / "market"
    generate(SynthConfig(root, "market1501", ids=8, cams=3, seed=1))
    return root


def extract_cfg(root: Path, out: Path, **kw):
    from featcache.extract.runner import ExtractConfig

    base = dict(dataset="market1501", root=root, backbones=("clip-tiny", "align-tiny"), out=out, views=3,
                batch_size=8, workers=0, image_size=(64, 32))
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="session")
def market_cache(market_root, tmp_path_factory) -> Path:
    from featcache.extract.runner import run_extract

    out = tmp_path_factory.mktemp("cache") / "market.h5"
    run_extract(extract_cfg(market_root, out))
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    """Every array of two caches equal bit for bit (attributes such as creation time aside)."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names: list[str] = []
        fa.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        other: list[str] = []
        fb.visititems(lambda n, o: other.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(names) == sorted(other)
        for n in names:
            assert np.array_equal(fa[n][...], fb[n][...]), f"{n} differs"


def record_mapper_inputs(monkeypatch) -> list:
    """Every uint8 batch extraction feeds the backbones, appended to the returned list as it runs."""
    from featcache.extract import mapper

    seen: list = []
    real = mapper.Mapper.__call__

    def spy(self, views, first_view):
        seen.append(views.clone())
        return real(self, views, first_view)

    monkeypatch.setattr(mapper.Mapper, "__call__", spy)
    return seen


def interrupt_after_epoch(monkeypatch, epoch: int):
    """Make training stop with KeyboardInterrupt right after checkpointing ``epoch``; returns the undo."""
    from featcache.training.rundir import RunDir

    real = RunDir.checkpoint

    def stop(self, e, *a, **k):
        real(self, e, *a, **k)
        if e == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "checkpoint", stop)
    return lambda: monkeypatch.setattr(RunDir, "checkpoint", real)


#: what reads a tensor's value back to the host, and what makes a tensor of host data (a copy to the GPU, which
#: waits for it when the host memory is not pinned): on a GPU each makes the host wait for the device
HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu")
HOST_TENSORS = ("tensor", "as_tensor", "from_numpy")


def count_host_reads(monkeypatch) -> dict:
    """Count the reads of tensor values back to the host and the tensors made of host data while the shared
    training loop runs its epochs (``Loop.fit``: batches, steps, optimizer, log rows, checkpoints), with the loop
    set up as on a GPU; returns the live count ``{"n": ...}``. On CPU torch every tensor is on the device, so a
    read counts wherever it would wait on a GPU; what torch's C++ side does (a boolean mask's ``nonzero``) and a
    ``.to(device)`` of a host tensor are not seen."""
    import torch

    from featcache.training import loop

    count, inside = {"n": 0}, {"on": False}

    def counted(real):
        def call(*a, **k):
            if inside["on"]:
                count["n"] += 1
            return real(*a, **k)
        return call
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    for name in HOST_TENSORS:
        monkeypatch.setattr(torch, name, counted(getattr(torch, name)))
    real_fit = loop.Loop.fit

    def fit(self, stage):
        inside["on"] = True
        try:
            return real_fit(self, stage)
        finally:
            inside["on"] = False
    monkeypatch.setattr(loop.Loop, "fit", fit)
    monkeypatch.setattr(loop, "DEFER_NAN_CHECK", True)  # the GPU's ways: the NaN check at the epoch's end,
    monkeypatch.setattr(loop, "FUSED_ADAM", True)       # Adam's step count on the device
    return count


def logged_steps(run: Path, batch: int) -> list[int]:
    """The steps of each epoch of a finished run, from its log (images / batch size)."""
    import csv

    with open(run / "log.csv") as fh:
        return [round(float(r["images_per_s"]) * float(r["seconds"]) / batch) for r in csv.DictReader(fh)]


@pytest.fixture(scope="session")  # session: kept while other modules interleave (a module scope is redone each time)
def runs(market_cache, tmp_path_factory) -> dict[str, Path]:
    """A teacher (train-gate) and a student distilled from it, one epoch each, through the command line (test_models,
    test_runs)."""
    from click.testing import CliRunner

    from featcache.cli import main

    root = tmp_path_factory.mktemp("models")
    r = CliRunner()
    res = r.invoke(main, ["train-gate", "--cache", str(market_cache), "--out", str(root / "gate"), "--epochs", "1",
                          "--batch-size", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["distill", "--cache", str(market_cache), "--gate", str(root / "gate"), "--out", str(root / "student"),
                          "--epochs", "1", "--batch-size", "16", "--student-init", "random", "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output
    return {"gate": root / "gate", "student": root / "student", "root": root}
