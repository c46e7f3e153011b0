"""TF for the localize node: look up transforms at a stamp, broadcast one.

Two implementations behind one interface (`TfClient`):

* `Tf2RosClient`: tf2_ros.Buffer + TransformListener + TransformBroadcaster (a ROS 2 installation);
* `TopicTfClient`: where tf2_ros is missing but tf2_msgs can be imported (ROS 2 from pip wheels plus
  the tf2_msgs built by `python -m r2former_ros.msg_build`): subscribes `/tf` and `/tf_static`
  with tf2's QoS into a `TransformCache` and publishes `/tf`.

`make_tf_client` picks the first that works; `TfUnavailable` says what to install otherwise.
"""
from __future__ import annotations

import importlib
import time
from typing import Any, Protocol

import numpy as np

from r2former_core.errors import ConfigError

from .transform_cache import TransformCache, TransformLookupError

TF_TOPIC, TF_STATIC_TOPIC = "/tf", "/tf_static"


class TfUnavailable(ConfigError):
    """Neither tf2_ros nor tf2_msgs can be imported."""


class TransformUnavailable(LookupError):
    """A transform could not be looked up within the timeout; the message says why."""


class TfClient(Protocol):
    backend: str

    def lookup(self, target: str, source: str, stamp_ns: int, timeout: float) -> np.ndarray:
        """Pose (7,) of `source` in `target` at `stamp_ns` (0 = latest); TransformUnavailable otherwise."""

    def send(self, parent: str, child: str, pose: np.ndarray, stamp_ns: int) -> None:
        """Broadcast the pose of `child` in `parent` on /tf."""

    def close(self) -> None:
        ...


def pose_from_transform(transform: Any) -> np.ndarray:
    t, r = transform.translation, transform.rotation
    return np.array([t.x, t.y, t.z, r.x, r.y, r.z, r.w], dtype=np.float64)


def transform_stamped(parent: str, child: str, pose: np.ndarray, stamp_ns: int) -> Any:
    from builtin_interfaces.msg import Time
    from geometry_msgs.msg import TransformStamped
    msg = TransformStamped()
    msg.header.frame_id, msg.child_frame_id = parent, child
    msg.header.stamp = Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))
    t, r = msg.transform.translation, msg.transform.rotation
    t.x, t.y, t.z = (float(v) for v in pose[:3])
    r.x, r.y, r.z, r.w = (float(v) for v in pose[3:])
    return msg


def stamp_seconds(stamp: Any) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class Tf2RosClient:
    """tf2_ros on a ROS 2 installation (`tf2` module given for testing with a stand-in)."""

    backend = "tf2_ros"

    def __init__(self, node: Any, tf2: Any = None) -> None:
        if tf2 is None:
            tf2 = importlib.import_module("tf2_ros")
        self._tf2 = tf2
        self._buffer = tf2.Buffer()
        self._listener = tf2.TransformListener(self._buffer, node)
        self._broadcaster = tf2.TransformBroadcaster(node)

    def lookup(self, target: str, source: str, stamp_ns: int, timeout: float) -> np.ndarray:
        from rclpy.duration import Duration
        from rclpy.time import Time
        try:
            tf = self._buffer.lookup_transform(target, source, Time(nanoseconds=int(stamp_ns)),
                                               timeout=Duration(nanoseconds=int(timeout * 1e9)))
        except self._tf2.TransformException as exc:
            raise TransformUnavailable(f"{target} -> {source}: {exc}") from None
        return pose_from_transform(tf.transform)

    def send(self, parent: str, child: str, pose: np.ndarray, stamp_ns: int) -> None:
        self._broadcaster.sendTransform(transform_stamped(parent, child, pose, stamp_ns))

    def close(self) -> None:
        unregister = getattr(self._listener, "unregister", None)
        if unregister is not None:
            unregister()


class TopicTfClient:
    """/tf and /tf_static into a TransformCache, /tf out; needs only tf2_msgs."""

    backend = "tf2_msgs"

    def __init__(self, node: Any, cache_time: float = 10.0) -> None:
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from tf2_msgs.msg import TFMessage
        self.cache = TransformCache(cache_time=cache_time)
        self._node = node
        dynamic = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
        static = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._subs = [node.create_subscription(TFMessage, TF_TOPIC, lambda m: self._on_tf(m, False), dynamic),
                      node.create_subscription(TFMessage, TF_STATIC_TOPIC, lambda m: self._on_tf(m, True), static)]
        self._pub = node.create_publisher(TFMessage, TF_TOPIC, dynamic)
        self._msg_type = TFMessage

    def _on_tf(self, msg: Any, static: bool) -> None:
        for tf in msg.transforms:
            self.cache.add(tf.header.frame_id, tf.child_frame_id, pose_from_transform(tf.transform),
                           stamp_seconds(tf.header.stamp), static=static)

    def lookup(self, target: str, source: str, stamp_ns: int, timeout: float) -> np.ndarray:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                return self.cache.lookup(target, source, stamp_ns * 1e-9)
            except TransformLookupError as exc:
                if not exc.retry or time.monotonic() >= deadline:
                    raise TransformUnavailable(f"{target} -> {source}: {exc}") from None
            time.sleep(0.01)

    def send(self, parent: str, child: str, pose: np.ndarray, stamp_ns: int) -> None:
        self._pub.publish(self._msg_type(transforms=[transform_stamped(parent, child, pose, stamp_ns)]))

    def close(self) -> None:
        for sub in self._subs:
            self._node.destroy_subscription(sub)
        self._node.destroy_publisher(self._pub)


def make_tf_client(node: Any) -> TfClient:
    """tf2_ros when installed, else the topic client over tf2_msgs; TfUnavailable when neither imports."""
    try:
        import tf2_ros  # noqa: F401
        return Tf2RosClient(node)
    except ImportError:
        pass
    try:
        import tf2_msgs.msg  # noqa: F401
    except ImportError:
        raise TfUnavailable(
            "TF is needed (camera_pose_in_base is empty and the map holds camera poses, or publish_tf is true) but "
            "neither tf2_ros nor tf2_msgs can be imported: install ROS 2's tf2_ros, or build tf2_msgs with "
            "`python -m r2former_ros.msg_build` and add the printed path to PYTHONPATH, or set "
            "camera_pose_in_base") from None
    return TopicTfClient(node)
