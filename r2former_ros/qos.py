"""QoS profiles built from parameters (names as in ROS: best_effort | reliable)."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

RELIABILITY_CHOICES = ("best_effort", "reliable")


def stream_qos(reliability: str = "best_effort", depth: int = 5) -> QoSProfile:
    """Keep-last, volatile; `best_effort` with depth 5 equals rclpy's `qos_profile_sensor_data`."""
    if reliability not in RELIABILITY_CHOICES:
        raise ValueError(f"unknown QoS reliability {reliability!r}; choose one of {', '.join(RELIABILITY_CHOICES)}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(1, int(depth)),
                      reliability=(ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort"
                                   else ReliabilityPolicy.RELIABLE),
                      durability=DurabilityPolicy.VOLATILE)


def latched_qos(depth: int = 1) -> QoSProfile:
    """Reliable + transient local: late subscribers (RViz) get the last message."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
