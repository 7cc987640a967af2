"""``featcache synth``: synthetic re-ID datasets written as real JPEGs in the official layouts.

Market-1501 layout: ``bounding_box_train``, ``bounding_box_test`` (with 0000
distractors and -1 junk boxes), ``query`` (one image per identity and camera,
as in the official split). VeRi-776 layout: ``image_train``, ``image_test``,
``image_query`` (queries also appear in the test set, as in the official data),
the ``name_*.txt`` lists and ``gt_index.txt`` / ``jk_index.txt``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.config import StageConfig, save_resolved
from featcache.errors import ConfigError, check_choice
from featcache.progress import progress
from featcache.synth_render import Person, Scene, Vehicle, render_person, render_vehicle

logger = logging.getLogger(__name__)

LAYOUT_CAMS = {"market1501": 6, "veri776": 20}


@dataclass(frozen=True)
class SynthConfig(StageConfig):
    """``featcache synth``: a synthetic dataset of real JPEGs in an official layout."""

    command = "synth"

    out: Path
    layout: str = "market1501"
    ids: int = 50
    cams: int = 6
    seed: int = 0
    images_per_cam: tuple[int, int] = (2, 4)
    cams_per_id: tuple[int, int] = (2, 4)
    night_cams: tuple[int, ...] = ()    # monochrome cameras (colour lost): a condition one expert may see better
    blur_cams: tuple[int, ...] = ()     # out-of-focus cameras (patterns lost)
    # a split of chosen sizes instead of ids half and half: the test identities (and their images, distractors and
    # junk boxes) are the same whatever train_ids is, so that test mAPs compare across training-set sizes
    train_ids: int = 0
    test_ids: int = 0

    def __post_init__(self) -> None:
        check_choice(self.layout, LAYOUT_CAMS, "--layout")
        if not 2 <= self.cams <= LAYOUT_CAMS[self.layout]:
            raise ConfigError(f"--cams {self.cams}: {self.layout} takes 2 to {LAYOUT_CAMS[self.layout]} cameras")
        for name, (lo, hi) in (("images_per_cam", self.images_per_cam), ("cams_per_id", self.cams_per_id)):
            if not 1 <= lo <= hi:
                raise ConfigError(f"{name} {lo},{hi}: expected two numbers with 1 <= first <= second")
        if self.cams_per_id[0] > self.cams:
            raise ConfigError(f"cams_per_id {self.cams_per_id[0]},{self.cams_per_id[1]}: the first is at most --cams ({self.cams})")
        for name, cams in (("night_cams", self.night_cams), ("blur_cams", self.blur_cams)):
            bad = [c for c in cams if not 1 <= c <= self.cams]
            if bad:
                raise ConfigError(f"{name} {bad}: cameras are numbered 1 to --cams ({self.cams})")
        both = sorted(set(self.night_cams) & set(self.blur_cams))
        if both:
            raise ConfigError(f"cameras {both} are in both night_cams and blur_cams; a camera has one condition")
        if self.ids < 4:
            raise ConfigError(f"--ids {self.ids}: at least 4 identities (half train, half test)")
        if bool(self.train_ids) != bool(self.test_ids) or min(self.train_ids, self.test_ids) < 0:
            raise ConfigError(f"train_ids {self.train_ids}, test_ids {self.test_ids}: give both (at least 2 each), or neither")
        if self.train_ids and min(self.train_ids, self.test_ids) < 2:
            raise ConfigError(f"train_ids {self.train_ids}, test_ids {self.test_ids}: at least 2 identities each")
        if self.train_ids and self.ids not in (50, self.train_ids + self.test_ids):
            raise ConfigError(f"--ids {self.ids} with train_ids {self.train_ids} and test_ids {self.test_ids}: give --ids, "
                              "or train_ids and test_ids, not both")

    @property
    def fixed_split(self) -> bool:
        """Train and test identities of chosen sizes, the test side independent of the training side."""
        return self.train_ids > 0


@dataclass
class _Shot:
    pid: int
    cam: int
    frame: int
    image_seed: int


def _plan(cfg: SynthConfig, rng: np.random.Generator) -> tuple[list[int], list[int], list[_Shot]]:
    """Choose train/test identities and the shots (identity, camera, frame) of each."""
    pids = list(range(1, cfg.ids + 1))
    perm = rng.permutation(pids)
    train = sorted(int(p) for p in perm[: cfg.ids // 2])
    test = sorted(int(p) for p in perm[cfg.ids // 2:])
    shots: list[_Shot] = []
    for pid in pids:
        n_cam = int(rng.integers(cfg.cams_per_id[0], min(cfg.cams_per_id[1], cfg.cams) + 1))
        for cam in sorted(rng.choice(np.arange(1, cfg.cams + 1), n_cam, replace=False)):
            for _ in range(int(rng.integers(cfg.images_per_cam[0], cfg.images_per_cam[1] + 1))):
                shots.append(_Shot(pid, int(cam), int(rng.integers(0, 99_999)), int(rng.integers(2**31))))
    return train, test, shots


def _plan_fixed(cfg: SynthConfig) -> tuple[list[int], list[int], list[_Shot]]:
    """``test_ids`` test identities (1..T) and ``train_ids`` training ones after them; each identity's shots drawn
    from a generator of its own, and the test identities' shots first, so that the test side, images included, is
    the same whatever the number of training identities."""
    test = list(range(1, cfg.test_ids + 1))
    train = list(range(cfg.test_ids + 1, cfg.test_ids + cfg.train_ids + 1))
    shots: list[_Shot] = []
    for pid in test + train:
        r = np.random.default_rng([cfg.seed, 4, pid])
        n_cam = int(r.integers(cfg.cams_per_id[0], min(cfg.cams_per_id[1], cfg.cams) + 1))
        for cam in sorted(r.choice(np.arange(1, cfg.cams + 1), n_cam, replace=False)):
            for _ in range(int(r.integers(cfg.images_per_cam[0], cfg.images_per_cam[1] + 1))):
                shots.append(_Shot(pid, int(cam), int(r.integers(0, 99_999)), int(r.integers(2**31))))
    return train, test, shots


def _queries(shots: list[_Shot], test: set[int]) -> set[int]:
    """Indices of query shots: the first shot of each test identity in each camera."""
    seen: set[tuple[int, int]] = set()
    out: set[int] = set()
    for i, s in enumerate(shots):
        if s.pid in test and (s.pid, s.cam) not in seen:
            seen.add((s.pid, s.cam))
            out.add(i)
    return out


#: the resolved config of a synthetic dataset, in its folder (no dataset reader lists it: they read images)
CONFIG_NAME = "featcache-synth.yaml"


def generate(cfg: SynthConfig) -> dict[str, int]:
    """Write the dataset under ``cfg.out``; return the number of files per folder."""
    rng = np.random.default_rng(cfg.seed)
    scenes = {c: dataclasses.replace(Scene.sample(np.random.default_rng([cfg.seed, 1, c])), condition=condition(cfg, c))
              for c in range(1, cfg.cams + 1)}
    train, test, shots = _plan_fixed(cfg) if cfg.fixed_split else _plan(cfg, rng)
    write = _write_market if cfg.layout == "market1501" else _write_veri
    counts = write(cfg, rng, scenes, set(train), set(test), shots)
    save_resolved(Path(cfg.out) / CONFIG_NAME, cfg)  # inside the dataset it describes, not beside it
    return counts


def condition(cfg: SynthConfig, cam: int) -> str:
    """The camera's condition: night, blur or day."""
    return "night" if cam in cfg.night_cams else "blur" if cam in cfg.blur_cams else "day"


