#!/usr/bin/env python3
"""Pool the plays of one or more `bench/tracking_filters.py` reports over their worlds, frame-weighted.

    .venv/bin/python bench/pool_plays.py bench/results/tracking_filters_ground_long_a.json \
        bench/results/tracking_filters_ground_long_b.json
    .venv/bin/python bench/pool_plays.py --by group bench/results/tracking_filters_round4_a.json \
        bench/results/tracking_filters_round4_b.json

`--by run` (default): one row per run as the report names it (filter/play[/odometry]). `--by group`: one row per
filter, with or without odometry, and group of plays: plain (drive, kidnap, kidnap@F), stress (speed suffixes
~slow and ~wave, kidnaps:K) and stops (~stops). Columns: frames, within 5 m and > 25 m (of all frames), inside the
95 % ellipse (of the published poses), published, candidates reranked per frame and, per run, frames taken for
standing and coasted (per 100 frames); per group, the share of plays with 90-98 % inside the ellipse."""
from __future__ import annotations

import argparse
import collections
import json
import sys


def group_of(play: str) -> str:
    if "~stops" in play:
        return "stops"
    if "~" in play or play.startswith("kidnaps"):
        return "stress"
    return "plain"


def pool(paths: list[str], by: str) -> dict[tuple[str, ...], collections.Counter]:
    acc: dict[tuple[str, ...], collections.Counter] = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for runs in report["sets"].values():
            for name, r in runs.items():
                if by == "run":
                    key: tuple[str, ...] = (name,)
                else:
                    parts = name.split("/")
                    odo = parts[-1] == "odometry"
                    parts = parts[:-1] if odo else parts
                    key = ("/".join(parts[:-1]), "odometry" if odo else "", group_of(parts[-1]))
                a = acc.setdefault(key, collections.Counter())
                n = r["frames"]
                published = r["published"] * n
                a["frames"] += n
                a["within"] += r["within_5m"] * n
                a["gross"] += r["gross_error_rate"] * n
                a["published"] += published
                a["inside"] += (r["calibration"] or 0.0) * published
                a["reranked"] += r["reranked_per_frame"] * n
                a["still"] += r.get("standing_still", 0)
                a["coasted"] += r.get("coasted_frames", 0)
                a["plays"] += 1
                c = r["calibration"]
                a["in_band"] += int(c is not None and 0.90 <= c <= 0.98)
    return acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="JSON reports of bench/tracking_filters.py (their worlds are pooled)")
    p.add_argument("--by", choices=("run", "group"), default="run",
                   help="one row per run (default) or per filter, odometry and group of plays")
    args = p.parse_args(argv)
    acc = pool(args.reports, args.by)
    head = "run" if args.by == "run" else "filter | odometry | plays"
    last = "standing / coasted per 100" if args.by == "run" else "plays in 90-98 %"
    print(f"| {head} | frames | within 5 m | > 25 m | in 95 % ellipse | published | reranked | {last} |")
    print("|---|---|---|---|---|---|---|---|")
    for key, a in acc.items():
        n = a["frames"]
        inside = 100 * a["inside"] / a["published"] if a["published"] else float("nan")
        tail = (f"{100 * a['still'] / n:.1f} / {100 * a['coasted'] / n:.1f}" if args.by == "run"
                else f"{100 * a['in_band'] / a['plays']:.0f} %")
        print(f"| {' | '.join(key)} | {n} | {100 * a['within'] / n:.1f} % | {100 * a['gross'] / n:.1f} % | "
              f"{inside:.1f} % | {100 * a['published'] / n:.1f} % | {a['reranked'] / n:.1f} | {tail} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
