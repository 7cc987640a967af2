"""featcache eval: protocol rules, metrics against independent references, search, re-ranking, the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from conftest import extract_cfg, shared_path
from featcache.cli import main
from featcache.errors import ConfigError, InputError
from featcache.evaluation.features import known_kinds
from featcache.evaluation.metrics import Accumulator, average_precision, masks, positive_ranks
from featcache.evaluation.rerank import rerank_blocks
from featcache.evaluation.runner import EvalConfig, run_eval
from featcache.evaluation.search import l2_normalize
from reference_reid import evaluate_reference, rerank_reference

G_PIDS = np.array([1, 1, 2, 0, 1, 3])
G_CAMS = np.array([1, 2, 1, 2, 3, 1])


def test_hand_computed_case_with_junk_and_distractor():
    pos, junk = masks(1, 1, G_PIDS, G_CAMS)
    assert list(np.flatnonzero(pos)) == [1, 4] and list(np.flatnonzero(junk)) == [0]
    scores = np.array([0.9, 0.5, 0.8, 0.7, 0.3, 0.1])  # junk first (ignored), distractor 0000 at 0.7 counts
    r = positive_ranks(scores, pos, junk)
    assert list(r) == [3, 4]
    assert average_precision(r, "plain") == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert average_precision(r, "trapezoid") == pytest.approx(((0 + 1 / 3) / 2 + (1 / 3 + 2 / 4) / 2) / 2)
    acc = Accumulator((1, 5))
    acc.add(0, r)
    acc.add(1, positive_ranks(scores, *masks(3, 1, G_PIDS, G_CAMS)))  # pid 3 only in its own camera: no match
    res = acc.result()
    assert res["queries_evaluated"] == 1 and res["queries_skipped"] == 1
    assert res["cmc"] == {"1": 0.0, "5": 1.0} and res["mINP"] == pytest.approx(2 / 4)


def test_ties_break_by_gallery_order():
    pos, junk = masks(1, 1, G_PIDS, G_CAMS)
    tied = np.array([0.0, 0.7, 0.7, 0.7, 0.7, 0.7])  # everything ties but the junk
    assert list(positive_ranks(tied, pos, junk)) == [1, 4]  # gallery 1 first, gallery 4 after 2 and 3
    assert average_precision(np.array([1]), "trapezoid") == 1.0


def _clustered(rng, nq: int, ng: int, d: int, ids: int, noise: float):
    """L2-normalised features around one centre per identity, cameras 1-6 (pid 0 in the gallery: distractors)."""
    g_pids, g_cams = rng.integers(0, ids, ng), rng.integers(1, 7, ng)
    q_pids, q_cams = rng.integers(1, ids, nq), rng.integers(1, 7, nq)
    centers = rng.normal(size=(ids, d))
    qf = l2_normalize(centers[q_pids] + rng.normal(scale=noise, size=(nq, d)))
    gf = l2_normalize(centers[g_pids] + rng.normal(scale=noise, size=(ng, d)))
    return qf, gf, q_pids, q_cams, g_pids, g_cams


@pytest.mark.parametrize("ap_form", ["plain", "trapezoid"])
def test_agrees_with_brute_force_reference(ap_form):
    nq, ng = 60, 400
    qf, gf, q_pids, q_cams, g_pids, g_cams = _clustered(np.random.default_rng(0), nq, ng, 16, ids=30, noise=1.2)
    gf[10:40] = gf[40:70]  # identical rows with other identities: exact ties
    q_pids[0] = 99  # an identity absent from the gallery: skipped
    scores = qf @ gf.T
    assert any(len(np.unique(row)) < ng for row in scores)
    ref = evaluate_reference(qf, gf, q_pids, q_cams, g_pids, g_cams, ap_form=ap_form, scores=scores)
    acc = Accumulator((1, 5, 10, 20), ap_form)
    for i in range(nq):
        acc.add(i, positive_ranks(scores[i], *masks(q_pids[i], q_cams[i], g_pids, g_cams)))
    ours = acc.result()
    assert ours["queries_skipped"] == ref["queries_skipped"] > 0
    for key in ("mAP", "mINP"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6)
    assert ours["cmc"] == pytest.approx(ref["cmc"], abs=1e-6)


def test_veri776_rule_reproduces_the_official_good_and_junk_lists():
    proto = shared_path("veri776-protocol")
    q = (proto / "name_query.txt").read_text().split()
    t = (proto / "name_test.txt").read_text().split()
    g_pids = np.array([int(n[:4]) for n in t])
    g_cams = np.array([int(n[6:9]) for n in t])
    gt = (proto / "gt_index.txt").read_text().splitlines()
    jk = (proto / "jk_index.txt").read_text().splitlines()
    for k, name in enumerate(q):
        pos, junk = masks(int(name[:4]), int(name[6:9]), g_pids, g_cams)
        assert list(np.flatnonzero(pos) + 1) == sorted(int(x) for x in gt[k].split()), name
        assert list(np.flatnonzero(junk) + 1) == sorted(int(x) for x in jk[k].split()), name


@pytest.mark.heavy
def test_rerank_matches_the_dense_reference_and_raises_map():
    rng = np.random.default_rng(3)
    ids, per, d = 12, 6, 8
    centers = rng.normal(size=(ids, d)) * 0.6
    pids = np.repeat(np.arange(1, ids + 1), per)
    cams = np.tile(np.arange(1, per + 1), ids)
    feats = l2_normalize(centers[pids - 1] + rng.normal(scale=0.55, size=(len(pids), d)))
    qsel = cams == 1
    qf, gf = feats[qsel], feats[~qsel]
    ref = rerank_reference(qf, gf, k1=6, k2=3, lambda_value=0.3)
    ours = np.concatenate([b for _, b in rerank_blocks(qf, gf, k1=6, k2=3, lam=0.3, device="cpu", budget=600)])
    np.testing.assert_allclose(-ours, ref, atol=1e-5)
    args = (pids[qsel], cams[qsel], pids[~qsel], cams[~qsel])
    plain = evaluate_reference(qf, gf, *args)
    reranked = evaluate_reference(qf, gf, *args, scores=ours)
    assert reranked["mAP"] > plain["mAP"] + 0.02


def test_blockwise_equals_one_shot(market_cache):
    from featcache.evaluation.engine import evaluate

    ev = run_eval(EvalConfig(market_cache, "concat:clip-tiny,align-tiny", budget_mb=64))
    args = (ev.qf, ev.gf, ev.query.pids, ev.query.camids, ev.gallery.pids, ev.gallery.camids)
    many, _, _ = evaluate(*args, budget=1)  # one query a block
    for key in ("mAP", "mINP", "cmc", "queries_evaluated"):
        assert ev.report[key] == many[key]


def test_eval_command_end_to_end(market_cache, tmp_path):
    r = CliRunner()
    out = ["--json", str(tmp_path / "r.json"), "--plots", str(tmp_path / "p"), "--save-features", str(tmp_path / "f.npz")]
    res = r.invoke(main, ["eval", "--cache", str(market_cache), "--model", "backbone:clip-tiny", *out])
    assert res.exit_code == 0, res.output
    assert "mAP" in res.output and "R1" in res.output and "random weights" in res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    for key in ("mAP", "mINP", "cmc", "protocol", "ap_form", "queries_evaluated", "queries_skipped", "gallery_size", "model", "cache", "timings"):
        assert key in rep
    assert rep["protocol"]["dataset"] == "market1501" and "junk" in rep["protocol"]["rule"] and set(rep["cmc"]) == {"1", "5", "10", "20"}
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["cmc.png", "eval.config.yaml", "ranked_random.png", "ranked_worst_ap.png"]
    saved = yaml.safe_load((tmp_path / "r.json.config.yaml").read_text())["eval"]
    assert saved["model"] == "backbone:clip-tiny" and saved["budget_mb"] == 256 and rep["config"] == saved
    assert rep["random_init_backbones"] == ["clip-tiny"]  # only what this model read, not every backbone in the cache
    f = np.load(tmp_path / "f.npz")
    assert {"query", "gallery", "query_pids", "query_camids", "gallery_pids", "gallery_camids", "query_names", "gallery_names"} <= set(f.files)
    for form in ("plain", "trapezoid"):
        res = r.invoke(main, ["eval", "--cache", str(market_cache), "--model", "backbone:clip-tiny", "--ap", form, "--json", str(tmp_path / f"{form}.json")])
        assert res.exit_code == 0, res.output
        ours = json.loads((tmp_path / f"{form}.json").read_text())
        ref = evaluate_reference(f["query"], f["gallery"], f["query_pids"], f["query_camids"], f["gallery_pids"], f["gallery_camids"], ap_form=form)
        assert ours["mAP"] == pytest.approx(ref["mAP"], abs=1e-6) and ours["mINP"] == pytest.approx(ref["mINP"], abs=1e-6)
        assert ours["cmc"] == pytest.approx(ref["cmc"], abs=1e-6)
    res = r.invoke(main, ["eval", "--cache", str(market_cache), "--model", "concat:clip-tiny,align-tiny", "--flip", "--rerank"])
    assert res.exit_code == 0, res.output
    assert "re-ranked" in res.output and "flip" in res.output


def test_an_evaluation_opens_its_cache_once(market_cache, tmp_path, monkeypatch):
    """The cache is opened once per evaluation, and query, gallery, counts and identity read through that reader."""
    import h5py

    opened = []
    real = h5py.File.__init__

    def counting(self, name, *a, **k):
        if isinstance(name, (str, Path)):  # h5py also wraps open file ids
            opened.append(Path(name).resolve())
        real(self, name, *a, **k)

    monkeypatch.setattr(h5py.File, "__init__", counting)
    for model in ("backbone:clip-tiny", "concat:clip-tiny,align-tiny"):
        opened.clear()
        ev = run_eval(EvalConfig.from_dict({"cache": market_cache, "model": model, "flip": True}))
        assert ev.report["mAP"] is not None and opened.count(Path(market_cache).resolve()) == 1, (model, opened)


def test_bad_input(market_cache, market_root, tmp_path):
    with pytest.raises(ConfigError, match="unknown --model kind 'resnet'; available: " + ", ".join(known_kinds())):
        run_eval(EvalConfig(market_cache, "resnet:50"))
    with pytest.raises(InputError, match="holds: align-tiny, clip-tiny"):
        run_eval(EvalConfig(market_cache, "backbone:clip-vit-b16"))
    with pytest.raises(ConfigError, match="KIND:REF"):
        run_eval(EvalConfig(market_cache, "clip-tiny"))
    from featcache.extract.runner import run_extract

    other = tmp_path / "other.h5"
    run_extract(extract_cfg(market_root, other, backbones=("clip-tiny",), image_size=(32, 32), views=1))
    with pytest.raises(InputError, match="extracted differently: image_size"):
        run_eval(EvalConfig(market_cache, "backbone:clip-tiny", gallery_cache=other))
    with pytest.raises(InputError, match="the query split holds 1 view per image, so views 0 to 0 can be read, not view 1; extract with --views 2"):
        run_eval(EvalConfig(other, "backbone:clip-tiny", flip=True))
    # a cache whose gallery split is empty (a CSV with only training and query rows)
    root = tmp_path / "csv"
    root.mkdir()
    img = next((market_root / "query").glob("*.jpg"))
    (root / "a.jpg").write_bytes(img.read_bytes())
    (root / "manifest.csv").write_text("path,pid,camid,split\na.jpg,1,1,query\na.jpg,1,1,train\n")
    run_extract(extract_cfg(root, tmp_path / "q.h5", dataset="csv", backbones=("clip-tiny",)))
    with pytest.raises(InputError, match="no cached gallery images"):
        run_eval(EvalConfig(tmp_path / "q.h5", "backbone:clip-tiny"))
    res = CliRunner().invoke(main, ["eval", "--cache", str(tmp_path / "q.h5"), "--model", "backbone:clip-tiny"])
    assert res.exit_code == 1 and "no cached gallery images" in res.output


def test_cross_domain_gallery_cache(market_cache, tmp_path):
    from conftest import extract_cfg
    from featcache.extract.runner import run_extract
    from featcache.synth import SynthConfig, generate

    other_root = tmp_path / "veri"
    generate(SynthConfig(other_root, "veri776", ids=6, cams=4, seed=4))
    other = tmp_path / "veri.h5"
    run_extract(extract_cfg(other_root, other, dataset="veri776"))
    rep = run_eval(EvalConfig(market_cache, "backbone:clip-tiny", gallery_cache=other)).report
    assert rep["gallery_cache"]["dataset"] == "veri776" and rep["cache"]["dataset"] == "market1501"
    assert rep["evaluated_on"] == str(other) and rep["protocol"]["dataset"] == "veri776"  # the protocol of the evaluated data
    alone = run_eval(EvalConfig(other, "backbone:clip-tiny")).report
    assert (rep["mAP"], rep["query_size"], rep["gallery_size"]) == (alone["mAP"], alone["query_size"], alone["gallery_size"])


def test_agreement_by_hand():
    """Two models, two queries, a gallery of five: overlaps and rank correlations worked out by hand, junk left out
    of both rankings."""
    from featcache.evaluation.metrics import agreement

    def topk_agreement(*args, k):
        return agreement(*args, k=k)["top_k_overlap"]

    eye = np.eye(5, dtype=np.float32)
    g = eye
    # query 0 prefers gallery 0 > 1 > 2 > ... in model a, 4 > 3 > 0 in model b; top-2 overlap {0,1} vs {4,3}: 0
    qa = np.array([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5]], np.float32)
    qb = np.array([[3, 0, 0, 4, 5], [1, 2, 3, 4, 5]], np.float32)
    pids, cams = np.array([1, 2]), np.array([1, 1])
    g_pids, g_cams = np.array([9, 9, 9, 9, 9]), np.array([2, 2, 2, 2, 2])
    assert topk_agreement(qa, g, qb, g, pids, cams, g_pids, g_cams, k=2) == pytest.approx((0 + 1) / 2)
    assert topk_agreement(qa, g, qb, g, pids, cams, g_pids, g_cams, k=3) == pytest.approx((1 / 3 + 1) / 2)
    # gallery 4 is junk for query 1 (same identity and camera): both top-2 become {3, 2}
    g_pids2, g_cams2 = np.array([9, 9, 9, 9, 2]), np.array([2, 2, 2, 2, 1])
    qb2 = np.array([[5, 4, 3, 2, 1], [0, 0, 4, 5, 9]], np.float32)
    assert topk_agreement(qa, g, qb2, g, pids, cams, g_pids2, g_cams2, k=2) == pytest.approx(1.0)
    # Spearman, query 0: ranks of a (4, 3, 2, 1, 0); of b (3, 0, 0, 4, 5) with the tie shared: (2, .5, .5, 3, 4);
    # centred, their products sum to -6.5 over norms sqrt(10 * 9.5). Query 1: identical scores, 1.
    corr = agreement(qa, g, qb, g, pids, cams, g_pids, g_cams, k=2)["rank_correlation"]
    assert corr == pytest.approx((-6.5 / np.sqrt(95) + 1) / 2)
    # junk dropped before ranking: query 1 compares (1, 2, 3, 4) with (0, 0, 4, 5): ranks (0..3) and (.5, .5, 2, 3)
    corr2 = agreement(qa, g, qb2, g, pids, cams, g_pids2, g_cams2, k=2)["rank_correlation"]
    rb = np.array([0.5, 0.5, 2, 3]) - 1.5
    assert corr2 == pytest.approx((1 + (np.arange(4) - 1.5) @ rb / np.sqrt(5 * (rb @ rb))) / 2)


def test_ranks_share_ties_and_spearman_of_a_constant_is_zero():
    from featcache.evaluation.metrics import ranks, spearman

    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([7.0, 7.0, 7.0])) == 0.0
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([-1.0, -5.0, -9.0])) == pytest.approx(-1.0)


def test_split_stats_count_images_identities_and_cameras(market_cache):
    from featcache.cache import CacheSplit
    from featcache.cache.describe import split_stats

    st = split_stats(market_cache)
    for name in ("train", "query", "gallery"):
        sp = CacheSplit.load(market_cache, name)
        assert st[name]["images"] == len(sp)
        assert st[name]["identities"] == len(set(sp.pids[sp.pids > 0].tolist()))
        assert st[name]["cameras"] == len(set(sp.camids.tolist()))
    assert st["train"]["identities"] == 4 and st["query"]["cameras"] >= 2


@pytest.mark.parametrize("ap_form", ["plain", "trapezoid"])
def test_block_ranking_equals_the_per_query_rule_with_ties_junk_and_tiny_blocks(ap_form):
    """featcache.evaluation.ranking against metrics.positive_ranks, query by query: integer scores (ties
    everywhere), junk, queries without positives, blocks of one and of many queries."""
    from featcache.evaluation.ranking import GalleryIndex, block_ranks, split_ranks

    rng = np.random.default_rng(3)
    nq, ng = 50, 300
    g_pids, g_cams = rng.integers(0, 12, ng), rng.integers(1, 4, ng)
    q_pids, q_cams = rng.integers(1, 14, nq), rng.integers(1, 4, nq)
    scores = rng.integers(-3, 4, size=(nq, ng)).astype(np.float32)
    scores[:, 5] = -0.0  # -0.0 and 0.0 are one score
    index = GalleryIndex.build(q_pids, q_cams, g_pids, g_cams)
    want = [positive_ranks(scores[i], *masks(q_pids[i], q_cams[i], g_pids, g_cams)) for i in range(nq)]
    for block in (1, 7, nq):
        got = []
        for s in range(0, nq, block):
            got += split_ranks(*block_ranks(scores[s: s + block], s, index))
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    from featcache.evaluation.ranking import _ranks  # keys that fill all 64 bits: the last row of a pass

    r, c = _ranks(scores[:3], 0, index, col_bits=30)
    assert all(np.array_equal(a, b) for a, b in zip(split_ranks(r, c), want[:3]))
    r, c = block_ranks(scores.astype(np.float64), 0, index)  # re-ranked distances: float64, ranked as such
    assert all(np.array_equal(a, b) for a, b in zip(split_ranks(r, c), want))
    acc_a, acc_b = Accumulator((1, 5), ap_form), Accumulator((1, 5), ap_form)
    acc_a.add_block(0, *block_ranks(scores, 0, index))
    for i, r in enumerate(want):
        acc_b.add(i, r)
    a, b = acc_a.result(), acc_b.result()
    assert a["cmc"] == b["cmc"] and a["queries_skipped"] == b["queries_skipped"] > 0
    assert (a["mAP"], a["mINP"]) == pytest.approx((b["mAP"], b["mINP"]), abs=1e-12)


@pytest.mark.heavy
def test_approximate_search_is_labelled_and_exact_when_it_sees_everything(tmp_path):
    """ivf-flat visiting every list with k = the gallery returns every entry: its metrics are the exact ones;
    a short list gives AP@k, and the report and table say the numbers are approximate."""
    from featcache.evaluation.approx import ApproxSpec
    from featcache.evaluation.engine import evaluate

    qf, gf, q_pids, q_cams, g_pids, g_cams = _clustered(np.random.default_rng(0), 40, 2000, 16, ids=40, noise=1.0)
    exact, _, _ = evaluate(qf, gf, q_pids, q_cams, g_pids, g_cams, device="cpu")
    every, _, _ = evaluate(qf, gf, q_pids, q_cams, g_pids, g_cams, device="cpu",
                           approx=ApproxSpec("ivf-flat", k=len(gf), nprobe=4096))
    assert every["search"]["mode"] == "approx" and every["search"]["index"].startswith("IVF")
    for key in ("mAP", "mINP"):
        assert every[key] == pytest.approx(exact[key], abs=1e-6)
    assert every["cmc"] == pytest.approx(exact["cmc"])
    short, _, _ = evaluate(qf, gf, q_pids, q_cams, g_pids, g_cams, device="cpu", approx=ApproxSpec("ivf-pq", k=20, nprobe=8))
    assert short["mAP"] < exact["mAP"] and short["mINP"] <= exact["mINP"] and "AP@k" in short["search"]["note"]
    from featcache.evaluation.runner import format_table

    report = {**short, "model": {"spec": "x"}, "protocol": {"dataset": "synthetic"}, "ap_form": "plain", "flip": False,
              "rerank": None, "gallery_size": len(gf), "feature_dim": 16, "search_backend": "faiss-cpu",
              "timings": {"total_s": 0.0}, "random_init_backbones": []}
    assert "APPROXIMATE search (IVF" in format_table(report) and "mAP is AP@20" in format_table(report)
    with pytest.raises(ConfigError, match=r"--approx-k 10 is shorter than the largest of --ranks \(20\)"):
        EvalConfig(Path("c.h5"), "backbone:x", search="approx", approx_k=10)


def test_ranks_counted_on_the_device_equal_the_sorted_ranks_ties_and_junk_included():
    """device_ranking (the GPU path) run on CPU torch: the same ranks as ranking.block_ranks and the same metrics."""
    import torch

    from featcache.evaluation.device_ranking import device_block_ranks
    from featcache.evaluation.ranking import GalleryIndex, block_ranks
    from featcache.evaluation.engine import evaluate

    rng = np.random.default_rng(11)
    nq, ng = 60, 900
    qf = rng.integers(-2, 3, size=(nq, 8)).astype(np.float32)  # small integers: exact scores, many ties
    gf = rng.integers(-2, 3, size=(ng, 8)).astype(np.float32)
    qp, gp = rng.integers(0, 40, nq), rng.integers(0, 40, ng)
    qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)  # junk: same identity and camera
    index = GalleryIndex.build(qp, qc, gp, gc)
    scores = qf @ gf.T
    assert len(np.unique(scores)) < scores.size / 100  # ties everywhere
    want = block_ranks(scores, 0, index)
    for budget in (2**30, 64 * 1024):  # one chunk, and many small ones
        got = device_block_ranks(torch.from_numpy(scores), 0, index, budget)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    a, pa, _ = evaluate(qf, gf, qp, qc, gp, gc, device="cpu", ranking="sort", budget=64 * 1024)
    b, pb, backend = evaluate(qf, gf, qp, qc, gp, gc, device="cpu", ranking="device", budget=64 * 1024)
    assert a == b and pa == pb and "ranks on the device" in backend
    from featcache.evaluation.engine import DeviceRanker, SortRanker, ranker_for
    from featcache.evaluation.search import Scorer

    cpu = Scorer(gf, "cpu")  # ranking="auto" sorts scores made off a GPU; "device" and "sort" choose as named
    assert isinstance(ranker_for("auto", cpu, 1), SortRanker) and isinstance(ranker_for("sort", cpu, 1), SortRanker)
    assert isinstance(ranker_for("device", cpu, 1), DeviceRanker)


def test_device_ranks_keep_the_tie_rule_across_signed_zeros_and_negative_scores():
    """-0.0 and 0.0 are equal scores (the earlier gallery entry first), and negative scores order below positive ones."""
    import torch

    from featcache.evaluation.device_ranking import device_block_ranks
    from featcache.evaluation.ranking import GalleryIndex, block_ranks

    scores = np.array([[0.0, -0.0, 0.5, -0.5, -0.0, 0.0, -1.0, 1.0]], dtype=np.float32)
    index = GalleryIndex.build(np.array([1]), np.array([0]), np.array([1, 2, 1, 1, 2, 1, 3, 2]), np.array([1, 1, 1, 1, 1, 0, 1, 1]))
    got = device_block_ranks(torch.from_numpy(scores), 0, index)
    want = block_ranks(scores, 0, index)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[0].tolist() == [2, 3, 6]  # positives at 0.5, 0.0 (index 0; -0.0 at 1 after it), -0.5; junk at index 5


def _elements_touched(fn) -> int:
    """The elements of every tensor the torch operations inside ``fn`` produce: the work, without a clock."""
    import torch
    from torch.overrides import TorchFunctionMode

    total = 0

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal total
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    total += o.numel()
            return out

    with Count():
        fn()
    return total


def test_device_ranking_work_does_not_grow_with_the_positives_of_a_query():
    """It gathered a full row of scores per positive: work proportional to positives x gallery. Now a fixed number
    of passes per row: 64 positives a query cost about what 1 does (counted in elements, not timed)."""
    import torch

    from featcache.evaluation.device_ranking import device_block_ranks
    from featcache.evaluation.ranking import GalleryIndex

    rng = np.random.default_rng(3)
    nq, ng = 16, 4096
    scores = torch.from_numpy(rng.standard_normal((nq, ng)).astype(np.float32))
    work = {}
    for per_query in (1, 64):
        g_pids = np.full(ng, 10_000)
        g_pids[:per_query * nq] = np.repeat(np.arange(nq), per_query)  # query i's positives, in camera 1
        index = GalleryIndex.build(np.arange(nq), np.zeros(nq, int), g_pids, np.ones(ng, int))
        work[per_query] = _elements_touched(lambda: device_block_ranks(scores, 0, index))
    assert work[64] < 1.5 * work[1], work


def test_the_cmc_plot_ticks_integer_ranks(tmp_path, monkeypatch):
    """Its rank axis had ticks at 2.5, 7.5, ... (a gallery of 20: ranks 1 to 20)."""
    from types import SimpleNamespace

    from featcache.evaluation import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figures.append(fig))
    ev = SimpleNamespace(per_query={i: (0.5, 1 + i % 7) for i in range(12)}, gf=np.zeros((20, 4)),
                         report={"model": {"spec": "backbone:x"}, "search": {"mode": "exact"}, "mAP": 0.5})
    plots._cmc_curve(ev, tmp_path / "cmc.png")
    ticks = [t for t in figures[0].axes[0].get_xticks() if 1 <= t <= 20]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
