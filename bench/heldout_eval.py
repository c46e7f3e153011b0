"""Held-out evaluation of a model on synthetic worlds never used in training (docs/TRAINING.md).

For every world seed: a map drive (day) is rendered and built into a map with the model; every query
drive (other conditions, lateral offset <= 2 m, yaw jitter <= 15 deg) is evaluated against its world's
map with the reranking modes none / ransac / r2former (`r2former_core.evaluation`, as `r2former eval`).
Prints one table per query set and the mean, and writes JSON. Rendered drives and maps are kept in
--work and reused when they exist (drives depend only on seed, condition, frames, size and spacing;
maps are rebuilt when the model's fingerprint changes).

    .venv/bin/python bench/heldout_eval.py --model models/r2former_tiny_demo.safetensors \\
        --out bench/results/heldout_eval.json
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import built_map, machine_info, rendered_drive, write_report

DEFAULT_SETS = "950:dusk,950:night,951:fog,951:rain,952:winter,952:autumn"


def render_drive(work: Path, seed: int, kind: str, cond: str, frames: int, size: tuple[int, int],
                 spacing: float) -> Path:
    """The rendered drive folder (images/, poses.txt), rendered on first use."""
    return rendered_drive(work / f"{kind}_{seed}_{cond.replace(',', '+')}_{frames}_{size[0]}x{size[1]}_sp{spacing:g}",
                          seed, kind, cond, frames, size, spacing)


def map_for(work: Path, seed: int, model, drive_dir: Path, tag: str = ""):
    """The map of `drive_dir` built with `model` (reused while the fingerprint and `tag` match)."""
    return built_map(model, work / f"map_{seed}_{model.fingerprint}{tag}", drive_dir)


def parse_sets(text: str) -> list[tuple[int, str]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        seed, _, cond = item.partition(":")
        if not cond:
            raise SystemExit(f"--sets: {item!r} is not SEED:CONDITION")
        out.append((int(seed), cond))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (any format load_model reads)")
    p.add_argument("--sets", default=DEFAULT_SETS,
                   help=f"query sets as SEED:CONDITION, comma separated (default {DEFAULT_SETS})")
    p.add_argument("--map-conditions", default="day", help="condition of every map drive (default day)")
    p.add_argument("--map-frames", type=int, default=160, help="frames of each map drive (default 160)")
    p.add_argument("--query-frames", type=int, default=60, help="frames of each query drive (default 60)")
    p.add_argument("--spacing", type=float, default=2.5, help="metres between frames (default 2.5)")
    p.add_argument("--size", default="model",
                   help="rendered image size HxW, or 'model' for the model's input size (default)")
    p.add_argument("--top-k", type=int, default=100, help="candidates retrieved and reranked (default 100)")
    p.add_argument("--threshold-m", type=float, default=25.0, help="positive radius in metres (default 25)")
    p.add_argument("--work", default="runs/heldout", help="folder for rendered drives and maps (default runs/heldout)")
    p.add_argument("--modes", default="none,ransac,r2former",
                   help="reranking modes, comma separated (default none,ransac,r2former)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16", "int8"),
                   help="numeric precision of map building, extraction and reranking (default fp32)")
    p.add_argument("--out", default="bench/results/heldout_eval.json", help="JSON report path")
    args = p.parse_args(argv)

    from r2former_core.data.sources import open_source
    from r2former_core.evaluation import ModeResult, evaluate, format_confidence_table, format_table
    from r2former_core.localizer import Localizer, LocalizerConfig
    from r2former_core.model import load_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, precision=args.precision)
    tag = "" if model.precision == "fp32" else f"_{model.precision}"
    size = tuple(model.cfg.image_size) if args.size == "model" else tuple(int(v) for v in args.size.split("x"))
    work = Path(args.work)
    sets = parse_sets(args.sets)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    t_start = time.time()

    def drive(seed: int, kind: str, cond: str, frames: int) -> Path:
        return render_drive(work, seed, kind, cond, frames, size, args.spacing)

    maps = {seed: map_for(work, seed, model, drive(seed, "map", args.map_conditions, args.map_frames), tag)
            for seed in sorted({s for s, _ in sets})}

    report: dict = {"sets": {}, "meta": {"machine": machine_info(torch.get_num_threads()),
                                        "model": str(args.model), "fingerprint": model.fingerprint,
                                        "precision": model.precision, "rerank_precision": model.rerank_precision,
                                        "top_k": args.top_k, "threshold_m": args.threshold_m, "size": list(size),
                                        "map_frames": args.map_frames, "query_frames": args.query_frames,
                                        "spacing_m": args.spacing, "map_conditions": args.map_conditions}}
    per_mode: dict[str, list[dict]] = {}
    pooled: dict[str, ModeResult] = {}
    for seed, cond in sets:
        d = drive(seed, "query", cond, args.query_frames)
        src = open_source(images=str(d / "images"), poses=str(d / "poses.txt"))
        loc = Localizer(model, maps[seed], LocalizerConfig(top_k=args.top_k, device="cpu", precision=args.precision))
        res = evaluate(loc, src, modes=modes, threshold_m=args.threshold_m, progress=False)
        name = f"{seed}_{cond}"
        print(f"\n== {name} ({len(src)} queries, map of {len(maps[seed])})")
        print(format_table(res))
        report["sets"][name] = {m: r.summary() for m, r in res.items()}
        for m, r in res.items():
            per_mode.setdefault(m, []).append(r.summary())
            pooled.setdefault(m, ModeResult(pose_threshold_m=r.pose_threshold_m)).extend(r)

    mean = {m: {k: float(np.mean([s[k] for s in rows])) for k in ("recall@1", "recall@5", "recall@10",
                                                                  "ms_per_query", "median_error_m")}
            for m, rows in per_mode.items()}
    report["mean"] = mean
    report["pooled"] = {m: r.summary() for m, r in pooled.items()}
    report["meta"]["seconds"] = round(time.time() - t_start, 1)
    print(f"\n== mean of {len(sets)} query sets")
    print(f"{'rerank':<10} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'ms/query':>10}")
    for m, s in mean.items():
        print(f"{m:<10} {100 * s['recall@1']:>6.1f}% {100 * s['recall@5']:>6.1f}% {100 * s['recall@10']:>6.1f}% "
              f"{s['ms_per_query']:>10.1f}")
    print("\n== all queries pooled")
    print(format_table(pooled))
    print(format_confidence_table(pooled))
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
