"""The localize node with the tracker (parameter `tracking`, on by default) in its own process, over real
topics: a drive along a map of distinct images with wheel odometry on `odom_topic`.

One node is shared by the tests of this module (in file order): the filter goes from global search to
tracking and then reranks fewer candidates than top_k (global search on track_global_candidates of
them), poses are published with the filter's covariance,
odometry is used (and its absence reported), a standing robot's repeated view is held without reranking, a
frozen camera (one image while the odometry moves) is reported,
/initialpose seeds the filter (the node's own initialpose
does not), stamps going back restart it, a tracking parameter set live restarts it, deactivate/activate
restarts it. The tiny random-weight model cannot rerank by appearance, so the node reranks with RANSAC
(homography inliers of the token matches), which tells an image from the others here.
"""
from __future__ import annotations

import numpy as np
import pytest
from rostools import (
    LATCHED,
    NodeProcess,
    RosProbe,
    build_test_map,
    line_poses,
    save_tiny_model,
    synthetic_images,
    wait_until,
)

pytestmark = pytest.mark.ros

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from r2former_core.data.poses import compose_poses, invert_poses  # noqa: E402
from r2former_core.frames import pose_from_xyzrpy  # noqa: E402
from r2former_ros.conversions import pose_from_msg, pose_msg, rgb_to_image_msg, sec_to_stamp, stamp_to_ns  # noqa: E402

NODE = "/r2former_localizer"
MAP_SIZE, SPACING, DT = 40, 2.0, 0.2          # map entries 2 m apart, frames 0.2 s apart: 10 m/s
TOP_K, TRACK, KIDNAP, GLOBAL = 20, 4, 2, 12
ODOM_IN_MAP = pose_from_xyzrpy([5.0, -3.0, 0.0, 0.0, 0.0, 0.4])     # where the odometry frame lies in the map


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("tracking")
    images = synthetic_images(MAP_SIZE, seed=5)
    model = save_tiny_model(tiny_model, root / "tiny.safetensors")
    poses = line_poses(MAP_SIZE, SPACING)
    map_dir = build_test_map(tiny_model, images, poses, root / "map", child_frame="base_link")
    return dict(root=root, model=model, map=map_dir, images=images, poses=poses)


def status_values(array: DiagnosticArray) -> dict[str, str] | None:
    for status in array.status:
        if status.name.endswith("r2former_localizer: localization"):
            return {kv.key: kv.value for kv in status.values} | {"_level": status.level[0],
                                                                 "_message": status.message}
    return None


