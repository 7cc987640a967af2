"""The public Python API: docs/api.md's examples run and print what the page shows; ``evaluate`` equals a
reference implementation of torchreid's algorithm on every kind of input it accepts."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import featcache
from click.testing import CliRunner
from featcache.cli import main
from featcache.errors import FeatcacheError
from reference_reid import evaluate_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
NUMBER = re.compile(r"-?\d+\.\d+")


def doc_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", text, re.S)]


def same_output(got: str, want: str) -> bool:
    """Equal text, with decimal numbers compared to 1e-3 (CPUs round the last digit differently)."""
    if NUMBER.sub("#", got.strip()) != NUMBER.sub("#", want.strip()):
        return False
    return all(abs(float(a) - float(b)) <= 1e-3 for a, b in zip(NUMBER.findall(got), NUMBER.findall(want)))


@pytest.mark.heavy
def test_the_api_page_runs_and_prints_what_it_shows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = doc_blocks(DOC.read_text())
    assert [lang for lang, _ in blocks].count("python") >= 6
    namespace: dict = {}
    last = ""
    for i, (lang, code) in enumerate(blocks):
        if lang == "bash":
            for line in code.strip().splitlines():
                argv = shlex.split(line)
                assert argv[0] == "featcache", line  # the page's shell lines are featcache commands: run them in-process
                res = CliRunner().invoke(main, argv[1:])
                assert res.exit_code == 0, f"{line}\n{res.output[-1500:]}"
        elif lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"docs/api.md block {i}", "exec"), namespace)
            last = out.getvalue()
        elif lang == "text":
            assert same_output(last, code), f"docs/api.md block {i} shows:\n{code}\nthe code printed:\n{last}"


@pytest.fixture
def labelled():
    rng = np.random.default_rng(3)
    qf, gf = rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=(300, 16)).astype(np.float32)
    qp, gp = rng.integers(0, 30, 40), rng.integers(0, 30, 300)
    qc, gc = rng.integers(0, 3, 40), rng.integers(0, 3, 300)
    return qf, gf, qp, gp, qc, gc


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _close(a: dict, b: dict) -> None:
    assert abs(a["mAP"] - b["mAP"]) < 1e-6 and abs(a["mINP"] - b["mINP"]) < 1e-6
    assert all(abs(a["cmc"][k] - b["cmc"][k]) < 1e-6 for k in b["cmc"])
    assert a["queries_skipped"] == b["queries_skipped"]


def test_evaluate_equals_the_reference_on_unnormalised_features_lists_tensors_and_distances(labelled):
    qf, gf, qp, gp, qc, gc = labelled
    ref = evaluate_reference(_unit(qf), _unit(gf), qp, qc, gp, gc)
    scale = np.random.default_rng(0).uniform(0.1, 10.0, (len(gf), 1)).astype(np.float32)
    _close(featcache.evaluate(qf, gf * scale, qp, gp, qc, gc), ref)  # rescaled rows: the same ranking
    _close(featcache.evaluate(qf.tolist(), gf.tolist(), qp.tolist(), gp.tolist(), qc.tolist(), gc.tolist()), ref)
    _close(featcache.evaluate(torch.from_numpy(qf), torch.from_numpy(gf), torch.from_numpy(qp).int(), gp.astype(np.uint16),
                              qc.astype(np.float64), torch.from_numpy(gc).float()), ref)
    dist = np.sqrt(((qf[:, None] - gf[None]) ** 2).sum(-1)).astype(np.float32)
    ref_d = evaluate_reference(qf, gf, qp, qc, gp, gc, scores=-dist)
    _close(featcache.evaluate(None, None, qp, gp, qc, gc, distmat=dist), ref_d)
    _close(featcache.evaluate(None, None, qp, gp, qc, gc, distmat=torch.from_numpy(dist)), ref_d)
    _close(featcache.evaluate(None, None, qp, gp, qc, gc, distmat=dist.astype(np.float64)), ref_d)  # ranked as float32
    tied = np.round(dist.astype(np.float64), 1)  # many ties: the earlier gallery entry ranks first, as a stable sort
    _close(featcache.evaluate(None, None, qp, gp, qc, gc, distmat=tied), evaluate_reference(qf, gf, qp, qc, gp, gc, scores=-tied.astype(np.float32)))
    _close(featcache.evaluate(torch.from_numpy(qf).bfloat16(), torch.from_numpy(gf).bfloat16(), qp, gp, qc, gc),
           evaluate_reference(_unit(torch.from_numpy(qf).bfloat16().float().numpy()), _unit(torch.from_numpy(gf).bfloat16().float().numpy()),
                              qp, qc, gp, gc))
    assert abs(featcache.evaluate(None, None, qp, gp, qc, gc, distmat=dist)["mAP"] - ref["mAP"]) > 1e-4  # not the cosine
    for ranking in ("sort", "device"):  # where ranks are counted changes nothing
        assert featcache.evaluate(qf, gf, qp, gp, qc, gc, ranking=ranking) == featcache.evaluate(qf, gf, qp, gp, qc, gc)


@pytest.mark.parametrize("call, message", [
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g, qp, gp[:-1], qc, gc), "g_pids: 299 labels for 300 rows"),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g, qp + 0.5, gp, qc, gc), "q_pids: expected integer labels"),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g[:, :8], qp, gp, qc, gc), "query has 16-d features and gallery 8-d"),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(np.where(np.arange(40)[:, None] == 7, np.nan, q), g, qp, gp, qc, gc),
     "query: 1 row\\(s\\) hold NaN or inf \\(rows 7\\)"),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g, qp, gp, qc, gc, distmat=q @ g.T), "not both"),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g, qp, gp, qc, gc, ap="area"), "ap='area': expected one of"),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g, qp, gp, qc, gc, ranking="gpu"), "ranking='gpu': expected one of auto, sort, device"),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g, [[1, 2]] * 20, gp, qc, gc), "q_pids: expected a 1-D sequence"),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g, ["a"] * 40, gp, qc, gc), "q_pids: expected integer labels"),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g, qp, gp, qc, gc, device="gpu"), "device 'gpu': expected auto, cpu, cuda or cuda:N"),
    pytest.param(lambda q, g, qp, gp, qc, gc: featcache.evaluate(q, g, qp, gp, qc, gc, device="cuda"),
                 r"^device='cuda': torch sees no CUDA device on this machine \(use device='cpu' or 'auto'\)$",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")),
    (lambda q, g, qp, gp, qc, gc: featcache.evaluate(None, None, qp, gp, qc, gc, distmat=(q @ g.T).T),
     r"distmat: shape \(300, 40\) is \(gallery x query\) for 40 query and 300 gallery labels; expected \(query x gallery\)"),
])
def test_unsupported_input_is_one_clear_error(labelled, call, message):
    with pytest.raises(FeatcacheError, match=message) as err:
        call(*labelled)
    assert "\n" not in str(err.value)


def test_a_view_outside_the_cache_is_refused_naming_split_view_and_range(market_cache):
    """View -1 once read image i-1's last view (and a training image's row for image 0): no view wraps around."""
    import featcache
    from featcache.errors import FeatcacheError

    with featcache.open_cache(market_cache) as c:
        query = c.split("query")
        last = query.read("clip-tiny", "pooled", view=1)  # query images keep two views: the image and its flip
        for view in (-1, 2):  # no --views hint: evaluation splits keep two views at most
            with pytest.raises(FeatcacheError, match=f"the query split holds 2 views per image, so views 0 to 1 can "
                                                     f"be read, not view {view}$"):
                query.read("clip-tiny", "pooled", view=view)
        with pytest.raises(FeatcacheError, match="view 1.5 of the query split: expected an integer"):
            query.read("clip-tiny", "pooled", view=1.5)
        assert np.array_equal(query.read("clip-tiny", "pooled", view=np.int64(1)), last)
        with pytest.raises(FeatcacheError, match="the train split holds 3 views per image, so views 0 to 2 can be read, "
                                                 "not view 3; extract with --views 4 or more to read it$"):
            c.split("train").read("clip-tiny", "pooled", view=3)


def test_gallery_identity_minus_one_is_junk_as_in_the_official_kit(labelled):
    """The Market-1501 kit puts -1 boxes in every query's junk_index; counted as negatives they lowered mAP."""
    qf, gf, qp, gp, qc, gc = labelled
    qp = np.where(qp == 0, 1, qp)
    gp = gp.copy()
    gp[::7] = -1  # a seventh of the gallery: junk boxes
    keep = gp != -1
    dist = np.sqrt(((qf[:, None] - gf[None]) ** 2).sum(-1)).astype(np.float32)
    for junked, removed in (
        (featcache.evaluate(qf, gf, qp, gp, qc, gc), featcache.evaluate(qf, gf[keep], qp, gp[keep], qc, gc[keep])),
        (featcache.evaluate(None, None, qp, gp, qc, gc, distmat=dist),
         featcache.evaluate(None, None, qp, gp[keep], qc, gc[keep], distmat=dist[:, keep])),
    ):
        _close(junked, removed)
        assert junked["queries_evaluated"] == removed["queries_evaluated"]
        assert junked["gallery_junk"] == int((~keep).sum()) and removed["gallery_junk"] == 0
    negatives = featcache.evaluate(qf, gf, qp, gp, qc, gc, junk_pids=())  # torchreid on unfiltered data
    _close(negatives, evaluate_reference(_unit(qf), _unit(gf), qp, qc, gp, gc))
    assert negatives["gallery_junk"] == 0 and negatives["mAP"] != featcache.evaluate(qf, gf, qp, gp, qc, gc)["mAP"]
    with pytest.raises(FeatcacheError, match=r"^q_pids: query row\(s\) 3 have identity -1, which junk_pids=\(-1,\) marks"):
        featcache.evaluate(qf, gf, np.where(np.arange(len(qp)) == 3, -1, qp), gp, qc, gc)


def test_dir_lists_the_public_api_that_loads_lazily():
    import featcache

    names = dir(featcache)
    assert set(featcache.__all__) <= set(names) and {"evaluate", "open_cache", "read_teacher_targets"} <= set(names)
    for name in featcache.__all__:
        assert getattr(featcache, name) is not None, name


def test_degenerate_features_are_warned_about(labelled, caplog):
    """All-equal features gave an mAP from gallery order without a word."""
    qf, gf, qp, gp, qc, gc = labelled
    with caplog.at_level("WARNING", logger="featcache"):
        featcache.evaluate(qf, np.zeros_like(gf), qp, gp, qc, gc)
        featcache.evaluate(None, None, qp, gp, qc, gc, distmat=np.ones((len(qf), len(gf))))
    assert caplog.text.count("are degenerate") == 2 and "follow the gallery's order" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="featcache"):
        featcache.evaluate(qf, gf, qp, gp, qc, gc)
    assert "degenerate" not in caplog.text
