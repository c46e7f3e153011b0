#!/usr/bin/env python3
"""Multi-condition maps: a map of a day and a night drive against a day-only map, on held-out worlds.

For every world seed (held out: never used in training or validation, docs/TRAINING.md section 3.2)
a day map drive and a night map drive are rendered; the day drive is built into the day-only map and
the two maps are merged (`r2former map merge`) into the day + night map (two sessions). Query drives
in other conditions (default dusk, night, fog, rain; lateral offset <= 2 m, yaw jitter <= 15 deg)
are localized against both maps as `r2former eval` does (`Localizer.localize_features`, one
extraction per query, the same candidates for every mode): recall@1 (first ranked map image within
--threshold-m, 25 m, `r2former_core.metrics`), the first ranked image within 5 m, and the published
pose within 5 m, for global retrieval alone (`none`) and R2Former reranking.

On the day + night map the published pose is computed twice from the same reranked candidates: with
the session-aware estimate (each session contributes its own top candidates, `r2former_core.pose`)
and with the session ids hidden (the whole map read as one drive), to show what the session handling
changes.

Rendered drives and built maps are cached in --work (keyed by seed, condition, frames, size, model).

    .venv/bin/python bench/multisession_eval.py --model models/r2former_tiny_demo.safetensors \\
        --out bench/results/multisession_eval.json
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchlib import built_map, drive_source, machine_info, rendered_drive, write_report  # noqa: E402

DEFAULT_SEEDS = "950,951,952"
DEFAULT_QUERIES = "dusk,night,fog,rain"
MAPS = ("day", "day+night", "day+night, sessions hidden")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (any format load_model reads)")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"held-out world seeds (default {DEFAULT_SEEDS})")
    p.add_argument("--queries", default=DEFAULT_QUERIES, help=f"query conditions (default {DEFAULT_QUERIES})")
    p.add_argument("--map-frames", type=int, default=160, help="frames of each map drive (default 160)")
    p.add_argument("--query-frames", type=int, default=60, help="frames of each query drive (default 60)")
    p.add_argument("--spacing", type=float, default=2.5, help="metres between frames (default 2.5)")
    p.add_argument("--top-k", type=int, default=100, help="candidates retrieved and reranked (default 100)")
    p.add_argument("--threshold-m", type=float, default=25.0, help="recall radius in metres (default 25)")
    p.add_argument("--modes", default="none,r2former", help="reranking modes (default none,r2former)")
    p.add_argument("--work", default="runs/multisession", help="cache of rendered drives and maps")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="bench/results/multisession_eval.json", help="JSON report path")
    args = p.parse_args(argv)

    from r2former_core.evaluation import ModeResult
    from r2former_core.localizer import Localizer, LocalizerConfig
    from r2former_core.mapdb import MapDatabase, MapError
    from r2former_core.mapops import merge_maps
    from r2former_core.model import load_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    size = tuple(model.cfg.image_size)
    work = Path(args.work)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    conditions = [c.strip() for c in args.queries.split(",") if c.strip()]
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    t_start = time.time()

    def drive(seed: int, kind: str, cond: str, frames: int) -> Path:
        return rendered_drive(work / f"{kind}_{seed}_{cond}_{frames}_{size[0]}x{size[1]}_sp{args.spacing:g}",
                              seed, kind, cond, frames, size, args.spacing)

    def session_map(seed: int, cond: str) -> Path:
        path = work / f"map_{seed}_{cond}_{model.fingerprint}"
        built_map(model, path, drive(seed, "map", cond, args.map_frames), session_name=cond,
                  conditions=[cond]).close()
        return path

    results: dict[str, dict[str, ModeResult]] = {label: {m: ModeResult() for m in modes} for label in MAPS}
    per_set: dict[str, dict] = {}
    for seed in seeds:
        day, night = session_map(seed, "day"), session_map(seed, "night")
        both_path = work / f"map_{seed}_day+night_{model.fingerprint}"
        try:
            both = MapDatabase.load(both_path, expected_fingerprint=model.fingerprint)
        except MapError:
            both = merge_maps([day, night], both_path, overwrite=True, progress=False)
        assert len(both.info.sessions) == 2
        localizers = {"day": Localizer(model, MapDatabase.load(day), LocalizerConfig(top_k=args.top_k, device="cpu")),
                      "day+night": Localizer(model, both, LocalizerConfig(top_k=args.top_k, device="cpu"))}
        for cond in conditions:
            name = f"{seed}_{cond}"
            res = {label: {m: ModeResult() for m in modes} for label in MAPS}
            for rec in drive_source(drive(seed, "query", cond, args.query_frames)):
                q_global, q_local = localizers["day"].extract(rec.image)
                for label, loc in localizers.items():
                    localize(loc, q_global, q_local, rec.pose, modes, args.threshold_m, res[label],
                             res["day+night, sessions hidden"] if label == "day+night" else None)
            per_set[name] = {label: {m: summarize(r) for m, r in rm.items()} for label, rm in res.items()}
            for label in MAPS:
                for m in modes:
                    results[label][m].extend(res[label][m])
            print(f"{name}: " + "; ".join(
                f"{label} R@1 {100 * per_set[name][label][m]['recall@1']:.1f}% pose<5m "
                f"{100 * per_set[name][label][m]['pose_within_5m']:.1f}%"
                for label in MAPS for m in modes[-1:]), flush=True)

    pooled = {label: {m: summarize(r) for m, r in res.items()} for label, res in results.items()}
    by_condition = {}
    for cond in conditions:
        by_condition[cond] = {}
        for label in MAPS:
            by_condition[cond][label] = {}
            for m in modes:
                rows = [per_set[f"{s}_{cond}"][label][m] for s in seeds]
                n = sum(r["queries"] for r in rows)
                by_condition[cond][label][m] = {k: sum(r[k] * r["queries"] for r in rows) / n
                                                for k in ("recall@1", "top1_within_5m", "pose_within_5m")}
    print_tables(by_condition, pooled, modes)
    report = {"meta": {"machine": machine_info(args.threads), "model": str(args.model),
                       "fingerprint": model.fingerprint, "seeds": seeds,
                       "query_conditions": conditions, "map_sessions": ["day", "night"], "top_k": args.top_k,
                       "threshold_m": args.threshold_m, "size": list(size), "map_frames": args.map_frames,
                       "query_frames": args.query_frames, "spacing_m": args.spacing, "threads": args.threads,
                       "seconds": round(time.time() - t_start, 1)},
              "by_condition": by_condition, "pooled": pooled, "sets": per_set}
    write_report(args.out, report)
    return 0


def localize(loc, q_global: np.ndarray, q_local: np.ndarray, truth: np.ndarray, modes: tuple[str, ...],
             threshold_m: float, out: dict, hidden: dict | None) -> None:
    """One query against one map, every mode on the same candidates (as r2former_core.evaluation does);
    `hidden`: also the pose estimated from the same candidates with the map's session ids hidden."""
    from r2former_core.metrics import first_positive_rank
    from r2former_core.pose import estimate_pose, normalised_scores
    db = loc.map
    t0 = time.perf_counter()
    idx, _ = loc.retrieve(q_global)
    c_local = db.local(idx) if any(m != "none" for m in modes) else None
    shared_ms = (time.perf_counter() - t0) * 1000
    for m in modes:
        t = time.perf_counter()
        result = loc.localize_features(q_global, q_local, rerank=m, retrieved=idx, c_local=c_local,
                                       with_matches=False)
        ranked = np.array([c.index for c in result.candidates])
        targets = [(out[m], result.pose, result.covariance, result.confidence)]
        if hidden is not None:
            s01 = normalised_scores(m, np.array([c.rerank_score for c in result.candidates]))
            est = estimate_pose(db.poses[ranked], s01, db.keyframe_spacing(), loc.config.pose)
            targets.append((hidden[m], est.pose, est.covariance, est.confidence))
        for r, pose, cov, conf in targets:
            r.ms.append(shared_ms + (time.perf_counter() - t) * 1000)
            r.ranks.append(first_positive_rank(ranked, db.poses[:, :2], truth[:2], threshold_m))
            r.errors_m.append(float(np.linalg.norm(db.poses[ranked[0], :2] - truth[:2])))
            r.add_pose(pose, cov, conf, truth)


