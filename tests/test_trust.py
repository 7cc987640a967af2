"""Nothing silently wrong, nothing unsafe: space, locks, partial results, safe loading, confined paths, processes.

Each test reproduces one finding of the trust issue; write errors are injected rather than made with a small
filesystem.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from click.testing import CliRunner

from conftest import assert_same_cache, extract_cfg
from featcache.cache import CacheError, summary
from featcache.cli import main
from featcache.datasets import DatasetLayoutError, load_listing
from featcache.errors import InputError, RunError
from featcache.extract.runner import run_extract


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------- space
def test_a_cache_that_cannot_fit_fails_at_once_naming_sizes(market_root, tmp_path, monkeypatch):
    import featcache.cache.store as store

    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(RunError, match=r"cannot create .*c\.h5: it needs 0\.\d+ GiB and 0\.00 GiB are free"):
        run_extract(extract_cfg(market_root, tmp_path / "c.h5", backbones=("clip-tiny",)))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cache, no .creating, no lock file left behind


def test_reservation_failure_leaves_nothing_and_a_rerun_works(market_root, market_cache, tmp_path, monkeypatch):
    import featcache.cache.store as store

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "posix_fallocate", full)
    out = tmp_path / "c.h5"
    with pytest.raises(RunError, match="cannot create .* on disk"):
        run_extract(extract_cfg(market_root, out))
    assert not out.exists() and not (tmp_path / "c.h5.creating").exists()
    monkeypatch.undo()
    run_extract(extract_cfg(market_root, out))
    assert_same_cache(market_cache, out)
    with open(out, "rb") as fh:  # the blocks are reserved, not holes
        assert os.fstat(fh.fileno()).st_blocks * 512 >= out.stat().st_size


def test_disk_full_during_the_run_is_one_line_and_resumes(market_root, market_cache, tmp_path, monkeypatch):
    from featcache.cache.writer import CacheWriter

    real, calls = CacheWriter.write, {"n": 0}

    def full_on_third(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, batch)

    monkeypatch.setattr(CacheWriter, "write", full_on_third)
    out = tmp_path / "c.h5"
    args = ["extract", "--dataset", "market1501", "--root", market_root, "--backbone", "clip-tiny", "--backbone", "align-tiny",
            "--out", out, "--views", "3", "--batch-size", "8", "--workers", "0", "--image-size", "64x32"]
    res = _cli(*args)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "No space left on device (errno 28)" in res.output and "run the same command to resume" in res.output
    assert summary(out)["splits"]["train"] == 16  # the two batches before stay cached
    monkeypatch.undo()
    assert _cli(*args).exit_code == 0
    assert_same_cache(market_cache, out)


def test_disk_full_in_train_gate_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from featcache.synth_cache import write_feature_cache
    from featcache.training import rundir

    cache = write_feature_cache(tmp_path / "f.h5", ids=16, per_id=4, cams=4, views=2)
    real = torch.save

    def short_write(obj, f, *a, **k):
        real(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3968 vs 3860")

    monkeypatch.setattr(rundir.torch, "save", short_write)
    res = _cli("train-gate", "--cache", cache, "--out", tmp_path / "r", "--epochs", "2", "--fusion", "average")
    assert res.exit_code == 1 and "cannot write" in res.output and "is the disk full?" in res.output and "Traceback" not in res.output
    assert not list((tmp_path / "r").rglob("*.tmp"))
    monkeypatch.undo()
    assert _cli("train-gate", "--cache", cache, "--out", tmp_path / "r", "--epochs", "2", "--fusion", "average", "--resume").exit_code == 0


def test_a_refused_write_names_the_file(market_cache, tmp_path, monkeypatch):
    """Read-only output folders (root ignores permissions here, so the refusal is injected)."""
    import featcache.fileio as fileio

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(fileio.os, "replace", denied)
    res = _cli("eval", "--cache", market_cache, "--model", "backbone:clip-tiny", "--json", tmp_path / "ro" / "r.json")
    assert res.exit_code == 1 and f"Error: cannot write {tmp_path / 'ro' / 'r.json'}: Permission denied (errno 13)" in res.output
    assert "Traceback" not in res.output and not list((tmp_path / "ro").glob("*.tmp"))


# ---------------------------------------------------------------------------------------------- one writer
HOLD = """
import sys, time
from pathlib import Path
{body}
print("held", flush=True)
sys.stdin.read()
"""


def _hold(body: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(body=body)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_it(market_root, tmp_path):
    out = tmp_path / "c.h5"
    holder = _hold(f"from featcache.cache.lock import WriterLock\nlock = WriterLock(Path({str(out)!r})).__enter__()")
    try:
        with pytest.raises(InputError, match=f"being written by another featcache process \\(pid {holder.pid} on "):
            run_extract(extract_cfg(market_root, out, backbones=("clip-tiny",)))
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    run_extract(extract_cfg(market_root, out, backbones=("clip-tiny",)))  # the kernel released the dead holder's lock


def test_a_file_open_for_writing_elsewhere_is_busy_not_unreadable(market_cache, tmp_path):
    copy = tmp_path / "c.h5"
    shutil.copy(market_cache, copy)
    holder = _hold(f"import h5py\nf = h5py.File({str(copy)!r}, 'r+')")
    try:
        res = _cli("eval", "--cache", copy, "--model", "backbone:clip-tiny")
        assert res.exit_code == 1 and "is busy: another process has it open (not a featcache writer)" in res.output
    finally:
        holder.kill()
        holder.wait()
    assert _cli("eval", "--cache", copy, "--model", "backbone:clip-tiny").exit_code == 0


# ---------------------------------------------------------------------------------------------- honest partial results
def test_eval_refuses_pending_images_unless_allowed_and_then_says_so(market_cache, tmp_path):
    copy = tmp_path / "c.h5"
    shutil.copy(market_cache, copy)
    with h5py.File(copy, "r+") as f:
        split = f["images/split"][...]
        status = f["images/status"]
        for i in [int(j) for j in (split == 2).nonzero()[0][:5]]:
            status[i] = 0  # as a killed extraction leaves them
    res = _cli("eval", "--cache", copy, "--model", "backbone:clip-tiny")
    assert res.exit_code == 1 and "has pending images (gallery 5)" in res.output and "--allow-partial" in res.output
    res = _cli("eval", "--cache", copy, "--model", "backbone:clip-tiny", "--allow-partial", "--json", tmp_path / "r.json")
    assert res.exit_code == 0 and "not cached: pending gallery 5" in res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["partial"]["pending"] == {"train": 0, "query": 0, "gallery": 5} and rep["partial"]["complete"] is False
    full = json.loads(json.dumps(run_eval_report(market_cache)))
    assert full["partial"]["complete"] is True


def run_eval_report(cache: Path) -> dict:
    from featcache.evaluation.runner import EvalConfig, run_eval

    return run_eval(EvalConfig(cache, "backbone:clip-tiny")).report


# ---------------------------------------------------------------------------------------------- safe loading
class Payload:
    """Unpickling this creates a file: what a planted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_in_a_checkpoint_does_not_run(tmp_path):
    from featcache.synth_cache import write_feature_cache

    cache = write_feature_cache(tmp_path / "f.h5", ids=16, per_id=4, cams=4, views=2)
    run = tmp_path / "r"
    args = ["train-gate", "--cache", cache, "--out", run, "--fusion", "average", "--epochs", "1"]
    assert _cli(*args).exit_code == 0
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "optimizer": Payload(marker)}, run / "ckpt" / "state-0001.pt")
    torch.load(run / "ckpt" / "state-0001.pt", weights_only=False)  # the payload is real: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    res = _cli(*args, "--resume")
    assert res.exit_code == 1 and "the checkpoint of epoch 1 cannot be read" in res.output
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- confined paths, manifests
def test_manifest_paths_stay_inside_the_root(market_root, tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    img = next((market_root / "query").glob("*.jpg"))
    shutil.copy(img, outside / "secret.jpg")
    shutil.copy(img, root / "ok.jpg")
    (root / "link.jpg").symlink_to(outside / "secret.jpg")
    for bad, why in (("../outside/secret.jpg", "leads outside"), (str(outside / "secret.jpg"), "is absolute"),
                     ("link.jpg", "leads outside"), ("../../../etc/hostname", "leads outside")):
        (root / "manifest.csv").write_text(f"path,pid,camid,split\nok.jpg,1,1,query\n{bad},1,2,gallery\n")
        with pytest.raises(DatasetLayoutError, match=f"manifest.csv:3: .*{why}"):
            load_listing("csv", root)
    (root / "manifest.csv").write_text("path,pid,camid,split\nok.jpg,1,1,query\nok.jpg,1,2,gallery\nok.jpg,1,3,gallery\n")
    with pytest.raises(DatasetLayoutError, match="manifest.csv:4: ok.jpg is listed in split gallery again \\(first on line 3\\)"):
        load_listing("csv", root)
    (root / "manifest.csv").write_text("path,pid,camid,split\n")
    with pytest.raises(DatasetLayoutError, match="manifest .*manifest.csv lists no images"):
        load_listing("csv", root)


def test_broken_symlinks_are_recorded_as_failed_and_exif_is_reported(market_root, tmp_path, caplog):
    from PIL import Image

    root = tmp_path / "m"
    shutil.copytree(market_root, root)
    train = sorted((root / "bounding_box_train").glob("*.jpg"))
    train[0].unlink()
    train[0].symlink_to(tmp_path / "gone.jpg")
    img = Image.open(train[1])
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    img.save(train[1], exif=exif)
    with caplog.at_level("WARNING"):
        res = run_extract(extract_cfg(root, tmp_path / "c.h5", backbones=("clip-tiny",)))
    assert res.summary["failed"] == [{"path": f"bounding_box_train/{train[0].name}", "reason": "broken symbolic link"}]
    assert any("1 image(s) carry an EXIF orientation tag" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------------- files featcache cannot read
def test_newer_format_garbage_identity_and_unreadable_out(market_root, market_cache, tmp_path):
    newer = tmp_path / "newer.h5"
    shutil.copy(market_cache, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 99
    res = _cli("info", newer)
    assert res.exit_code == 1 and "has format version 99, newer than this featcache reads" in res.output
    garbage = tmp_path / "garbage.h5"
    shutil.copy(market_cache, garbage)
    with h5py.File(garbage, "r+") as f:
        f.attrs["identity"] = "{not json"
    res = _cli("eval", "--cache", garbage, "--model", "backbone:clip-tiny")
    assert res.exit_code == 1 and "'identity' attribute is not a featcache cache identity" in res.output
    plain = tmp_path / "plain.h5"
    plain.write_bytes(b"not hdf5")
    with pytest.raises(CacheError, match="not a readable HDF5 file.*use --overwrite to replace it"):
        run_extract(extract_cfg(market_root, plain, backbones=("clip-tiny",)))


# ---------------------------------------------------------------------------------------------- processes
def _argv(root: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "featcache", "extract", "--dataset", "market1501", "--root", str(root), "--backbone", "clip-tiny",
            "--backbone", "align-tiny", "--out", str(out), "--views", "3", "--batch-size", "8", "--workers", str(workers),
            "--image-size", "64x32"]


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def test_workers_die_with_their_killed_parent(market_root, tmp_path):
    from crash import start

    out = tmp_path / "orphans.h5"
    argv = _argv(market_root, out, 2)[3:]
    (proc,) = start(argv, tmp_path / "log", env_per_rank=[{"FEATCACHE_FAULT": "extract.after_batch:1"}])  # SIGKILL of the main process alone
    workers: set[int] = set()
    while proc.is_alive():
        workers |= _children(proc.pid)
        time.sleep(0.01)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL and workers, (proc.exitcode, workers)
    deadline = time.monotonic() + 30
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _running(w)]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may leave dead orphans unreaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_cleanly_with_queued_batches_written(market_root, market_cache, tmp_path):
    from crash import finish, start

    out, log = tmp_path / "term.h5", tmp_path / "log"
    argv = _argv(market_root, out, 0)[3:]  # the command line without the interpreter
    assert finish(start(argv, log, env_per_rank=[{"FEATCACHE_FAULT": "extract.after_batch:2:TERM"}])) == [1]
    assert "Aborted!" in log.read_text() and "Traceback" not in log.read_text()  # click's 'Aborted!', as for Ctrl-C
    s = summary(out)
    assert sum(s["splits"].values()) >= 16 and s["pending"] > 0  # the batches finished before the signal stay
    assert finish(start(argv, log)) == [0]
    assert_same_cache(market_cache, out)


# ---------------------------------------------------------------------------------------------- first-hour messages
def test_messages_for_a_folder_a_finished_read_only_cache_and_a_read_only_output_folder(market_cache, market_root, tmp_path, monkeypatch):
    res = _cli("info", market_cache.parent)
    assert res.exit_code == 1 and f"cache {market_cache.parent} is a folder, not a featcache cache file: give one of the files it " \
        f"holds (market.h5), e.g. {market_cache}" in res.output
    assert not list(market_cache.parent.glob("*.lock"))  # a finished run leaves no lock file beside its cache
    copy = tmp_path / "done.h5"
    shutil.copy(market_cache, copy)
    import featcache.extract.runner as runner

    def no_writer(*a, **k):
        raise AssertionError("a finished cache must not be opened for writing")

    monkeypatch.setattr(runner, "CacheWriter", no_writer)  # a finished (maybe read-only) cache is only read
    assert run_extract(extract_cfg(market_root, copy)).processed == 0
    import featcache.cache.lock as lock

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lock.os, "open", denied)
    res = _cli("extract", "--dataset", "market1501", "--root", market_root, "--backbone", "clip-tiny", "--out", tmp_path / "ro" / "c.h5",
               "--image-size", "64x32")
    assert res.exit_code == 1 and f"cannot write in {tmp_path / 'ro'} (permission denied), where c.h5 goes" in res.output


# ---------------------------------------------------------------------------------------------- file modes
@pytest.mark.heavy
def test_every_file_a_training_run_and_an_evaluation_write_honours_the_umask(tmp_path):
    """Weights were published 0600 (safetensors writes through a private temporary file), every other file 0644:
    colleagues on shared storage could read a run's log but not its model. Umask 027, so a fixed 0644 fails too."""
    import safetensors

    from featcache.synth_cache import write_feature_cache

    assert tuple(int(x) for x in safetensors.__version__.split(".")[:2]) >= (0, 4)  # the floor setup.cfg allows
    umask = 0o027
    cache = write_feature_cache(tmp_path / "f.h5", ids=8, per_id=4, cams=2, views=2)
    old = os.umask(umask)
    try:
        run = tmp_path / "run"
        res = _cli("train-gate", "--cache", cache, "--out", run, "--experts", "clip-sim,align-sim", "--epochs", "2",
                   "--device", "cpu")
        assert res.exit_code == 0, res.output
        res = _cli("eval", "--cache", cache, "--model", f"gate:{run}", "--json", tmp_path / "ev" / "r.json",
                   "--plots", tmp_path / "ev" / "plots", "--save-features", tmp_path / "ev" / "f.npz")
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    files = [p for d in (run, tmp_path / "ev") for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.parent.name == "ckpt" for p in files)
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files
             if p.stat().st_mode & 0o777 != 0o666 & ~umask}
    assert not wrong, f"modes other than {oct(0o666 & ~umask)}: {wrong}"


