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
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcache import __version__
from featcache.standins.config import StandinConfig
from featcache.standins.shipped import ARITHMETIC

logger = logging.getLogger(__name__)
TAIL = 20  # stderr lines kept per worker, for the error message


@dataclass
class Job:
    """A stand-in to train: what the runner hands a worker, and the worker's process once started."""

    name: str
    key: str
    out: Path
    proc: subprocess.Popen | None = None
    tail: list[str] = field(default_factory=list)

    def start(self, cfg: StandinConfig, data: Path, device: str) -> None:
        """Start the worker process; its stderr is passed on line by line by :meth:`relay`."""
        args = [sys.executable, "-m", "featcache.standins.worker", self.name, self.key, str(data), str(self.out),
                device, str(logging.getLogger("featcache").getEffectiveLevel()), json.dumps(cfg.to_dict(absolute=True))]
        env = {**os.environ, **(ARITHMETIC if device == "cpu" else {})}
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def relay(self) -> None:
        """Pass the worker's stderr on to ours until it closes, keeping the last lines (run in a thread)."""
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            sys.stderr.write(line)
            self.tail = [*self.tail[-(TAIL - 1):], line.rstrip()]

    def failure(self) -> str:
        """The worker's own error line, else its exit status."""
        errors = [ln for ln in self.tail if ln.startswith("error:")]
        return errors[-1][len("error:"):].strip() if errors else f"its process exited with {self.proc.returncode}" + (
            f" ({self.tail[-1]})" if self.tail else "")


def arithmetic_seen(device: str) -> dict[str, Any]:
    """What this process computes with: the device, torch's kernels and threads, the CPU and torch's build."""
    import torch

    return {"device": device, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "processor": cpu_name(),
            "machine": platform.machine()}


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

    seen = arithmetic_seen(device)
    if device == "cpu" and seen["cpu_capability"] != ARITHMETIC["ATEN_CPU_CAPABILITY"].upper():
        logger.warning("%s: this CPU computes with %s kernels, not AVX2: the weights will differ from those of the "
                       "same recipe on AVX2 CPUs (and from the shipped ones)", name, seen["cpu_capability"])
    with np.load(data) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    backbone, log = train_standin(name, cfg, images, labels, torch.device(device))
    save_standin(backbone, out)
    meta = {"preset": name, "key": key, "featcache": __version__, "config": cfg.to_dict(absolute=True),
            "images": int(len(labels)), "identities": int(labels.max() + 1), "arithmetic": seen, "log": log}
    (out / "standin.json").write_text(json.dumps(meta, indent=1, default=str))


def main(argv: list[str]) -> int:
    """``python -m featcache.standins.worker NAME KEY DATA OUT DEVICE LOGLEVEL CONFIG_JSON``: what :class:`Job` runs."""
    from featcache.errors import FeatcacheError
    from featcache.progress import TqdmHandler

    name, key, data, out, device, level, config = argv
    handler = TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("featcache").setLevel(int(level))
    try:
        train_into(name, key, Path(data), Path(out), device, StandinConfig.from_dict(json.loads(config)))
    except FeatcacheError as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
