"""r2former_ros.health: windowed diagnostic levels (frequency, input timeout, transient errors) and the
TF cache (r2former_ros.transform_cache) - the ROS-free logic behind the node's diagnostics and TF."""
from __future__ import annotations

import math

import numpy as np
import pytest

from r2former_core.data.poses import compose_poses, invert_poses
from r2former_core.frames import pose_from_xyzrpy
from r2former_ros.health import (
    ERROR,
    OK,
    STALE,
    WARN,
    EventWindow,
    FrequencyStatus,
    InputTimeout,
    OdometryMonitor,
    Status,
    TrackingMonitor,
    merge,
)
from r2former_ros.transform_cache import TransformCache, TransformLookupError


def ticks(status: FrequencyStatus, start: float, stop: float, rate: float) -> float:
    for i in range(round((stop - start) * rate)):
        status.tick(start + i / rate)
    return stop


def test_frequency_within_bounds_is_ok_and_outside_warns():
    f = FrequencyStatus("images", 5.0, 15.0, window=5.0, start=0.0)
    ticks(f, 0.0, 10.0, 10.0)
    s = f.status(10.0)
    assert s.level == OK and "desired frequency met" in s.message
    assert dict(s.values)["images rate (Hz)"] == "10.00"
    ticks(f, 10.0, 20.0, 2.0)                        # camera slows down to 2 Hz
    assert f.status(20.0).level == WARN and "too low" in f.status(20.0).message
    ticks(f, 20.0, 30.0, 40.0)                       # and then floods
    assert f.status(30.0).level == WARN and "too high" in f.status(30.0).message
    ticks(f, 30.0, 40.0, 10.0)                       # back to normal: the warning clears
    assert f.status(40.0).level == OK


def test_frequency_without_events_is_an_error_unless_minimum_is_zero():
    f = FrequencyStatus("images", 1.0, 30.0, window=3.0, start=0.0)
    ticks(f, 0.0, 5.0, 10.0)
    assert f.status(5.0).level == OK
    assert f.status(8.5).level == ERROR and "no events" in f.status(8.5).message   # 3 s window without an image
    poses = FrequencyStatus("poses", 0.0, 30.0, window=3.0, start=0.0)
    assert poses.status(10.0).level == OK


def test_frequency_window_is_shorter_right_after_start():
    f = FrequencyStatus("images", 5.0, 15.0, window=5.0, start=100.0)
    ticks(f, 100.0, 101.0, 10.0)
    count, duration, rate = f.rate(101.0)
    assert count == 10 and duration == pytest.approx(1.0) and rate == pytest.approx(10.0)


@pytest.mark.parametrize("bad", [(-1.0, 5.0), (5.0, 1.0), (0.0, 0.0)])
def test_frequency_rejects_bad_bounds(bad):
    with pytest.raises(ValueError):
        FrequencyStatus("x", *bad)


def test_input_timeout_error_and_stale():
    t = InputTimeout("image", 2.0, start=0.0)
    assert t.status(1.0).level == OK                           # still starting
    assert t.status(2.5).level == STALE and "no image received" in t.status(2.5).message
    t.seen(3.0)
    assert t.status(4.9).level == OK
    s = t.status(5.5)
    assert s.level == ERROR and "no image for 2.5 s" in s.message and dict(s.values)["image age (s)"] == "2.50"
    t.seen(6.0)
    assert t.status(6.1).level == OK                           # a camera that comes back clears it


def test_event_window_lets_a_transient_error_clear():
    w = EventWindow(10.0)
    w.add(1.0)
    assert w.count(5.0) == 1 and w.count(10.9) == 1
    assert w.count(11.01) == 0 and w.total == 1 and w.last == 1.0


def test_merge_takes_the_worst_level():
    s = merge([Status(OK, "fine", [("a", "1")]), Status(WARN, "slow"), Status(ERROR, "dead", [("b", "2")]),
               Status(ERROR, "gone")])
    assert s.level == ERROR and s.message == "dead; gone" and s.values == [("a", "1"), ("b", "2")]


# ------------------------------------------------------------------------------ TF cache

def pose(x, y, z=0.0, yaw=0.0, roll=0.0, pitch=0.0):
    return pose_from_xyzrpy([x, y, z, roll, pitch, yaw])


def test_chain_through_the_common_ancestor_static_and_dynamic():
    c = TransformCache()
    c.add("map", "odom", pose(1.0, 2.0, yaw=0.3), 0.0, static=True)
    for t in np.arange(10.0, 12.01, 0.1):                       # the base drives along odom x at 1 m/s
        c.add("odom", "base_link", pose(t - 10.0, 0.0, yaw=0.1 * (t - 10.0)), t)
    c.add("base_link", "camera", pose(0.5, -0.1, 1.2, yaw=math.pi / 2), 0.0, static=True)
    got = c.lookup("map", "camera", 11.05)
    expected = compose_poses(compose_poses(pose(1.0, 2.0, yaw=0.3), pose(1.05, 0.0, yaw=0.105)),
                             pose(0.5, -0.1, 1.2, yaw=math.pi / 2))
    assert np.allclose(got, expected, atol=1e-9)
    # the inverse direction, and between two leaves through base_link
    assert np.allclose(c.lookup("camera", "map", 11.05), invert_poses(expected), atol=1e-9)
    c.add("base_link", "lidar", pose(-0.2, 0.0, 0.3), 0.0, static=True)
    assert np.allclose(c.lookup("camera", "lidar", 11.0),
                       compose_poses(invert_poses(pose(0.5, -0.1, 1.2, yaw=math.pi / 2)), pose(-0.2, 0.0, 0.3)))
    # stamp 0: the latest common time
    assert np.allclose(c.lookup("odom", "base_link", 0.0), pose(2.0, 0.0, yaw=0.2), atol=1e-9)


