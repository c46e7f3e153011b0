"""rosbag2 access with `rosbags` (no ROS install needed): opening, topics, and the messages' fields."""
from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw
import numpy as np
from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.rosbag2 import ReaderError
from rosbags.typesys import Stores, get_typestore

from ...errors import DataError
from ..image_codec import decode_compressed, decode_raw

IMAGE_MSG_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
POSE_MSG_TYPES = ("nav_msgs/msg/Odometry", "geometry_msgs/msg/PoseStamped",
                  "geometry_msgs/msg/PoseWithCovarianceStamped")
TF_MSG_TYPE = "tf2_msgs/msg/TFMessage"
TF_TOPIC = "/tf"
TF_STATIC_TOPIC = "/tf_static"  # read along with a TF pose topic whenever the bag has it

#: What deserializing a message of a damaged or unexpected bag raises.
MESSAGE_ERRORS = (AnyReaderError, AttributeError, ValueError)


@functools.cache
def typestore() -> Any:
    """The message types used for bags without embedded definitions (created once)."""
    return get_typestore(Stores.ROS2_KILTED)


def bag_location(bag_path: str | Path) -> Path:
    """The path AnyReader wants: a rosbag2 folder (also accepted: a file inside it) or a ROS 1 .bag."""
    path = Path(bag_path)
    if not path.exists():
        raise DataError(f"bag {path} does not exist")
    if path.is_file():
        if path.suffix == ".bag":
            return path
        if (path.parent / "metadata.yaml").is_file():
            return path.parent
        raise DataError(f"{path} is not a rosbag2 folder: pass the bag folder (with metadata.yaml); for a "
                        "lone .mcap/.db3 file, put it in its own folder and run `ros2 bag reindex <folder>`")
    if not (path / "metadata.yaml").is_file():
        raise DataError(f"{path} is not a rosbag2 folder (no metadata.yaml); if it holds a recording whose "
                        "metadata was lost, run `ros2 bag reindex <folder>`")
    return path


@contextmanager
def open_bag(bag_path: str | Path) -> Iterator[Any]:
    """An open AnyReader (rosbag2 sqlite3/mcap, or ROS 1); failures to open become DataError."""
    location = bag_location(bag_path)
    try:
        reader = AnyReader([location], default_typestore=typestore())
        reader.open()
    except (AnyReaderError, ReaderError, OSError, KeyError, ValueError, sqlite3.DatabaseError) as exc:
        raise DataError(f"cannot read bag {location}: {exc}") from exc
    try:
        yield reader
    except bag_read_errors() as exc:   # a bag damaged past its index fails while messages are read
        raise DataError(f"cannot read bag {location}: {type(exc).__name__}: {exc}; the bag is truncated or damaged "
                        "(a recording cut short can often be repaired with `ros2 bag reindex`)") from exc
    finally:
        reader.close()


def bag_read_errors() -> tuple[type[BaseException], ...]:
    """What the bag readers raise for damaged files: rosbags' errors, sqlite3 / apsw (rosbags' SQLite) errors."""
    return (AnyReaderError, ReaderError, sqlite3.DatabaseError, apsw.Error)


def reader_topics(reader: Any) -> dict[str, str]:
    """Topic name -> message type of an open bag."""
    return {name: (info.msgtype or "(mixed types)") for name, info in reader.topics.items()}


def list_topics(bag_path: str | Path) -> dict[str, str]:
    """Topic name -> message type of the bag (e.g. {'/odom': 'nav_msgs/msg/Odometry'})."""
    with open_bag(bag_path) as reader:
        return reader_topics(reader)


def format_topics(topics: dict[str, str]) -> str:
    """'topics in the bag: /a (type), ...' for error messages."""
    if not topics:
        return "the bag has no topics"
    return "topics in the bag: " + ", ".join(f"{name} ({msgtype})" for name, msgtype in sorted(topics.items()))


def connections(reader: Any, topic: str, supported: tuple[str, ...], role: str, bag: Path) -> list[Any]:
    """The connections of `topic`; DataError when it is missing or of a type not in `supported`."""
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        raise DataError(f"{role} topic {topic!r} is not in bag {bag}; {format_topics(reader_topics(reader))}")
    bad = sorted({c.msgtype for c in conns if c.msgtype not in supported})
    if bad:
        raise DataError(f"{role} topic {topic!r} in bag {bag} has type {', '.join(bad)}; supported "
                        f"{role} types: {', '.join(supported)}")
    return conns


def header_stamp(msg: Any, bag_time_ns: int) -> float:
    """Header stamp in seconds, or the bag (receive) time when the header stamp is zero (unset)."""
    stamp = msg.header.stamp
    if stamp.sec == 0 and stamp.nanosec == 0:
        return bag_time_ns * 1e-9
    return stamp.sec + stamp.nanosec * 1e-9


def pose_of(msg: Any, msgtype: str) -> np.ndarray:
    """(7,) pose of an Odometry, PoseStamped or PoseWithCovarianceStamped message."""
    pose = msg.pose if msgtype == "geometry_msgs/msg/PoseStamped" else msg.pose.pose
    p, q = pose.position, pose.orientation
    return np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w], dtype=np.float64)


def decode_image_msg(msg: Any, msgtype: str) -> np.ndarray:
    """RGB uint8 image of an Image or CompressedImage message (ImageDecodeError when malformed)."""
    if msgtype == "sensor_msgs/msg/CompressedImage":
        return decode_compressed(msg.format, msg.data)
    return decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.data, bool(msg.is_bigendian))