class Session:
    def __init__(self, assets):
        self.assets = assets
        self.probe = RosProbe("tracking_probe")
        p = self.probe
        self.poses = p.subscribe(PoseWithCovarianceStamped, f"{NODE}/pose")
        self.candidates = p.subscribe(MarkerArray, f"{NODE}/candidates")
        self.state = p.subscribe(String, f"{NODE}/state", LATCHED)
        self.diagnostics = p.subscribe(DiagnosticArray, "/diagnostics")
        self.image_pub = p.publisher(Image, "/cam/image")
        self.odom_pub = p.publisher(Odometry, "/wheel/odom")
        self.initialpose_pub = p.publisher(PoseWithCovarianceStamped, "/initialpose")
        self.node = NodeProcess("r2former_ros.localize_node", [
            "--ros-args", "-r", "image:=/cam/image",
            "-p", f"map_path:={assets['map']}", "-p", f"model_path:={assets['model']}", "-p", "device:=cpu",
            "-p", "rerank:=ransac", "-p", f"top_k:={TOP_K}", "-p", "diagnostics_rate:=10.0",
            "-p", "qos_reliability:=reliable", "-p", "odom_topic:=/wheel/odom", "-p", "transform_timeout:=0.3",
            "-p", f"track_track_candidates:={TRACK}", "-p", f"track_kidnap_candidates:={KIDNAP}",
            "-p", f"track_global_candidates:={GLOBAL}",
            "-p", "publish_initialpose:=true", "-p", "initialpose_min_confidence:=0.0"], assets["root"] / "logs")
        self.stamp = 100.0
        self.sent: dict[int, int] = {}       # image stamp (ns) -> map entry driven to
        self.frames = 0                      # frames sent (each is processed before the next is sent)

    def ready(self) -> bool:
        return self.probe.wait_for_subscriber("/cam/image", 60) and self.state.wait(1, 20)

    def frame(self, k: int, odometry: bool = True, stamp: float | None = None,
              image: int | None = None, odom_ahead: float = 0.0) -> dict[str, str]:
        """Drive to map entry k: odometry (base_link in odom; `odom_ahead` metres further along the road) and
        the image at the next stamp (the image of entry `image` instead: a frozen camera); waits until the
        frame is processed and returns the first diagnostics that include it."""
        self.stamp = self.stamp + DT if stamp is None else stamp
        stamp_ns = stamp_to_ns(sec_to_stamp(self.stamp))
        self.sent[stamp_ns] = k
        if odometry:
            odom = Odometry()
            odom.header.stamp = sec_to_stamp(self.stamp)
            odom.header.frame_id, odom.child_frame_id = "odom", "base_link"
            base = self.assets["poses"][k].copy()
            base[0] += odom_ahead                                     # (the road runs along the map's x axis)
            odom.pose.pose = pose_msg(compose_poses(invert_poses(ODOM_IN_MAP), base))
            self.odom_pub.publish(odom)
        msg = rgb_to_image_msg(self.assets["images"][k if image is None else image])
        msg.header.stamp = sec_to_stamp(self.stamp)
        msg.header.frame_id = "camera"
        n_diag = len(self.diagnostics)
        self.image_pub.publish(msg)
        self.frames += 1
        assert wait_until(lambda: any(m.markers and stamp_to_ns(m.markers[0].header.stamp) == stamp_ns
                                      for m in self.candidates.snapshot()[-5:]), 20), self.node.output()
        # accepted + rejected counts the frames recorded (after the tracker's figures were updated)
        return self.diag(lambda d: int(d["accepted"]) + int(d["rejected"]) >= self.frames, after=n_diag)

    def diag(self, predicate, after: int | None = None, timeout: float = 5.0) -> dict[str, str]:
        """The first localization diagnostics received after the `after`-th message (default: from now) whose
        values satisfy `predicate` (the last one received when none does within `timeout`)."""
        start = len(self.diagnostics) if after is None else after
        found: dict[str, str] = {}

        def check() -> bool:
            nonlocal found
            for msg in self.diagnostics.snapshot()[start:]:
                values = status_values(msg)
                if values is not None:
                    found = values
                    if predicate(values):
                        return True
            return False
        wait_until(check, timeout)
        return found

    def set_params(self, **values) -> None:
        req = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()])
        res = self.probe.call(SetParameters, f"{NODE}/set_parameters", req)
        assert all(r.successful for r in res.results), [r.reason for r in res.results]

    def close(self) -> None:
        self.node.stop()
        self.probe.close()


@pytest.fixture(scope="module")
def session(assets):
    s = Session(assets)
    try:
        assert s.ready(), s.node.output()
        yield s
    finally:
        s.close()


def test_global_search_then_tracking_with_fewer_candidates_and_odometry(session, assets):
    s = session
    assert s.state.snapshot()[0].data == "not_localized"
    first = s.frame(0)
    assert first["tracking"] == "on" and first["tracking_state"] == "global", first
    assert first["tracking_reranked"] == str(GLOBAL) and first["reranked"] == str(GLOBAL)   # global search
    tracked = [s.frame(k) for k in range(1, 25)]
    states = [d["tracking_state"] for d in tracked]
    assert "tracking" in states and states[-1] == "tracking", states
    while_tracking = [int(d["tracking_reranked"]) for d in tracked[-8:]]
    assert max(while_tracking) <= TRACK + KIDNAP < TOP_K, while_tracking
    last = tracked[-1]
    assert float(last["tracking_reranked_mean"]) < TOP_K
    assert int(last["tracking_support"]) > 0 and 0.0 <= float(last["tracking_elsewhere"]) <= 1.0
    assert float(last["tracking_speed_mps"]) == pytest.approx(SPACING / DT, abs=3.0)
    assert "latency_filter_ms" in last
    # odometry at every image stamp was used
    assert last["odometry"] == "used" and last["odom_topic"] == "/wheel/odom", last
    assert int(last["odometry_used"]) == 25 and last["odometry_missing"] == "0"
    assert last["_level"] == 0 and last["_message"] == "localized (filter tracking)", last
    # poses: published once the filter holds a place, at the truth, with the filter's covariance
    assert wait_until(lambda: s.state.last().data == "localized", 5), [m.data for m in s.state.snapshot()]
    poses = s.poses.snapshot()
    assert 5 <= len(poses) <= 25
    errors = [abs(pose_from_msg(p.pose.pose)[0] - SPACING * s.sent[stamp_to_ns(p.header.stamp)]) for p in poses]
    assert max(errors[-5:]) < 3.0, errors
    cov = np.asarray(poses[-1].pose.covariance).reshape(6, 6)
    assert np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() > 0
    # the node's own initialpose (publish_initialpose) does not seed its tracker
    assert "initialpose at" not in s.node.output()


