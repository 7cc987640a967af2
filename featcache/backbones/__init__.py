"""Frozen foundation backbones (open_clip CLIP, transformers ALIGN) built from presets."""

from __future__ import annotations

from featcache.backbones import align as _align  # noqa: F401  (registers the family)
from featcache.backbones import clip as _clip  # noqa: F401
from featcache.backbones.base import Backbone, OutputSpec, WeightsNotFoundError, family_builder
from featcache.backbones.hub import check_published_weights
from featcache.backbones.presets import Preset, PresetError, available_presets, get_preset

__all__ = ["Backbone", "OutputSpec", "Preset", "PresetError", "WeightsNotFoundError", "available_presets", "build_backbone", "get_preset"]


def build_backbone(name: str, image_size: tuple[int, int], weights: str | None = None, random_init: bool = False) -> Backbone:
    """Build the preset ``name`` at ``image_size`` (H, W).

    Weights: ``weights`` (a local file or directory) if given; else random
    initialisation for the tiny presets or when ``random_init`` is set
    explicitly; else the preset's published weights, which must be found.
    """
    preset = get_preset(name)
    if weights is None and preset.standin and not random_init:
        raise WeightsNotFoundError(
            f"{name} is a stand-in expert whose weights are trained on this machine, not published: run "
            f"`featcache pretrain-standins` (it prints the path) and pass --weights {name}=PATH, or use `featcache demo`, "
            "which does both")
    if weights is None and not (preset.random_init or random_init):
        check_published_weights(preset)  # fails in seconds, before the model libraries load
    return family_builder(preset.family)(preset, image_size, weights, random_init)
