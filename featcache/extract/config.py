"""``featcache extract``'s config: the only place its defaults live (torch-free, so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.config import StageConfig, parser
from featcache.datasets.layouts import get_reader
from featcache.errors import ConfigError, check_choice
from featcache.preprocess import parse_size
from featcache.runtime import check_device_name, parse_workers

TOKEN_MODES = ("view0", "all", "none")
MAPPERS = ("overlapped", "plain")


def parse_names(value) -> tuple[str, ...]:
    """Repeated or comma-separated names as a tuple."""
    items = [value] if isinstance(value, str) else list(value or ())
    return tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())


def parse_weights(value) -> dict[str, str]:
    """``PRESET=PATH`` items (a list, or a mapping from YAML) as a dict."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    items = [value] if isinstance(value, str) else list(value or ())
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{item!r}: expected PRESET=PATH")
        out[name] = path
    return out


@dataclass(frozen=True)
class ExtractConfig(StageConfig):
    """``featcache extract``: run the frozen backbones once over a dataset into an HDF5 cache."""

    command = "extract"

    dataset: str
    root: Path
    backbones: tuple[str, ...]
    out: Path
    views: int = 4
    batch_size: int = 32
    workers: int | None = parser(parse_workers, default=None)  # None: auto (see resolve_workers)
    device: str = "auto"
    weights: dict[str, str] = parser(parse_weights, default_factory=dict)
    overwrite: bool = False
    repair: bool = False                 # verify an existing cache and redo the images whose rows fail their checksums
    tokens: str = "view0"
    image_size: tuple[int, int] = parser(parse_size, default=(256, 256))
    aug_seed: int = 0
    random_init: bool = False
    skip_bad_names: bool = False
    float32: tuple[str, ...] = parser(parse_names, default=())  # outputs stored as float32 (OUTPUT or PRESET:OUTPUT, globs)
    mapper: str = "overlapped"           # plain: the reference path (benchmarks and checks)
    preset_files: tuple[str, ...] = ()   # the user's preset files given as --backbone PATH.json (kept so a rerun finds them)

    def __post_init__(self) -> None:
        get_reader(self.dataset)
        self._take_preset_files()
        if not self.backbones:
            raise ConfigError("--backbone: give at least one backbone preset (see `featcache backbones`)")
        if len(set(self.backbones)) != len(self.backbones):
            raise ConfigError(f"--backbone: a preset is named twice in {list(self.backbones)}")
        unknown = sorted(set(self.weights) - set(self.backbones))
        if unknown:
            raise ConfigError(f"--weights names {unknown}, which are not among the --backbone presets {list(self.backbones)}")
        if not 1 <= self.views <= 64:
            raise ConfigError(f"--views {self.views}: expected 1 to 64 (0 clean, 1 flip, 2+ augmentations)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: expected at least 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers {self.workers}: expected 0 or more, or auto")
        check_choice(self.tokens, TOKEN_MODES, "--tokens")
        check_device_name(self.device)
        check_choice(self.mapper, MAPPERS, "--mapper")
        if self.repair and self.overwrite:
            raise ConfigError("--repair and --overwrite exclude each other (--overwrite starts the cache anew)")

    def _take_preset_files(self) -> None:
        """``--backbone ./my-preset.json``: the file joins ``preset_files`` and the backbone is known by its name
        from here on (cache groups, --weights keys, eval's backbone:NAME)."""
        from featcache.backbones.presets import PresetError, add_preset_file, is_preset_file

        files = list(self.preset_files) + [str(Path(b).resolve()) for b in self.backbones if is_preset_file(b)]
        try:
            names = {f: add_preset_file(f) for f in files}
        except PresetError as exc:
            raise ConfigError(str(exc)) from None
        object.__setattr__(self, "preset_files", tuple(dict.fromkeys(files)))
        object.__setattr__(self, "backbones", tuple(names[str(Path(b).resolve())] if is_preset_file(b) else b for b in self.backbones))