# ---------------------------------------------------------------------------------------------- unfinished caches
@pytest.mark.heavy
def test_training_on_an_unfinished_cache_is_refused_or_recorded_and_every_later_stage_says_so(market_root, market_cache, tmp_path):
    """train-gate once trained on the cached part with one warning, distill said nothing, and eval of that gate after
    the extraction finished reported a complete cache: nothing said the teacher had seen part of the data."""
    part = tmp_path / "part.h5"
    shutil.copy(market_cache, part)
    with h5py.File(part, "r+") as f:
        train = [int(j) for j in (f["images/split"][...] == 0).nonzero()[0]]
        for i in train[-6:]:
            f["images/status"][i] = 0  # as a killed extraction leaves them
    gate, student = tmp_path / "gate", tmp_path / "student"
    args = ["train-gate", "--cache", part, "--out", gate, "--epochs", "1", "--batch-size", "16", "--device", "cpu"]
    res = _cli(*args)
    assert res.exit_code == 1 and f"6 of {len(train)} training images are not cached yet" in res.output
    assert "rerun the same featcache extract command to finish it, or pass --allow-partial" in res.output and not gate.exists()
    assert _cli(*args, "--allow-partial").exit_code == 0
    record = json.loads((gate / "run.json").read_text())["partial"]
    assert record["images_used"] == len(train) - 6 and record["images_total"] == len(train) and len(record["images_digest"]) == 64
    d_args = ["distill", "--cache", part, "--gate", gate, "--out", student, "--epochs", "1", "--student-init", "random",
              "--device", "cpu", "--workers", "0", "--set", "batch_size=16"]
    res = _cli(*d_args)
    assert res.exit_code == 1 and "6 of" in res.output and "--allow-partial" in res.output
    run_extract(extract_cfg(market_root, part))  # the extraction finished: the cache is whole, the gate is not
    res = _cli(*d_args)
    assert res.exit_code == 1 and f"--gate {gate} was trained on {len(train) - 6} of {len(train)} training images" in res.output
    res = _cli(*d_args, "--allow-partial")
    assert res.exit_code == 0, res.output
    assert json.loads((student / "run.json").read_text())["partial"] == record
    for model in (f"gate:{gate}", f"student:{student}"):
        res = _cli("eval", "--cache", part, "--model", model, "--json", tmp_path / "r.json")
        assert res.exit_code == 0 and res.output.count(f"was trained on {len(train) - 6} of {len(train)} training images") == 1
        rep = json.loads((tmp_path / "r.json").read_text())
        assert rep["trained_on_partial"] == record and rep["partial"]["complete"] is True
    rep = json.loads(json.dumps(run_eval_report(market_cache)))
    assert rep["trained_on_partial"] is None


