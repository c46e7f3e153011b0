"""Tracking against single-frame localization on held-out synthetic worlds (issue 11, docs/TRACKING.md).

Per query set SEED:CONDITIONS: a map drive by day once around the loop (210 frames) and a query drive in the
given conditions (160 frames, 10 Hz) are rendered at --size, the map is built with the model, and the query
drive is played as one sequence through the real pipeline (`r2former_core.evaluation.evaluate_sequence`, the
code of `r2former eval --sequence`): every frame localized on its own ("single", published when accepted) and
by the tracker ("tracking"), four ways:

* drive            the drive in time order, no odometry (the filter estimates the speed)
* kidnap           the second half played first: at the middle the robot is carried back to the start
* .../odometry     the same with noisy wheel odometry (r2former_core.odometry, seeded by the world seed);
                   across the kidnap the odometry shows no motion (the robot was carried)

Each frame's features are extracted once and shared. In every run single frames and the tracker run frame by
frame interleaved, so each run's ms per frame has a single-frame reference timed in the same pass
(`single_ms_per_frame_same_pass`; on a shared machine only such ratios mean something); the single-frame
accuracy is that of the first pass (it does not depend on the order).
Scores are over ALL frames: within_5m (published pose within 5 m and 20 deg; no pose = miss),
gross_error_rate (> 25 m), calibration (published poses inside their 95 % ellipse), reranked and ms per frame.

    .venv/bin/python bench/tracking_eval.py --model models/r2former_tiny_demo.safetensors \\
        --out bench/results/tracking_eval.json

Default sets: the held-out worlds 950-952 (never used in training or validation; docs/TRAINING.md) in every
condition, the hardest (night and fog, map by day) on all three, and the issue's reference sequence (world 7,
the demo's world, also never used in training). The tracker's parameters were chosen on other worlds
(bench/tracking_filters.py). Rendered drives and maps are kept in --work and reused.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import built_map, drive_source, machine_info, odometry_in_play_order, tracking_drive, write_report  # noqa: E402

from r2former_core.evaluation import SequenceFrame, SequenceResult, evaluate_sequence, plot_sequence  # noqa: E402
from r2former_core.options import TrackingConfig  # noqa: E402

HARDEST = "night+fog"
DEFAULT_SETS = ("950:night+fog,951:night+fog,952:night+fog,7:night+fog,"
                "950:dusk,950:night,951:fog,951:rain,952:winter,952:autumn")
RUNS = ("drive", "kidnap", "drive/odometry", "kidnap/odometry")


def pooled(results: list[SequenceResult]) -> SequenceResult:
    out = SequenceResult()
    for r in results:
        for name in ("names", "stamps", "errors_m", "yaw_errors_deg", "published", "mahalanobis2", "ms", "reranked",
                     "states"):
            getattr(out, name).extend(getattr(r, name))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (any format load_model reads)")
    p.add_argument("--sets", default=DEFAULT_SETS,
                   help=f"query sets SEED:CONDITIONS (conditions joined by +), comma separated "
                        f"(default {DEFAULT_SETS})")
    p.add_argument("--size", default="256x320", help="rendered image size HxW (default 256x320, as make demo)")
    p.add_argument("--map-frames", type=int, default=210, help="frames of the map drive, once around (default 210)")
    p.add_argument("--query-frames", type=int, default=160, help="frames of each query drive (default 160)")
    p.add_argument("--top-k", type=int, default=100, help="candidates retrieved (and reranked by single) (default 100)")
    p.add_argument("--work", default="runs/tracking", help="drives and maps (default runs/tracking)")
    p.add_argument("--plots", default="bench/results/tracking_eval",
                   help="folder for the error-over-frames plots of the hardest sets "
                        "(default bench/results/tracking_eval)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default="bench/results/tracking_eval.json", help="JSON report path")
    args = p.parse_args(argv)

    from r2former_core.localizer import Localizer, LocalizerConfig
    from r2former_core.model import load_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    size = tuple(int(v) for v in args.size.split("x"))
    tag = f"{size[0]}x{size[1]}"
    work, plots = Path(args.work), Path(args.plots)
    work.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    cfg = TrackingConfig()
    t_start = time.time()

    report: dict = {"sets": {}, "meta": {
        "model": args.model, "fingerprint": model.fingerprint, "size": list(size), "map_frames": args.map_frames,
        "query_frames": args.query_frames, "top_k": args.top_k, "tracking_config": asdict(cfg),
        "machine": machine_info(args.threads), "threads": args.threads,
        "load_average_start": os.getloadavg()[0]}}
    hardest: dict[str, list[SequenceResult]] = {}    # run -> results of the hardest held-out sets
    hardest_paired: dict[str, list[float]] = {}       # run -> single-frame ms of the same passes
    for item in args.sets.split(","):
        seed_text, cond = item.split(":")
        seed = int(seed_text)
        mdir = tracking_drive(work, seed, "map", "day", args.map_frames, size)
        mapdb = built_map(model, work / f"map_{seed}_{args.map_frames}_{tag}_{model.fingerprint}", mdir)
        qdir = tracking_drive(work, seed, "query", cond, args.query_frames, size)
        localizer = Localizer(model, mapdb, LocalizerConfig(top_k=args.top_k, device="cpu"))
        frames = []
        for rec in drive_source(qdir):
            t = time.perf_counter()
            features = localizer.extract(rec.image)
            frames.append(SequenceFrame(rec.name, rec.stamp, rec.pose, features=features,
                                        extract_ms=(time.perf_counter() - t) * 1000))
        n = len(frames)
        truth = np.array([f.truth for f in frames])
        orders = {"drive": np.arange(n), "kidnap": np.r_[np.arange(n // 2, n), np.arange(n // 2)]}
        results: dict[str, SequenceResult] = {}
        paired_single_ms: dict[str, list[float]] = {}
        for run in RUNS:
            order = orders[run.split("/")[0]]
            odom = odometry_in_play_order(truth, order, seed) if run.endswith("odometry") else None
            played = [SequenceFrame(frames[i].name, frames[0].stamp + 0.1 * k, frames[i].truth,
                                    features=frames[i].features, extract_ms=frames[i].extract_ms,
                                    odom_pose=None if odom is None else odom[k]) for k, i in enumerate(order)]
            # single frames run in every pass, frame by frame interleaved with the tracker, so that each run's
            # ms per frame has a same-pass reference on a shared machine (accuracy: the first pass's)
            out = evaluate_sequence(localizer, played, modes=("single", "tracking"), tracking=cfg, progress=False)
            if run == "drive":
                results["single"] = out["single"]
            results[f"tracking/{run}"] = out["tracking"]
            paired_single_ms[f"tracking/{run}"] = out["single"].ms
        report["sets"][item] = {k: r.summary() for k, r in results.items()}
        for k, ms in paired_single_ms.items():
            report["sets"][item][k]["single_ms_per_frame_same_pass"] = float(np.mean(ms))
        if cond == HARDEST:
            if seed != 7:                          # the reference world is reported on its own
                for k, r in results.items():
                    hardest.setdefault(k, []).append(r)
                for k, ms in paired_single_ms.items():
                    hardest_paired.setdefault(k, []).extend(ms)
            single_kidnap = SequenceResult()       # single-frame results do not depend on the order
            for i in orders["kidnap"]:
                for name in ("names", "stamps", "errors_m", "yaw_errors_deg", "published", "mahalanobis2", "ms",
                             "reranked", "states"):
                    getattr(single_kidnap, name).append(getattr(results["single"], name)[i])
            for run in ("kidnap", "kidnap/odometry"):
                plot_sequence({"single": single_kidnap, "tracking": results[f"tracking/{run}"]},
                              plots / f"{seed}_{cond}_{run.replace('/', '_')}.png",
                              title=f"world {seed}, {cond.replace('+', ' and ')}, map by day: {run} "
                                    f"(second half played first)")
        print(f"\n== {item} ({n} frames, map of {len(mapdb)})")
        print(table(report["sets"][item]))

    if hardest:
        held_out = {k: pooled(v) for k, v in hardest.items()}
        report["hardest_pooled"] = {k: r.summary() for k, r in held_out.items()}
        for k, ms in hardest_paired.items():
            report["hardest_pooled"][k]["single_ms_per_frame_same_pass"] = float(np.mean(ms))
        report["targets"] = targets(report["hardest_pooled"])
        print(f"\n== {HARDEST}, held-out worlds pooled")
        print(table(report["hardest_pooled"]))
        print("\ntargets (tracking/kidnap vs single):")
        for name, t in report["targets"].items():
            print(f"  {name:<48} {t['value']:<28} {'met' if t['met'] else 'NOT met'}")
    report["meta"]["seconds"] = round(time.time() - t_start, 1)
    report["meta"]["load_average_end"] = os.getloadavg()[0]
    write_report(args.out, report)
    print(f"plots in {plots}")
    return 0


def table(rows: dict[str, dict]) -> str:
    lines = [f"{'run':<26} {'within 5 m':>10} {'> 25 m':>7} {'published':>9} {'in 95%':>7} {'reranked':>9} "
             f"{'ms/frame':>9} {'x single':>9}"]
    for name, s in rows.items():
        cal = "-" if s["calibration"] is None else f"{100 * s['calibration']:.1f}%"
        ratio = s["ms_per_frame"] / s.get("single_ms_per_frame_same_pass", s["ms_per_frame"])
        lines.append(f"{name:<26} {100 * s['within_5m']:>9.1f}% {100 * s['gross_error_rate']:>6.1f}% "
                     f"{100 * s['published']:>8.1f}% {cal:>7} {s['reranked_per_frame']:>9.1f} "
                     f"{s['ms_per_frame']:>9.1f} {ratio:>9.2f}")
    return "\n".join(lines)


def targets(s: dict[str, dict]) -> dict[str, dict]:
    """Issue 11's targets on the hardest sets with a kidnap (tracking/kidnap against single)."""
    single, kid, odo = s["single"], s["tracking/kidnap"], s["tracking/kidnap/odometry"]
    cal = kid["calibration"] or 0.0
    return {
        "within_5m >= single + 0.15 (or >= 0.95)": {
            "value": f"{kid['within_5m']:.3f} vs {single['within_5m']:.3f}",
            "met": kid["within_5m"] >= min(single["within_5m"] + 0.15, 0.95)},
        "gross errors <= 1/4 of single's": {
            "value": f"{kid['gross_error_rate']:.3f} vs {single['gross_error_rate']:.3f}",
            "met": kid["gross_error_rate"] <= single["gross_error_rate"] / 4},
        "reranked per frame <= 1/2 of single's": {
            "value": f"{kid['reranked_per_frame']:.1f} vs {single['reranked_per_frame']:.1f}",
            "met": kid["reranked_per_frame"] <= single["reranked_per_frame"] / 2},
        "ms per frame not higher (single timed in the same pass)": {
            "value": f"{kid['ms_per_frame']:.1f} vs {kid['single_ms_per_frame_same_pass']:.1f}",
            "met": kid["ms_per_frame"] <= kid["single_ms_per_frame_same_pass"]},
        "calibration 90-98 % inside the 95 % ellipse": {"value": f"{cal:.3f}", "met": 0.90 <= cal <= 0.98},
        "with odometry better still (within 5 m up, gross not up)": {
            "value": f"{odo['within_5m']:.3f} / {odo['gross_error_rate']:.3f} vs "
                     f"{kid['within_5m']:.3f} / {kid['gross_error_rate']:.3f}",
            "met": odo["within_5m"] >= kid["within_5m"] and odo["gross_error_rate"] <= kid["gross_error_rate"]},
    }


if __name__ == "__main__":
    raise SystemExit(main())
