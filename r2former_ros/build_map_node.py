"""`build_map`: build a localization map from a rosbag2 (offline) or from live topics.

Offline (no ROS graph needed; the same code path as `r2former build-map --bag`):

    build_map --bag BAG --image-topic /camera/image_raw --pose-topic /odom --out maps/campus
              [--model M] [--min-distance 1.0] [--min-angle 15] [--device auto] [--overwrite]
    build_map --bag BAG --image-topic /camera/image_raw --pose-topic /tf --tf-frames map:camera_link ...
    build_map --bag BAG --image-topic /camera/image_raw --pose-topic /pose --pose-frames map:camera_link ...

Live (node `r2former_map_builder`; its parameters are listed in config/build_map.yaml):

    build_map --live --image-topic /camera/image_raw --pose-topic /odom --pose-type odometry
              --out maps/campus [--duration 120] [--compressed] [--ros-args --params-file config/build_map.yaml]

Appending (`--append MAP`, parameter `append`): the drive becomes a new session of the existing map
MAP (same model, same frames), e.g. a night drive added to a day map. MAP's entries are copied into
the new map before the subscriptions start; at the end MAP is replaced atomically (or the result goes
to `out`). Until then MAP stays as it was, and an interrupted or empty drive leaves it untouched.

    build_map --live --append maps/campus --session-name night --conditions night ...

Live mode pairs every image with the pose interpolated at its stamp from a short pose history,
keeps a keyframe when the camera moved `min_distance` metres or turned `min_angle` degrees since
the last keyframe, extracts its features and appends it to the map. The map appears atomically
(written to a temporary directory, renamed at the end) after `--duration` seconds or on Ctrl-C;
an interrupted or empty build leaves nothing under the output name.

The map records the frames of its poses: an Odometry topic's `header.frame_id` and
`child_frame_id`, a PoseStamped / PoseWithCovarianceStamped topic's `header.frame_id` with the
child from `pose_frames` (`--pose-frames PARENT:CHILD`), or the `--tf-frames` pair (offline).
Poses in an odometry frame (`odom`, `.../odom`) log a warning: such a map drifts with the odometry.
Command-line options override the ROS parameters (`--ros-args -p ...`, `--params-file`).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CompressedImage, Image

from r2former_core.data.image_limits import set_max_image_pixels
from r2former_core.data.keyframes import select_keyframes
from r2former_core.data.sources import open_source
from r2former_core.errors import EXPECTED_ERRORS, ImageDecodeError, R2FormerError
from r2former_core.features import extract_image
from r2former_core.frames import (
    CAMERA_CONVENTIONS,
    PoseFrames,
    clean_frame_id,
    frames_from_messages,
    given_frames,
    odometry_warning,
    to_body_convention,
    uses_optical_convention,
)
from r2former_core.mapdb import MapDatabase, MapWriter
from r2former_core.mapops import open_append
from r2former_core.mapping import build_map
from r2former_core.model import load_model
from r2former_core.options import LocalizerConfig, add_config_option, device_type
from r2former_core.resources import resolve_model_path

from .conversions import msg_to_rgb, pose_from_msg, stamp_to_ns
from .parameters import ParamSpec, declare_parameters
from .pose_buffer import PoseBuffer, PoseLookup
from .qos import DURABILITY_CHOICES, RELIABILITY_CHOICES, stream_qos

NODE_NAME = "r2former_map_builder"
POSE_TYPES: dict[str, type] = {"odometry": Odometry, "pose_stamped": PoseStamped,
                               "pose_with_covariance": PoseWithCovarianceStamped}
WARN_THROTTLE_SEC = 5.0
DRAIN_BUDGET_SEC = 3.0

PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("out", "", "output map directory (required unless append is set; must not exist unless overwrite is "
              "true)", read_only=True),
    ParamSpec("append", "", "existing map to add this drive to as a new session (same model and frames): replaced "
              "atomically at the end, or the result goes to out when set; empty = build a new map", read_only=True),
    ParamSpec("session_name", "", "name of this drive's session in the map (e.g. 'campus night'; empty = none)",
              read_only=True),
    ParamSpec("conditions", "", "comma-separated conditions of this drive recorded with its session (e.g. "
              "'night,rain'; empty = not known)", read_only=True),
    ParamSpec("model_path", "", "model file; empty = the packaged demo model "
              "models/r2former_tiny_demo.safetensors (use the model the localizer will use)", read_only=True),
    ParamSpec.from_config(LocalizerConfig, "device", read_only=True),
    ParamSpec("image_topic", "image", "image topic (sensor_msgs/Image; with image_transport compressed the "
              "CompressedImage topic <image_topic>/compressed)", read_only=True),
    ParamSpec("image_transport", "raw", "raw (sensor_msgs/Image) or compressed (CompressedImage, jpeg/png)",
              choices=("raw", "compressed"), read_only=True),
    ParamSpec.from_config(LocalizerConfig, "max_image_pixels", read_only=True,
                          note="an image above it is skipped unread (counted as malformed)"),
    ParamSpec("pose_topic", "pose", "pose topic: the pose of the camera (or of the base) in the map frame",
              read_only=True),
    ParamSpec("pose_type", "odometry", "message type of pose_topic: odometry (nav_msgs/Odometry), pose_stamped "
              "(geometry_msgs/PoseStamped) or pose_with_covariance (geometry_msgs/PoseWithCovarianceStamped)",
              choices=tuple(POSE_TYPES), read_only=True),
    ParamSpec("min_distance", 1.0, "keyframe when the camera moved at least this far (metres) since the last "
              "keyframe; 0 disables the criterion", min=0.0, max=1000.0, read_only=True),
    ParamSpec("min_angle", 15.0, "keyframe when the camera turned at least this much (degrees) since the last "
              "keyframe; 0 disables the criterion (both 0: every image)", min=0.0, max=180.0, read_only=True),
    ParamSpec("duration", 0.0, "stop and write the map after this many seconds (0 = until Ctrl-C)",
              min=0.0, max=1.0e6, read_only=True),
    ParamSpec("pose_tolerance", 0.05, "an image up to this many seconds outside the pose history still takes "
              "the nearest pose", min=0.0, max=10.0, read_only=True),
    ParamSpec("pose_max_gap", 1.0, "never interpolate between pose samples further apart than this (seconds)",
              min=0.0, max=60.0, read_only=True),
    ParamSpec("pose_wait", 1.0, "how long an image waits for a pose newer than its stamp (seconds)",
              min=0.0, max=60.0, read_only=True),
    ParamSpec("max_pending", 30, "images waiting for their pose or for feature extraction; older ones are "
              "dropped (counted) when more arrive", min=1, max=1000, read_only=True),
    ParamSpec("qos_reliability", "best_effort", "reliability of the image and pose subscriptions",
              choices=RELIABILITY_CHOICES, read_only=True),
    ParamSpec("qos_depth", 10, "history depth of the image and pose subscriptions", min=1, max=1000,
              read_only=True),
    ParamSpec("qos_durability", "volatile", "durability of the image and pose subscriptions: volatile (matches "
              "every publisher) or transient_local (with reliable: also receives what a transient_local publisher, "
              "e.g. a bag player, sent before this node discovered it; does not match volatile publishers)",
              choices=DURABILITY_CHOICES, read_only=True),
    ParamSpec("pose_frames", "", "PARENT:CHILD, the frames of the poses, recorded in the map: the child of "
              "pose_stamped / pose_with_covariance messages (which name only the parent, header.frame_id), or both "
              "when the messages leave header.frame_id empty; empty = from the messages. A frame that differs from "
              "one the messages name is an error", read_only=True,
              pattern=r"|[^:\s]+:[^:\s]+", pattern_help="empty, or PARENT:CHILD"),
    ParamSpec("frame_id", "", "the parent frame alone (kept for old parameter files; pose_frames is the complete "
              "form); empty = from the messages", read_only=True),
    ParamSpec("camera_convention", "auto", "maps hold camera poses in the body convention (x forward, z up): "
              "optical = the poses are of an optical frame (z forward) and are rotated; auto = optical when the "
              "child frame ends in _optical or _optical_frame; body = as they are",
              choices=CAMERA_CONVENTIONS, read_only=True),
    ParamSpec("overwrite", False, "replace an existing map at out", read_only=True),
)


class BuildMapError(R2FormerError, RuntimeError):
    """The map cannot be built; the message says why and what to do."""


@dataclass
class BuildCounts:
    images: int = 0
    dropped: int = 0
    no_pose: int = 0
    not_keyframe: int = 0
    malformed: int = 0
    keyframes: int = 0
    poses: int = 0


def is_keyframe(last: np.ndarray | None, pose: np.ndarray, min_distance: float, min_angle_deg: float) -> bool:
    """The offline keyframe rule (`select_keyframes`) applied to one new pose."""
    if last is None:
        return True
    return len(select_keyframes(np.stack([last, pose]), min_distance, min_angle_deg)) == 2


class MapBuilderNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        v = declare_parameters(self, PARAMETERS)
        self.values = v
        if not v["out"] and not v["append"]:
            raise BuildMapError("no output map: pass --out MAP (or -p out:=MAP), or --append MAP to add the drive "
                                "to an existing map")
        self.given_frames = self._given_frames(v)
        self.model_path = resolve_model_path(v["model_path"], "parameter model_path")
        self.model = load_model(self.model_path, device=v["device"])
        self.writer: MapWriter | None = None
        self.frames: PoseFrames | None = None
        self._frames_checked = False
        if v["append"]:
            # Appending: the map's frames are known, its entries are copied now (before any image arrives).
            self.writer, self.frames = self._open_append()
        else:
            # The map's frames come with the pose messages, so the writer is created at the first keyframe;
            # a writer started and aborted now fails early for an output that exists or does not fit.
            self._create_writer(PoseFrames("map")).abort()
        self._frames_seen: Counter[tuple[str, str]] = Counter()
        self.failure: str | None = None
        self.counts = BuildCounts()
        self.poses = PoseBuffer(tolerance=v["pose_tolerance"], max_gap=v["pose_max_gap"])
        self._pending: deque[tuple[float, float, Image | CompressedImage]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._drain_until = 0.0
        self._last_key: np.ndarray | None = None
        self.done = False

        qos = stream_qos(v["qos_reliability"], v["qos_depth"], v["qos_durability"])
        if v["image_transport"] == "compressed":
            self.create_subscription(CompressedImage, f"{v['image_topic']}/compressed", self._on_image, qos)
        else:
            self.create_subscription(Image, v["image_topic"], self._on_image, qos)
        self.create_subscription(POSE_TYPES[v["pose_type"]], v["pose_topic"], self._on_pose, qos)
        if v["duration"] > 0:
            self._end_timer = self.create_timer(float(v["duration"]), self._on_duration)
        self._worker = threading.Thread(target=self._work, name="r2former-map-builder", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"building {v['out'] or v['append']} from {v['image_topic']} ({v['image_transport']}) + {v['pose_topic']} "
            f"({v['pose_type']}); keyframes every {v['min_distance']} m / {v['min_angle']} deg; model "
            f"{self.model_path} ({self.model.fingerprint}); "
            + (f"stops after {v['duration']} s" if v["duration"] > 0 else "Ctrl-C to finish"))

    @staticmethod
    def _given_frames(v: dict[str, Any]) -> tuple[str, str]:
        """pose_frames, or the parent alone from frame_id; BuildMapError when they disagree."""
        parent, child = given_frames(v["pose_frames"] or None)
        frame_id = clean_frame_id(v["frame_id"])
        if frame_id and parent and frame_id != parent:
            raise BuildMapError(f"frame_id {frame_id!r} and pose_frames {v['pose_frames']!r} name different parent "
                                "frames; set only pose_frames")
        return parent or frame_id, child

    @property
    def _source(self) -> str:
        v = self.values
        return f"live {v['image_topic']} + {v['pose_topic']} ({v['pose_type']})"

    @property
    def _conditions(self) -> list[str]:
        return [c.strip() for c in self.values["conditions"].split(",") if c.strip()]

    def _create_writer(self, frames: PoseFrames) -> MapWriter:
        v, cfg = self.values, self.model.cfg
        writer = MapDatabase.create(
            v["out"], fingerprint=self.model.fingerprint, model_config=json.loads(cfg.to_json()),
            image_size=cfg.image_size, global_dim=cfg.global_dim, num_local=cfg.local_tokens,
            local_values=cfg.local_values, frame_id=frames.parent, child_frame=frames.child,
            overwrite=bool(v["overwrite"]), source=self._source)
        writer.begin_session(v["session_name"], self._source, self._conditions)
        return writer

    def _open_append(self) -> tuple[MapWriter, PoseFrames]:
        """A writer holding a copy of the `append` map and a new session for this drive, and the map's frames."""
        v = self.values
        info = MapDatabase.read_info(v["append"])
        writer = open_append(v["append"], fingerprint=self.model.fingerprint, frame_id=info.frame_id,
                             child_frame=info.child_frame, source=self._source, session_name=v["session_name"],
                             conditions=self._conditions, out=v["out"] or None, overwrite=bool(v["overwrite"]),
                             progress=False)
        frames = PoseFrames(info.frame_id, info.child_frame,
                            uses_optical_convention(info.child_frame, v["camera_convention"]))
        self.get_logger().info(f"appending a session to {v['append']} ({len(info.sessions)} sessions, {info.count} "
                               f"entries, the pose of {frames})" + (f"; writing {v['out']}" if v["out"] else ""))
        return writer, frames

    def _open_map(self) -> MapWriter:
        """The writer, created at the first keyframe with the frames the pose messages named so far (when
        appending: created at start, and the messages' frames must be the map's)."""
        if self._frames_checked:
            assert self.writer is not None
            return self.writer
        with self._cond:
            seen = dict(self._frames_seen)
        what = f"pose topic {self.values['pose_topic']!r}"
        if self.writer is None:
            parent, child, warnings = frames_from_messages(seen, self.given_frames, what)
            for warning in warnings:
                self.get_logger().warning(warning)
            self.frames = PoseFrames(parent, child, uses_optical_convention(child, self.values["camera_convention"]))
            self.writer = self._create_writer(self.frames)
            drift = odometry_warning(parent)
            if drift:
                self.get_logger().warning(drift)
            self.get_logger().info(f"map poses: the pose of {self.frames}")
        else:
            assert self.frames is not None
            parent, child, warnings = frames_from_messages(seen, self.given_frames, what)
            if not child:       # PoseStamped names no child: the map's, unless pose_frames says otherwise
                child = self.frames.child
            else:
                for warning in warnings:
                    self.get_logger().warning(warning)
            if (parent, child) != (self.frames.parent, self.frames.child):
                raise BuildMapError(f"the pose messages of {what} hold the pose of {child or '(unnamed)'} in "
                                    f"{parent}, map {self.values['append']} the pose of {self.frames}: a session "
                                    "must have its map's frames (set pose_frames, or build a separate map)")
        self._frames_checked = True
        return self.writer

    # ---------------------------------------------------------------- input
    def _stamp(self, header) -> float:
        ns = stamp_to_ns(header.stamp)
        return (ns if ns else self.get_clock().now().nanoseconds) * 1e-9

    def _on_pose(self, msg: Odometry | PoseStamped | PoseWithCovarianceStamped) -> None:
        pose = msg.pose if isinstance(msg, PoseStamped) else msg.pose.pose
        frames = clean_frame_id(msg.header.frame_id), clean_frame_id(getattr(msg, "child_frame_id", ""))
        self.poses.add(self._stamp(msg.header), pose_from_msg(pose))
        with self._cond:
            self.counts.poses += 1
            if self._frames_seen and frames not in self._frames_seen:
                self.get_logger().warning(f"pose messages now name the frames {frames}, before "
                                          f"{', '.join(map(str, self._frames_seen))}; the map records the frames "
                                          "seen most often up to its first keyframe",
                                          throttle_duration_sec=WARN_THROTTLE_SEC)
            self._frames_seen[frames] += 1
            self._cond.notify()

    def _on_image(self, msg: Image | CompressedImage) -> None:
        with self._cond:
            self.counts.images += 1
            if len(self._pending) >= self.values["max_pending"]:
                self._pending.popleft()
                self.counts.dropped += 1
                self.get_logger().warning("images arrive faster than keyframes are extracted: dropping the oldest; "
                                       "raise min_distance / min_angle or max_pending",
                                       throttle_duration_sec=WARN_THROTTLE_SEC)
            self._pending.append((time.monotonic(), self._stamp(msg.header), msg))
            self._cond.notify()

    def _on_duration(self) -> None:
        self._end_timer.cancel()
        self.get_logger().info(f"duration of {self.values['duration']} s reached")
        self.done = True

    # ---------------------------------------------------------------- worker
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stop, timeout=0.1)
                if self._stop and (not self._pending or time.monotonic() > self._drain_until):
                    return
                if not self._pending:
                    continue
                received_at, stamp, msg = self._pending[0]
                final = self._stop or time.monotonic() - received_at > self.values["pose_wait"]
                status, pose = self.poses.lookup(stamp, final=final)
                if status is PoseLookup.WAIT:
                    self._cond.wait(0.02)
                    continue
                self._pending.popleft()
                if status is PoseLookup.MISSING or pose is None:
                    self.counts.no_pose += 1
                    self.get_logger().warning(f"no pose at image stamp {stamp:.3f}: image skipped",
                                              throttle_duration_sec=WARN_THROTTLE_SEC)
                    continue
                if not is_keyframe(self._last_key, pose, self.values["min_distance"], self.values["min_angle"]):
                    self.counts.not_keyframe += 1
                    continue
            try:
                self._add(msg, stamp, pose)
            except ImageDecodeError as exc:
                with self._cond:
                    self.counts.malformed += 1
                self.get_logger().warning(f"skipping image: {exc}", throttle_duration_sec=WARN_THROTTLE_SEC)
            except EXPECTED_ERRORS as exc:
                self.failure = str(exc)
                self.get_logger().error(f"cannot build the map: {exc}")
                self.done = True
                return

    def _add(self, msg: Image | CompressedImage, stamp: float, pose: np.ndarray) -> None:
        rgb = msg_to_rgb(msg, max_pixels=int(self.values["max_image_pixels"]))
        writer = self._open_map()
        assert self.frames is not None
        # Keyframes are chosen on the poses as received: turning every pose by one fixed rotation (optical
        # to body convention) changes neither distances nor the angles between poses.
        stored = to_body_convention(pose, self.frames.child, self.values["camera_convention"])[0]
        global_desc, local = extract_image(self.model, rgb)
        index = writer.add(global_desc, local, stored, stamp, f"{stamp:.6f}", thumbnail=rgb)
        with self._cond:
            self._last_key = pose
            self.counts.keyframes += 1
        self.get_logger().info(f"keyframe {index}: stamp {stamp:.3f} at "
                               f"({pose[0]:.2f}, {pose[1]:.2f}, {pose[2]:.2f})")

    # --------------------------------------------------------------- finish
    def finish(self) -> bool:
        """Stop the worker (after at most DRAIN_BUDGET_SEC of pending images) and write the map.

        Returns True when a map was written, False when there was nothing to write."""
        with self._cond:
            self._stop = True
            self._drain_until = time.monotonic() + DRAIN_BUDGET_SEC
            self._cond.notify_all()
        self._worker.join(DRAIN_BUDGET_SEC + 30.0)
        c = self.counts
        summary = (f"{c.images} images, {c.poses} poses: {c.keyframes} keyframes, {c.not_keyframe} too close to "
                   f"the previous keyframe, {c.no_pose} without pose, {c.malformed} malformed, {c.dropped} dropped")
        if self.writer is None or self.writer.session_count == 0:
            if self.writer is not None:
                self.writer.abort()
            if self.failure:
                self._log("error", f"no map written: {self.failure} ({summary})")
                return False
            self._log("error", f"no keyframes, no map written ({summary}); check the topics "
                               f"({self.values['image_topic']}, {self.values['pose_topic']}) and pose_type")
            return False
        db = self.writer.commit()
        self._log("info", f"map written: {db.path} ({len(db)} images in {len(db.info.sessions)} session(s), "
                          f"{self.writer.session_count} from this drive, the pose of {self.frames}); {summary}")
        return True

    def _log(self, level: str, message: str) -> None:
        # After Ctrl-C the context may be shut down; the rcutils logger still works, print as a fallback.
        try:
            getattr(self.get_logger(), level)(message)
        except Exception:  # noqa: BLE001
            print(message, file=sys.stderr)


