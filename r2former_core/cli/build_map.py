"""`r2former build-map`: build a map from an image folder with poses or from a rosbag2."""
from __future__ import annotations

import argparse

from .common import (add_model_options, add_source_options, load_model_from_args, nonneg_float, open_source_from_args,
                     positive_int)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("build-map",
                       help="build a map from posed images (folder + poses file, or rosbag2 with a pose topic or TF)",
                       description="Select keyframes of a posed image source, extract R2Former features and write a "
                                   "map directory atomically (nothing appears under --out until it is complete).")
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
    p.add_argument("--frame-id", default=None,
                   help="frame the poses are expressed in (default: PARENT of --tf-frames, else map)")
    p.add_argument("--index", default="flat", choices=["flat", "ivfpq"],
                   help="faiss index: flat (exact, default) or ivfpq (compressed, for maps of millions of images)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing map at --out (atomically)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    source = open_source_from_args(args, require_poses=True)   # bad sources fail before torch is imported
    from ..mapping import build_map
    frame_id = args.frame_id or (source.tf_frames[0] if getattr(source, "tf_frames", None) else "map")
    model = load_model_from_args(args)
    mapdb = build_map(source, model, args.out, min_distance=args.min_distance, min_angle=args.min_angle,
                      batch_size=args.batch_size, frame_id=frame_id, index=args.index, overwrite=args.overwrite)
    print(f"map {mapdb.info.path}: {len(mapdb)} images, model {mapdb.info.fingerprint}, "
          f"keyframe spacing {mapdb.keyframe_spacing():.2f} m")
    return 0
