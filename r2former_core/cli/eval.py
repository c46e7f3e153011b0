"""`r2former eval`: recall@1/5/10 per reranking mode on a query set with ground-truth poses."""
from __future__ import annotations

import argparse

from ..errors import CliError
from ..options import RERANK_MODES, LocalizerConfig, add_config_option
from .common import add_model_options, add_skip_unreadable, positive_float
from .tracking_options import add_sequence_options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="recall@N of none / ransac / r2former reranking on queries with ground truth",
                       description="Extract each query once, retrieve the top-K map images, rerank them with each "
                                   "selected mode and report recall@1/5/10 (a query is recalled at N when one of its "
                                   "first N map images lies within --threshold-m), ms per query and the median top-1 "
                                   "error. For the pose the localizer would publish: the fraction within "
                                   "--pose-threshold-m, the fraction inside its covariance's 95%% ellipse, and a "
                                   "table of accepted/correct results per min_confidence (to choose that parameter). "
                                   "Writes JSON, a recall@N plot and a confidence plot beside it. With --sequence: the "
                                   "queries are one drive in stamp order, localized frame by frame on their own "
                                   "(single) and with the tracker (tracking); JSON {\"single\": {...}, \"tracking\": "
                                   "{...}} with within_5m (fraction of ALL frames whose published pose is within 5 m "
                                   "and 20 deg; no pose = miss), gross_error_rate (> 25 m), ms_per_frame, "
                                   "reranked_per_frame, calibration (fraction inside the 95%% ellipse), a plot of the "
                                   "error over the frames (<stem>.png) and one CSV row per frame (<stem>_frames.csv).")
    p.add_argument("--map", required=True, help="map directory built with `r2former build-map`")
    p.add_argument("--queries", default=None, help="query image folder")
    p.add_argument("--query-poses", default=None, help="ground-truth poses of --queries (TUM or CSV)")
    p.add_argument("--bag", default=None, help="query rosbag2 instead of a folder (with --image-topic/--pose-topic)")
    p.add_argument("--image-topic", default=None, help="image topic of --bag")
    p.add_argument("--pose-topic", default=None, help="ground-truth pose topic of --bag")
    add_skip_unreadable(p)
    add_model_options(p)
    p.add_argument("--rerank", default="all", choices=[*RERANK_MODES, "all"],
                   help="reranking mode(s) to evaluate (default all; with --sequence one mode, all = r2former)")
    add_config_option(p, LocalizerConfig, "top_k")
    p.add_argument("--threshold-m", type=positive_float, default=25.0,
                   help="positive distance threshold in metres (default 25)")
    p.add_argument("--pose-threshold-m", type=positive_float, default=5.0,
                   help="a published pose within this many metres of the ground truth counts as correct (default 5)")
    p.add_argument("--out", default=None,
                   help="JSON output path (plots are written beside it: <stem>.png recall@N, <stem>_confidence.png); "
                        "without it the tables are only printed")
    add_sequence_options(p, ("on", "off", "both"), "both")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..data.sources import open_source
    from ..evaluation import evaluate, format_confidence_table, format_table, write_report
    from ..localizer import Localizer
    from ..mapdb import MapDatabase
    from .common import load_model_from_args
    if not args.queries and not args.bag:
        raise CliError("give the queries: --queries DIR --query-poses FILE, or --bag BAG")
    source = open_source(images=args.queries, poses=args.query_poses, bag=args.bag, image_topic=args.image_topic,
                         pose_topic=args.pose_topic, require_poses=True, skip_unreadable=args.skip_unreadable)
    model = load_model_from_args(args)
    mapdb = MapDatabase.load(args.map, expected_fingerprint=model.fingerprint, device=args.device)
    if args.sequence:
        return run_sequence(args, source, model, mapdb)
    if args.odometry:
        raise CliError("--odometry goes with --sequence")
    localizer = Localizer(model, mapdb, LocalizerConfig(top_k=args.top_k, device=args.device,
                                                        precision=args.precision))
    modes = ("none", "ransac", "r2former") if args.rerank == "all" else (args.rerank,)
    results = evaluate(localizer, source, modes=modes, threshold_m=args.threshold_m,
                       pose_threshold_m=args.pose_threshold_m)
    print(format_table(results))
    print(format_confidence_table(results))
    if args.out:
        meta = {"map": str(mapdb.info.path), "model": model.fingerprint, "top_k": args.top_k,
                "precision": model.precision, "rerank_precision": model.rerank_precision,
                "threshold_m": args.threshold_m, "pose_threshold_m": args.pose_threshold_m,
                "queries": source.description}
        json_path, plot = write_report(results, args.out, meta)
        print(f"wrote {json_path} and {plot} (and the confidence plot beside it)")
    return 0


def run_sequence(args, source, model, mapdb) -> int:
    from ..evaluation import evaluate_sequence, format_sequence_table, sequence_frames, write_sequence_report
    from ..localizer import Localizer
    from .tracking_options import read_odometry, tracking_config_from_args
    rerank = "r2former" if args.rerank == "all" else args.rerank
    localizer = Localizer(model, mapdb, LocalizerConfig(top_k=args.top_k, rerank=rerank, device=args.device,
                                                        precision=args.precision))
    tracking = tracking_config_from_args(args)
    modes = {"on": ("tracking",), "off": ("single",), "both": ("single", "tracking")}[args.tracking]
    odometry = read_odometry(args.odometry)
    results = evaluate_sequence(localizer, sequence_frames(localizer, source, odometry), modes=modes,
                                tracking=tracking, total=len(source))
    print(format_sequence_table(results))
    if args.out:
        from dataclasses import asdict
        meta = {"map": str(mapdb.info.path), "model": model.fingerprint, "top_k": args.top_k, "rerank": rerank,
                "queries": source.description, "odometry": args.odometry, "tracking_config": asdict(tracking)}
        json_path, plot = write_sequence_report(results, args.out, meta)
        print(f"wrote {json_path}, {plot} and the per-frame CSV beside them")
    return 0
