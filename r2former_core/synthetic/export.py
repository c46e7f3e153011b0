"""Writing synthetic drives to disk: image folders with TUM ground truth, or rosbag2 bags.

A drive is written by `write_drive`: `images/<stamp>.png` + `poses.txt` (TUM), or with `bag=True`
a rosbag2 `bag/` (camera images and ground-truth odometry) + `poses.txt`. Messages are built by
small functions (`header_msg`, `image_msg`, `odometry_msg`) so that another topic is a connection
in `DriveBagWriter` plus a call to one of them.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm

from ..errors import ConfigError
from .scene import parse_conditions
from .world import SyntheticWorld, Trajectory

log = logging.getLogger(__name__)

STORAGES = ("sqlite3", "mcap")
IMAGE_TOPIC = "/camera/image_raw"
COMPRESSED_IMAGE_TOPIC = "/camera/image_raw/compressed"
ODOM_TOPIC = "/odom"
CAMERA_FRAME = "camera"     # header.frame_id of the images
MAP_FRAME = "map"           # the ground truth's frame
# The ground-truth odometry holds the camera's poses (z = camera height). The synthetic robot's base frame is
# defined to coincide with its camera (identity mounting), so it is labelled base_link: a map built from /odom
# holds base poses and the localizer publishes them as they are.
ODOM_CHILD_FRAME = "base_link"
ODOMETRY_TYPE = "nav_msgs/msg/Odometry"


def stamp_name(ns: int) -> str:
    """'%.6f' of the stamp, from integer nanoseconds so no float rounding can creep in."""
    return f"{ns // 10**9}.{ns % 10**9 // 1000:06d}"


def write_drive(world_or_seed: SyntheticWorld | int, out_dir: str | Path, kind: str = "map",
                conditions: str | Sequence[str] = ("day",), frames: int = 100, size: tuple[int, int] = (480, 640),
                bag: bool = False, compressed: bool = False, storage: str = "sqlite3",
                spacing: float | None = None, progress: bool = False) -> Path:
    """Render a drive to `out_dir`; returns `out_dir`.

    Without `bag`: `images/<stamp>.png` (the stem parses as the stamp) and `poses.txt` (TUM:
    `timestamp tx ty tz qx qy qz qw`). With `bag`: a rosbag2 directory `bag/` holding `/camera/image_raw`
    (sensor_msgs/Image rgb8) or, with `compressed`, `/camera/image_raw/compressed` (JPEG), plus `/odom`
    (nav_msgs/Odometry, ground truth at twice the camera rate), and `poses.txt` beside it.
    ConfigError for bad options, FileExistsError when `out_dir` already holds a drive.
    """
    world = world_or_seed if isinstance(world_or_seed, SyntheticWorld) else SyntheticWorld(int(world_or_seed))
    conditions = parse_conditions(conditions)
    if storage not in STORAGES:
        raise ConfigError(f"storage must be 'sqlite3' or 'mcap', not {storage!r}")
    if compressed and not bag:
        raise ConfigError("compressed images are only written into a bag (bag=True)")
    out = Path(out_dir)
    for target in (out / "bag", out / "poses.txt") + (() if bag else (out / "images",)):
        if target.exists() and (target.is_file() or any(target.iterdir())):
            raise FileExistsError(f"{target} already exists; choose an empty output directory")
    out.mkdir(parents=True, exist_ok=True)
    if bag and (out / "bag").is_dir():
        (out / "bag").rmdir()                            # empty (checked above); the bag writer creates it
    traj = world.trajectory(kind, frames, spacing)
    odom = world.trajectory(kind, frames, spacing, substeps=2)
    writer = DriveBagWriter(out / "bag", storage, compressed, odom) if bag else None
    if not bag:
        (out / "images").mkdir(exist_ok=True)
    try:
        drive = world.drive(kind, conditions, frames, size, spacing)
        for i, frame in enumerate(tqdm(drive, total=frames, unit="img", desc=f"synth {kind}",
                                       disable=None if progress else True)):
            ns = int(traj.stamps_ns[i])
            if writer:
                writer.frame(i, ns, frame.image)
            else:
                bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
                cv2.imwrite(str(out / "images" / f"{stamp_name(ns)}.png"), bgr)
    finally:
        if writer:
            writer.close()
    write_ground_truth(out / "poses.txt", traj)
    log.info("synthetic drive written", extra={"path": str(out), "kind": kind, "frames": frames,
                                               "conditions": ",".join(conditions), "bag": bag})
    return out


def write_ground_truth(path: Path, traj: Trajectory) -> None:
    """TUM file of a trajectory, stamps printed from integer nanoseconds (they equal the image names)."""
    lines = ["# timestamp tx ty tz qx qy qz qw"]
    lines += [f"{stamp_name(int(ns))} " + " ".join(f"{v:.9f}" for v in pose)
              for ns, pose in zip(traj.stamps_ns, traj.poses)]
    path.write_text("\n".join(lines) + "\n")


# -------------------------------------------------------------------------------------------- messages

def header_msg(ts: Any, ns: int, frame_id: str) -> Any:
    """std_msgs/Header at integer nanoseconds."""
    T = ts.types
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9),
                                    frame_id=frame_id)


def image_msg(ts: Any, image: np.ndarray, ns: int, compressed: bool, frame_id: str = CAMERA_FRAME) -> Any:
    """sensor_msgs/Image (rgb8) or, `compressed`, sensor_msgs/CompressedImage (JPEG quality 90)."""
    T = ts.types
    if compressed:
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        return T["sensor_msgs/msg/CompressedImage"](header=header_msg(ts, ns, frame_id), format="jpeg",
                                                    data=jpg.ravel())
    h, w = image.shape[:2]
    return T["sensor_msgs/msg/Image"](header=header_msg(ts, ns, frame_id), height=h, width=w, encoding="rgb8",
                                      is_bigendian=0, step=w * 3, data=np.ascontiguousarray(image).ravel())


def odometry_msg(ts: Any, traj: Trajectory, k: int, frame_id: str, child_frame_id: str) -> Any:
    """nav_msgs/Odometry of sample k of `traj`: its pose, and the body-frame twist from its neighbours."""
    T = ts.types
    ns, p = int(traj.stamps_ns[k]), traj.poses
    a, b = max(k - 1, 0), min(k + 1, len(p) - 1)
    dt = max((traj.stamps_ns[b] - traj.stamps_ns[a]) / 1e9, 1e-9)
    yaw = 2 * np.arctan2(p[:, 5], p[:, 6])
    vel = (p[b, :2] - p[a, :2]) / dt
    forward = float(vel @ (math.cos(yaw[k]), math.sin(yaw[k]))) if b > a else 0.0
    lateral = float(vel @ (-math.sin(yaw[k]), math.cos(yaw[k]))) if b > a else 0.0
    spin = math.remainder(yaw[b] - yaw[a], 2 * math.pi) / dt if b > a else 0.0
    V3, Cov = T["geometry_msgs/msg/Vector3"], np.zeros(36)
    pose = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=p[k, 0], y=p[k, 1], z=p[k, 2]),
                                       orientation=T["geometry_msgs/msg/Quaternion"](x=p[k, 3], y=p[k, 4],
                                                                                    z=p[k, 5], w=p[k, 6]))
    twist = T["geometry_msgs/msg/Twist"](linear=V3(x=forward, y=lateral, z=0.0), angular=V3(x=0.0, y=0.0, z=spin))
    return T[ODOMETRY_TYPE](header=header_msg(ts, ns, frame_id), child_frame_id=child_frame_id,
                            pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=Cov),
                            twist=T["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=Cov.copy()))


# -------------------------------------------------------------------------------------------- bags

class DriveBagWriter:
    """A drive as a rosbag2: camera images at the frame stamps; ground-truth odometry (`odom`, sampled at
    twice the camera rate) at the frame stamps and half-way between. Messages are written in time order."""

    def __init__(self, path: Path, storage: str, compressed: bool, odom: Trajectory):
        self.ts = get_typestore(Stores.ROS2_KILTED)
        self.compressed, self.odom = compressed, odom
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self.writer = Writer(path, version=9, storage_plugin=plugin)
        self.writer.open()
        self.image_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
        topic = COMPRESSED_IMAGE_TOPIC if compressed else IMAGE_TOPIC
        self.image_conn = self.writer.add_connection(topic, self.image_type, typestore=self.ts)
        self.odom_conn = self.writer.add_connection(ODOM_TOPIC, ODOMETRY_TYPE, typestore=self.ts)

    def write(self, conn: Any, ns: int, msg: Any, msgtype: str) -> None:
        self.writer.write(conn, ns, self.ts.serialize_cdr(msg, msgtype))

    def frame(self, i: int, ns: int, image: np.ndarray) -> None:
        """Frame i (stamp `ns`) with the odometry samples 2i (same stamp) and 2i + 1 (after it)."""
        self._odom(2 * i)
        self.write(self.image_conn, ns, image_msg(self.ts, image, ns, self.compressed), self.image_type)
        if 2 * i + 1 < len(self.odom.poses):
            self._odom(2 * i + 1)

    def _odom(self, k: int) -> None:
        msg = odometry_msg(self.ts, self.odom, k, MAP_FRAME, ODOM_CHILD_FRAME)
        self.write(self.odom_conn, int(self.odom.stamps_ns[k]), msg, ODOMETRY_TYPE)

    def close(self) -> None:
        self.writer.close()