# --------------------------------------------------------------------------- CLI

# command-line option (argparse dest) -> parameter name
OPTION_PARAMETERS = {"out": "out", "model": "model_path", "device": "device", "image_topic": "image_topic",
                     "pose_topic": "pose_topic", "pose_type": "pose_type", "min_distance": "min_distance",
                     "min_angle": "min_angle", "duration": "duration", "pose_frames": "pose_frames",
                     "camera_convention": "camera_convention", "max_image_pixels": "max_image_pixels",
                     "append": "append", "session_name": "session_name", "conditions": "conditions"}


def build_parser() -> argparse.ArgumentParser:
    defaults = {s.name: s.default for s in PARAMETERS}
    p = argparse.ArgumentParser(prog="build_map", description=__doc__.split("\n\n")[0],
                                epilog="Options left out take the ROS parameter value (live mode) or the "
                                       "default shown.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--bag", help="build offline from this rosbag2 folder")
    mode.add_argument("--live", action="store_true", help="build from live topics until --duration or Ctrl-C")
    p.add_argument("--out", help="output map directory (with --append: where the result goes instead of MAP)")
    p.add_argument("--append", metavar="MAP",
                   help="add the drive to the existing map MAP as a new session (same model and frames); MAP is "
                        "replaced atomically at the end unless --out is given")
    p.add_argument("--session-name", help="name of the drive's session (default none)")
    p.add_argument("--conditions", help="comma-separated conditions of the drive, e.g. night,rain (default unknown)")
    p.add_argument("--image-topic", help=f"image topic (live default {defaults['image_topic']!r}; offline: the "
                                         "only image topic of the bag when omitted)")
    p.add_argument("--pose-topic", help=f"pose topic (live default {defaults['pose_topic']!r}); offline also /tf "
                                        "with --tf-frames")
    p.add_argument("--tf-frames", metavar="PARENT:CHILD",
                   help="offline (--bag) only: take the poses from the bag's TF, the pose of frame CHILD in frame "
                        "PARENT (e.g. map:base_link) at each image stamp, chained over /tf (interpolated) and "
                        "/tf_static (read automatically when present); --pose-topic defaults to /tf")
    p.add_argument("--pose-frames", metavar="PARENT:CHILD",
                   help="the frames of the poses, recorded in the map (the pose of CHILD in PARENT), for what the "
                        "pose messages leave out: the child of pose_stamped / pose_with_covariance (e.g. "
                        "map:camera_link), or both for an empty header.frame_id. Odometry names both itself, and "
                        "--tf-frames names them offline; a different value here is an error")
    p.add_argument("--camera-convention", choices=CAMERA_CONVENTIONS,
                   help="maps hold camera poses in the body convention (x forward, z up): optical = the poses are "
                        "of an optical frame (z forward) and are rotated; auto (default) = optical when the child "
                        "frame ends in _optical or _optical_frame; body = as they are")
    p.add_argument("--pose-type", choices=tuple(POSE_TYPES),
                   help=f"live: message type of the pose topic (default {defaults['pose_type']})")
    p.add_argument("--compressed", action="store_true", help="live: subscribe <image-topic>/compressed")
    p.add_argument("--model", help="model file (default: the packaged demo model)")
    p.add_argument("--device", type=device_type, help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--min-distance", type=float,
                   help=f"keyframe distance in metres (default {defaults['min_distance']})")
    p.add_argument("--min-angle", type=float, help=f"keyframe angle in degrees (default {defaults['min_angle']})")
    p.add_argument("--duration", type=float, help="live: stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing map")
    add_config_option(p, LocalizerConfig, "max_image_pixels", help_suffix="; offline: every image of the bag, "
                      "live: overrides the max_image_pixels parameter")
    p.set_defaults(max_image_pixels=None)      # live: left out = the parameter's value (params file)
    return p