# ---------------------------------------------------------------------------------------------- outputs checked first
def test_an_output_that_cannot_be_written_is_refused_before_the_work_and_late_failures_keep_the_metrics(
        market_cache, tmp_path, monkeypatch):
    """eval --json NOTADIR/r.json once ran the whole evaluation, then failed, and the metrics were never printed."""
    from featcache.evaluation import runner

    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    computed = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: computed.append(1) or real(*a, **k))
    base = ["eval", "--cache", market_cache, "--model", "backbone:clip-tiny"]
    for option, path, says in (("--json", blocker / "r.json", f"{blocker} is a file, not a folder"),
                                ("--save-features", blocker / "sub" / "f.npz", f"{blocker} is a file, not a folder"),
                                ("--plots", blocker / "plots", f"{blocker} is a file, not a folder")):
        res = _cli(*base, option, path)
        assert res.exit_code == 1 and f"Error: {option} {path}: " in res.output and says in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not computed
    res = _cli("train-gate", "--cache", market_cache, "--out", blocker / "run", "--epochs", "1", "--device", "cpu")
    assert res.exit_code == 1 and f"--out {blocker / 'run'}: cannot create it" in res.output
    from test_profile_export import make_run

    res = _cli("export", "--model", f"student:{make_run(tmp_path / 'student', 'resnet18')}", "--onnx", blocker / "m.onnx")
    assert res.exit_code == 1 and f"--onnx {blocker / 'm.onnx'}: cannot create it" in res.output, res.output

    def full_disk(path, write):
        raise RunError(f"cannot write {path}: No space left on device (errno 28)")

    monkeypatch.setattr(runner, "atomic_write", full_disk)  # the check passed; the disk filled up during the work
    res = _cli(*base, "--json", tmp_path / "r.json")
    assert res.exit_code == 1 and "No space left on device" in res.output.splitlines()[-1]
    assert "mAP" in res.output and computed  # the metrics, printed before the error