def test_a_standing_robot_is_held_without_reranking(session):
    """The robot stands at entry 24: the camera repeats its view and the odometry does not move. Once a pose is
    published, those frames are held (track_still_view_change): nothing reranked, the place published again."""
    s = session
    n_poses = len(s.poses)
    held = [s.frame(24, stamp=s.stamp + 0.1) for _ in range(5)]
    last = held[-1]
    assert int(last["tracking_still_frames"]) >= 4 and last["tracking_reranked"] == "0", last
    assert float(last["tracking_standing_s"]) >= 0.3 and last["tracking_state"] == "tracking", last
    assert wait_until(lambda: len(s.poses) >= n_poses + 5, 5)
    standing = s.poses.snapshot()[-4:]
    assert all(abs(pose_from_msg(p.pose.pose)[0] - SPACING * 24) < 3.0 for p in standing)


def test_frames_without_odometry_are_reported(session):
    s = session
    d = [s.frame(k, odometry=False) for k in (25, 26)][-1]
    d = s.diag(lambda v: int(v.get("odometry_missing", "0")) >= 2)
    assert d["odometry"].startswith("odometry stale"), d
    assert d["_level"] == 1 and "without odometry" in d["_message"], d
    assert d["tracking_state"] == "tracking"        # predicted without odometry, still tracking


def test_initialpose_seeds_the_tracker(session, assets):
    s = session
    msg = PoseWithCovarianceStamped()
    msg.header.frame_id = "map"
    msg.header.stamp = sec_to_stamp(1.0)
    msg.pose.pose = pose_msg(assets["poses"][5])
    msg.pose.covariance = np.diag([1.0, 1.0, 1.0, 0.1, 0.1, 0.1]).reshape(-1).tolist()
    assert s.probe.wait_for_subscriber("/initialpose", 10)
    s.initialpose_pub.publish(msg)
    assert wait_until(lambda: "initialpose at x=10.00" in s.node.output(), 5), s.node.output()
    d = s.frame(6, stamp=s.stamp + DT)          # the robot is next to the seed: tracked from there
    assert "seeded from initialpose" in d["tracking_last_reset"], d
    assert d["tracking_state"] == "tracking" and int(d["tracking_reranked"]) <= TRACK + KIDNAP, d


def test_stamps_going_back_restart_the_filter(session):
    s = session
    for k in range(7, 12):
        s.frame(k)
    n_state = len(s.state)
    d = s.frame(12, stamp=s.stamp - 30.0)      # a looped bag: 30 s back
    assert d["tracking_state"] == "global" and d["tracking_reranked"] == str(GLOBAL), d
    assert "filter reset" in s.node.output()
    assert s.state.wait(n_state + 1, 5) and s.state.last().data == "lost"   # it was localized: lost now


def test_tracking_parameters_are_live_and_restart_the_filter(session):
    s = session
    for k in range(13, 20):
        s.frame(k)
    s.set_params(track_min_mass=0.95, track_global_candidates=0)      # 0: global search on the whole top_k
    d = s.frame(20)
    assert "parameters changed" in d["tracking_last_reset"] and d["tracking_reranked"] == str(TOP_K), d
    s.set_params(tracking=False)
    d = s.frame(21)
    assert d["tracking"] == "off" and d["tracking_state"].startswith("off"), d
    assert "filter" not in d["_message"]
    s.set_params(tracking=True)
    assert s.frame(22)["tracking"] == "on"