def run_offline(args: argparse.Namespace) -> int:
    """Delegate to the core map builder (the code behind `r2former build-map`)."""
    defaults = {s.name: s.default for s in PARAMETERS}
    if not args.out and not args.append:
        print("build_map: error: --out MAP (or --append MAP) is required", file=sys.stderr)
        return 2
    try:
        set_max_image_pixels(args.max_image_pixels if args.max_image_pixels is not None
                             else defaults["max_image_pixels"])
        model = load_model(resolve_model_path(args.model or ""), device=args.device or defaults["device"])
        source = open_source(bag=args.bag, image_topic=args.image_topic, pose_topic=args.pose_topic,
                             tf_frames=args.tf_frames, pose_frames=args.pose_frames,
                             camera_convention=args.camera_convention or defaults["camera_convention"])
        build_map(source, model, args.out,
                  min_distance=args.min_distance if args.min_distance is not None else defaults["min_distance"],
                  min_angle=args.min_angle if args.min_angle is not None else defaults["min_angle"],
                  overwrite=args.overwrite, progress=sys.stderr.isatty(), append=args.append,
                  index=None if args.append else "flat", session_name=args.session_name or "",
                  conditions=[c for c in (args.conditions or "").split(",") if c.strip()])
    except EXPECTED_ERRORS as exc:
        print(f"build_map: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build_map: interrupted; no map written", file=sys.stderr)
        return 130
    return 0


