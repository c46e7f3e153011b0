"""ROS message <-> numpy conversions (images, stamps, poses), without cv_bridge.

Image payloads are decoded by `r2former_core.data.image_codec`, so the node, the offline tools
and the tests share one decoder; malformed messages raise `ImageDecodeError` with the reason.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, PoseArray, PoseWithCovarianceStamped
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from r2former_core.data.image_codec import decode_compressed, decode_raw, encode_compressed, encode_raw
from r2former_core.data.image_limits import ImageTooLargeError
from r2former_core.errors import ImageDecodeError

__all__ = ["ImageDecodeError", "ImageTooLargeError", "compressed_msg_to_rgb", "covariance_to_msg", "image_msg_to_rgb",
           "msg_to_rgb", "ns_to_stamp", "pose_array_msg", "pose_from_msg", "pose_msg", "pose_with_covariance_msg",
           "rgb_to_compressed_msg", "rgb_to_image_msg", "sec_to_stamp", "stamp_to_ns", "stamp_to_sec"]

# --------------------------------------------------------------------------------- time

def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def stamp_to_sec(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def sec_to_stamp(seconds: float) -> Time:
    return ns_to_stamp(round(seconds * 1e9))


# -------------------------------------------------------------------------------- images

def image_msg_to_rgb(msg: Image, max_pixels: int | None = None) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, mono16, ...) -> HxWx3 uint8 RGB.

    A size above `max_pixels` (None: the process-wide `max_image_pixels`) is refused before anything
    is allocated (`ImageTooLargeError`, an `ImageDecodeError`)."""
    return decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.data, bool(msg.is_bigendian),
                      max_pixels=max_pixels)


def compressed_msg_to_rgb(msg: CompressedImage, max_pixels: int | None = None) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg, png) -> HxWx3 uint8 RGB; the size declared in the PNG/JPEG
    header is checked against `max_pixels` before decoding."""
    return decode_compressed(msg.format, msg.data, max_pixels=max_pixels)


def msg_to_rgb(msg: Image | CompressedImage, max_pixels: int | None = None) -> np.ndarray:
    if isinstance(msg, CompressedImage):
        return compressed_msg_to_rgb(msg, max_pixels)
    return image_msg_to_rgb(msg, max_pixels)


def rgb_to_image_msg(image_rgb: np.ndarray, header: Header | None = None, encoding: str = "rgb8") -> Image:
    """HxWx3 uint8 RGB -> sensor_msgs/Image (rgb8, bgr8 or mono8)."""
    height, width, step, data = encode_raw(image_rgb, encoding)
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=0, step=step)
    msg.data = data
    if header is not None:
        msg.header = header
    return msg


def rgb_to_compressed_msg(image_rgb: np.ndarray, header: Header | None = None, fmt: str = "jpeg",
                          quality: int = 90) -> CompressedImage:
    msg = CompressedImage(format=fmt)
    msg.data = encode_compressed(image_rgb, fmt, quality=quality)
    if header is not None:
        msg.header = header
    return msg


# --------------------------------------------------------------------------------- poses

def pose_msg(pose: Sequence[float] | np.ndarray) -> Pose:
    """(7,) x y z qx qy qz qw -> geometry_msgs/Pose (quaternion normalised; zero -> identity)."""
    p = np.asarray(pose, dtype=np.float64).reshape(-1)
    if p.shape != (7,):
        raise ValueError(f"expected a pose of 7 values (x y z qx qy qz qw), got shape {p.shape}")
    q = p[3:]
    norm = float(np.linalg.norm(q))
    q = q / norm if norm > 1e-12 and np.isfinite(norm) else np.array([0.0, 0.0, 0.0, 1.0])
    msg = Pose()
    msg.position.x, msg.position.y, msg.position.z = (float(v) for v in p[:3])
    msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w = (float(v) for v in q)
    return msg


def pose_from_msg(msg: Pose) -> np.ndarray:
    """geometry_msgs/Pose -> (7,) float64 x y z qx qy qz qw."""
    return np.array([msg.position.x, msg.position.y, msg.position.z, msg.orientation.x, msg.orientation.y,
                     msg.orientation.z, msg.orientation.w], dtype=np.float64)


def covariance_to_msg(covariance: np.ndarray) -> np.ndarray:
    """(6, 6) over x y z roll pitch yaw -> 36 float64, row-major and exactly symmetric."""
    c = np.asarray(covariance, dtype=np.float64)
    if c.shape != (6, 6):
        raise ValueError(f"expected a 6x6 covariance, got shape {c.shape}")
    return np.ascontiguousarray(((c + c.T) / 2).reshape(36))


def pose_with_covariance_msg(pose: np.ndarray, covariance: np.ndarray, frame_id: str,
                             stamp: Time) -> PoseWithCovarianceStamped:
    msg = PoseWithCovarianceStamped()
    msg.header.frame_id = frame_id
    msg.header.stamp = stamp
    msg.pose.pose = pose_msg(pose)
    msg.pose.covariance = covariance_to_msg(covariance)
    return msg


def pose_array_msg(poses: np.ndarray, frame_id: str, stamp: Time | None = None) -> PoseArray:
    """(M, 7) map poses -> geometry_msgs/PoseArray."""
    arr = np.asarray(poses, dtype=np.float64).reshape(-1, 7)
    msg = PoseArray()
    msg.header.frame_id = frame_id
    if stamp is not None:
        msg.header.stamp = stamp
    msg.poses = [pose_msg(p) for p in arr]
    return msg
