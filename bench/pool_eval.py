"""Pool the hardest sets of several `bench/tracking_eval.py` reports (run side by side, a few worlds each) and
check issue 11's targets on the pooled figures, as tracking_eval does for one report:

    .venv/bin/python bench/pool_eval.py bench/results/tracking_eval_fresh3_a.json \\
        bench/results/tracking_eval_fresh3_b.json [--out pooled.json]

Rates are pooled over frames (calibration over published poses, times per frame over frames); each report's
`hardest_pooled` holds its own sets' figures, so the reports must not share a set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import pool_summaries  # noqa: E402
from tracking_eval import table, targets  # noqa: E402

_PER_FRAME = ("within_5m", "gross_error_rate", "published", "reranked_per_frame", "ms_per_frame",
              "single_ms_per_frame_same_pass")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="tracking_eval.py JSON reports (disjoint sets)")
    p.add_argument("--out", help="write the pooled figures and the targets as JSON here")
    args = p.parse_args(argv)
    reports = [json.loads(Path(r).read_text()) for r in args.reports]
    sets = [name for r in reports for name in r["sets"]]
    if len(set(sets)) != len(sets):
        raise SystemExit(f"the reports share a set: {sorted(sets)}")
    missing = [path for path, r in zip(args.reports, reports) if "hardest_pooled" not in r]
    if missing:
        raise SystemExit(f"no hardest sets in {', '.join(missing)}")
    runs = list(reports[0]["hardest_pooled"])
    pooled = {run: pool_summaries([r["hardest_pooled"][run] for r in reports], _PER_FRAME) for run in runs}
    result = {"sets": sets, "pooled": pooled, "targets": targets(pooled)}
    print(f"== pooled over {len(sets)} sets: {', '.join(sets)}")
    print(table(pooled))
    print("\ntargets (tracking/kidnap vs single):")
    for name, t in result["targets"].items():
        print(f"  {name:<56} {t['value']:<28} {'met' if t['met'] else 'NOT met'}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
