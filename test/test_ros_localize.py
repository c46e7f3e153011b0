"""The localize node in its own process, driven over real topics from the test process.

One node is shared by the tests of this module (in file order): poses, matches, candidates,
diagnostics, state transitions, /initialpose, malformed input, a 30 Hz stream, map reload, SIGINT.
"""
from __future__ import annotations

import time

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
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from r2former_ros.conversions import rgb_to_image_msg, sec_to_stamp, stamp_to_ns  # noqa: E402

NODE = "/r2former_localizer"
MAP_SIZE, MAP2_SIZE = 12, 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("localize")
    images = synthetic_images(MAP_SIZE, seed=1)
    model = save_tiny_model(tiny_model, root / "tiny.safetensors")
    map_a = build_test_map(tiny_model, images, line_poses(MAP_SIZE), root / "map_a")
    map_b = build_test_map(tiny_model, images[:MAP2_SIZE], line_poses(MAP2_SIZE, 2.0), root / "map_b")
    return dict(root=root, model=model, map_a=map_a, map_b=map_b, images=images)


def localization_status(array: DiagnosticArray):
    return next(s for s in array.status if s.name.endswith(": localization"))


class Session:
    """The node under test, the probe and its subscriptions."""

    def __init__(self, assets):
        self.probe = RosProbe("localize_probe")
        p = self.probe
        self.poses = p.subscribe(PoseWithCovarianceStamped, f"{NODE}/pose")
        self.matches = p.subscribe(Image, f"{NODE}/matches")
        self.candidates = p.subscribe(MarkerArray, f"{NODE}/candidates")
        self.map_poses = p.subscribe(PoseArray, f"{NODE}/map_poses", LATCHED)
        self.state = p.subscribe(String, f"{NODE}/state", LATCHED)
        self.diagnostics = p.subscribe(DiagnosticArray, "/diagnostics")
        self.initialpose = p.subscribe(PoseWithCovarianceStamped, "/initialpose")
        self.image_pub = p.publisher(Image, "/cam/image")
        self.node = NodeProcess("r2former_ros.localize_node", [
            "--ros-args", "-r", "image:=/cam/image",
            "-p", f"map_path:={assets['map_a']}", "-p", f"model_path:={assets['model']}", "-p", "device:=cpu",
            "-p", "min_confidence:=0.0", "-p", "matches_rate:=50.0", "-p", "diagnostics_rate:=10.0",
            "-p", "localized_after:=2", "-p", "lost_after:=2", "-p", "publish_initialpose:=true",
            "-p", "initialpose_min_confidence:=0.0", "-p", "top_k:=5", "-p", "tracking:=false",   # single frames
            # reliable + deep DDS history: every frame reaches the node, so the node's own newest-frame
            # slot is what drops (the default best-effort QoS is used by the launch test)
            "-p", "qos_reliability:=reliable", "-p", "qos_depth:=100"], assets["root"] / "logs")
        self.next_stamp = 50.0
        self.images = assets["images"]

    def ready(self) -> bool:
        return (self.probe.wait_for_subscriber("/cam/image", 60) and self.state.wait(1, 20)
                and self.map_poses.wait(1, 10))

    def publish(self, image: np.ndarray | None = None, msg: Image | None = None) -> int:
        """Publish an image (or a prepared message) with the next stamp; returns its stamp in ns."""
        self.next_stamp += 0.1
        if msg is None:
            msg = rgb_to_image_msg(image if image is not None else self.images[3])
        msg.header.stamp = sec_to_stamp(self.next_stamp)
        msg.header.frame_id = "camera"
        self.image_pub.publish(msg)
        return stamp_to_ns(msg.header.stamp)

    def processed(self, stamp_ns: int, timeout: float = 20.0) -> bool:
        """Wait for the result of the image with this stamp (every result publishes ~/candidates)."""
        def seen() -> bool:
            return any(m.markers and stamp_to_ns(m.markers[0].header.stamp) == stamp_ns
                       for m in self.candidates.snapshot()[-20:])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if seen():
                return True
            time.sleep(0.02)
        return False

    def diag(self, timeout: float = 5.0) -> dict[str, str]:
        """Values of the localization status of a diagnostics message received after this call."""
        n = len(self.diagnostics)
        assert self.diagnostics.wait(n + 1, timeout), "no /diagnostics"
        status = localization_status(self.diagnostics.last())
        return {kv.key: kv.value for kv in status.values} | {"_level": status.level, "_message": status.message}

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


