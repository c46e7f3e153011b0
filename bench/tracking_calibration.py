"""Where the tracker's published covariance is honest and where it cannot be (issue 11: 90-98 % of the errors
inside the 95 % ellipse), on the validation score tables of bench/tracking_filters.py.

For every published pose of the tracker (defaults of TrackingConfig) on each query set, played in time order
and with a kidnap (second half first), with and without odometry: the error, its Mahalanobis distance under
the published covariance, the confidence, and the error and the published variance along the pose's heading
(along the map's drive) and across it. Reported:

* calibration world by world: inside the 90-98 % band, too wide (> 98 %), too narrow (< 90 %);
* the published poses outside their ellipse, by error: > 25 m (a wrong place), 5-25 m, < 5 m;
* the poses at the right place (error <= 25 m): how many lie inside, the 95th percentile of their squared
  Mahalanobis distance (5.99 if the covariance described them exactly), the mean squared error and mean
  published variance along and across the drive, and each world's mean cross-track error (the query drive's
  lateral offset from the map drive, which no single frame or filter observes);
* the confidence the tracker published against the fraction of those poses that were > 25 m off.

    .venv/bin/python bench/tracking_calibration.py --model models/r2former_tiny_demo.safetensors \\
        --sets night+fog-validation --out bench/results/tracking_calibration.json

Score tables are read from (or written to) --work as bench/tracking_filters.py does.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine_info, write_report  # noqa: E402
from tracking_filters import (  # noqa: E402
    NIGHT_FOG_WORLDS,
    PLAIN_ORDERS,
    STRESS_ORDERS,
    VARIANTS,
    TableLocalizer,
    Variant,
    odometry_in_play_order,
    play,
    play_times,
    score_table,
)

from r2former_core.data.poses import yaw_from_quat  # noqa: E402
from r2former_core.evaluation import CHI2_2D_95, GROSS_M  # noqa: E402
from r2former_core.options import TrackingConfig  # noqa: E402

CONFIDENCE_BINS = (0.90, 0.93, 0.95, 0.97, 0.99, 1.0001)


def published_poses(table: dict, order: np.ndarray, odometry: np.ndarray | None, variant: Variant,
                    dt: np.ndarray | None = None) -> list[dict]:
    """One record per published pose of the tracker (a variant of bench/tracking_filters.py) on a score table,
    the frames played in `order`, `dt` seconds apart (None: 0.1 s)."""
    loc = TableLocalizer(table)
    cfg = TrackingConfig(**variant.config)
    belief = variant.belief(loc.map.poses, loc.map.keyframe_spacing(), cfg) if variant.belief else None
    tracker = variant.tracker(loc, cfg, belief=belief)
    stamps = table["stamps"][0] + play_times(len(order), dt)
    out = []
    for k, i in enumerate(order):
        r = tracker.step(stamps[k], features=(np.array([i]), None),
                         odom_pose=None if odometry is None else odometry[k], with_matches=False)
        if not r.accepted:
            continue
        e = r.pose[:2] - table["query_poses"][i][:2]
        cov = r.covariance[:2, :2]
        yaw = float(yaw_from_quat(r.pose[3:]))
        along, across = np.array([np.cos(yaw), np.sin(yaw)]), np.array([-np.sin(yaw), np.cos(yaw)])
        out.append({"error": float(np.linalg.norm(e)), "m2": float(e @ np.linalg.solve(cov, e)),
                    "confidence": r.confidence, "along": float(e @ along), "across": float(e @ across),
                    "var_along": float(along @ cov @ along), "var_across": float(across @ cov @ across)})
    return out


def summarise(records: dict[str, list[dict]]) -> dict:
    """Figures over the records of several worlds (world -> its published poses)."""
    every = [r for recs in records.values() for r in recs]
    inside = np.array([r["m2"] <= CHI2_2D_95 for r in every])
    err = np.array([r["error"] for r in every])
    worlds = {w: float(np.mean([r["m2"] <= CHI2_2D_95 for r in recs])) for w, recs in records.items() if recs}
    right = [r for r in every if r["error"] <= GROSS_M]
    m2_right = np.array([r["m2"] for r in right])
    conf = np.array([r["confidence"] for r in every])
    bins = []
    for lo, hi in zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:]):
        sel = (conf >= lo) & (conf < hi)
        bins.append({"confidence": [lo, min(hi, 1.0)], "published": int(sel.sum()),
                     "gross": int((sel & (err > GROSS_M)).sum())})
    return {
        "published": len(every),
        "calibration": float(inside.mean()) if len(every) else None,
        "worlds": len(worlds),
        "worlds_in_band": sum(0.90 <= v <= 0.98 for v in worlds.values()),
        "worlds_too_wide": sum(v > 0.98 for v in worlds.values()),
        "worlds_too_narrow": sum(v < 0.90 for v in worlds.values()),
        "calibration_by_world": worlds,
        "outside_by_error": {"> 25 m": int((~inside & (err > GROSS_M)).sum()),
                             "5-25 m": int((~inside & (err > 5) & (err <= GROSS_M)).sum()),
                             "< 5 m": int((~inside & (err <= 5)).sum())},
        "right_place": {
            "published": len(right),
            "inside": float(np.mean(m2_right <= CHI2_2D_95)) if len(right) else None,
            "m2_p95": float(np.percentile(m2_right, 95)) if len(right) else None,
            "along_mean_sq_error": float(np.mean([r["along"] ** 2 for r in right])) if right else None,
            "along_mean_variance": float(np.mean([r["var_along"] for r in right])) if right else None,
            "across_mean_sq_error": float(np.mean([r["across"] ** 2 for r in right])) if right else None,
            "across_mean_variance": float(np.mean([r["var_across"] for r in right])) if right else None,
            "lateral_offset_by_world": {w: float(np.mean([r["across"] for r in recs if r["error"] <= GROSS_M]))
                                        for w, recs in records.items()
                                        if any(r["error"] <= GROSS_M for r in recs)}},
        "confidence_bins": bins,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (any format load_model reads)")
    p.add_argument("--sets", default="night+fog-validation",
                   help="query sets SEED:CONDITIONS, comma separated, or night+fog-validation (the 20 validation "
                        "worlds of bench/tracking_filters.py at night in fog) (default night+fog-validation)")
    p.add_argument("--orders", default="drive,kidnap", help="play orders as in bench/tracking_filters.py; "
                                                            "'calibration' = its third round's 10 plays "
                                                            "(default drive,kidnap)")
    p.add_argument("--variant", default="defaults", choices=list(VARIANTS),
                   help="the tracker: defaults or a variant of bench/tracking_filters.py (default defaults)")
    p.add_argument("--size", default="256x320", help="rendered image size HxW (default 256x320)")
    p.add_argument("--map-frames", type=int, default=210, help="frames of the map drive (default 210)")
    p.add_argument("--query-frames", type=int, default=160, help="frames of each query drive (default 160)")
    p.add_argument("--work", default="runs/tracking", help="drives, maps and score tables (default runs/tracking)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; only for missing tables)")
    p.add_argument("--out", default="bench/results/tracking_calibration.json", help="JSON report path")
    args = p.parse_args(argv)
    sets = ",".join(f"{w}:night+fog" for w in NIGHT_FOG_WORLDS) if args.sets == "night+fog-validation" else args.sets

    from r2former_core.model import load_model
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    size = tuple(int(v) for v in args.size.split("x"))
    variant = VARIANTS[args.variant]
    orders = f"{PLAIN_ORDERS},{STRESS_ORDERS}" if args.orders == "calibration" else args.orders
    runs = [f"{o}{suffix}" for o in orders.split(",") for suffix in ("", "/odometry")]
    records: dict[str, dict[str, list[dict]]] = {r: {} for r in runs}
    for item in tqdm(sets.split(","), desc="sets", unit="set", disable=None):
        seed, cond = item.split(":")
        table = dict(np.load(score_table(model, int(seed), cond, Path(args.work), size, args.map_frames,
                                         args.query_frames)))
        for name in runs:
            order, dt = play(name.split("/")[0], len(table["stamps"]))
            odom = odometry_in_play_order(table["query_poses"], order, int(seed)) if name.endswith("odometry") \
                else None
            records[name][item] = published_poses(table, order, odom, variant, dt)
    report = {"runs": {name: summarise(recs) for name, recs in records.items()},
              "all": summarise({f"{w}/{name}": recs for name, by_world in records.items()
                                for w, recs in by_world.items()}),
              "meta": {"machine": machine_info(args.threads), "model": args.model, "sets": sets,
                       "variant": args.variant, "orders": orders}}
    for name, s in {**report["runs"], "all runs": report["all"]}.items():
        rp = s["right_place"]
        print(f"\n== {name}: {s['published']} published, {100 * (s['calibration'] or 0):.1f} % inside the 95 % "
              f"ellipse; worlds in the 90-98 % band {s['worlds_in_band']}/{s['worlds']}, too wide "
              f"{s['worlds_too_wide']}, too narrow {s['worlds_too_narrow']}")
        print(f"   outside, by error: {s['outside_by_error']}")
        if rp["published"]:
            print(f"   at the right place (<= {GROSS_M:g} m): {rp['published']}, {100 * rp['inside']:.1f} % inside, "
                  f"m2 p95 {rp['m2_p95']:.2f} (exact: {CHI2_2D_95}); along the drive: mean error^2 "
                  f"{rp['along_mean_sq_error']:.2f} m^2, published variance {rp['along_mean_variance']:.2f}; across: "
                  f"{rp['across_mean_sq_error']:.2f} vs {rp['across_mean_variance']:.2f}")
            if name != "all runs":
                print("   lateral offset by world (m): " + " ".join(
                    f"{w.split(':')[0]}:{v:+.1f}" for w, v in rp["lateral_offset_by_world"].items()))
        bins = [f"[{b['confidence'][0]:.2f}, {b['confidence'][1]:.2f}) {b['published']}, {b['gross']}"
                + (f" ({100 * b['gross'] / b['published']:.1f} %)" if b["published"] else "")
                for b in s["confidence_bins"]]
        print("   confidence -> published, > 25 m off: " + "; ".join(bins))
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
