"""Options shared by several subcommands (model, device, precision, sources)."""
from __future__ import annotations

import argparse
import logging

from ..errors import CliError
from ..options import LocalizerConfig, add_config_option
from ..resources import resolve_model_path

# Listed here so that building the parser imports no numpy; a test keeps it equal to frames.CAMERA_CONVENTIONS.
CAMERA_CONVENTIONS = ("auto", "body", "optical")

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
    """The options on reading input images (every command that reads images has them):
    --skip-unreadable and --max-image-pixels (applied process-wide by `apply_image_limit`)."""
    p.add_argument("--skip-unreadable", action="store_true",
                   help="image folders: skip (and count) image files that do not decode instead of stopping at "
                        "the first one")
    add_config_option(p, LocalizerConfig, "max_image_pixels")


def apply_image_limit(args: argparse.Namespace) -> None:
    """Make --max-image-pixels the limit of every image decoded in this process (files, bag messages)."""
    from ..data.image_limits import set_max_image_pixels
    if getattr(args, "max_image_pixels", None) is not None:
        set_max_image_pixels(args.max_image_pixels)


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
                   help="poses of --images: TUM (timestamp tx ty tz qx qy qz qw; image files named by timestamp) or "
                        "CSV with a header name,x,y,z,qx,qy,qz,qw or name,x,y,yaw (metres; yaw in radians about +z, "
                        "z = 0)" + ("" if poses_required else " (optional)"))
    g.add_argument("--bag", default=None, help="rosbag2 directory (sqlite3 or mcap)")
    g.add_argument("--image-topic", default=None, help="image topic in --bag (sensor_msgs/Image or CompressedImage)")
    g.add_argument("--pose-topic", default=None,
                   help="pose topic in --bag (Odometry, PoseStamped or PoseWithCovarianceStamped), interpolated at the "
                        "image stamps; or /tf (tf2_msgs/TFMessage) together with --tf-frames")
    g.add_argument("--tf-frames", default=None, metavar="PARENT:CHILD",
                   help="poses from the bag's TF: the pose of frame CHILD in frame PARENT (e.g. map:base_link or "
                        "odom:camera_link) at each image stamp, chained over /tf (interpolated) and /tf_static "
                        "(read automatically when present); --pose-topic defaults to /tf")
    g.add_argument("--pose-frames", default=None, metavar="PARENT:CHILD",
                   help="the frames of the poses, recorded in the map: the pose of CHILD in PARENT. For --images "
                        "(the files name no frame; default map:camera) and for what pose messages leave out (the "
                        "child of PoseStamped / PoseWithCovarianceStamped, an empty header.frame_id). Odometry "
                        "messages (header.frame_id, child_frame_id) and --tf-frames name the frames themselves; a "
                        "different value here is an error")
    g.add_argument("--camera-convention", choices=CAMERA_CONVENTIONS, default="auto",
                   help="maps store camera poses in the body convention (x forward, y left, z up). optical: the "
                        "input poses are of an optical frame (z forward, x right, y down, e.g. a visual SLAM "
                        "trajectory) and are rotated to the body convention; body: used as they are; auto "
                        "(default): optical when the child frame's name ends in _optical or _optical_frame "
                        "(REP-103), e.g. --tf-frames map:camera_optical_frame")
    g.add_argument("--pose-tolerance", type=nonneg_float, default=0.05,
                   help="seconds an image may lie outside the pose samples and still get a pose (default 0.05)")
    add_skip_unreadable(g)


def pose_frames_from_args(args) -> str | tuple[str | None, str | None] | None:
    """--pose-frames, or build-map's --frame-id PARENT (the parent alone); CliError when they disagree."""
    pose_frames, frame_id = getattr(args, "pose_frames", None), getattr(args, "frame_id", None)
    if not frame_id:
        return pose_frames
    if not pose_frames:
        return (frame_id, None)
    from ..frames import clean_frame_id, parse_frame_pair
    if parse_frame_pair(pose_frames, "--pose-frames")[0] != clean_frame_id(frame_id):
        raise CliError(f"--frame-id {frame_id} and --pose-frames {pose_frames} name different parent frames; "
                       "give only --pose-frames PARENT:CHILD")
    return pose_frames


def open_source_from_args(args, require_poses: bool):
    from ..data.sources import open_source
    if not args.images and not args.bag:
        raise CliError("give a source: --images DIR [--poses FILE] or --bag BAG --image-topic T")
    return open_source(images=args.images, poses=args.poses, bag=args.bag, image_topic=args.image_topic,
                       pose_topic=args.pose_topic, tolerance=args.pose_tolerance, require_poses=require_poses,
                       tf_frames=getattr(args, "tf_frames", None), pose_frames=pose_frames_from_args(args),
                       camera_convention=getattr(args, "camera_convention", "auto"),
                       skip_unreadable=getattr(args, "skip_unreadable", False))


def load_model_from_args(args):
    """The model of --model on --device at --precision (the resolved precision is logged)."""
    from ..model import load_model
    model = load_model(resolve_model_path(args.model), device=args.device,
                       precision=getattr(args, "precision", "fp32"))
    log.info("model %s: %s", model.fingerprint, model.describe_precision())
    return model
