#!/usr/bin/env python3
"""Ranking equivalence of the reduced precisions (issue 14): does bf16 / int8 rank like fp32?

Two parts, each mode against fp32 measured in the same run:
  heldout  the demo model on the held-out synthetic set (bench/heldout_eval.py: worlds 950-952, six query
           sets, maps of 160 images, top-100 reranked with r2former). Each mode builds its maps and
           localizes in that mode, end to end, as a user of the mode would. Reports top-1 agreement
           with fp32 (same best map image), R@1/R@5 (25 m) and the difference in R@1 points.
  deits    the released DeiT-S configuration (480x640) with random official-layout weights on random
           inputs: database images of smooth random scenes, queries that are shifted noisy views of
           them. Reports top-1 agreement of the global retrieval and of the reranking (all database
           images reranked per query), the smallest global-descriptor cosine to fp32, the mean overlap
           of the 500 selected tokens and the largest match-probability difference.
The acceptance rule (docs/BENCHMARKS.md): top-1 agreement >= 99 % and R@1 within 0.5 points.
The per-query rerank scores of the heldout part also feed bench/rerank_budget.py (--scores-out).

    .venv/bin/python bench/precision_equivalence.py --model models/r2former_tiny_demo.safetensors \\
        --modes fp32,bf16,int8 --out bench/results/precision_equivalence.json
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import machine_info, write_report  # noqa: E402
from heldout_eval import DEFAULT_SETS, map_for, parse_sets, render_drive  # noqa: E402


def heldout_rankings(model_path: str, mode: str, args) -> dict:
    """Per query: best map index, first-positive rank, and the global order/scores and rerank scores."""
    from r2former_core.data.sources import open_source
    from r2former_core.localizer import Localizer, LocalizerConfig
    from r2former_core.metrics import first_positive_rank
    from r2former_core.model import load_model

    model = load_model(model_path, precision=mode)
    size = tuple(model.cfg.image_size)
    work = Path(args.work)
    tag = "" if model.precision == "fp32" or args.fp32_maps else f"_{model.precision}"
    map_model = load_model(model_path, precision="fp32") if args.fp32_maps else model
    out = {"best": [], "rank": [], "global_idx": [], "global_score": [], "rerank_score": [], "query_xy": [],
           "map_xy": {}, "set": [], "ms": []}
    maps = {}
    for seed, cond in parse_sets(args.sets):
        if seed not in maps:
            maps[seed] = map_for(work, seed, map_model, render_drive(work, seed, "map", "day", 160, size, 2.5), tag)
            out["map_xy"][seed] = maps[seed].poses[:, :2]
        loc = Localizer(model, maps[seed], LocalizerConfig(top_k=args.top_k, device="cpu", precision=mode))
        src = open_source(images=str(render_drive(work, seed, "query", cond, 60, size, 2.5) / "images"),
                          poses=str(render_drive(work, seed, "query", cond, 60, size, 2.5) / "poses.txt"))
        map_xy = maps[seed].poses[:, :2]
        for rec in src:
            t = time.perf_counter()
            q_global, q_local = loc.extract(rec.image)
            idx, gscore = loc.retrieve(q_global)
            res = loc.localize_features(q_global, q_local, rerank="r2former", retrieved=idx, with_matches=False)
            out["ms"].append((time.perf_counter() - t) * 1000)
            ranked = np.array([c.index for c in res.candidates])
            by_index = {c.index: c.rerank_score for c in res.candidates}
            out["best"].append(int(ranked[0]))
            out["rank"].append(first_positive_rank(ranked, map_xy, rec.pose[:2], args.threshold_m))
            out["global_idx"].append(idx.tolist())
            out["global_score"].append(gscore.tolist())
            out["rerank_score"].append([float(by_index[int(i)]) for i in idx])
            out["query_xy"].append(rec.pose[:2].tolist())
            out["set"].append(seed)
    out["precision"], out["rerank_precision"] = model.precision, model.rerank_precision
    return out


def randomized_deits(seed: int):
    """DeiT-S 480x640 in the official layout with random weights whose attention is far from uniform."""
    from r2former_core.model import ModelConfig, build_model
    model = build_model(ModelConfig(), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.12)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "token" in name or "pos_embed" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def scenes(n_db: int, n_q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    db = torch.nn.functional.interpolate(torch.randn(n_db, 3, 30, 40, generator=g), size=(480, 640), mode="bicubic",
                                         align_corners=False) * 1.5
    q = torch.roll(db[:n_q], shifts=(16, -24), dims=(2, 3)) + 0.3 * torch.randn(n_q, 3, 480, 640, generator=g)
    return db, q


def deits_rankings(mode: str, args) -> dict:
    model = randomized_deits(args.seed)
    model.set_precision(mode)
    db_img, q_img = scenes(args.deits_db, args.deits_queries, args.seed)
    t = time.perf_counter()
    db = [model.extract(db_img[i:i + 1]) for i in range(len(db_img))]
    q = [model.extract(q_img[i:i + 1]) for i in range(len(q_img))]
    extract_s = time.perf_counter() - t
    db_g = torch.cat([f.global_desc for f in db])
    db_l = torch.cat([f.local for f in db])
    t = time.perf_counter()
    probs = [model.rerank(f.global_desc[0], f.local[0], db_g, db_l).match_prob.numpy() for f in q]
    return {"global": torch.cat([f.global_desc for f in q + db]).numpy(), "tokens": [f.token_index[0].numpy()
                                                                                     for f in q + db],
            "global_top1": [int(np.argmax(db_g.numpy() @ f.global_desc[0].numpy())) for f in q],
            "prob": np.stack(probs), "extract_s": extract_s, "rerank_s": time.perf_counter() - t,
            "precision": model.precision, "rerank_precision": model.rerank_precision}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "r2former_tiny_demo.safetensors"),
                   help="model of the heldout part (default: the demo model)")
    p.add_argument("--modes", default="fp32,bf16,int8", help="precisions, fp32 first (default fp32,bf16,int8)")
    p.add_argument("--parts", default="heldout,deits", help="heldout and/or deits (default both)")
    p.add_argument("--sets", default=DEFAULT_SETS, help=f"heldout query sets (default {DEFAULT_SETS})")
    p.add_argument("--top-k", type=int, default=100, help="candidates retrieved and reranked (default 100)")
    p.add_argument("--threshold-m", type=float, default=25.0, help="positive radius in metres (default 25)")
    p.add_argument("--fp32-maps", action="store_true",
                   help="heldout: every mode localizes against maps built in fp32 (default: maps built in the mode)")
    p.add_argument("--tie-margin", type=float, default=0.01,
                   help="heldout: fp32 top-1 vs top-2 match-probability margin below which a query counts as a "
                        "near-tie (reported separately; the acceptance rule counts every query) (default 0.01)")
    p.add_argument("--work", default="runs/heldout", help="rendered drives and maps (default runs/heldout)")
    p.add_argument("--deits-db", type=int, default=16, help="DeiT-S part: database images (default 16)")
    p.add_argument("--deits-queries", type=int, default=8, help="DeiT-S part: queries (default 8)")
    p.add_argument("--seed", type=int, default=0, help="DeiT-S part: weight and input seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--scores-out", default=str(ROOT / "bench" / "results" / "heldout_rerank_scores.npz"),
                   help="per-query global and rerank scores of the heldout part (input of bench/rerank_budget.py)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "precision_equivalence.json"), help="JSON report")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if modes[0] != "fp32":
        modes = ["fp32"] + [m for m in modes if m != "fp32"]
    parts = {s.strip() for s in args.parts.split(",")}
    report: dict = {"meta": {"machine": machine_info(torch.get_num_threads()), "fp32_maps": args.fp32_maps,
                             "tie_margin": args.tie_margin,
                             "command": " ".join(["bench/precision_equivalence.py", *sys.argv[1:]]),
                             "torch": torch.__version__, "modes": modes, "date": time.strftime("%Y-%m-%d %H:%M")},
                    "heldout": {}, "deits": {}}

    if "heldout" in parts:
        from r2former_core.metrics import recall_from_ranks
        runs = {m: heldout_rankings(args.model, m, args) for m in modes}
        ref = runs["fp32"]
        print(f"\n== held-out synthetic set, {len(ref['best'])} queries, top-{args.top_k}, {args.threshold_m:g} m")
        ref_scores = np.sort(np.array(ref["rerank_score"]), axis=1)
        decidable = ref_scores[:, -1] - ref_scores[:, -2] >= args.tie_margin
        ref_xy = np.array([ref["map_xy"][s][b] for s, b in zip(ref["set"], ref["best"])])
        print(f"{'mode':<6} {'runs as (extract/rerank)':<24} {'top-1 agree':>11} {'non-tie':>8} {'<=5 m':>6} "
              f"{'R@1':>7} "
              f"{'R@5':>7} {'dR@1':>7} {'ms/query':>9}")
        for m, r in runs.items():
            r1, r5 = recall_from_ranks(r["rank"], 1), recall_from_ranks(r["rank"], 5)
            agree = float(np.mean(np.array(r["best"]) == np.array(ref["best"])))
            d_r1 = 100 * (r1 - recall_from_ranks(ref["rank"], 1))
            same = np.array(r["best"]) == np.array(ref["best"])
            best_xy = np.array([ref["map_xy"][s][b] for s, b in zip(r["set"], r["best"])])
            near = float(np.mean(np.linalg.norm(best_xy - ref_xy, axis=1) <= 5.0))
            row = {"precision": r["precision"], "rerank_precision": r["rerank_precision"], "top1_agreement": agree,
                   "top1_agreement_non_tie": float(same[decidable].mean()) if decidable.any() else None,
                   "non_tie_queries": int(decidable.sum()), "top1_within_5m": near, "recall@1": r1, "recall@5": r5,
                   "delta_r1_points": d_r1, "ms_per_query": float(np.median(r["ms"])),
                   "equivalent": bool(agree >= 0.99 and abs(d_r1) <= 0.5)}
            report["heldout"][m] = row
            nt = row["top1_agreement_non_tie"]
            print(f"{m:<6} {r['precision'] + '/' + r['rerank_precision']:<24} {100 * agree:>10.1f}% "
                  f"{'-' if nt is None else f'{100 * nt:.1f}%':>8} {100 * near:>5.1f}% {100 * r1:>6.1f}% "
                  f"{100 * r5:>6.1f}% {d_r1:>+7.2f} {row['ms_per_query']:>9.1f}")
        print(f"(non-tie: the {int(decidable.sum())} queries whose fp32 top-1 leads top-2 by >= {args.tie_margin:g} in "
              "match probability; <=5 m: top-1 within 5 m of fp32's top-1)")
        Path(args.scores_out).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.scores_out, **{f"{m}_{k}": np.asarray(v) for m, r in runs.items()
                                               for k, v in r.items() if k not in ("map_xy", "precision",
                                                                                  "rerank_precision")},
                            **{f"map_xy_{s}": xy for s, xy in ref["map_xy"].items()},
                            threshold_m=args.threshold_m)
        print(f"wrote {args.scores_out}")

    if "deits" in parts:
        runs = {m: deits_rankings(m, args) for m in modes}
        ref = runs["fp32"]
        print(f"\n== DeiT-S 480x640, random official-layout weights, {args.deits_queries} queries x "
              f"{args.deits_db} database images")
        print(f"{'mode':<6} {'global top-1':>12} {'rerank top-1':>12} {'min cos':>9} {'tokens kept':>11} "
              f"{'max dprob':>10} {'extract s':>9} {'rerank s':>8}")
        for m, r in runs.items():
            cos = np.sum(r["global"] * ref["global"], axis=1)
            overlap = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(r["tokens"], ref["tokens"])])
            row = {"precision": r["precision"], "rerank_precision": r["rerank_precision"],
                   "global_top1_agreement": float(np.mean(np.array(r["global_top1"]) == np.array(ref["global_top1"]))),
                   "rerank_top1_agreement": float(np.mean(r["prob"].argmax(1) == ref["prob"].argmax(1))),
                   "min_global_cosine": float(cos.min()), "token_overlap": float(overlap),
                   "max_prob_diff": float(np.abs(r["prob"] - ref["prob"]).max()),
                   "rerank_margin_fp32_median": float(np.median(np.diff(np.sort(ref["prob"], 1)[:, -2:], axis=1))),
                   "extract_s": r["extract_s"], "rerank_s": r["rerank_s"]}
            report["deits"][m] = row
            print(f"{m:<6} {100 * row['global_top1_agreement']:>11.1f}% {100 * row['rerank_top1_agreement']:>11.1f}% "
                  f"{row['min_global_cosine']:>9.5f} {100 * overlap:>10.1f}% {row['max_prob_diff']:>10.2e} "
                  f"{row['extract_s']:>9.1f} {row['rerank_s']:>8.1f}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
