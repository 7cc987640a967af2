"""``featcache pretrain-standins``'s config (torch-free, so the CLI starts fast)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from featcache.config import StageConfig, parser
from featcache.errors import ConfigError
from featcache.preprocess import parse_size
from featcache.runtime import check_device_name
from featcache.training.options import check_training


#: each trained stand-in's record beside its weights (preset, key, config, arithmetic, per-epoch log)
META_FILE = "standin.json"


def default_root() -> Path:
    """Where trained stand-ins live: $FEATCACHE_HOME/standins, else $XDG_CACHE_HOME or ~/.cache, /featcache/standins."""
    home = os.environ.get("FEATCACHE_HOME")
    if home:
        return Path(home).expanduser() / "standins"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "featcache" / "standins"


@dataclass(frozen=True)
class StandinConfig(StageConfig):
    """``featcache pretrain-standins``: train the stand-in presets on a synthetic pre-training set of their own.

    The set has other identities and another seed than any dataset the demo evaluates on; each preset sees it
    through its own view of the world (its preset's ``standin.view``), so that the experts are complementary.
    """

    command = "pretrain-standins"

    presets: tuple[str, ...] = ("clip-mini", "align-mini")
    root: Path | None = None           # default: $FEATCACHE_HOME/standins or ~/.cache/featcache/standins
    ids: int = 256                     # pre-training identities (the demo has 50, other people)
    cams: int = 12                     # scenes of the pre-training set (all in daylight; the views do the rest)
    per_id: int = 12
    image_size: tuple[int, int] = parser(parse_size, default=(128, 64))
    seed: int = 1000                   # the pre-training set's seed; also the training seed
    epochs: int | None = None          # None: each preset's own (its standin.epochs)
    batch_size: int = 32
    instances: int = 4
    lr: float | None = None            # None: each preset's own (its standin.lr)
    lr_min: float = 1e-5
    weight_decay: float = 5e-4
    device: str = "auto"
    force: bool = False                # train again even where weights with this key exist

    def __post_init__(self) -> None:
        from featcache.backbones.presets import get_preset

        if not self.presets:
            raise ConfigError("--preset: name at least one stand-in preset")
        for name in self.presets:
            try:
                preset = get_preset(name)
            except ConfigError as exc:
                raise ConfigError(f"--preset: {exc}") from None
            if not preset.standin:
                raise ConfigError(f"--preset {name}: not a stand-in preset (its preset file has no 'standin' entry); "
                                  "stand-ins are clip-mini and align-mini")
        check_device_name(self.device)
        for name in self.presets:
            epochs, lr = self.schedule(name)
            check_training(epochs, self.batch_size, self.instances, lr, self.lr_min)
        if self.ids < self.batch_size // self.instances:
            raise ConfigError(f"ids {self.ids}: fewer than the {self.batch_size // self.instances} identities of a batch "
                              "(batch_size / instances)")
        if self.cams < 2 or self.per_id < self.instances:
            raise ConfigError(f"cams {self.cams}, per_id {self.per_id}: need at least 2 cameras and instances "
                              f"({self.instances}) images per identity")

    def schedule(self, name: str) -> tuple[int, float]:
        """(epochs, lr) for preset ``name``: the options where given, else the preset's own."""
        from featcache.backbones.presets import get_preset

        own = get_preset(name).standin
        return (self.epochs if self.epochs is not None else int(own.get("epochs", 10)),
                self.lr if self.lr is not None else float(own.get("lr", 1e-3)))

    def where(self) -> Path:
        return Path(self.root).expanduser() if self.root is not None else default_root()
