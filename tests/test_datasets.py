"""Parsing of every official layout, on synthetic data and on real file names."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import shared_path
from featcache.datasets import DatasetLayoutError, load_listing


def _layout(tmp: Path, files: list[Path], folder: str, others: tuple[str, ...] = ()) -> Path:
    root = tmp / "ds"
    for sub in (folder, *others):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, root / folder / f.name)
    return root


def test_market_synthetic_drops_junk_keeps_distractors(market_root):
    lst = load_listing("market1501", market_root)
    assert lst.count("train") > 0 and lst.count("query") > 0 and lst.count("gallery") > 0
    assert all(it.pid != -1 for it in lst.items)
    assert any(it.pid == 0 and it.split == "gallery" for it in lst.items)
    junk = list((market_root / "bounding_box_test").glob("-1_*.jpg"))
    assert junk and not any(it.path.endswith(junk[0].name) for it in lst.items)
    assert lst.junk == len(junk) and f"left out by the protocol: {len(junk)}" in lst.summary()


def test_market_real_names(tmp_path):
    src = sorted(shared_path("real-crops", "market1501-named").glob("*.jpg"))
    root = _layout(tmp_path, src, "bounding_box_test", ("bounding_box_train", "query"))
    lst = load_listing("market1501", root)
    assert len(lst.items) == len(src) == 67
    by_name = {Path(it.path).name: it for it in lst.items}
    assert by_name["0000_c3s1_107067_00.jpg"].pid == 0
    assert (by_name["1285_c2s3_021432_00.jpg"].pid, by_name["1285_c2s3_021432_00.jpg"].camid) == (1285, 2)
    assert {it.camid for it in lst.items if it.pid == 51} == {3, 4}


def test_nonstandard_names_are_reported_not_guessed(tmp_path):
    src = sorted(shared_path("real-crops", "nonstandard-names").glob("*.jpg"))
    root = _layout(tmp_path, src, "bounding_box_train", ("bounding_box_test", "query"))
    with pytest.raises(DatasetLayoutError) as err:
        load_listing("market1501", root)
    msg = str(err.value)
    assert "PPPP_cCsS_FFFFFF_BB.jpg" in msg and "b0280_c3s3_065619_00.jpg" in msg and "21 file(s)" in msg
    # lenient mode keeps them as rejected, never as items with a guessed identity
    root2 = _layout(tmp_path / "b", src + sorted(shared_path("real-crops", "market1501-named").glob("0001_*.jpg")),
                    "bounding_box_train", ("bounding_box_test", "query"))
    lst = load_listing("market1501", root2, strict=False)
    assert len(lst.rejected) == 21 and len(lst.items) == 2
    assert all(Path(it.path).name.startswith("0001_") for it in lst.items)


def test_duke_real_names(tmp_path):
    src = sorted(shared_path("real-crops", "dukemtmc-named").glob("*.jpg"))
    root = _layout(tmp_path, src, "bounding_box_train", ("bounding_box_test", "query"))
    lst = load_listing("dukemtmc", root)
    assert len(lst.items) == 20
    it = next(i for i in lst.items if i.path.endswith("5842_c7_f0053326.jpg"))
    assert (it.pid, it.camid, it.split) == (5842, 7, "train")
    # a Market name is not a Duke name
    shutil.copy(next(shared_path("real-crops", "market1501-named").glob("*.jpg")), root / "query")
    with pytest.raises(DatasetLayoutError, match="PPPP_cC_fFFFFFFF"):
        load_listing("dukemtmc", root)


def test_msmt17_lists(tmp_path):
    src = sorted(shared_path("real-crops", "msmt17-named").glob("*.jpg"))
    root = tmp_path / "msmt"
    lines: dict[str, list[str]] = {"list_train.txt": [], "list_query.txt": [], "list_gallery.txt": []}
    for i, f in enumerate(src):
        lst_name = ["list_train.txt", "list_query.txt", "list_gallery.txt"][i % 3]
        sub = "train" if lst_name == "list_train.txt" else "test"
        pid = f.name[:4]
        (root / sub / pid).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / sub / pid / f.name)
        lines[lst_name].append(f"{pid}/{f.name} {int(pid)}")
    for k, v in lines.items():
        (root / k).write_text("\n".join(v) + "\n")
    lst = load_listing("msmt17", root)
    assert len(lst.items) == 15
    it = next(i for i in lst.items if i.path.endswith("0168_018_14_0303morning_1118_1_ex.jpg"))
    assert (it.pid, it.camid) == (168, 14)
    assert {i.split for i in lst.items} == {"train", "query", "gallery"}
    (root / "list_query.txt").write_text("broken line without label\n")
    with pytest.raises(DatasetLayoutError, match="list_query.txt:1"):
        load_listing("msmt17", root)


def test_veri_real_names_and_official_lists(tmp_path):
    src = sorted(shared_path("real-crops", "veri776-named").glob("*.jpg"))
    root = _layout(tmp_path, src, "image_test", ("image_train", "image_query"))
    lst = load_listing("veri776", root)
    assert [(i.pid, i.camid) for i in lst.items] == [(1, 1), (2, 2), (2, 2), (3, 1), (11, 17)]

    proto = shared_path("veri776-protocol")
    root2 = tmp_path / "veri"
    for sub in ("image_train", "image_query", "image_test"):
        (root2 / sub).mkdir(parents=True)
    for name in ("name_train.txt", "name_query.txt", "name_test.txt"):
        shutil.copy(proto / name, root2 / name)
    lst = load_listing("veri776", root2)
    q = [i for i in lst.items if i.split == "query"]
    g = [i for i in lst.items if i.split == "gallery"]
    assert (len(q), len(g), lst.count("train")) == (1678, 11579, 37778)
    # the official good/junk sets follow from our parse of the names (gallery kept in list order)
    gt = (proto / "gt_index.txt").read_text().splitlines()
    jk = (proto / "jk_index.txt").read_text().splitlines()
    for k in range(0, 1678, 37):
        good = {j + 1 for j, x in enumerate(g) if x.pid == q[k].pid and x.camid != q[k].camid}
        junk = {j + 1 for j, x in enumerate(g) if x.pid == q[k].pid and x.camid == q[k].camid}
        assert good == {int(t) for t in gt[k].split()}
        assert junk == {int(t) for t in jk[k].split()}


def test_missing_folder_names_expected_layout(tmp_path):
    (tmp_path / "bounding_box_train").mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        load_listing("market1501", tmp_path)
    assert "query" in str(err.value) and "bounding_box_test/" in str(err.value)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_listing("veri776", tmp_path / "nope")
    from featcache.errors import ConfigError

    with pytest.raises(ConfigError, match="available: csv, dukemtmc, folder, market1501, msmt17, veri776"):
        load_listing("cuhk03", tmp_path)


def test_a_folder_is_every_image_below_it_sorted_without_labels(tmp_path):
    for rel in ("b/2.png", "a.jpg", "b/1.JPG", "notes.txt", "c/d/e.webp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    lst = load_listing("folder", tmp_path)
    assert [it.path for it in lst.items] == ["a.jpg", "b/1.JPG", "b/2.png", "c/d/e.webp"]
    assert {(it.pid, it.camid, it.split) for it in lst.items} == {(0, 0, "gallery")}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no images found"):
        load_listing("folder", tmp_path / "empty")


def test_csv_manifest(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,pid,camid,split\na.jpg,1,1,train\nb.jpg,2,1,query\nc.jpg,2,2,gallery\n")
    lst = load_listing("csv", tmp_path)
    assert [i.split for i in lst.items] == ["train", "query", "gallery"]
    (tmp_path / "bad.csv").write_text("path,pid,camid,split\na.jpg,1,1,test\n")
    with pytest.raises(DatasetLayoutError, match=r"bad.csv:2.*split 'test'"):
        load_listing("csv", tmp_path / "bad.csv")
    (tmp_path / "nohdr.csv").write_text("a.jpg,1,1,train\n")
    with pytest.raises(DatasetLayoutError, match="header path,pid,camid,split"):
        load_listing("csv", tmp_path / "nohdr.csv")