def parameter_overrides(args: argparse.Namespace) -> list[Parameter]:
    """Options given on the command line, as parameter overrides (they win over --params-file)."""
    overrides = [Parameter(param, value=getattr(args, dest)) for dest, param in OPTION_PARAMETERS.items()
                 if getattr(args, dest) is not None]
    if args.compressed:
        overrides.append(Parameter("image_transport", value="compressed"))
    if args.overwrite:
        overrides.append(Parameter("overwrite", value=True))
    return overrides


def run_live(args: argparse.Namespace, argv: list[str]) -> int:
    rclpy.init(args=argv)
    node: MapBuilderNode | None = None
    try:
        node = MapBuilderNode(parameter_overrides=parameter_overrides(args))
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while rclpy.ok() and not node.done:
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except EXPECTED_ERRORS as exc:
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot build the map: {exc}")
        return 2
    finally:
        written = False
        if node is not None:
            try:
                written = node.finish()
            except EXPECTED_ERRORS as exc:
                print(f"build_map: error: {exc}", file=sys.stderr)
            node.destroy_node()
        rclpy.try_shutdown()
    if written:
        return 0
    return 2 if node is not None and node.failure else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = build_parser().parse_args(remove_ros_args(argv)[1:])
    if args.live:
        if args.tf_frames is not None:
            print("build_map: error: --tf-frames works only with --bag (live mode takes poses from a pose topic)",
                  file=sys.stderr)
            return 2
        return run_live(args, argv)
    return run_offline(args)


if __name__ == "__main__":
    sys.exit(main())
