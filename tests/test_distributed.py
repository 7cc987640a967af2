"""Distributed extraction (torchrun, gloo): shards, the virtual-dataset master, resuming a dead rank, and readers
that open a cache while it is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import assert_same_cache
from crash import finish, free_port, start
from featcache.cache import CacheSplit, open_cache_file, status_counts
from featcache.cache.checksum import verify_cache
from featcache.cache.shards import partial_path, shard_dir, shard_path


def _argv(root: Path, out: Path, batch: int = 8) -> list[str]:
    """The options of the session's ``market_cache`` (conftest.extract_cfg), on the command line."""
    return ["extract", "--dataset", "market1501", "--root", str(root), "--backbone", "clip-tiny", "--backbone", "align-tiny",
            "--out", str(out), "--views", "3", "--batch-size", str(batch), "--workers", "0", "--image-size", "64x32", "--device", "cpu"]


@pytest.mark.slow  # about 10 s that cannot shrink: two fresh interpreters import open_clip and transformers; the
# default suite shards two ranks through the forkserver (below, and the two-rank SIGKILL campaign)
def test_torchrun_two_processes_equal_one_process_array_for_array(market_root, market_cache, tmp_path):
    out = tmp_path / "dist.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one-process cache was made: same kernels, same bits
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "featcache", *_argv(market_root, out)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: " in proc.stdout and "rank 1: " in proc.stdout
    assert_same_cache(market_cache, out)  # plain h5py reads the master as one cache
    with h5py.File(out, "r") as f:
        assert f["backbones/clip-tiny/embed"].is_virtual and not f["images/path"].is_virtual
    assert [p.name for p in sorted(shard_dir(out).glob("*.h5"))] == ["rank-00000-of-00002.h5", "rank-00001-of-00002.h5"]
    assert not verify_cache(out).bad
    from click.testing import CliRunner
    from featcache.cli import main

    assert "shards: 2 (2 published)" in CliRunner().invoke(main, ["info", str(out)]).output


@pytest.mark.heavy
def test_a_dead_rank_is_redone_alone_and_other_world_sizes_are_refused(market_root, market_cache, tmp_path):
    from featcache.errors import InputError
    from featcache.extract.runner import run_extract
    from conftest import extract_cfg

    out, log = tmp_path / "c.h5", tmp_path / "log"
    argv = _argv(market_root, out)
    procs = start(argv, log, world=2, env_per_rank=[{}, {"FEATCACHE_FAULT": "extract.after_batch:2:STOP"}])  # rank 1 hangs
    deadline = time.monotonic() + 120
    while not shard_path(out, 0, 2).is_file() and time.monotonic() < deadline:  # rank 0 finishes and publishes
        time.sleep(0.05)
    assert procs[0].is_alive()  # waiting for rank 1, and holding the master's lock for the whole launch
    with pytest.raises(InputError, match="being written by another featcache process"):
        run_extract(extract_cfg(market_root, out, overwrite=True))
    os.kill(procs[1].pid, signal.SIGKILL)
    os.kill(procs[0].pid, signal.SIGTERM)  # what torchrun does to the others when a rank dies
    finish(procs, 30)
    assert shard_path(out, 0, 2).is_file() and partial_path(shard_path(out, 1, 2)).is_file()
    with open_cache_file(out) as f:  # readers of the master see rank 0's images, rank 1's as pending
        assert 0 < int((f["images/status"][...] == 0).sum()) < len(f["images/status"])
    before = shard_path(out, 0, 2).stat().st_mtime_ns
    assert finish(start(argv, log, world=2)) == [0, 0]
    assert shard_path(out, 0, 2).stat().st_mtime_ns == before  # rank 0's finished shard was not touched
    assert "rank 0: " in log.read_text() and "; 0 images this run" in log.read_text().split("rank 0: ")[-1].splitlines()[0]
    assert_same_cache(market_cache, out)

    with pytest.raises(InputError, match="extracted by 2 ranks: resume it with torchrun --nproc-per-node 2"):
        run_extract(extract_cfg(market_root, out))
    assert finish(start(_argv(market_root, out, batch=4), log, world=2)) == [1, 1]
    assert "extracted by 2 ranks with --batch-size 8; this run has 2 ranks and --batch-size 4" in log.read_text()
    assert finish(start([*argv, "--overwrite"], log, world=1)) == [0]  # --overwrite starts anew, shards and all
    assert not shard_dir(out).exists()
    assert_same_cache(market_cache, out)


def test_readers_of_a_growing_cache_see_only_complete_images(market_root, market_cache, tmp_path):
    """Evaluation and training read a cache while it is written: every image they see as cached equals the
    finished cache, row for row, checksums included; the rest count as pending. (Through a sharded master,
    a shard's images appear when it is published: test_a_dead_rank_... reads one half-published.)"""
    out, log = tmp_path / "c.h5", tmp_path / "log"
    ref = CacheSplit.load(market_cache, "gallery")
    want = dict(zip(ref.images, ref.read("clip-tiny", "embed", 0)))
    procs = start(_argv(market_root, out), log)
    seen: list[tuple[int, int]] = []
    while any(p.is_alive() for p in procs):
        time.sleep(0.002)  # leave the writer its core
        if not out.is_file():
            continue
        pending = status_counts(out)["pending"]["gallery"]
        try:
            split = CacheSplit.load(out, "gallery")
        except Exception as exc:  # no gallery image cached yet is the only acceptable refusal
            assert "holds no cached gallery images" in str(exc), exc
            continue
        rows = split.read("clip-tiny", "embed", 0)  # checked against its checksums as it is read
        for i, r in zip(split.images, rows):
            assert np.array_equal(r, want[i]), f"image {i} read while written differs from the finished cache"
        seen.append((len(split), pending))
    assert finish(procs) == [0]
    assert any(0 < n and p > 0 for n, p in seen), f"no read caught the cache part-written: {seen[:5]}"
    assert_same_cache(market_cache, out)


