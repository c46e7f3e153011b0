#!/usr/bin/env python3
"""Synthetic world speed: images/s at 480x640 on ONE thread (one CPU core), per condition set.

Renders a query drive (traffic included, as `SyntheticWorld.drive` does) for each condition set and reports
wall-clock and CPU-time rates; the process is pinned to one core and OpenCV/BLAS use one thread. On a shared
machine the wall-clock rate drops when other jobs compete for the core; the CPU-time rate is less affected.
Prints a table and writes JSON.

    python bench/synthetic_speed.py [--frames 60] [--seed 0] [--out bench/results/synthetic_speed.json]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchlib import machine_info, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONDITION_SETS = [("day",), ("dusk",), ("night",), ("winter",), ("autumn",), ("fog",), ("rain",),
                  ("night", "rain"), ("dusk", "winter", "fog")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=60, help="images per condition set (default 60)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "synthetic_speed.json"))
    args = p.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2
    cv2.setNumThreads(1)
    sys.path.insert(0, str(ROOT))
    from r2former_core.synthetic import SyntheticWorld

    t0 = time.perf_counter()
    world = SyntheticWorld(args.seed)
    init_s = time.perf_counter() - t0
    size = (args.height, args.width)
    next(iter(world.drive("query", ("day",), 2, size)))                  # warm-up (caches, allocator)
    rows = []
    for cond in CONDITION_SETS:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        n = sum(1 for _ in world.drive("query", cond, args.frames, size))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        rows.append({"conditions": ",".join(cond), "frames": n, "images_per_s_wall": n / wall,
                     "images_per_s_cpu": n / cpu, "ms_per_image_wall": wall * 1000 / n})
    total = sum(r["frames"] for r in rows)
    overall_wall = total / sum(r["frames"] / r["images_per_s_wall"] for r in rows)
    overall_cpu = total / sum(r["frames"] / r["images_per_s_cpu"] for r in rows)

    width = max(len(r["conditions"]) for r in rows)
    print(f"synthetic world seed {args.seed}: init {init_s:.2f} s, route {world.route_length:.0f} m, "
          f"{size[0]}x{size[1]}, 1 thread")
    print(f"{'conditions':<{width}}  {'img/s wall':>10}  {'img/s cpu':>9}  {'ms/img':>7}")
    for r in rows:
        print(f"{r['conditions']:<{width}}  {r['images_per_s_wall']:>10.1f}  {r['images_per_s_cpu']:>9.1f}  "
              f"{r['ms_per_image_wall']:>7.1f}")
    print(f"{'all':<{width}}  {overall_wall:>10.1f}  {overall_cpu:>9.1f}  {1000 / overall_wall:>7.1f}")

    result = {"benchmark": "synthetic_speed", "size": list(size), "threads": 1, "seed": args.seed,
              "world_init_s": init_s, "route_length_m": world.route_length, "per_conditions": rows,
              "overall_images_per_s_wall": overall_wall, "overall_images_per_s_cpu": overall_cpu,
              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "machine": machine_info(1)}
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
