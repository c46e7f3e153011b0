"""QoS profiles built from parameters (names as in ROS: best_effort | reliable, volatile | transient_local)."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

RELIABILITY_CHOICES = ("best_effort", "reliable")
DURABILITY_CHOICES = ("volatile", "transient_local")


def stream_qos(reliability: str = "best_effort", depth: int = 5, durability: str = "volatile") -> QoSProfile:
    """Keep-last; `best_effort`, depth 5, `volatile` equals rclpy's `qos_profile_sensor_data`.

    `transient_local` on both sides (with `reliable`) makes the writer's history reach a reader that discovers
    it late: a volatile reader drops what was published before it matched the writer, which DDS discovery can
    delay by seconds on a busy machine although the writer already saw the reader. A transient_local reader
    does not match a volatile writer (ROS reports incompatible QoS, policy DURABILITY)."""
    if reliability not in RELIABILITY_CHOICES:
        raise ValueError(f"unknown QoS reliability {reliability!r}; choose one of {', '.join(RELIABILITY_CHOICES)}")
    if durability not in DURABILITY_CHOICES:
        raise ValueError(f"unknown QoS durability {durability!r}; choose one of {', '.join(DURABILITY_CHOICES)}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(1, int(depth)),
                      reliability=(ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort"
                                   else ReliabilityPolicy.RELIABLE),
                      durability=(DurabilityPolicy.VOLATILE if durability == "volatile"
                                  else DurabilityPolicy.TRANSIENT_LOCAL))


def latched_qos(depth: int = 1) -> QoSProfile:
    """Reliable + transient local: late subscribers (RViz) get the last message."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
