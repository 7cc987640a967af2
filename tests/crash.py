"""SIGKILL at seeded random moments: run featcache commands in child processes, kill them, resume them.

Children come from a multiprocessing *forkserver* that has imported torch
and featcache once, so starting one costs milliseconds, not the seconds of a
new interpreter: a campaign of kills and resumes fits in a CI test. A child runs the
real command line (``featcache.cli.main``) and nothing of the test process.

A kill moment is drawn (seeded) from the run a start is expected to make:
three in four within the work still to do, one in four within start-up; a
run that ends before its moment is simply started again with the next one.
With two ranks, the SIGKILL hits one rank (the other then gets torchrun's
SIGTERM) or, one time in three, both at once.
Kills land in decoding, inference, writing, checkpointing, start-up,
checks, creation and publication. Moments
are seeded; where they land depends on the machine's speed, which is the
point: the guarantees must hold at any moment.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

# what a child would otherwise import at each start (the backbones' libraries take seconds)
_PRELOAD = ["featcache.cli", "featcache.extract.runner", "featcache.gate.runner", "featcache.distill.runner",
            "torch.distributed", "h5py", "open_clip", "open_clip.model", "transformers", "huggingface_hub",
            "transformers.models.align.modeling_align", "featcache.backbones.align", "featcache.backbones.clip",
            "torchvision", "crash_warm"]
_ctx = None


def context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(_PRELOAD)
    return _ctx


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    mp.set_start_method("fork", force=True)  # as in `python -m featcache`: DataLoader workers are this process's children
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from featcache.cli import main

    main.main(args=argv, prog_name="featcache", standalone_mode=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], log: Path, world: int = 1, env_per_rank: list[dict[str, str]] | None = None) -> list:
    """Start ``featcache ARGV`` as ``world`` ranks (torchrun's variables set as torchrun sets them)."""
    ctx = context()
    procs = []
    port = str(free_port())
    for rank in range(world):
        e = dict(env_per_rank[rank]) if env_per_rank else {}
        if world > 1:
            e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        p = ctx.Process(target=_child, args=(argv, e, str(log)), daemon=False)
        p.start()
        procs.append(p)
    return procs


def finish(procs: list, timeout: float = 300) -> list[int]:
    for p in procs:
        p.join(timeout)
    return [p.exitcode for p in procs]


def kill_when(procs: list, ready, delay, victim: int, passed=lambda: False) -> tuple[bool, float | None]:
    """SIGKILL rank ``victim`` (every rank when ``victim == len(procs)``) ``delay(s)`` seconds after ``ready()``
    first holds, ``s`` seconds after the start (a number: that many seconds), or as soon as ``passed()`` says the moment aimed at is over (the next unit of work is done),
    unless the run ended first; the other ranks then get what torchrun sends them when one rank dies: SIGTERM,
    then SIGKILL. Returns whether the kill landed and when ``ready()`` first held (``time.monotonic``)."""
    t_start = time.monotonic()
    while not ready():
        if not any(p.is_alive() for p in procs):
            return False, None
        time.sleep(0.01)
    t_ready = time.monotonic()
    wait = delay(t_ready - t_start) if callable(delay) else delay
    while time.monotonic() < t_ready + wait and not passed():
        if not any(p.is_alive() for p in procs):
            return False, t_ready
        time.sleep(0.01)
    if not any(p.is_alive() for p in procs):
        return False, t_ready
    victims = range(len(procs)) if victim == len(procs) else [victim]  # victim == ranks: all of them
    for v in victims:
        if procs[v].is_alive():
            os.kill(procs[v].pid, signal.SIGKILL)
    for i, p in enumerate(procs):
        if i not in victims and p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join(3)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join()
    # landed: a victim died of the SIGKILL (one that exited on its own in the meantime does not count)
    return any(procs[v].exitcode == -signal.SIGKILL for v in victims), t_ready


@dataclass
class Campaign:
    """Seeded kills of a command (``kills``, 20 unless told), each followed by ``check``, then a run to the end.

    Kill moments are placed by the run's progress, not by the clock of another run: the machine's speed
    changes while a campaign runs (a parallel test starts or ends), and delays taken from the timing run alone
    then overshoot. So a kill in the work is delayed by a fraction of a unit at the pace its own start showed
    (the time it took to reach its target against the timing run's), a kill in start-up by a fraction of the
    start-up at the pace last seen, and a kill aimed within a unit of work lands no later than that unit's end.
    Each kill in the work then consumes the units it aims at and at most one more, whatever the speed."""

    argv: list[str]
    log: Path
    world: int = 1
    units: int = 1   # units of work in a whole run (batches, epochs)
    kills: int = 20
    seed: int = 0
    landed: list[float] = field(default_factory=list)
    in_work: int = 0  # kills that landed while work was left (the others hit start-up, checks or publication)
    pace: float = 1.0  # observed durations over the timing run's (below 1: the machine is faster now)

    def run(self, timing: "Timing", remaining, check) -> int:
        """``remaining()``: the share of the work left (0..1), read from the files as a resumed run reads them;
        ``check()``: the files' guarantees, asserted after every kill. Returns the kills that landed. Every start,
        its planned moment, whether the kill landed and what the check found go to ``self.log`` between the
        children's own output, so that a failure keeps its whole story."""
        import numpy as np

        rng = np.random.default_rng(self.seed)
        note(self.log, f"campaign: {self.kills} kills of featcache {' '.join(self.argv)}; world {self.world}, "
                       f"seed {self.seed}, {self.units} units; {timing}")
        hits = tries = 0
        while hits < self.kills and tries < 3 * self.kills:
            # While work is left, three moments in four fall in it: once the files show the run a seeded number
            # of units further (one or a few, so that work is left for the next kill), a seeded fraction of a
            # unit later, so anywhere within a unit (decoding, inference, writing,
            # checkpointing, publication after the last). The others, and all once the work is done, fall
            # within a run that finds nothing (or little) to do: start-up, checks, creation, final outputs.
            left, u, v = remaining(), float(rng.uniform()), float(rng.uniform())
            in_work = left > 0 and tries % 4 != 3
            ready, delay, passed, expected, plan = self._moment(in_work, left, u, v, timing, remaining)
            victim = int(rng.integers(self.world + 1)) if self.world > 1 else 0  # world: every rank
            note(self.log, f"start {tries + 1} (kill {hits + 1} of {self.kills}), {plan}, victim "
                           f"{'every rank' if victim == self.world else f'rank {victim}'}")
            t0 = time.monotonic()
            procs = start(self.argv, self.log, self.world)
            tries += 1
            landed, t_ready = kill_when(procs, ready, delay, victim, passed)
            elapsed = round(time.monotonic() - t0, 3)
            self._observe_pace(expected, t_ready and t_ready - t0, landed, elapsed, timing, left)
            note(self.log, f"start {tries}: {'killed' if landed else 'ended before its kill'} after {elapsed} s "
                           f"(exit codes {[p.exitcode for p in procs]}); {remaining():.3f} of the work left; "
                           f"pace {self.pace:.2f}")
            if landed:
                hits += 1
                self.landed.append(elapsed)
                self.in_work += in_work
            try:
                check()
            except AssertionError:
                note(self.log, f"start {tries}: the files' check failed")
                raise
        note(self.log, f"final resume after {hits} kills ({self.in_work} while work was left) in {tries} starts")
        codes = finish(start(self.argv, self.log, self.world))
        note(self.log, f"final resume: exit codes {codes}")
        if any(c != 0 for c in codes):
            raise AssertionError(f"the final resume failed (exit codes {codes}); log: {self.log.read_text()[-3000:]}")
        return hits

    def _moment(self, in_work: bool, left: float, u: float, v: float, timing: "Timing", remaining):
        """Where one start's kill falls: ``ready()``, the ``delay`` after it, ``passed()`` (the moment aimed at is
        over), the timing run's seconds until ``ready()`` held (None: start-up) and the plan in words."""
        unit = timing.work / self.units  # seconds of one unit of work (a batch, an epoch) in the timing run
        if not in_work:  # within start-up, before the first unit of work (or within a run with nothing to do)
            # the timing run's start-up ends with its first unit done: the last fifth of it is left to the kills in
            # the work, so that a start-up kill at a misjudged pace does not use up a unit of work
            delay = u * (0.8 * timing.startup if left > 0 else timing.noop) * self.pace
            passed = (lambda: remaining() < left - 1e-9) if left > 0 else (lambda: False)
            return (lambda: True), delay, passed, None, f"in start-up: {left:.3f} left; kill {delay:.3f} s after the start"
        # a seeded number of units ahead: one or a few, more only in long runs (at most an eighth of the work left)
        steps = max(1, round(u * u * left * min(self.units, 8) / 4))
        if left > 1.5 / self.units:  # never past the last unit while more than one is left: a kill aimed at the
            steps = min(steps, round(left * self.units) - 1)  # end of the run rarely lands (its tail is short)
        target = left - steps / self.units
        expected = timing.startup + (steps - 1) * unit  # from the start until ready() holds, in the timing run
        passed = (lambda: remaining() < target - 1e-9) if target > 0 else (lambda: False)
        return ((lambda: remaining() <= target), (lambda s: v * unit * self._paced(s / expected)), passed, expected,
                f"in the work: {left:.3f} left; kill {v:.2f} of a unit after {max(target, 0):.3f} is left")

    def _observe_pace(self, expected: float | None, to_ready: float | None, landed: bool, elapsed: float,
                      timing: "Timing", left: float) -> None:
        """Update the pace from what this start showed: the time it took to reach its target against the timing
        run's, or, for a run that ended on its own with nothing to do, its whole duration against the timing
        run's no-op. Bounded to a factor of 4 either way: one odd start cannot throw the next moments far."""
        if expected and to_ready:
            self._paced(to_ready / expected)
        elif not landed and left <= 0:
            self._paced(elapsed / timing.noop)

    def _paced(self, seen: float) -> float:
        """Take ``seen`` as the pace now (bounded to a factor of 4 either way) and return it."""
        self.pace = min(4.0, max(0.25, seen))
        return self.pace


def note(log: Path, line: str) -> None:
    """One line of the harness's own between the children's output in ``log`` (appended, as they append)."""
    with open(log, "a") as fh:
        fh.write(f"=== {time.strftime('%H:%M:%S')} {line}\n")


@dataclass
class Timing:
    noop: float     # a run that finds nothing to do: start-up and checks
    startup: float  # from the start to the first unit of work done
    work: float     # from there to the last
    tail: float     # from there to the exit


def timing(argv: list[str], log: Path, remaining, world: int = 1) -> Timing:
    """Time an uninterrupted run, watching ``remaining()`` (the share of work left) from outside, then the same
    command again, which finds nothing to do."""
    finish(start(["--help"], log))  # the forkserver is up and warm
    note(log, f"timing: an uninterrupted run of featcache {' '.join(argv)}")
    t0 = time.monotonic()
    procs = start(argv, log, world)
    first = last = None
    while any(p.is_alive() for p in procs):
        r = remaining()
        now = time.monotonic() - t0
        if first is None and r < 1:
            first = now
        if last is None and r <= 0:
            last = now
        time.sleep(0.01)
    end = time.monotonic() - t0
    if any(c != 0 for c in finish(procs)):
        raise AssertionError(f"the uninterrupted run failed; log: {log.read_text()[-3000:]}")
    first = end if first is None else first
    last = end if last is None else last
    t1 = time.monotonic()
    note(log, "timing: the same command again, which finds nothing to do")
    if any(c != 0 for c in finish(start(argv, log, world))):
        raise AssertionError(f"the run that finds nothing to do failed; log: {log.read_text()[-3000:]}")
    return Timing(time.monotonic() - t1, first, max(0.05, last - first), max(0.01, end - last))
