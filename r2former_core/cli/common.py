"""Options shared by several subcommands (model, device, precision, sources)."""
from __future__ import annotations

import argparse
import logging

from ..options import LocalizerConfig, add_config_option
from ..errors import CliError

log = logging.getLogger(__name__)

def _number(kind, test, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {what}")
        return value
    return parse


# argparse `type=`s with a range: a bad value is a one-line usage error, not a traceback later.
positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
unit_float = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def add_skip_unreadable(p) -> None:
    p.add_argument("--skip-unreadable", action="store_true",
                   help="image folders: skip (and count) image files that do not decode instead of stopping at "
                        "the first one")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="weights file: the official checkpoint (CVPR23_DeitS_Rerank.pth), DeiT ImageNet weights, or a "
                        "model saved by r2former (.safetensors). Default: $R2FORMER_MODEL, else the project's demo "
                        "model in models/")
    add_config_option(p, LocalizerConfig, "device")
    add_config_option(p, LocalizerConfig, "precision")


def add_source_options(p: argparse.ArgumentParser, what: str, poses_required: bool) -> None:
    g = p.add_argument_group(f"{what} source (an image folder or a rosbag2)")
    g.add_argument("--images", default=None, help="folder of PNG/JPEG images (or a VG-benchmark folder with "
                                                  "UTM coordinates in the file names)")
    g.add_argument("--poses", default=None,
                   help="poses of --images: TUM (timestamp tx ty tz qx qy qz qw; image files named by timestamp) or CSV "
                        "with a header name,x,y,z,qx,qy,qz,qw or name,x,y,yaw (metres; yaw in radians about +z, "
                        "z = 0)" + ("" if poses_required else
                                                                                  " (optional)"))
    g.add_argument("--bag", default=None, help="rosbag2 directory (sqlite3 or mcap)")
    g.add_argument("--image-topic", default=None, help="image topic in --bag (sensor_msgs/Image or CompressedImage)")
    g.add_argument("--pose-topic", default=None,
                   help="pose topic in --bag (Odometry, PoseStamped or PoseWithCovarianceStamped), interpolated at the "
                        "image stamps; or /tf (tf2_msgs/TFMessage) together with --tf-frames")
    g.add_argument("--tf-frames", default=None, metavar="PARENT:CHILD",
                   help="poses from the bag's TF: the pose of frame CHILD in frame PARENT (e.g. map:base_link or "
                        "odom:camera_link) at each image stamp, chained over /tf (interpolated) and /tf_static "
                        "(read automatically when present); --pose-topic defaults to /tf")
    g.add_argument("--pose-tolerance", type=nonneg_float, default=0.05,
                   help="seconds an image may lie outside the pose samples and still get a pose (default 0.05)")
    add_skip_unreadable(g)


def open_source_from_args(args, require_poses: bool):
    from ..data.sources import open_source
    if not args.images and not args.bag:
        raise CliError("give a source: --images DIR [--poses FILE] or --bag BAG --image-topic T")
    return open_source(images=args.images, poses=args.poses, bag=args.bag, image_topic=args.image_topic,
                       pose_topic=args.pose_topic, tolerance=args.pose_tolerance, require_poses=require_poses,
                       tf_frames=getattr(args, "tf_frames", None),
                       skip_unreadable=getattr(args, "skip_unreadable", False))


def load_model_from_args(args):
    """The model of --model on --device at --precision (the resolved precision is logged)."""
    from ..model import load_model
    from ..model.zoo import resolve_model_path
    model = load_model(resolve_model_path(args.model), device=args.device,
                       precision=getattr(args, "precision", "fp32"))
    log.info("model %s: %s", model.fingerprint, model.describe_precision())
    return model