def test_pose_matches_candidates_diagnostics(session):
    s = session
    assert s.state.snapshot()[0].data == "not_localized"
    assert len(s.map_poses.last().poses) == MAP_SIZE and s.map_poses.last().header.frame_id == "map"

    stamp = s.publish(s.images[4])
    assert s.poses.wait(1, 30), s.node.output()
    pose = s.poses.last()
    assert pose.header.frame_id == "map"
    assert stamp_to_ns(pose.header.stamp) == stamp
    cov = np.asarray(pose.pose.covariance).reshape(6, 6)
    assert np.allclose(cov, cov.T)
    assert np.linalg.eigvalsh(cov).min() > 0
    q = pose.pose.pose.orientation
    assert np.isclose(np.linalg.norm([q.x, q.y, q.z, q.w]), 1.0)

    assert s.matches.wait(1, 10)
    m = s.matches.last()
    assert m.encoding == "rgb8" and m.height >= 120 and m.width > 160
    assert stamp_to_ns(m.header.stamp) == stamp

    assert s.processed(stamp)
    markers = [mk for mk in s.candidates.last().markers if mk.action == mk.ADD]
    assert markers and all(mk.header.frame_id == "map" for mk in markers)

    d = s.diag()
    for key in ("state", "confidence", "input_rate_hz", "processed_rate_hz", "received", "processed", "dropped",
                "malformed", "latency_extract_ms", "latency_total_ms", "latency_decode_ms", "device", "map_size",
                "map_path", "model_fingerprint"):
        assert key in d, key
    assert d["map_size"] == str(MAP_SIZE) and d["device"] == "cpu"


def test_state_transitions_and_initialpose(session):
    s = session
    for _ in range(2):                          # localized_after = 2 accepted results
        assert s.processed(s.publish())
    assert wait_until(lambda: s.state.last().data == "localized", 10), [m.data for m in s.state.snapshot()]
    n_state = len(s.state)
    assert s.initialpose.wait(1, 10)
    n_initial = len(s.initialpose)
    assert s.initialpose.last().header.frame_id == "map"

    s.set_params(min_confidence=1.0)           # everything rejected from now on
    n_poses = len(s.poses)
    for _ in range(2):
        assert s.processed(s.publish())
    assert s.state.wait(n_state + 1, 10) and s.state.last().data == "lost"
    assert len(s.poses) == n_poses             # rejected results are not published
    assert s.diag()["state"] == "lost"

    s.set_params(min_confidence=0.0)
    for _ in range(2):
        assert s.processed(s.publish())
    assert s.state.wait(n_state + 2, 10)
    assert [m.data for m in s.state.snapshot()[n_state - 1:]] == ["localized", "lost", "localized"]
    assert s.initialpose.wait(n_initial + 1, 10)   # once per transition to localized
    time.sleep(0.3)
    assert len(s.initialpose) == n_initial + 1


def test_malformed_images_are_skipped_and_counted(session):
    s = session
    before = int(s.diag()["malformed"])
    good = rgb_to_image_msg(s.images[2])
    bad_encoding = rgb_to_image_msg(s.images[2])
    bad_encoding.encoding = "yuv422_weird"
    zero = Image(height=0, width=0, encoding="rgb8", step=0)
    short = rgb_to_image_msg(s.images[2])
    short.data = bytes(short.data)[: short.step * 10]
    for msg in (bad_encoding, zero, short):
        s.publish(msg=msg)
        time.sleep(0.4)   # one at a time: the newest-frame slot would otherwise drop some
    stamp = s.publish(msg=good)
    assert s.processed(stamp), s.node.output()
    assert any(stamp_to_ns(p.header.stamp) == stamp for p in s.poses.snapshot())
    assert s.node.alive()
    deadline = time.monotonic() + 5
    while int(s.diag()["malformed"]) < before + 3 and time.monotonic() < deadline:
        pass
    assert int(s.diag()["malformed"]) == before + 3
    assert "skipping image" in s.node.output()


def _stream(s: Session, count: int, rate_hz: float | None) -> dict[int, float]:
    """Publish `count` images at `rate_hz` (None: as fast as possible); {stamp_ns: publish time}."""
    sent: dict[int, float] = {}
    t_next = time.monotonic()
    for i in range(count):
        sent[s.publish(s.images[i % MAP_SIZE])] = time.monotonic()
        if rate_hz:
            t_next += 1 / rate_hz
            time.sleep(max(0.0, t_next - time.monotonic()))
    return sent


def _counts_after(s: Session, d0: dict[str, str], expected: int) -> tuple[dict[str, str], int, int, int]:
    deadline = time.monotonic() + 5
    while True:
        d1 = s.diag()
        received, processed, dropped = (int(d1[k]) - int(d0[k]) for k in ("received", "processed", "dropped"))
        if (received == expected and d1["pending"] == "0") or time.monotonic() > deadline:
            return d1, received, processed, dropped


