"""`r2former build-map`: build a map from an image folder with poses or from a rosbag2."""
from __future__ import annotations

import argparse

from .common import (add_model_options, add_source_options, load_model_from_args, nonneg_float, open_source_from_args,
                     positive_int)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("build-map",
                       help="build a map from posed images (folder + poses file, or rosbag2 with a pose topic or TF)",
                       description="Select keyframes of a posed image source, extract R2Former features and write a "
                                   "map directory atomically (nothing appears under --out until it is complete). "
                                   "The map records the frames of its poses (the pose of CHILD in PARENT): from "
                                   "the Odometry / pose messages or --tf-frames of a bag, from --pose-frames for "
                                   "an image folder. Build in the map frame: poses in an odometry frame drift.")
    add_source_options(p, "map", poses_required=True)
    p.add_argument("--out", required=True, help="map directory to create")
    add_model_options(p)
    p.add_argument("--min-distance", type=nonneg_float, default=0.0,
                   help="keep a frame when it is at least this many metres from the last kept one (default 0: all)")
    p.add_argument("--min-angle", type=nonneg_float, default=0.0,
                   help="... or turned at least this many degrees from it (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per extraction batch (default: 16 on CUDA; on a CPU 1 for the DeiT-S 480x640 model, "
                        "up to 8 for small models, whichever measured fastest)")
    p.add_argument("--frame-id", default=None, metavar="PARENT",
                   help="the parent frame of the poses alone (kept for old command lines): the same as "
                        "--pose-frames PARENT:CHILD with the child left to the source; --pose-frames is the "
                        "complete form")
    p.add_argument("--index", default="flat", choices=["flat", "ivfpq"],
                   help="faiss index: flat (exact, default) or ivfpq (compressed, for maps of millions of images)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing map at --out (atomically)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    source = open_source_from_args(args, require_poses=True)   # bad sources fail before torch is imported
    from ..mapping import build_map
    model = load_model_from_args(args)
    mapdb = build_map(source, model, args.out, min_distance=args.min_distance, min_angle=args.min_angle,
                      batch_size=args.batch_size, index=args.index, overwrite=args.overwrite)
    info = mapdb.info
    print(f"map {info.path}: {len(mapdb)} images, poses of {info.child_frame or '(child frame unknown)'} in "
          f"{info.parent_frame}, model {info.fingerprint}, keyframe spacing {mapdb.keyframe_spacing():.2f} m")
    return 0
