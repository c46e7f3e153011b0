#!/usr/bin/env python3
"""Recall cost of reranking fewer candidates (issue 14, item 4): `rerank_budget_ms` and `rerank_margin`.

A candidate's rerank score does not depend on the other candidates, so reranking only the first n of
the global top-K gives, for those n, exactly the scores of a full reranking: the effect of a budget is
computed from one full run per query (bench/precision_equivalence.py --scores-out: global order,
global scores and r2former scores of the top-100 on the held-out synthetic set). Rules, as the
localizer applies them (r2former_core/localizer.py):
  fixed n   the first n candidates by global score are reranked, the rest follow in global order;
            a budget B ms reranks n = max(rerank_min, B / cost per candidate);
  margin    candidates whose global cosine is within `rerank_margin` of the best are reranked (at
            least rerank_min): a confident retrieval (a clear best) reranks fewer.

    .venv/bin/python bench/rerank_budget.py --scores bench/results/heldout_rerank_scores.npz \\
        --ms-per-candidate 21.5 --out bench/results/rerank_budget.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from benchlib import write_report

ROOT = Path(__file__).resolve().parents[1]


def ranked_with(n: int, idx: np.ndarray, rerank: np.ndarray) -> np.ndarray:
    """Map indices in final order when the first n of the global order `idx` are reranked."""
    head = np.argsort(-rerank[:n], kind="stable")
    return np.concatenate([idx[:n][head], idx[n:]])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", default=str(ROOT / "bench" / "results" / "heldout_rerank_scores.npz"),
                   help="output of bench/precision_equivalence.py --scores-out")
    p.add_argument("--mode", default="fp32", help="which precision's run to use (default fp32)")
    p.add_argument("--counts", default="1,5,10,20,30,50,100", help="candidates reranked (default 1,5,...,100)")
    p.add_argument("--margins", default="0.01,0.02,0.05,0.1,0.2", help="rerank_margin values (default 0.01..0.2)")
    p.add_argument("--rerank-min", type=int, default=10, help="rerank_min of the margin rule (default 10)")
    p.add_argument("--ms-per-candidate", type=float, default=None,
                   help="reranking cost per candidate of the model you deploy (bench/model_speed.py: rerank ms / K); "
                        "prints the budget each row needs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rerank_budget.json"), help="JSON report")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from r2former_core.metrics import first_positive_rank, recall_from_ranks

    data = np.load(args.scores)
    m = args.mode
    idx_all, g_all, r_all = data[f"{m}_global_idx"], data[f"{m}_global_score"], data[f"{m}_rerank_score"]
    q_xy, sets = data[f"{m}_query_xy"], data[f"{m}_set"]
    threshold = float(data["threshold_m"])
    map_xy = {int(k.split("_")[-1]): data[k] for k in data.files if k.startswith("map_xy_")}
    k_max = idx_all.shape[1]

    def recalls(counts: np.ndarray) -> tuple[float, float, float]:
        ranks = [first_positive_rank(ranked_with(int(n), idx, r), map_xy[int(s)], xy, threshold)
                 for n, idx, r, s, xy in zip(counts, idx_all, r_all, sets, q_xy)]
        return recall_from_ranks(ranks, 1), recall_from_ranks(ranks, 5), float(np.mean(counts))

    rows = []
    print(f"{len(idx_all)} queries, top-{k_max}, {m} scores, positives within {threshold:g} m")
    print(f"{'rule':<22} {'reranked (mean)':>15} {'R@1':>7} {'R@5':>7}" +
          (f" {'budget ms':>10}" if args.ms_per_candidate else ""))
    for n in (int(v) for v in args.counts.split(",")):
        n = min(n, k_max)
        r1, r5, mean_n = recalls(np.full(len(idx_all), n))
        rows.append({"rule": f"first {n}", "n": n, "mean_reranked": mean_n, "recall@1": r1, "recall@5": r5})
    for margin in (float(v) for v in args.margins.split(",")):
        counts = np.array([min(k_max, max(args.rerank_min, int(np.count_nonzero(g >= g.max() - margin))))
                           for g in g_all])
        r1, r5, mean_n = recalls(counts)
        rows.append({"rule": f"margin {margin:g} (min {args.rerank_min})", "margin": margin,
                     "mean_reranked": mean_n, "recall@1": r1, "recall@5": r5})
    for row in rows:
        budget = f" {row['mean_reranked'] * args.ms_per_candidate:>10.0f}" if args.ms_per_candidate else ""
        print(f"{row['rule']:<22} {row['mean_reranked']:>15.1f} {100 * row['recall@1']:>6.1f}% "
              f"{100 * row['recall@5']:>6.1f}%{budget}")
    write_report(args.out, {"meta": {"scores": args.scores, "mode": m, "queries": int(len(idx_all)),
                                        "ms_per_candidate": args.ms_per_candidate}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
