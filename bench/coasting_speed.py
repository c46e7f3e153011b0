#!/usr/bin/env python3
"""Time per frame of the tracker on a slow robot with odometry, coasting on (`update_spacing` 0.75: frames the
odometry says are too near the last used one skip the network and the reranking) against every frame used
(`update_spacing` 0), the same frames in the same run, images given as the node gives them (`Tracker.step`
with the image: extraction included).

    .venv/bin/python bench/coasting_speed.py --model models/r2former_tiny_demo.safetensors \
        --out bench/results/coasting_speed.json

A synthetic world's day map (210 images) and a night-and-fog drive 0.3 m between frames (1.5 m/s at 5 Hz) with
noisy wheel odometry (`r2former_core.odometry`), rendered into --work (reused). Prints a table and writes JSON:
ms per frame (mean, median), frames that ran the network, candidates reranked per frame, and the ratio."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import built_map, drive_source, machine_info, rendered_drive, write_report  # noqa: E402

from r2former_core.localizer import Localizer  # noqa: E402
from r2former_core.model import load_model  # noqa: E402
from r2former_core.odometry import simulate_odometry  # noqa: E402
from r2former_core.options import LocalizerConfig, TrackingConfig  # noqa: E402
from r2former_core.tracking import Tracker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (any format load_model reads)")
    p.add_argument("--seed", type=int, default=900, help="synthetic world (default 900, a validation world)")
    p.add_argument("--frames", type=int, default=200, help="query frames played, 0.3 m apart (default 200)")
    p.add_argument("--size", default="256x320", help="rendered image size HxW (default 256x320)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--work", default="runs/coasting", help="drives and map (default runs/coasting)")
    p.add_argument("--out", default="bench/results/coasting_speed.json", help="JSON report path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.split("x"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    mdir = rendered_drive(work / f"map_{args.seed}", args.seed, "map", "day", 210, size)
    qdir = rendered_drive(work / f"query_{args.seed}_{args.frames}", args.seed, "query", "night,fog", args.frames,
                          size, spacing=0.3)
    mapdb = built_map(model, work / f"map_{args.seed}_{model.fingerprint}", mdir)
    frames = list(drive_source(qdir))
    odometry = simulate_odometry(np.array([f.pose for f in frames]), args.seed)
    localizer = Localizer(model, mapdb, LocalizerConfig(device="cpu"))
    localizer.extract(frames[0].image)                                          # warm-up
    runs = {"coasting (update_spacing 0.75)": TrackingConfig(),
            "every frame (update_spacing 0)": TrackingConfig(update_spacing=0.0)}
    trackers = {name: Tracker(localizer, cfg) for name, cfg in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    network: dict[str, int] = {name: 0 for name in runs}
    reranked: dict[str, list[int]] = {name: [] for name in runs}
    for k, f in enumerate(frames):            # both trackers frame by frame, interleaved: the same machine state
        for name, tracker in trackers.items():
            t = time.perf_counter()
            r = tracker.step(0.2 * k, f.image, odom_pose=odometry[k], with_matches=False)
            times[name].append((time.perf_counter() - t) * 1000)
            network[name] += int("extract" in r.timings_ms)
            reranked[name].append(r.reranked)
    base = "every frame (update_spacing 0)"
    report = {"meta": {"machine": machine_info(args.threads), "model": args.model, "seed": args.seed,
                       "frames": len(frames), "spacing_m": 0.3, "frame_interval_s": 0.2, "map": len(mapdb)},
              "runs": {name: {"ms_per_frame": float(np.mean(times[name])),
                              "ms_per_frame_median": float(np.median(times[name])),
                              "network_frames": network[name], "reranked_per_frame": float(np.mean(reranked[name])),
                              "x_every_frame": float(np.mean(times[name]) / np.mean(times[base]))}
                       for name in runs}}
    print(f"{'run':<34} {'ms/frame':>9} {'median':>7} {'network':>8} {'reranked':>9} {'x every frame':>14}")
    for name, r in report["runs"].items():
        print(f"{name:<34} {r['ms_per_frame']:>9.1f} {r['ms_per_frame_median']:>7.1f} "
              f"{r['network_frames']:>4}/{len(frames):<3} {r['reranked_per_frame']:>9.1f} {r['x_every_frame']:>14.2f}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
