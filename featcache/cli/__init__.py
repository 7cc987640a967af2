"""The ``featcache`` command line: one click group; each command parses options and calls one typed function.

Every stage's options fill its config dataclass (``featcache.config``): a
``--config`` YAML section first, then ``--set key=value``, then the options
given on the command line. Options default to ``None`` here so that the
dataclass stays the only place a default lives; ``--help`` shows it from
there. The package is only click's wiring: ``group`` (the group, its errors
and ``--config``), ``options`` (how a config field becomes an option),
``stages`` (the commands that run a stage) and ``tools`` (the others).
Importing it registers the model kinds (``gate``, ``student``), so that
evaluation knows none by name.
"""

from featcache.cli.group import main
from featcache.cli import stages as _stages, tools as _tools  # noqa: F401,E402  (the commands register on main)

import featcache.distill.features  # noqa: F401,E402  (registers the student: model kind)
import featcache.gate.features  # noqa: F401,E402  (registers the gate: model kind)

__all__ = ["main"]
