"""featcache: re-identification with cached foundation-model features (MoE-KD).

The public Python API (docs/api.md), imported lazily so that the command line starts fast:

- ``featcache.evaluate``: exact mAP, CMC and mINP of any features or distance matrix under the protocol;
- ``featcache.open_cache``: a feature cache for reading (``CacheReader``);
- ``featcache.read_teacher_targets``: a gate run's teacher targets (``TeacherTargets``);
- ``featcache.load_model``: a trained student or teacher that embeds images as ``featcache eval`` does;
- ``featcache.FeatcacheError``: the base of every error featcache raises on purpose.
"""

from typing import TYPE_CHECKING

from featcache.errors import FeatcacheError

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time they load lazily (below)
    from featcache.api import evaluate, load_model, open_cache, read_teacher_targets  # noqa: F401

__version__ = "0.1.0"
_LAZY = ("evaluate", "load_model", "open_cache", "read_teacher_targets")  # featcache.api's names, loaded on first use
__all__ = ["FeatcacheError", *_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        from featcache import api

        return getattr(api, name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the lazily loaded public API among them (``dir(featcache)``, tab completion)."""
    return sorted(set(globals()) | set(__all__))