def test_deactivate_and_activate_restart_the_filter(session):
    s = session
    for k in range(23, 33):
        d = s.frame(k)
    assert d["tracking_state"] == "tracking", d
    for transition in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_ACTIVATE):
        req = ChangeState.Request()
        req.transition.id = transition
        assert s.probe.call(ChangeState, f"{NODE}/change_state", req, timeout=30).success
    assert s.probe.wait_for_subscriber("/cam/image", 10)
    d = s.frame(33)
    assert d["tracking_state"] == "global" and d["tracking_reranked"] == str(TOP_K), d
    assert s.node.alive() and "Traceback" not in s.node.output()


def test_a_frozen_camera_is_reported(session):
    """The camera driver repeats one image while the odometry drives on: diagnostics warn once the robot has
    driven 5 m with an unchanged view (health.FROZEN_VIEW_WARN_M), and stop when the view changes again."""
    s = session
    for k in range(34, 36):
        s.frame(k)
    for k in range(36, 40):                   # 2 m per frame with the image of entry 35
        s.frame(k, image=35)
    d = s.diag(lambda v: float(v.get("tracking_frozen_view_m", "0")) >= 5.0)
    assert float(d["tracking_frozen_view_m"]) >= 5.0 and d["_level"] == 1, d
    assert "frozen camera" in d["_message"], d
    s.frame(38)                               # a new view
    d = s.diag(lambda v: float(v.get("tracking_frozen_view_m", "9")) == 0.0)
    assert d["tracking_frozen_view_m"] == "0.0" and "frozen camera" not in d["_message"], d


def test_a_slow_robot_is_coasted_between_keyframes(session, assets):
    """The odometry moves 0.4 m per frame (a slow robot; the test map has images at its 2 m entries only, so
    the camera shows entry 39 throughout): frames nearer than track_update_spacing (0.75 x 2 m) to the last
    used one are coasted: nothing reranked, counted in the diagnostics, the last result republished moved
    by the odometry since the last used frame; at 1.6 m the next frame is used again."""
    s = session
    msg = PoseWithCovarianceStamped()            # start from a known place (the camera test left it unsure)
    msg.header.frame_id = "map"
    msg.pose.pose = pose_msg(assets["poses"][36])
    msg.pose.covariance = np.diag([1.0, 1.0, 1.0, 0.1, 0.1, 0.1]).reshape(-1).tolist()
    s.initialpose_pub.publish(msg)
    assert wait_until(lambda: "initialpose at x=72.00" in s.node.output(), 5), s.node.output()
    for k in (37, 38):
        s.frame(k)
    n_poses = len(s.poses)
    used = s.frame(39)
    assert used["tracking_state"] == "tracking", used
    n_coasted = int(used["tracking_coasted_frames"])
    coasted = [s.frame(39, odom_ahead=0.4 * (j + 1), stamp=s.stamp + 0.1) for j in range(3)]
    last = coasted[-1]
    assert int(last["tracking_coasted_frames"]) == n_coasted + 3 and last["tracking_reranked"] == "0", last
    assert all(d["tracking_reranked"] == "0" for d in coasted), coasted
    again = s.frame(39, odom_ahead=1.6, stamp=s.stamp + 0.1)
    assert int(again["tracking_coasted_frames"]) == n_coasted + 3 and int(again["tracking_reranked"]) > 0, again
    published = s.poses.snapshot()[n_poses:]
    by_stamp = {stamp_to_ns(p.header.stamp): pose_from_msg(p.pose.pose)[0] for p in published}
    stamps = list(s.sent)[-5:]                # the used frame, three coasted ones, the next used one
    # the used frame was published, and the coasted ones after it, each moved 0.4 m on by the odometry
    xs = [by_stamp.get(t) for t in stamps[:4]]
    assert None not in xs, (by_stamp, stamps)
    assert np.diff(xs) == pytest.approx([0.4, 0.4, 0.4], abs=0.05)
    assert s.node.alive() and "Traceback" not in s.node.output()
