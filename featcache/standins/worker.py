"""One stand-in's pre-training in a process of its own, in the recipe's fixed arithmetic.

torch, MKL and oneDNN choose their kernels and threads once, when a process starts, and pre-training carries any
rounding difference on until the weights differ outright (docs/notes/shipped-standins.md). So the runner starts
one process per stand-in with :data:`~featcache.standins.shipped.ARITHMETIC` in its environment (one thread each,
hence several stand-ins side by side on several cores): ``python -m featcache.standins.worker``, with the rendered
set in a ``.npz`` file. The worker writes the trained weights and their ``standin.json`` into a folder that the
runner then publishes; what it logs, its progress lines included, goes to its stderr, which the runner passes on.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcache import __version__
from featcache.standins.config import META_FILE, StandinConfig
from featcache.standins.shipped import ARITHMETIC

logger = logging.getLogger(__name__)
TAIL = 20  # stderr lines kept per worker, for the error message
FIXED_KERNELS = ("AVX2", "AVX512")  # torch's capabilities of CPUs that can run the recipe's AVX2 kernels


def worker_env(device: str) -> dict[str, str]:
    """The environment a worker trains in: ours, with the recipe's arithmetic on a CPU that has AVX2. Elsewhere only
    one thread (asking torch for AVX2 kernels on a CPU without them would crash it), and the weights differ."""
    import torch

    if device != "cpu":
        return dict(os.environ)
    kernels = torch.backends.cpu.get_cpu_capability()
    if kernels in FIXED_KERNELS:
        return {**os.environ, **ARITHMETIC}
    logger.warning("this CPU has no AVX2 (torch reports %s kernels): stand-ins train in its own arithmetic, and "
                   "their weights differ from the shipped ones and from other machines'", kernels)
    return {**os.environ, **{k: v for k, v in ARITHMETIC.items() if k.endswith("_NUM_THREADS")}}


@dataclass
class Job:
    """A stand-in to train: what the runner hands a worker, and the worker's process once started."""

    name: str
    key: str
    out: Path
    proc: subprocess.Popen | None = None
    tail: list[str] = field(default_factory=list)

    def start(self, cfg: StandinConfig, data: Path, device: str, env: dict[str, str]) -> None:
        """Start the worker process; its stderr is passed on line by line by :meth:`relay`."""
        args = [sys.executable, "-m", "featcache.standins.worker", self.name, self.key, str(data), str(self.out),
                device, str(logging.getLogger("featcache").getEffectiveLevel()), json.dumps(cfg.to_dict(absolute=True))]
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)

    def relay(self) -> None:
        """Pass the worker's stderr on to ours until it closes, keeping the last lines (run in a thread). It reads
        to the end whatever happens to our stderr, so that the worker never blocks on a full pipe."""
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.tail = [*self.tail[-(TAIL - 1):], line.rstrip()]
            try:
                sys.stderr.write(line)
            except (OSError, ValueError):  # our stderr closed or broken: keep draining the pipe
                pass

    def failure(self) -> str:
        """One line: the stand-in, and the worker's own error, else how its process ended."""
        errors = [ln for ln in self.tail if ln.startswith("error:")]
        if errors:
            return errors[-1][len("error:"):].strip()
        code = self.proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        return f"{self.name}: its training process {how}" + (f" (last output: {self.tail[-1]})" if self.tail else "")


def arithmetic_seen(device: str) -> dict[str, Any]:
    """What this process computes with: the device, torch's kernels and threads, the arithmetic's environment, the
    CPU and torch's build."""
    import torch

    return {"device": device, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "environment": {k: os.environ.get(k) for k in ARITHMETIC},
            "torch": torch.__version__, "processor": cpu_name(), "machine": platform.machine()}


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_into(name: str, key: str, data: Path, out: Path, device: str, cfg: StandinConfig) -> None:
    """Train preset ``name`` on the set in ``data`` and write its weights and ``standin.json`` into ``out``."""
    import numpy as np
    import torch

    from featcache.standins.train import save_standin, train_standin

    with np.load(data) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    backbone, log = train_standin(name, cfg, images, labels, torch.device(device))
    save_standin(backbone, out)
    meta = {"preset": name, "key": key, "featcache": __version__, "config": cfg.to_dict(absolute=True),
            "images": int(len(labels)), "identities": int(labels.max() + 1), "arithmetic": arithmetic_seen(device),
            "log": log}
    (out / META_FILE).write_text(json.dumps(meta, indent=1, default=str))


def main(argv: list[str]) -> int:
    """``python -m featcache.standins.worker NAME KEY DATA OUT DEVICE LOGLEVEL CONFIG_JSON``: what :class:`Job` runs.
    Exit 0 with the folder written; 1 with an ``error:`` line; 130 when interrupted (its parent says why)."""
    from featcache.errors import FeatcacheError
    from featcache.processes import die_with_parent
    from featcache.progress import setup_logging

    name, key, data, out, device, level, config = argv
    die_with_parent()
    setup_logging({logging.DEBUG: 2, logging.INFO: 1}.get(int(level), 0))
    try:
        train_into(name, key, Path(data), Path(out), device, StandinConfig.from_dict(json.loads(config)))
    except FeatcacheError as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
