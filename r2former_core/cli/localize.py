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

log = logging.getLogger(__name__)

CSV_COLUMNS = ["name", "stamp", "x", "y", "z", "qx", "qy", "qz", "qw", "confidence", "accepted", "best_index",
               "best_name", "var_x", "var_y", "var_z", "var_roll", "var_pitch", "var_yaw", "ms_decode", "ms_extract", "ms_search", "ms_rerank",
               "ms_pose", "ms_total"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("localize", help="localize images (folder or rosbag2) against a map, write a CSV",
                       description="For each query image: extract features, retrieve the top-K map images, rerank, "
                                   "estimate a pose with covariance. Writes one CSV row per query: " +
                                   ", ".join(CSV_COLUMNS) + " (var_* = covariance diagonal).")
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        n, accepted = _write_rows(tmp, source, localizer, mapdb, model, matches_dir)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{n} queries localized, {accepted} accepted (confidence >= {args.min_confidence}); wrote {out}")
    return 0


def _write_rows(path: Path, source, localizer, mapdb, model, matches_dir: Path | None) -> tuple[int, int]:
    """Localize every query into the CSV at `path`; returns (queries, accepted)."""
    import cv2
    from tqdm import tqdm

    from ..visualization import draw_matches
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
                text = [f"{rec.name}  conf {res.confidence:.2f}  best {best.name if best else '-'}",
                        f"score {best.score:.3f}  global {best.global_score:.3f}" if best else ""]
                image = draw_matches(rec.image, mapdb.thumbnail(res.best_index), res.matches,
                                     model_size=model.cfg.image_size, text=text)
                cv2.imwrite(str(matches_dir / f"{Path(rec.name).stem}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            t_read = time.perf_counter()
    return n, accepted