def test_lookup_errors_say_whether_waiting_helps():
    c = TransformCache(cache_time=1.0)
    for t in np.arange(0.0, 5.01, 0.1):
        c.add("odom", "base_link", pose(t, 0.0), t)
    with pytest.raises(TransformLookupError, match="after the newest") as future:
        c.lookup("odom", "base_link", 6.0)
    assert future.value.retry
    with pytest.raises(TransformLookupError, match="before the oldest") as old:
        c.lookup("odom", "base_link", 1.0)                      # cache_time 1 s: dropped
    assert not old.value.retry
    with pytest.raises(TransformLookupError, match="does not exist") as unknown:
        c.lookup("odom", "camera", 4.0)
    assert unknown.value.retry
    c.add("world", "other", pose(0.0, 0.0), 0.0, static=True)
    with pytest.raises(TransformLookupError, match="not connected"):
        c.lookup("odom", "other", 4.0)
    assert not c.add("a", "a", pose(0, 0), 0.0) and not c.add("a", "b", np.full(7, np.nan), 0.0)


def test_tracking_monitor_reports_the_filter_or_that_tracking_is_off():
    off = TrackingMonitor(False).status()
    assert off.level == OK and dict(off.values)["tracking"] == "off"
    t = TrackingMonitor(True)
    t.frame("global", 100, 100, 0.2, 0.0)
    t.frame("tracking", 40, 30, 0.05, 9.5)
    t.frame("tracking", 40, 0, 0.05, 9.5, used=False)       # a duplicate stamp: not counted as reranked
    v = dict(t.status().values)
    assert (v["tracking_state"], v["tracking_support"], v["tracking_reranked"]) == ("tracking", "40", "30")
    assert v["tracking_reranked_mean"] == "65.0" and v["tracking_frames"] == "2" and v["tracking_frames_skipped"] == "1"
    assert v["tracking_elsewhere"] == "0.050" and v["tracking_speed_mps"] == "9.50"
    assert v["tracking_still_frames"] == "0" and v["tracking_standing_s"] == "0.0"
    # a standing robot: its frames are held (nothing reranked) and how long it has stood is shown
    for k in range(5):
        t.frame("tracking", 40, 0, 0.05, 0.0, still=True, stamp=10.0 + 0.5 * k)
    v = dict(t.status().values)
    assert v["tracking_still_frames"] == "5" and v["tracking_standing_s"] == "2.0" and v["tracking_reranked"] == "0"
    t.frame("tracking", 40, 30, 0.05, 1.0, stamp=13.0)       # it drives off
    v = dict(t.status().values)
    assert v["tracking_still_frames"] == "5" and v["tracking_standing_s"] == "0.0"
    assert v["tracking_coasted_frames"] == "0"
    # a slow robot: frames nearer than update_spacing to the last used one are coasted (nothing reranked)
    t.frame("tracking", 40, 0, 0.05, 1.0, stamp=13.05, coasted=True)
    t.frame("tracking", 40, 0, 0.05, 1.0, stamp=13.1, coasted=True)
    v = dict(t.status().values)
    assert v["tracking_coasted_frames"] == "2" and v["tracking_reranked"] == "0" and v["tracking_standing_s"] == "0.0"
    # the odometry moves while the view stays the same: a frozen camera, WARN from 5 m on
    t.frame("tracking", 40, 30, 0.05, 1.0, stamp=13.2, frozen_view_m=4.0)
    assert t.status().level == OK and dict(t.status().values)["tracking_frozen_view_m"] == "4.0"
    t.frame("tracking", 40, 30, 0.05, 1.0, stamp=13.4, frozen_view_m=6.0)
    s = t.status()
    assert s.level == WARN and "frozen camera" in s.message and "6 m" in s.message
    t.frame("tracking", 40, 30, 0.05, 1.0, stamp=13.6, frozen_view_m=0.0)
    assert t.status().level == OK
    t.reset("initialpose")
    v = dict(t.status().values)
    assert v["tracking_state"] == "global" and v["tracking_resets"] == "1" and v["tracking_last_reset"] == "initialpose"


def test_odometry_monitor_warns_while_frames_miss_odometry():
    assert dict(OdometryMonitor("", 5.0).status(0.0).values)["odometry"] == "off (odom_topic empty)"
    o = OdometryMonitor("/odom", window=5.0)
    o.message(1.0)
    o.frame(True, "", 1.0)
    s = o.status(1.5)
    assert s.level == OK and dict(s.values)["odometry"] == "used" and dict(s.values)["odometry_age_s"] == "0.50"
    o.frame(False, "odometry stale: the newest is 2.00 s older than the image", 3.0)
    s = o.status(3.5)
    assert s.level == WARN and "1 frames without odometry" in s.message and "stale" in s.message
    assert dict(s.values)["odometry_missing"] == "1"
    o.frame(True, "", 9.0)
    assert o.status(9.0).level == OK                        # the missing frame left the window
