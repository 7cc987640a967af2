"""``featcache embed``'s config: the only place its defaults live (torch-free, so the CLI starts fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featcache.config import StageConfig, parser
from featcache.errors import ConfigError
from featcache.preprocess import parse_size
from featcache.runtime import check_device_name, parse_workers


@dataclass(frozen=True)
class EmbedConfig(StageConfig):
    """``featcache embed``: a model's features of every image of a folder or a dataset, as a feature cache."""

    command = "embed"

    model: str                           # student:RUN, gate:RUN, backbone:PRESET, or a bare run folder or preset name
    out: Path
    images: Path | None = None           # any folder of images, searched recursively, sorted by path
    dataset: str | None = None           # or a dataset in its official layout (with --root): its splits and labels
    root: Path | None = None
    batch_size: int = 64
    workers: int | None = parser(parse_workers, default=None)  # None: auto (see resolve_workers)
    device: str = "auto"
    image_size: tuple[int, int] | None = parser(lambda v: None if v in (None, "", "none") else parse_size(v), default=None)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if (self.images is None) == (self.dataset is None):
            raise ConfigError("give --images FOLDER, or --dataset NAME with --root ROOT (one of the two)")
        if self.dataset is not None and self.root is None:
            raise ConfigError(f"--dataset {self.dataset}: give --root, the dataset's folder in its official layout")
        if self.images is not None and self.root is not None:
            raise ConfigError("--root goes with --dataset; --images is the folder itself")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: expected at least 1")
        check_device_name(self.device)
