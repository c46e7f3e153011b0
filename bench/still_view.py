#!/usr/bin/env python3
"""How much a view changes when the robot stands still, and when it moves a little: the threshold of the
tracker's `still_view_change` (docs/TRACKING.md, "Standing still").

For places along each world's query drive it renders, with the model's global descriptor (L2-normalised),
the change 1 - cosine between

* **standing**: the same pose rendered again `--still-seconds` later: fresh sensor noise, the traffic moved
  on (what a parked robot's camera sends);
* **moving**: the pose and the pose `d` metres further along the drive (same time, fresh noise) for every
  `d` of `--distances`; and turned in place by the angles of `--turns`.

It prints the percentiles of each and writes them to JSON. A threshold separates the two when it lies above
the standing changes and below the moving ones at the smallest distance the filter needs to see (its
`position_std`, 1 m by default). The figures are the model's: the official DeiT-S checkpoint or a model of
your own gives its own, so run this with `--model` before changing the default.

    .venv/bin/python bench/still_view.py --model models/r2former_tiny_demo.safetensors \\
        --out bench/results/still_view.json
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_info, write_report  # noqa: E402

PERCENTILES = (0, 1, 5, 50, 95, 99, 100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (any format load_model reads)")
    p.add_argument("--worlds", default="900,901,953",
                   help="synthetic world seeds, comma separated (default 900,901,953: validation worlds)")
    p.add_argument("--conditions", default="day,night+fog",
                   help="conditions of the renders, comma separated, each joined by + (default day,night+fog)")
    p.add_argument("--places", type=int, default=24, help="places per world and condition (default 24)")
    p.add_argument("--distances", default="0.25,0.5,1,2",
                   help="metres moved along the drive, comma separated (default 0.25,0.5,1,2)")
    p.add_argument("--turns", default="2,5", help="degrees turned in place, comma separated (default 2,5)")
    p.add_argument("--still-seconds", default="0.1,1,5",
                   help="seconds between the two renders of a standing robot, comma separated (default 0.1,1,5)")
    p.add_argument("--size", default="256x320", help="rendered image size HxW (default 256x320, as the demo)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="bench/results/still_view.json", help="JSON report path")
    args = p.parse_args(argv)

    from r2former_core.features import extract_arrays
    from r2former_core.model import load_model
    from r2former_core.synthetic import LANE, SyntheticWorld, parse_conditions

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    size = tuple(int(v) for v in args.size.split("x"))
    distances = [float(v) for v in args.distances.split(",")]
    turns = [float(v) for v in args.turns.split(",")]
    waits = [float(v) for v in args.still_seconds.split(",")]
    changes: dict[str, list[float]] = {}

    def desc(images: list[np.ndarray]) -> np.ndarray:
        return extract_arrays(model, images, local=False).global_desc

    jobs = [(int(w), c) for w in args.worlds.split(",") for c in args.conditions.split(",")]
    for seed, cond in tqdm(jobs, desc="worlds x conditions", unit="set", disable=None):
        world = SyntheticWorld(seed)
        conditions = parse_conditions(cond.replace("+", ","))
        rng = np.random.default_rng(seed)
        starts = rng.uniform(0, world.route_length, args.places)
        for k, s0 in enumerate(starts):
            # the right lane from s0 on, 0.05 m steps: index i is i * 0.05 m further along
            step = 0.05
            pos, tan = world.route.at(s0 + step * np.arange(int(round(max(distances) / step)) + 1))
            xy = pos + LANE * np.stack([-tan[:, 1], tan[:, 0]], 1)
            yaw = np.arctan2(tan[:, 1], tan[:, 0])
            t0 = float(k * 7.0)

            def render(i: int, t: float, dyaw: float = 0.0, noise: int = 0, world=world, conditions=conditions,
                       xy=xy, yaw=yaw, key=(seed, k)) -> np.ndarray:
                return world.render(xy[i, 0], xy[i, 1], yaw[i] + math.radians(dyaw), conditions, size,
                                    rng=np.random.default_rng([*key, noise, int(t * 1000)]),
                                    movers=world.traffic("query", conditions, t))

            images = [render(0, t0)]
            names = []
            for w in waits:
                images.append(render(0, t0 + w, noise=1))
                names.append(f"standing {w:g} s")
            for d in distances:
                images.append(render(int(round(d / step)), t0, noise=2))
                names.append(f"moved {d:g} m")
            for a in turns:
                images.append(render(0, t0, dyaw=a, noise=3))
                names.append(f"turned {a:g} deg")
            g = desc(images)
            for name, other in zip(names, g[1:]):
                changes.setdefault(f"{cond}: {name}", []).append(float(1.0 - g[0] @ other))

    table = {name: {f"p{q}": float(np.percentile(v, q)) for q in PERCENTILES} | {"n": len(v)}
             for name, v in changes.items()}
    print(f"\n1 - cosine of the global descriptors ({args.model}, {size[0]}x{size[1]})")
    print(f"{'pair':<34}" + "".join(f"{'p' + str(q):>10}" for q in PERCENTILES))
    for name, row in table.items():
        print(f"{name:<34}" + "".join(f"{row['p' + str(q)]:>10.5f}" for q in PERCENTILES))
    write_report(args.out, {"changes": table, "meta": {
        "machine": machine_info(torch.get_num_threads()), "model": args.model, "size": list(size),
        "worlds": args.worlds, "conditions": args.conditions, "places": args.places}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
