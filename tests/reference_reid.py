"""Independent reference implementations used by the tests and the benchmark.

Written the straightforward way most re-ID code does it (full distance
matrix, a sort per query, junk removed, metrics from the 0/1 match vector),
the trapezoid AP as a literal port of the official Market-1501 MATLAB loop,
and a dense port of Zhong et al.'s k-reciprocal re-ranking.
"""

from __future__ import annotations

import numpy as np


def evaluate_reference(qf, gf, q_pids, q_cams, g_pids, g_cams, ranks=(1, 5, 10, 20), ap_form="plain", scores=None):
    sim = qf @ gf.T if scores is None else scores
    aps, inps, cmc_hits, skipped = [], [], [], 0
    for i in range(len(q_pids)):
        order = np.lexsort((np.arange(sim.shape[1]), -sim[i]))  # descending, ties by gallery index
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        raw = (g_pids[order][keep] == q_pids[i]).astype(np.int64)
        if not raw.any():
            skipped += 1
            continue
        cmc = raw.cumsum()
        cmc[cmc > 1] = 1
        cmc_hits.append(cmc[: max(ranks)])
        num_rel = raw.sum()
        if ap_form == "plain":
            tmp = raw.cumsum()
            tmp = np.array([x / (k + 1.0) for k, x in enumerate(tmp)]) * raw
            aps.append(tmp.sum() / num_rel)
        else:
            aps.append(_matlab_ap(raw))
        last = np.flatnonzero(raw)[-1]
        inps.append(raw.cumsum()[last] / (last + 1.0))
    hits = np.array([np.pad(c, (0, max(ranks) - len(c)), constant_values=1) for c in cmc_hits])
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)),
            "cmc": {str(k): float(hits[:, k - 1].mean()) for k in ranks}, "queries_skipped": skipped}


def _matlab_ap(raw):
    """compute_AP.m of the Market-1501 kit, over a ranking with junk already removed."""
    ngood = raw.sum()
    old_recall, old_precision, ap, hits = 0.0, 1.0, 0.0, 0
    for j, flag in enumerate(raw):
        if flag:
            hits += 1
        recall = hits / ngood
        precision = hits / (j + 1)
        ap += (recall - old_recall) * ((old_precision + precision) / 2)
        old_recall, old_precision = recall, precision
        if hits == ngood:
            break
    return ap


def rerank_reference(qf, gf, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al.'s re_ranking, dense, on squared Euclidean distances of L2-normalised features."""
    x = np.concatenate([qf, gf]).astype(np.float64)
    query_num, all_num = len(qf), len(x)
    original_dist = np.maximum(0, 2 - 2 * x @ x.T)
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist)
    initial_rank = np.lexsort((np.tile(np.arange(all_num), (all_num, 1)), original_dist), axis=1)
    for i in range(all_num):
        fwd = initial_rank[i, : k1 + 1]
        back = initial_rank[fwd, : k1 + 1]
        kr = fwd[np.where(back == i)[0]]
        exp = kr
        for c in kr:
            cf = initial_rank[c, : int(np.around(k1 / 2.0)) + 1]
            cb = initial_rank[cf, : int(np.around(k1 / 2.0)) + 1]
            ckr = cf[np.where(cb == c)[0]]
            if len(np.intersect1d(ckr, kr)) > 2.0 / 3 * len(ckr):
                exp = np.append(exp, ckr)
        exp = np.unique(exp)
        w = np.exp(-original_dist[i, exp])
        V[i, exp] = w / np.sum(w)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V = np.stack([np.mean(V[initial_rank[i, :k2], :], axis=0) for i in range(all_num)])
    inv = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jac = np.zeros((query_num, all_num))
    for i in range(query_num):
        tmin = np.zeros(all_num)
        nz = np.where(V[i] != 0)[0]
        for c in nz:
            tmin[inv[c]] += np.minimum(V[i, c], V[inv[c], c])
        jac[i] = 1 - tmin / (2 - tmin)
    final = jac * (1 - lambda_value) + original_dist * lambda_value
    return final[:, query_num:]
