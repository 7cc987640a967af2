"""featcache: re-identification with cached foundation-model features (MoE-KD)."""

__version__ = "0.1.0"
