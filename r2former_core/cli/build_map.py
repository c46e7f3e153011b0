"""`r2former build-map`: build a map from an image folder with poses or from a rosbag2 (one process or torchrun)."""
from __future__ import annotations

import argparse
import os

from ..errors import CliError
from .common import (
    add_model_options,
    add_source_options,
    load_model_from_args,
    nonneg_float,
    open_source_from_args,
    positive_int,
)

# Listed here so that building the parser imports no faiss; a test keeps it equal to mapdb.INDEX_TYPES.
INDEX_CHOICES = ("flat", "ivfpq", "hnsw")

EPILOG = """\
sessions:
  every drive becomes one session of the map (its source, --session-name and --conditions are recorded;
  `r2former map-info` lists them). --append MAP adds the drive to an existing map of the same model and
  frames as a new session: MAP is replaced atomically once the new map is complete (or the result goes
  to --out). `r2former map merge` combines whole maps, `r2former map prune` thins them.

distributed (torchrun):
  torchrun --nproc_per_node=N -m r2former_core.cli.main build-map ...      (gloo on CPU, NCCL on CUDA;
  several machines: torchrun's --nnodes/--node_rank/--rdzv_endpoint as usual). Each rank extracts a
  contiguous shard of the keyframes; rank 0 writes the map, identical to a one-process build. Every
  machine must read the same source; only rank 0's machine needs the output directory.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("build-map",
                       help="build a map from posed images (folder + poses file, or rosbag2 with a pose topic or TF)",
                       description="Select keyframes of a posed image source, extract R2Former features and write a "
                                   "map directory atomically (nothing appears under --out until it is complete). "
                                   "The map records the frames of its poses (the pose of CHILD in PARENT): from "
                                   "the Odometry / pose messages or --tf-frames of a bag, from --pose-frames for "
                                   "an image folder. Build in the map frame: poses in an odometry frame drift.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_options(p, "map", poses_required=True)
    p.add_argument("--out", default=None,
                   help="map directory to create (required unless --append, whose map it then replaces)")
    p.add_argument("--append", default=None, metavar="MAP",
                   help="add the drive to the existing map MAP as a new session (same model and frames); MAP is "
                        "replaced atomically at the end unless --out names another directory")
    p.add_argument("--session-name", default="", help="name of the drive's session, e.g. 'campus night' (default none)")
    p.add_argument("--conditions", default="",
                   help="comma-separated conditions of the drive recorded with its session, e.g. night,rain "
                        "(free text; default: not known)")
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
    p.add_argument("--index", default=None, choices=INDEX_CHOICES,
                   help="faiss index stored in the map: flat (exact; default for a new map), ivfpq (compressed, "
                        "approximate, for millions of images) or hnsw (graph, approximate, fast CPU search); "
                        "with --append the map's own index unless given")
    p.add_argument("--shard-dir", default=None,
                   help="under torchrun: where ranks other than 0 keep their shard until rank 0 takes it (default: "
                        "the system's temporary directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing map at --out (atomically)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if not args.out and not args.append:
        raise CliError("give the map to create (--out MAP) or the map to add the drive to (--append MAP)")
    source = open_source_from_args(args, require_poses=True)   # bad sources fail before torch is imported
    from ..mapping import build_map
    from ..train.distributed import init_distributed, shutdown
    dist = init_distributed(args.device)
    try:
        if dist.enabled:
            args.device = str(dist.device)
        model = load_model_from_args(args)
        mapdb = build_map(source, model, args.out, min_distance=args.min_distance, min_angle=args.min_angle,
                          batch_size=args.batch_size, index=args.index or ("flat" if not args.append else None),
                          overwrite=args.overwrite, append=args.append, session_name=args.session_name,
                          conditions=[c for c in args.conditions.split(",") if c.strip()], dist=dist,
                          shard_dir=args.shard_dir, progress=dist.is_main)
    finally:
        shutdown(dist)
    if mapdb is None:       # ranks other than 0 under torchrun
        return 0
    info = mapdb.info
    sessions = len(info.sessions)
    print(f"map {info.path}: {len(mapdb)} images in {sessions} session{'s' if sessions != 1 else ''}, poses of "
          f"{info.child_frame or '(child frame unknown)'} in {info.parent_frame}, model {info.fingerprint}, "
          f"keyframe spacing {mapdb.keyframe_spacing():.2f} m, index {info.index}"
          + (f" ({os.environ.get('WORLD_SIZE')} processes)" if dist.enabled else ""))
    return 0
