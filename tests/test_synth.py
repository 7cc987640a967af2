"""The synthetic generator writes the exact official layouts, deterministically."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.datasets import load_listing
from featcache.datasets.layouts import MARKET_RE, VERI_RE
from featcache.errors import ConfigError
from featcache.synth import SynthConfig, generate


def test_market_layout(market_root):
    assert sorted(p.name for p in market_root.iterdir()) == ["bounding_box_test", "bounding_box_train", "featcache-synth.yaml", "query"]
    for f in market_root.rglob("*.jpg"):
        assert MARKET_RE.match(f.name), f.name
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.size == (64, 128)
    lst = load_listing("market1501", market_root)
    train_ids = {i.pid for i in lst.items if i.split == "train"}
    test_ids = {i.pid for i in lst.items if i.split != "train"} - {0}
    assert train_ids and test_ids and not train_ids & test_ids
    gallery = defaultdict(set)
    for i in lst.items:
        if i.split == "gallery":
            gallery[i.pid].add(i.camid)
    per_cam = defaultdict(int)
    for q in (i for i in lst.items if i.split == "query"):
        per_cam[(q.pid, q.camid)] += 1
        assert gallery[q.pid] - {q.camid}, f"query {q.path} has no cross-camera match"
    assert set(per_cam.values()) == {1}  # one query per identity and camera, as in Market-1501


def test_veri_layout_and_index_files(tmp_path):
    root = tmp_path / "veri"
    generate(SynthConfig(root, "veri776", ids=8, cams=5, seed=3))
    for name in ("name_train.txt", "name_query.txt", "name_test.txt", "gt_index.txt", "jk_index.txt"):
        assert (root / name).is_file()
    q_names = (root / "name_query.txt").read_text().split()
    t_names = (root / "name_test.txt").read_text().split()
    assert all(VERI_RE.match(n) for n in q_names + t_names)
    assert set(q_names) <= set(t_names)  # as in VeRi-776, queries are part of the test set
    assert sorted(p.name for p in (root / "image_test").iterdir()) == sorted(t_names)
    gt = (root / "gt_index.txt").read_text().splitlines()
    jk = (root / "jk_index.txt").read_text().splitlines()
    assert len(gt) == len(jk) == len(q_names)
    for qn, good, junk in zip(q_names, gt, jk):
        assert good.split(), f"{qn} has no good match"
        assert str(t_names.index(qn) + 1) in junk.split()  # the query itself is junk (same camera)
        for j in good.split():
            t = t_names[int(j) - 1]
            assert t[:4] == qn[:4] and t[5:9] != qn[5:9]


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != "featcache-synth.yaml":  # the config names the folder it was written to
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    generate(SynthConfig(a, "market1501", ids=4, cams=2, seed=5))
    generate(SynthConfig(b, "market1501", ids=4, cams=2, seed=5))
    generate(SynthConfig(c, "market1501", ids=4, cams=2, seed=6))
    assert _digest(a) == _digest(b) != _digest(c)


def test_bad_options():
    with pytest.raises(ValueError, match="--cams 7"):
        SynthConfig(Path("x"), "market1501", ids=10, cams=7)
    with pytest.raises(ValueError, match="--layout"):
        SynthConfig(Path("x"), "duke", ids=10, cams=3)


def test_camera_conditions_night_is_monochrome_and_blur_is_soft(tmp_path):
    from PIL import Image

    root = tmp_path / "cond"
    generate(SynthConfig(root, "market1501", ids=6, cams=3, seed=2, night_cams=(2,), blur_cams=(3,)))
    by_cam: dict[int, list[np.ndarray]] = {1: [], 2: [], 3: []}
    for p in (root / "bounding_box_train").glob("*.jpg"):
        by_cam[int(p.name.split("_c")[1][0])].append(np.asarray(Image.open(p), dtype=np.float32))
    chroma = {c: np.mean([np.abs(a - a.mean(2, keepdims=True)).mean() for a in v]) for c, v in by_cam.items()}
    detail = {c: np.mean([np.abs(np.diff(a, axis=1)).mean() for a in v]) for c, v in by_cam.items()}
    assert chroma[2] < 1.5 < chroma[1]  # night: no colour left (JPEG adds a little)
    assert detail[3] < 0.7 * detail[1]   # blur: edges gone (sensor noise, added after, keeps some)
    with pytest.raises(ConfigError, match="night_cams \\[7\\]: cameras are numbered 1 to --cams"):
        SynthConfig(root, "market1501", ids=6, cams=3, night_cams=(7,))
    with pytest.raises(ConfigError, match="cameras \\[2\\] are in both night_cams and blur_cams"):
        SynthConfig(root, "market1501", ids=6, cams=3, night_cams=(2,), blur_cams=(2,))


def test_synth_writes_its_config_inside_the_dataset_and_nothing_beside_it(tmp_path):
    from featcache.datasets import load_listing
    from featcache.synth import CONFIG_NAME, SynthConfig, generate

    generate(SynthConfig(tmp_path / "m", "market1501", ids=4, cams=2, seed=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (tmp_path / "m" / CONFIG_NAME).is_file()
    assert all(it.path.endswith(".jpg") for it in load_listing("market1501", tmp_path / "m").items)
    generate(SynthConfig(tmp_path / "v", "veri776", ids=4, cams=2, seed=0))
    assert (tmp_path / "v" / CONFIG_NAME).is_file() and len(load_listing("veri776", tmp_path / "v").items) > 0


def test_a_fixed_split_keeps_the_test_side_whatever_the_training_side(tmp_path):
    """For a study across training-set sizes: --train-ids and --test-ids. The test identities, their images, the
    distractors and the junk boxes are byte for byte the same for 6 and for 14 training identities."""
    from featcache.datasets import load_listing
    from featcache.synth import SynthConfig, generate

    def test_side(root: Path) -> dict[str, bytes]:
        return {f"{d}/{f.name}": f.read_bytes() for d in ("query", "bounding_box_test") for f in sorted((root / d).iterdir())}

    roots = {}
    for n in (6, 14):
        roots[n] = tmp_path / f"n{n}"
        generate(SynthConfig(roots[n], "market1501", train_ids=n, test_ids=5, cams=3, seed=3, night_cams=(2,)))
    assert test_side(roots[6]) == test_side(roots[14]) and len(test_side(roots[6])) > 10
    for n, root in roots.items():
        listing = load_listing("market1501", root)
        train = {it.pid for it in listing.items if it.split == "train"}
        test = {it.pid for it in listing.items if it.split != "train" and it.pid > 0}
        assert len(train) == n and test == {1, 2, 3, 4, 5}
        assert sum(1 for it in listing.items if it.pid == 0) == 5  # distractors: as many as the test identities
    with pytest.raises(ConfigError, match="give both"):
        SynthConfig(tmp_path / "x", train_ids=10)
    with pytest.raises(ConfigError, match="not both"):
        SynthConfig(tmp_path / "x", ids=30, train_ids=10, test_ids=5)


def test_camera_conditions_are_carried_into_the_cache(tmp_path):
    """Each view row of a rendered synthetic dataset's cache records its camera's condition, as synthetic feature
    caches record their route; a dataset without conditions carries none."""
    from conftest import extract_cfg
    from featcache.cache import CacheReader, CacheSplit
    from featcache.datasets.base import CONDITIONS, SYNTH_CONFIG
    from featcache.extract.runner import run_extract
    from featcache.synth import CONFIG_NAME, SynthConfig, generate

    assert SYNTH_CONFIG == CONFIG_NAME  # the datasets layer reads what synth writes
    root = tmp_path / "m"
    generate(SynthConfig(root, "market1501", ids=8, cams=3, seed=1, night_cams=(2,), blur_cams=(3,)))
    run_extract(extract_cfg(root, tmp_path / "c.h5", backbones=("clip-tiny",)))
    with CacheReader(tmp_path / "c.h5") as c:
        names, values = c.conditions()
    assert names == list(CONDITIONS)
    for split in ("train", "query", "gallery"):
        s = CacheSplit.load(tmp_path / "c.h5", split)
        for v in range(int(s.n_views.min())):
            got = [names[i] for i in values[s.rows(v)]]
            assert got == [{1: "day", 2: "night", 3: "blur"}[int(c)] for c in s.camids]
    (root / CONFIG_NAME).unlink()  # not a synthetic dataset any more: nothing recorded
    run_extract(extract_cfg(root, tmp_path / "d.h5", backbones=("clip-tiny",)))
    with CacheReader(tmp_path / "d.h5") as c:
        assert c.conditions() is None