def summarize(r) -> dict:
    s = r.summary()
    return {"recall@1": s["recall@1"], "recall@5": s["recall@5"], "queries": s["queries"],
            "top1_within_5m": float(np.mean(np.asarray(r.errors_m) <= 5.0)),
            "pose_within_5m": s.get("pose_correct", float("nan")),
            "pose_median_error_m": s.get("pose_median_error_m", float("nan")),
            "inside_95_ellipse": s.get("inside_95_ellipse", float("nan")),
            "mean_confidence": float(np.mean(r.confidences)) if r.confidences else float("nan"),
            "ms_per_query": s["ms_per_query"]}


def print_tables(by_condition: dict, pooled: dict, modes: tuple[str, ...]) -> None:
    for m in modes:
        print(f"\n== rerank {m}: R@1 (25 m) / first image within 5 m / published pose within 5 m")
        print(f"{'queries':<10}" + "".join(f"{label:>30}" for label in MAPS))
        for cond, row in by_condition.items():
            print(f"{cond:<10}" + "".join(
                f"{100 * row[label][m]['recall@1']:>12.1f} /{100 * row[label][m]['top1_within_5m']:>6.1f} /"
                f"{100 * row[label][m]['pose_within_5m']:>6.1f}" for label in MAPS))
        print(f"{'all':<10}" + "".join(
            f"{100 * pooled[label][m]['recall@1']:>12.1f} /{100 * pooled[label][m]['top1_within_5m']:>6.1f} /"
            f"{100 * pooled[label][m]['pose_within_5m']:>6.1f}" for label in MAPS))


if __name__ == "__main__":
    raise SystemExit(main())
