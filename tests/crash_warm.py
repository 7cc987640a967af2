"""Imported once by the crash tests' forkserver: the lazy imports and first calls a featcache command makes,
done before any child is forked from it (one compute thread, as in every test process, so no thread pool
exists to be broken by the fork)."""

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401  (train-gate's plots)

from featcache.backbones import build_backbone  # noqa: E402
from featcache.distill.students import build_student  # noqa: E402

torch.set_num_threads(1)
with torch.no_grad():
    for _name in ("clip-tiny", "align-tiny"):
        build_backbone(_name, (64, 32), None, False).output_specs()
_student = build_student("resnet18", 5, "random", seed=0)
_student(torch.zeros(2, 3, 64, 32))