@pytest.mark.parametrize("rate_hz", [30.0, None], ids=["30Hz", "burst"])
def test_stream_drops_frames_instead_of_queuing(session, rate_hz):
    s = session
    d0 = s.diag()
    sent = _stream(s, 60, rate_hz)
    last = max(sent)
    assert s.processed(last, timeout=15), "the newest frame must always be processed"

    # every pose came soon after its image: latency bounded, not growing as a queue would make it
    arrivals = {stamp_to_ns(m.header.stamp): t for m, t in zip(s.poses.snapshot(), s.poses.times)}
    latencies = [arrivals[k] - sent[k] for k in sorted(sent) if k in arrivals]
    assert latencies and max(latencies) < 3.0, latencies
    assert latencies[-1] < 3.0

    d1, received, processed, dropped = _counts_after(s, d0, 60)
    assert received == 60, d1
    assert d1["pending"] == "0"
    assert processed + dropped == received, d1
    assert processed == len(latencies)              # min_confidence 0: every processed frame gives a pose
    if rate_hz is None:                              # a burst always outruns the model
        assert dropped > 0 and processed < received / 2, d1


def test_map_path_applied_live_bad_path_refused_and_reload(session, assets):
    s = session
    n = len(s.map_poses)
    s.set_params(map_path=str(assets["map_b"]))        # setting map_path loads the map (applied live)
    assert s.map_poses.wait(n + 1, 10)
    assert len(s.map_poses.last().poses) == MAP2_SIZE
    assert s.state.last().data == "not_localized"   # evidence from the old map is discarded
    assert s.diag()["map_size"] == str(MAP2_SIZE)

    req = SetParameters.Request(parameters=[Parameter("map_path", value=str(assets["root"] / "no_such_map"))
                                            .to_parameter_msg()])
    res = s.probe.call(SetParameters, f"{NODE}/set_parameters", req)
    assert not res.results[0].successful and "no_such_map" in res.results[0].reason
    stamp = s.publish()
    assert s.processed(stamp)
    assert any(stamp_to_ns(p.header.stamp) == stamp for p in s.poses.snapshot())
    assert len(s.map_poses) == n + 1 and s.diag()["map_size"] == str(MAP2_SIZE)
    assert s.diag()["map_path"] == str(assets["map_b"])

    res = s.probe.call(Trigger, f"{NODE}/reload_map", Trigger.Request())   # from disk again
    assert res.success and str(assets["map_b"]) in res.message, res.message
    assert s.map_poses.wait(n + 2, 10)


def test_sigint_exits_zero_within_5_seconds(session):
    s = session
    s.publish()            # busy or not, Ctrl-C must end it cleanly
    code, seconds = s.node.interrupt(5.0)
    assert code == 0, s.node.output()
    assert seconds < 5.0
    assert "Traceback" not in s.node.output()


@pytest.mark.parametrize("args, expected", [
    (["-p", "rerank:=foo"], "rerank"),
    (["-p", "top_k:=0"], "top_k"),
    (["-p", "image_transport:=h264"], "image_transport"),
    (["-p", "camera_pose_in_base:=[0.1, 0.2]"], "camera_pose_in_base"),
])
def test_invalid_parameters_fail_at_startup(assets, args, expected):
    node = NodeProcess("r2former_ros.localize_node",
                       ["--ros-args", "-p", f"map_path:={assets['map_a']}", "-p", f"model_path:={assets['model']}",
                        *args], assets["root"] / "logs")
    try:
        assert node.wait(30) == 1
        out = node.output()
        assert expected in out and "cannot start" in out and "Traceback" not in out
    finally:
        node.stop()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_failed_configure_keeps_the_process_up(assets):
    """A configure that fails (here: no CUDA) is logged, the node stays unconfigured and answers its
    lifecycle services; a manager could fix the parameter and configure again."""
    from lifecycle_msgs.srv import GetState
    node = NodeProcess("r2former_ros.localize_node",
                       ["--ros-args", "-r", "__node:=cuda_localizer", "-p", f"map_path:={assets['map_a']}",
                        "-p", f"model_path:={assets['model']}", "-p", "device:=cuda"], assets["root"] / "logs")
    probe = RosProbe("configure_failure_probe")
    try:
        state = probe.call(GetState, "/cuda_localizer/get_state", GetState.Request(), timeout=60)
        assert wait_until(lambda: "configure failed" in node.output(), 60), node.output()
        state = probe.call(GetState, "/cuda_localizer/get_state", GetState.Request())
        assert state.current_state.label == "unconfigured"
        assert node.alive() and "CUDA is not available" in node.output()
        assert "Traceback" not in node.output()
    finally:
        node.stop()
        probe.close()
