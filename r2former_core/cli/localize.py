"""`r2former localize`: localize every image of a folder or a rosbag2 against a map; write CSV."""
from __future__ import annotations

import argparse
import csv
import logging
import os
import time
from pathlib import Path

from ..errors import CliError
from ..options import TIMING_STAGES, LocalizerConfig, add_config_option
from .common import add_model_options, add_skip_unreadable, load_model_from_args
from .tracking_options import add_sequence_options

log = logging.getLogger(__name__)

CSV_COLUMNS = ["name", "stamp", "x", "y", "z", "qx", "qy", "qz", "qw", "confidence", "accepted", "best_index",
               "best_name", "var_x", "var_y", "var_z", "var_roll", "var_pitch", "var_yaw", "ms_decode", "ms_extract",
               "ms_search", "ms_rerank", "ms_pose", "ms_total"]
# with --sequence: the tracker's state, belief size, candidates reranked, "elsewhere" probability, filter time,
# 1 when the frame was held (the view unchanged: a standing robot)
SEQUENCE_COLUMNS = CSV_COLUMNS + ["state", "support", "reranked", "elsewhere", "ms_filter", "still", "coasted"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("localize", help="localize images (folder or rosbag2) against a map, write a CSV",
                       description="For each query image: extract features, retrieve the top-K map images, rerank, "
                                   "estimate a pose with covariance. Writes one CSV row per query: " +
                                   ", ".join(CSV_COLUMNS) + " (var_* = covariance diagonal). With --sequence the "
                                   "images are one drive in stamp order and the tracker localizes them (accepted = "
                                   "published, confidence = probability of the published place); extra columns: "
                                   + ", ".join(SEQUENCE_COLUMNS[len(CSV_COLUMNS):]) + ".")
    p.add_argument("--map", required=True, help="map directory built with `r2former build-map`")
    g = p.add_argument_group("queries (an image folder or a rosbag2)")
    g.add_argument("--images", default=None, help="folder of query images")
    g.add_argument("--bag", default=None, help="rosbag2 with the query images")
    g.add_argument("--image-topic", default=None, help="image topic of --bag (Image or CompressedImage)")
    add_skip_unreadable(g)
    p.add_argument("--out", required=True,
                   help="CSV file to write (written to a temporary file and renamed when every query is done, so a "
                        "failed run leaves no partial CSV)")
    add_model_options(p)
    for name in ("rerank", "top_k", "min_confidence", "rerank_budget_ms", "rerank_margin", "rerank_min"):
        add_config_option(p, LocalizerConfig, name)
    p.add_argument("--save-matches", default=None, metavar="DIR",
                   help="also write each query's matched-pair image (query | best map image, token matches) to DIR")
    add_sequence_options(p, ("on", "off"), "on")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..data.sources import open_source
    from ..localizer import Localizer
    from ..mapdb import MapDatabase
    if bool(args.images) == bool(args.bag):
        raise CliError("give the queries: either --images DIR or --bag BAG --image-topic T")
    matches_dir = Path(args.save_matches) if args.save_matches else None
    if matches_dir and matches_dir.exists() and not matches_dir.is_dir():
        raise CliError(f"--save-matches {matches_dir} is a file; give a directory (created if missing)")
    source = open_source(images=args.images, bag=args.bag, image_topic=args.image_topic, require_poses=False,
                         skip_unreadable=args.skip_unreadable)
    model = load_model_from_args(args)
    mapdb = MapDatabase.load(args.map, expected_fingerprint=model.fingerprint, device=args.device)
    localizer = Localizer(model, mapdb, LocalizerConfig(top_k=args.top_k, rerank=args.rerank,
                                                        min_confidence=args.min_confidence, device=args.device,
                                                        precision=args.precision,
                                                        rerank_budget_ms=args.rerank_budget_ms,
                                                        rerank_margin=args.rerank_margin, rerank_min=args.rerank_min))
    if matches_dir:
        matches_dir.mkdir(parents=True, exist_ok=True)
    if args.odometry and not args.sequence:
        raise CliError("--odometry goes with --sequence")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if args.sequence:
            n, accepted = _write_sequence_rows(tmp, source, localizer, args, matches_dir)
        else:
            n, accepted = _write_rows(tmp, source, localizer, mapdb, model, matches_dir)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    what = "published by the tracker" if args.sequence and args.tracking == "on" else \
        f"accepted (confidence >= {args.min_confidence})"
    print(f"{n} queries localized, {accepted} {what}; wrote {out}")
    return 0


def _write_rows(path: Path, source, localizer, mapdb, model, matches_dir: Path | None) -> tuple[int, int]:
    """Localize every query into the CSV at `path`; returns (queries, accepted)."""
    from tqdm import tqdm

    n = accepted = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        t_read = time.perf_counter()
        for rec in tqdm(source, total=len(source), desc="localize", unit="img", disable=None):
            res = localizer.localize(rec.image, decode_ms=(time.perf_counter() - t_read) * 1000)
            best = res.best
            writer.writerow([rec.name, f"{rec.stamp:.6f}", *(f"{v:.4f}" for v in res.pose[:3]),
                             *(f"{v:.6f}" for v in res.pose[3:]), f"{res.confidence:.4f}", int(res.accepted),
                             res.best_index, best.name if best else "",
                             *(f"{v:.6g}" for v in res.covariance.diagonal()),
                             *(f"{res.timings_ms.get(k, 0.0):.1f}" for k in TIMING_STAGES)])
            n += 1
            accepted += int(res.accepted)
            if matches_dir:
                _save_matches(matches_dir, rec.name, rec.image, res, localizer)
            t_read = time.perf_counter()
    return n, accepted


def _save_matches(matches_dir: Path, name: str, image, res, localizer) -> None:
    import cv2

    from ..visualization import draw_matches
    best = res.best
    text = [f"{name}  conf {res.confidence:.2f}  best {best.name if best else '-'}",
            f"score {best.score:.3f}  global {best.global_score:.3f}" if best else ""]
    drawn = draw_matches(image, localizer.map.thumbnail(res.best_index), res.matches,
                         model_size=localizer.model.cfg.image_size, text=text)
    cv2.imwrite(str(matches_dir / f"{Path(name).stem}.jpg"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))


def _write_sequence_rows(path: Path, source, localizer, args, matches_dir: Path | None) -> tuple[int, int]:
    """The queries in stamp order, localized by the tracker (or frame by frame with --tracking off)."""
    import numpy as np
    from tqdm import tqdm

    from ..evaluation import sequence_frames
    from ..tracking import Tracker
    from .tracking_options import read_odometry, tracking_config_from_args
    tracker = Tracker(localizer, tracking_config_from_args(args)) if args.tracking == "on" else None
    frames = sequence_frames(localizer, source, read_odometry(args.odometry))
    n = accepted = unmatched = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SEQUENCE_COLUMNS)
        for fr in tqdm(frames, total=len(source), desc="localize", unit="img", disable=None):
            t = time.perf_counter()
            features = fr.features if fr.features is not None else localizer.extract(fr.image)
            extract_ms = fr.extract_ms if fr.features is not None else (time.perf_counter() - t) * 1000
            if tracker is not None:
                tr = tracker.step(fr.stamp, features=features, odom_pose=fr.odom_pose,
                                  with_matches=matches_dir is not None)
                pose, cov, conf, ok, res = tr.pose, tr.covariance, tr.confidence, tr.accepted, tr.frame
                timings = dict(tr.timings_ms, extract=extract_ms)
                extra = [tr.state, tr.support, tr.reranked, f"{tr.elsewhere:.4f}", f"{timings.get('filter', 0):.1f}",
                         int(tr.still), int(tr.coasted)]
            else:
                res = localizer.localize_features(*features, with_matches=matches_dir is not None)
                pose, cov, conf, ok = res.pose, res.covariance, res.confidence, res.accepted
                timings = dict(res.timings_ms, extract=extract_ms)
                extra = ["single", 0, len(res.candidates), "", "", 0, 0]
            # extracted here, or beforehand when the source had to be reordered
            timings["total"] = (time.perf_counter() - t) * 1000 + (fr.extract_ms if fr.features is not None else 0.0)
            best = res.best if res is not None else None
            writer.writerow([fr.name, f"{fr.stamp:.6f}", *(f"{v:.4f}" for v in pose[:3]),
                             *(f"{v:.6f}" for v in pose[3:]), f"{conf:.4f}", int(ok),
                             res.best_index if res is not None else -1, best.name if best else "",
                             *(f"{v:.6g}" for v in np.diagonal(cov)),
                             *(f"{timings.get(k, 0.0):.1f}" for k in TIMING_STAGES), *extra])
            n += 1
            accepted += int(ok)
            if matches_dir and res is not None:
                if fr.image is None:
                    unmatched += 1
                else:
                    _save_matches(matches_dir, fr.name, fr.image, res, localizer)
    if unmatched:
        log.warning("--save-matches: %d frames were played out of source order, without their images: no "
                    "matched-pair image for them", unmatched)
    return n, accepted
