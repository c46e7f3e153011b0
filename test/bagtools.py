"""Helpers for tests: write small rosbag2 files (sqlite3 or mcap) with images and poses.

Uses `rosbags` only (no ROS installation needed). Bags are written with the ROS 2 Kilted types.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from r2former_core.data.image_codec import encode_compressed, encode_raw

POSE_MSG_TYPES = {
    "odometry": "nav_msgs/msg/Odometry",
    "pose": "geometry_msgs/msg/PoseStamped",
    "pose_cov": "geometry_msgs/msg/PoseWithCovarianceStamped",
}
IMAGE_MSG_TYPES = {"raw": "sensor_msgs/msg/Image", "compressed": "sensor_msgs/msg/CompressedImage"}


def typestore():
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores.ROS2_KILTED)


def stamp_msg(ts, seconds: float):
    """builtin_interfaces/Time for `seconds` (0 -> the zero stamp)."""
    total_ns = int(round(seconds * 1e9))
    return ts.types["builtin_interfaces/msg/Time"](sec=total_ns // 1_000_000_000, nanosec=total_ns % 1_000_000_000)


def header_msg(ts, seconds: float, frame_id: str):
    return ts.types["std_msgs/msg/Header"](stamp=stamp_msg(ts, seconds), frame_id=frame_id)


def image_msg(ts, image_rgb: np.ndarray | bytes, seconds: float, image_type: str = "raw",
              encoding: str = "rgb8", compressed_format: str = "jpeg"):
    """sensor_msgs Image / CompressedImage; `bytes` are stored as the compressed payload as is."""
    header = header_msg(ts, seconds, "camera")
    if image_type == "raw":
        height, width, step, data = encode_raw(image_rgb, encoding)
        return ts.types["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding=encoding,
                                                 is_bigendian=0, step=step,
                                                 data=np.frombuffer(data, dtype=np.uint8))
    if image_type == "compressed":
        payload = image_rgb if isinstance(image_rgb, bytes) else encode_compressed(image_rgb, compressed_format)
        return ts.types["sensor_msgs/msg/CompressedImage"](header=header, format=compressed_format,
                                                           data=np.frombuffer(payload, dtype=np.uint8))
    raise ValueError(f"image_type must be 'raw' or 'compressed', not {image_type!r}")


def pose_msg(ts, pose: np.ndarray, seconds: float, pose_type: str = "odometry", frame_id: str = "map",
             child_frame_id: str = "base_link"):
    """nav_msgs/Odometry, geometry_msgs/PoseStamped or PoseWithCovarianceStamped for a (7,) pose
    (`child_frame_id` is used by Odometry only)."""
    t = ts.types
    x, y, z, qx, qy, qz, qw = (float(v) for v in pose)
    geometry = t["geometry_msgs/msg/Pose"](position=t["geometry_msgs/msg/Point"](x=x, y=y, z=z),
                                           orientation=t["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw))
    header = header_msg(ts, seconds, frame_id)
    if pose_type == "pose":
        return t["geometry_msgs/msg/PoseStamped"](header=header, pose=geometry)
    with_cov = t["geometry_msgs/msg/PoseWithCovariance"](pose=geometry, covariance=np.zeros(36))
    if pose_type == "pose_cov":
        return t["geometry_msgs/msg/PoseWithCovarianceStamped"](header=header, pose=with_cov)
    if pose_type == "odometry":
        vec = t["geometry_msgs/msg/Vector3"]
        twist = t["geometry_msgs/msg/TwistWithCovariance"](
            twist=t["geometry_msgs/msg/Twist"](linear=vec(x=0.0, y=0.0, z=0.0), angular=vec(x=0.0, y=0.0, z=0.0)),
            covariance=np.zeros(36))
        return t["nav_msgs/msg/Odometry"](header=header, child_frame_id=child_frame_id, pose=with_cov, twist=twist)
    raise ValueError(f"pose_type must be one of {', '.join(POSE_MSG_TYPES)}, not {pose_type!r}")


def write_image_pose_bag(path: str | Path, images: Sequence[np.ndarray | bytes], stamps: Sequence[float],
                         poses: np.ndarray | None = None, pose_stamps: Sequence[float] | None = None,
                         image_type: str = "raw", encoding: str = "rgb8", pose_type: str = "odometry",
                         storage: str = "sqlite3", image_topic: str = "/camera/image_raw",
                         pose_topic: str = "/odom", compressed_format: str = "jpeg",
                         bag_time_offset: float = 0.0, zero_header_stamps: bool = False,
                         extra_topics: dict[str, str] | None = None,
                         pose_frames: tuple[str, str] | Sequence[tuple[str, str]] = ("map", "base_link")) -> Path:
    """Write a rosbag2 at `path` (must not exist) with one image topic and, if `poses` is given, one pose topic.

    `pose_frames` (header.frame_id, child_frame_id) of the pose messages: one pair for all, or one per pose.
    Messages are written in time order with bag time = stamp + `bag_time_offset`. With
    `zero_header_stamps` the header stamps are left 0 (readers must fall back to bag time).
    `extra_topics` {topic: msgtype} adds empty connections (to test topic listings).
    Returns the bag path.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    ts = typestore()
    plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
    image_type_name = IMAGE_MSG_TYPES[image_type]
    entries: list[tuple[float, int, str, object]] = []  # (time, order, kind, message)
    for image, stamp in zip(images, stamps, strict=True):
        entries.append((stamp, 1, image_topic, image_msg(ts, image, 0.0 if zero_header_stamps else stamp,
                                                         image_type, encoding, compressed_format)))
    if poses is not None:
        pose_type_name = POSE_MSG_TYPES[pose_type]
        per_pose = isinstance(pose_frames[0], (tuple, list))
        for i, (pose, stamp) in enumerate(zip(np.asarray(poses), pose_stamps, strict=True)):
            frame_id, child = pose_frames[i] if per_pose else pose_frames
            entries.append((stamp, 0, pose_topic, pose_msg(ts, pose, 0.0 if zero_header_stamps else stamp,
                                                           pose_type, frame_id, child)))
    entries.sort(key=lambda e: (e[0], e[1]))

    path = Path(path)
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {image_topic: (writer.add_connection(image_topic, image_type_name, typestore=ts), image_type_name)}
        if poses is not None:
            conns[pose_topic] = (writer.add_connection(pose_topic, pose_type_name, typestore=ts), pose_type_name)
        for topic, msgtype in (extra_topics or {}).items():
            writer.add_connection(topic, msgtype, typestore=ts)
        for stamp, _, topic, msg in entries:
            conn, msgtype = conns[topic]
            t_ns = int(round((stamp + bag_time_offset) * 1e9))
            writer.write(conn, t_ns, ts.serialize_cdr(msg, msgtype))
    return path