def _save(img, path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=int(rng.integers(75, 96)))


def _write_market(cfg: SynthConfig, rng, scenes, train: set[int], test: set[int], shots: list[_Shot]) -> dict[str, int]:
    people = {pid: Person.sample(np.random.default_rng([cfg.seed, 2, pid])) for pid in train | test}
    queries = _queries(shots, test)
    counts = {"bounding_box_train": 0, "bounding_box_test": 0, "query": 0}
    for i, s in enumerate(progress(shots, desc="synth market1501", unit="img")):
        folder = "bounding_box_train" if s.pid in train else ("query" if i in queries else "bounding_box_test")
        seq = 1 + s.frame % 6
        name = f"{s.pid:04d}_c{s.cam}s{seq}_{s.frame:06d}_{i % 100:02d}.jpg"
        img = render_person(people[s.pid], scenes[s.cam], np.random.default_rng(s.image_seed))
        _save(img, cfg.out / folder / name, rng)
        counts[folder] += 1
    # distractors (0000: people outside the query identities) and junk boxes (-1: background crops); with a fixed
    # split, as many as the test identities and drawn apart, so that they do not change with the training side
    if cfg.fixed_split:
        rng = np.random.default_rng([cfg.seed, 6])
    test_size = cfg.test_ids if cfg.fixed_split else cfg.ids // 2
    for k in range(max(5, test_size)):
        cam = int(rng.integers(1, cfg.cams + 1))
        img = render_person(Person.sample(np.random.default_rng([cfg.seed, 3, k])), scenes[cam], rng)
        _save(img, cfg.out / "bounding_box_test" / f"0000_c{cam}s1_{k:06d}_00.jpg", rng)
        counts["bounding_box_test"] += 1
    for k in range(max(3, test_size // 5)):
        cam = int(rng.integers(1, cfg.cams + 1))
        img = scenes[cam].finish(scenes[cam].background(64, 128, rng), rng)
        _save(img, cfg.out / "bounding_box_test" / f"-1_c{cam}s1_{k:06d}_00.jpg", rng)
        counts["bounding_box_test"] += 1
    return counts


def _write_veri(cfg: SynthConfig, rng, scenes, train: set[int], test: set[int], shots: list[_Shot]) -> dict[str, int]:
    cars = {pid: Vehicle.sample(np.random.default_rng([cfg.seed, 2, pid])) for pid in train | test}
    queries = _queries(shots, test)
    names: dict[str, list[str]] = {"train": [], "query": [], "test": []}
    test_meta: list[tuple[int, int]] = []
    query_meta: list[tuple[int, int]] = []
    for i, s in enumerate(progress(shots, desc="synth veri776", unit="img")):
        name = f"{s.pid:04d}_c{s.cam:03d}_{s.frame:08d}_{i % 2}.jpg"
        img = render_vehicle(cars[s.pid], scenes[s.cam], np.random.default_rng(s.image_seed))
        if s.pid in train:
            _save(img, cfg.out / "image_train" / name, rng)
            names["train"].append(name)
            continue
        _save(img, cfg.out / "image_test" / name, rng)
        names["test"].append(name)
        test_meta.append((s.pid, s.cam))
        if i in queries:  # as in VeRi-776, a query image is also part of the test set
            _save(img, cfg.out / "image_query" / name, rng)
            names["query"].append(name)
            query_meta.append((s.pid, s.cam))
    for split, lst in names.items():
        (cfg.out / f"name_{split}.txt").write_text("".join(n + "\n" for n in lst))
    gt_lines, jk_lines = [], []
    for qpid, qcam in query_meta:
        good = [str(j + 1) for j, (p, c) in enumerate(test_meta) if p == qpid and c != qcam]
        junk = [str(j + 1) for j, (p, c) in enumerate(test_meta) if p == qpid and c == qcam]
        gt_lines.append(" ".join(good) + " \n")
        jk_lines.append(" ".join(junk) + " \n")
    (cfg.out / "gt_index.txt").write_text("".join(gt_lines))
    (cfg.out / "jk_index.txt").write_text("".join(jk_lines))
    return {"image_train": len(names["train"]), "image_test": len(names["test"]), "image_query": len(names["query"])}