def test_a_cache_is_whole_when_it_is_published(market_root, tmp_path, monkeypatch):
    """The cache a reader can open never grows afterwards but by raw rows: its annotations (the synthetic
    dataset's camera conditions) are written under the temporary name, before the rename publishes it. A
    reader that opened it while they were added saw a truncated file (HDF5: "truncated file: eof < stored_eof")."""
    from conftest import extract_cfg
    from featcache.cache import CacheReader
    from featcache.cache import store
    from featcache.extract.runner import run_extract

    seen = []
    real = store.os.replace

    def publish(src, dst):
        if str(src).endswith(".creating"):
            with CacheReader(src) as c:
                seen.append(c.conditions() is not None)
        real(src, dst)

    monkeypatch.setattr(store.os, "replace", publish)
    run_extract(extract_cfg(market_root, tmp_path / "c.h5", views=1))
    assert seen == [True]


@pytest.mark.slow
def test_a_pipeline_under_two_ranks_shards_its_extraction_and_rank_0_runs_the_rest(tmp_path, monkeypatch):
    """``torchrun --nproc-per-node 2 -m featcache demo ...``: extraction and distillation on both ranks, every other
    stage on rank 0; the teacher's numbers equal a one-process run's (the student's batches are shared out, so its
    own differ). (slow: two whole small demos, about 30 s)"""
    import json

    from test_pipeline import SMALL

    small = [*SMALL, "--set", "distill.batch_size=8"]  # three PK batches an epoch: one for each rank at least
    home = {"FEATCACHE_HOME": str(tmp_path / "home")}
    assert finish(start(["demo", "--out", str(tmp_path / "two"), *small], tmp_path / "log", world=2,
                        env_per_rank=[home, home])) == [0, 0]
    log = (tmp_path / "log").read_text()
    assert "rank 1: the sharded stages are done; rank 0 runs the rest" in log and log.count("stage(s) ran") == 1
    assert len(list((tmp_path / "two").glob("cache-*.h5.shards/rank-*-of-00002.h5"))) == 2
    students = list((tmp_path / "two" / "student").glob("*/run.json"))
    assert students and all(json.loads(p.read_text())["world_size"] == 2 for p in students)
    assert finish(start(["demo", "--out", str(tmp_path / "one"), *small], tmp_path / "log", env_per_rank=[home])) == [0]
    two, one = (json.loads((tmp_path / d / "report" / "summary.json").read_text())["rows"] for d in ("two", "one"))
    assert set(two) == set(one) and any(k.startswith("student") for k in two)
    assert {k: v for k, v in two.items() if not k.startswith("student")} == {k: v for k, v in one.items() if not k.startswith("student")}


def _distill_argv(cache: Path, gate: Path, out: Path, epochs: int = 4) -> list[str]:
    return ["distill", "--cache", str(cache), "--gate", str(gate), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "8", "--instances", "2", "--student-init", "random", "--device", "cpu", "--workers", "0",
            "--no-tensorboard", "--resume"]


@pytest.mark.slow  # two ranks of distill and an evaluation: about 15 s
def test_distill_on_two_ranks_finishes_records_its_world_and_evaluates(market_cache, runs, tmp_path):
    """``torchrun --nproc-per-node 2 -m featcache distill ...`` on the CPU (gloo): each rank trains its share of every
    epoch, rank 0 writes the run, and the model it writes is evaluated like any student."""
    import json

    from click.testing import CliRunner

    from featcache.cli import main

    out = tmp_path / "s"
    argv = [*_distill_argv(market_cache, runs["gate"], out), "--pixel-cache", str(tmp_path / "px.h5"), "--input-path", "device"]
    assert finish(start(argv, tmp_path / "log", world=2)) == [0, 0]  # rank 0 builds the pixel cache; each rank keeps it resident
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 5 and (out / "model.safetensors").is_file()
    res = CliRunner().invoke(main, ["eval", "--cache", str(market_cache), "--model", f"student:{out}", "--device", "cpu"])
    assert res.exit_code == 0 and "mAP" in res.output, res.output


@pytest.mark.slow  # three two-rank runs of distill: about 25 s
def test_two_ranks_killed_at_a_fault_point_resume_to_the_same_run(market_cache, runs, tmp_path):
    """SIGKILL of rank 0 at a fault point (its first checkpoint written; rank 1 then stops), then ``--resume`` on two
    ranks: the run finishes and equals an uninterrupted two-rank run; resuming it on another number of ranks is
    refused."""
    from safetensors.torch import load_file

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert finish(start(_distill_argv(market_cache, runs["gate"], whole), tmp_path / "log", world=2)) == [0, 0]
    fault = {"FEATCACHE_FAULT": "train.after_checkpoint:1"}  # rank 0 dies right after its first checkpoint
    procs = start(_distill_argv(market_cache, runs["gate"], cut), tmp_path / "log", world=2, env_per_rank=[fault, {}])
    codes = finish(procs, timeout=120)  # rank 1 loses its peer in the next gradient exchange and stops too
    assert codes[0] == -9 and codes[1] not in (0, None), codes
    assert (cut / "ckpt" / "last").is_file() and not (cut / "model.safetensors").exists()
    refused = finish(start(_distill_argv(market_cache, runs["gate"], cut), tmp_path / "log1"))
    assert refused == [1] and "was trained on 2 rank(s), this launch has 1" in (tmp_path / "log1").read_text()
    assert finish(start(_distill_argv(market_cache, runs["gate"], cut), tmp_path / "log", world=2)) == [0, 0]
    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