# A transform for a TF bag: (header stamp in seconds, parent frame, child frame, (7,) pose of child in parent)
Transform = tuple[float, str, str, np.ndarray]


def tf_message(ts, transforms: Sequence[Transform]):
    """tf2_msgs/TFMessage with one geometry_msgs/TransformStamped per transform."""
    t = ts.types
    items = []
    for seconds, parent, child, pose in transforms:
        x, y, z, qx, qy, qz, qw = (float(v) for v in pose)
        transform = t["geometry_msgs/msg/Transform"](translation=t["geometry_msgs/msg/Vector3"](x=x, y=y, z=z),
                                                     rotation=t["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw))
        items.append(t["geometry_msgs/msg/TransformStamped"](header=header_msg(ts, seconds, parent),
                                                             child_frame_id=child, transform=transform))
    return t["tf2_msgs/msg/TFMessage"](transforms=items)


def write_tf_bag(path: str | Path, images: Sequence[np.ndarray], stamps: Sequence[float],
                 tf: Sequence[tuple[float, Sequence[Transform]]] | None = None,
                 tf_static: Sequence[Transform] | None = None,
                 storage: str = "sqlite3", image_topic: str = "/camera/image_raw", tf_topic: str = "/tf",
                 static_topic: str = "/tf_static") -> Path:
    """Write a rosbag2 with raw images and TF: `tf` (if not None, even empty) is a list of (bag time,
    transforms) messages on `tf_topic`;
    `tf_static` (if not None, even empty) is one message on `static_topic` at the start of the bag.

    Returns the bag path.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    ts = typestore()
    plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
    tf_type, image_type = "tf2_msgs/msg/TFMessage", IMAGE_MSG_TYPES["raw"]
    entries: list[tuple[float, int, str, object, str]] = []
    for image, stamp in zip(images, stamps, strict=True):
        entries.append((stamp, 2, image_topic, image_msg(ts, image, stamp), image_type))
    for bag_time, transforms in tf or ():
        entries.append((bag_time, 1, tf_topic, tf_message(ts, transforms), tf_type))
    if tf_static is not None:
        start = min([e[0] for e in entries], default=0.0)
        entries.append((start, 0, static_topic, tf_message(ts, tf_static), tf_type))
    entries.sort(key=lambda e: (e[0], e[1]))

    path = Path(path)
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {image_topic: writer.add_connection(image_topic, image_type, typestore=ts)}
        if tf is not None:
            conns[tf_topic] = writer.add_connection(tf_topic, tf_type, typestore=ts)
        if tf_static is not None:
            conns[static_topic] = writer.add_connection(static_topic, tf_type, typestore=ts)
        for stamp, _, topic, msg, msgtype in entries:
            writer.write(conns[topic], int(round(stamp * 1e9)), ts.serialize_cdr(msg, msgtype))
    return path
