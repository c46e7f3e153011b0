"""The pure-Python parts of the nodes: state machine, newest-frame slot, pose buffer, pictures, paths."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from r2former_ros.latest_frame import LatestFrameSlot
from r2former_ros.localization_state import LOCALIZED, LOST, NOT_LOCALIZED, LocalizationStateMachine, Transition
from r2former_ros.pose_buffer import PoseBuffer, PoseLookup

# ------------------------------------------------------------------------------ state machine


def run(sm: LocalizationStateMachine, sequence: str) -> list[str]:
    """Feed 'a'ccepted / 'r'ejected results; the state after each."""
    out = []
    for c in sequence:
        sm.update(c == "a")
        out.append(sm.state)
    return out


def test_state_machine_hysteresis():
    sm = LocalizationStateMachine(localized_after=3, lost_after=2)
    assert sm.state == NOT_LOCALIZED
    assert run(sm, "aaraa") == [NOT_LOCALIZED] * 5          # streak broken by a rejection
    assert sm.update(True) == Transition(NOT_LOCALIZED, LOCALIZED)
    assert run(sm, "rara") == [LOCALIZED] * 4               # single rejections do not lose it
    assert run(sm, "r") == [LOCALIZED]
    assert sm.update(False) == Transition(LOCALIZED, LOST)
    assert run(sm, "rrraa") == [LOST] * 5
    assert sm.update(True) == Transition(LOST, LOCALIZED)
    assert sm.update(True) is None


def test_state_machine_thresholds_of_one():
    sm = LocalizationStateMachine(1, 1)
    assert run(sm, "arar") == [LOCALIZED, LOST, LOCALIZED, LOST]
    fresh = LocalizationStateMachine(1, 1)
    assert run(fresh, "r") == [NOT_LOCALIZED]               # not_localized never becomes lost
    with pytest.raises(ValueError):
        LocalizationStateMachine(0, 1)


def test_state_follows_the_filter_with_tracking():
    sm = LocalizationStateMachine(localized_after=5, lost_after=5)   # the single-frame thresholds do not apply
    assert sm.follow("global", False) is None and sm.state == NOT_LOCALIZED
    assert sm.follow("tracking", False) is None                      # a place, not sure enough to publish
    assert sm.follow("tracking", True) == Transition(NOT_LOCALIZED, LOCALIZED)
    assert sm.follow("tracking", False) is None and sm.state == LOCALIZED
    assert sm.follow("lost", False) == Transition(LOCALIZED, LOST)
    assert sm.follow("global", False) is None and sm.state == LOST       # searching again after being localized
    assert sm.follow("tracking", True) == Transition(LOST, LOCALIZED)
    assert sm.follow("global", False) == Transition(LOCALIZED, LOST)     # a reset (stamps back, initial pose)
    fresh = LocalizationStateMachine()
    assert fresh.follow("lost", False) == Transition(NOT_LOCALIZED, LOST)


def test_pose_buffer_clear():
    buf = PoseBuffer(capacity=10)
    buf.add(1.0, np.array([0, 0, 0, 0, 0, 0, 1.0]))
    buf.clear()
    assert len(buf) == 0 and buf.newest_stamp is None and buf.lookup(1.0, final=True)[0] is PoseLookup.MISSING


# ------------------------------------------------------------------------------ newest-frame slot

def test_slot_keeps_only_the_newest_and_counts_drops():
    slot: LatestFrameSlot[int] = LatestFrameSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True and slot.put(3) is True
    frame = slot.take(0.1)
    assert frame is not None and frame.item == 3
    assert slot.take(0.01) is None
    c = slot.counts()
    assert (c.received, c.taken, c.dropped, c.pending) == (3, 1, 2, 0)


def test_slot_with_a_slow_worker_never_queues():
    slot: LatestFrameSlot[int] = LatestFrameSlot()
    seen: list[int] = []

    def worker():
        while True:
            f = slot.take(1.0)
            if f is None:
                return
            seen.append(f.item)
            time.sleep(0.01)

    t = threading.Thread(target=worker)
    t.start()
    for i in range(300):
        slot.put(i)
        time.sleep(0.0005)
    time.sleep(0.1)
    slot.close()
    t.join(2)
    c = slot.counts()
    assert seen[-1] == 299 and seen == sorted(seen)
    assert c.received == 300 and c.taken == len(seen) and c.taken + c.dropped + c.pending == c.received
    assert c.dropped > 0


def test_slot_close_wakes_the_worker():
    slot: LatestFrameSlot[int] = LatestFrameSlot()
    result = []
    t = threading.Thread(target=lambda: result.append(slot.take(None)))
    t.start()
    time.sleep(0.05)
    slot.close()
    t.join(1)
    assert not t.is_alive() and result == [None]


# ------------------------------------------------------------------------------ pose buffer

def pose_x(x: float) -> np.ndarray:
    return np.array([x, 0, 0, 0, 0, 0, 1.0])


def test_pose_buffer_interpolates_and_waits():
    buf = PoseBuffer(tolerance=0.05, max_gap=1.0)
    assert buf.lookup(1.0)[0] is PoseLookup.WAIT
    assert buf.lookup(1.0, final=True)[0] is PoseLookup.MISSING
    buf.add(1.0, pose_x(0.0))
    buf.add(1.2, pose_x(2.0))
    status, pose = buf.lookup(1.05)
    assert status is PoseLookup.OK and pose[0] == pytest.approx(0.5)
    assert buf.lookup(1.25)[0] is PoseLookup.WAIT            # a later pose may still bracket it
    status, pose = buf.lookup(1.22, final=True)              # within tolerance of the newest
    assert status is PoseLookup.OK and pose[0] == 2.0
    assert buf.lookup(0.5)[0] is PoseLookup.MISSING          # older than the history
    buf.add(5.0, pose_x(10.0))                               # a dropout: no interpolation across it
    assert buf.lookup(3.0)[0] is PoseLookup.MISSING


def test_pose_buffer_is_bounded():
    buf = PoseBuffer(capacity=10)
    for i in range(100):
        buf.add(float(i), pose_x(i))
    assert len(buf) == 10 and buf.newest_stamp == 99.0


def test_keyframe_rule_matches_offline_selection():
    from r2former_core.data.keyframes import select_keyframes
    from r2former_ros.build_map_node import is_keyframe
    rng = np.random.default_rng(0)
    poses = np.zeros((40, 7))
    poses[:, 0] = np.cumsum(rng.uniform(0, 0.6, 40))
    yaw = np.cumsum(rng.uniform(0, 0.2, 40))
    poses[:, 5], poses[:, 6] = np.sin(yaw / 2), np.cos(yaw / 2)
    kept, last = [], None
    for i, p in enumerate(poses):
        if is_keyframe(last, p, 1.0, 20.0):
            kept.append(i)
            last = p
    assert kept == select_keyframes(poses, 1.0, 20.0).tolist()


# ------------------------------------------------------------------------------ pictures and markers

def test_draw_matches_places_lines_on_token_pixels():
    from r2former_core.results import TokenMatches
    from r2former_ros.visualization import draw_matches, token_pixels
    query = np.zeros((120, 160, 3), np.uint8)
    thumb = np.zeros((60, 80, 3), np.uint8)    # half size: coordinates scale with the shown image
    m = TokenMatches(query_xy=np.array([[0.5, 0.25]], np.float32), map_xy=np.array([[0.25, 0.5]], np.float32),
                     similarity=np.array([0.9], np.float32))
    assert token_pixels(m.query_xy, (96, 128), (120, 160)).tolist() == [[80.0, 40.0]]
    out = draw_matches(query, thumb, m, model_size=(96, 128), num_lines=5, text=["conf 0.50"])
    banner = 16 + 6
    assert out.shape == (120 + banner, 160 + 160, 3)            # thumb resized to the query height
    assert out[banner + 40, 80].any()                           # start of the line at the query token
    assert out[banner + 80, 160 + 40].any()                     # end at the map token (0.25 * 128 * 160/128)
    assert out[5:15, 5:60].any()                                # text drawn
    none = draw_matches(query, None, TokenMatches(), model_size=(96, 128))
    assert none.shape == (120, 320, 3)


def test_candidate_markers_coloured_by_score():
    pytest.importorskip("rclpy")
    from builtin_interfaces.msg import Time
    from visualization_msgs.msg import Marker

    from r2former_core.results import Candidate
    from r2former_ros.visualization import candidate_markers
    cands = [Candidate(i, f"c{i}", np.array([i, 0, 0, 0, 0, 0, 1.0]), 0.5, s, s)
             for i, s in enumerate([0.9, 0.5, 0.1])]
    msg = candidate_markers(cands, "map", Time(sec=1), max_markers=2)
    assert msg.markers[0].action == Marker.DELETEALL
    arrows = [m for m in msg.markers if m.type == Marker.ARROW and m.action == Marker.ADD]
    assert len(arrows) == 2 and all(m.header.frame_id == "map" for m in msg.markers)
    assert arrows[0].color.g > arrows[0].color.r and arrows[1].color.r >= arrows[0].color.r
    ids = [(m.ns, m.id) for m in msg.markers[1:]]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------------------ paths and parameters

def test_default_model_path_lookup(monkeypatch, tmp_path):
    from r2former_core import resources
    monkeypatch.delenv(resources.MODEL_ENV, raising=False)
    monkeypatch.setattr(resources, "share_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    assert resources.default_model_path() is None
    with pytest.raises(FileNotFoundError, match="parameter model_path"):
        resources.resolve_model_path("", "parameter model_path")
    target = tmp_path / "b" / resources.DEMO_MODEL
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    assert resources.default_model_path() == target
    assert resources.resolve_model_path("") == target
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resources.resolve_model_path(str(tmp_path / "nope.safetensors"))
    monkeypatch.setenv(resources.MODEL_ENV, str(tmp_path / "mine.safetensors"))
    assert resources.default_model_path() == tmp_path / "mine.safetensors"


def test_installed_files_are_found_in_ament_prefixes_first(monkeypatch, tmp_path):
    from r2former_core import resources
    prefix = tmp_path / "install"
    installed = prefix / "share" / resources.PACKAGE / "config" / "localize.yaml"
    installed.parent.mkdir(parents=True)
    installed.write_text("/**: {}\n")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(prefix))
    assert resources.find_file("config/localize.yaml") == installed
    monkeypatch.delenv("AMENT_PREFIX_PATH")
    assert resources.find_file("config/localize.yaml") == resources.SOURCE_ROOT / "config" / "localize.yaml"
    with pytest.raises(FileNotFoundError, match="looked in"):
        resources.find_file("config/missing.yaml")


def test_param_spec_checks():
    pytest.importorskip("rclpy")
    from r2former_ros.parameters import ParamSpec
    spec = ParamSpec("rerank", "r2former", "d", choices=("r2former", "ransac", "none"))
    assert spec.check("ransac") is None
    assert "r2former, ransac, none" in spec.check("foo") and "rerank" in spec.check("foo")
    num = ParamSpec("top_k", 100, "d", min=1, max=1000)
    assert num.check(0) and num.check(1) is None
    assert num.descriptor().integer_range[0].from_value == 1
    assert ParamSpec("x", 0.5, "d", min=0.0, max=1.0).descriptor().floating_point_range[0].to_value == 1.0


# ------------------------------------------------------------------------------ TF adapters

class _StandInTf2:
    """A stand-in of tf2_ros's API (Buffer, TransformListener, TransformBroadcaster, TransformException):
    tf2_ros has no wheel, so Tf2RosClient's use of it is checked against this, not the real package."""

    class TransformException(Exception):
        pass

    def __init__(self, transforms):
        self.transforms = transforms
        self.sent = []
        self.listeners = []
        outer = self

        class Buffer:
            def lookup_transform(self, target, source, time, timeout=None):
                outer.last_query = (target, source, time.nanoseconds, timeout.nanoseconds)
                if (target, source) not in outer.transforms:
                    raise outer.TransformException(f"no {target} -> {source}")
                return outer.transforms[(target, source)]

        class TransformListener:
            def __init__(self, buffer, node):
                outer.listeners.append((buffer, node))

        class TransformBroadcaster:
            def __init__(self, node):
                pass

            def sendTransform(self, msg):  # noqa: N802 - tf2_ros's name
                outer.sent.append(msg)

        self.Buffer, self.TransformListener, self.TransformBroadcaster = Buffer, TransformListener, TransformBroadcaster


def test_tf2_ros_client_against_a_stand_in():
    pytest.importorskip("rclpy")
    from r2former_core.frames import pose_from_xyzrpy
    from r2former_ros.tf_io import Tf2RosClient, TransformUnavailable, pose_from_transform, transform_stamped
    mount = pose_from_xyzrpy([0.3, -0.1, 1.2, 0.0, 0.1, 0.5])
    tf2 = _StandInTf2({("base_link", "camera"): transform_stamped("base_link", "camera", mount, 5)})
    client = Tf2RosClient(node="node", tf2=tf2)
    assert tf2.listeners and tf2.listeners[0][1] == "node"
    got = client.lookup("base_link", "camera", 1_500_000_000, timeout=0.25)
    assert np.allclose(got, mount)
    assert tf2.last_query == ("base_link", "camera", 1_500_000_000, 250_000_000)
    with pytest.raises(TransformUnavailable, match="no odom -> base_link"):
        client.lookup("odom", "base_link", 0, 0.1)
    client.send("map", "odom", mount, 2_000_000_001)
    msg = tf2.sent[-1]
    assert (msg.header.frame_id, msg.child_frame_id) == ("map", "odom")
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (2, 1)
    assert np.allclose(pose_from_transform(msg.transform), mount)


def test_ekf_example_fuses_x_y_yaw_with_a_history_covering_the_latency():
    """config/ekf.yaml (robot_localization, not run here): pose0 is the localizer's pose with x, y, yaw,
    lagged data is smoothed over a history longer than the released model's worst latency on a CPU."""
    from pathlib import Path

    import yaml
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "ekf.yaml").read_text())
    p = doc["ekf_filter_node"]["ros__parameters"]
    assert p["pose0"] == "r2former_localizer/pose" and p["world_frame"] == p["map_frame"] == "map"
    config = p["pose0_config"]
    assert len(config) == 15 and [i for i, v in enumerate(config) if v] == [0, 1, 5]   # x, y, yaw
    assert p["smooth_lagged_data"] is True and p["history_length"] >= 5.6   # docs/BENCHMARKS.md: up to 5.6 s
    assert p["two_d_mode"] is True and p["publish_tf"] is True


# ------------------------------------------------------------------------------ diagnostics of faults

def test_subscription_monitor_says_why_no_image_arrives():
    from r2former_ros.health import SubscriptionMonitor
    m = SubscriptionMonitor("/cam/image", "reliable")
    assert m.why_no_input(0) == "no publisher on /cam/image"
    m.incompatible(2, "RELIABILITY_QOS_POLICY")
    why = m.why_no_input(1)
    assert "none with a compatible QoS" in why and "RELIABILITY" in why and "qos_reliability best_effort" in why
    m.matched(1)                                  # a compatible publisher too: the QoS is not the reason any more
    assert "but no message arrived" in m.why_no_input(2)
    m.lost(7)
    assert "7 message(s) lost" in m.why_no_input(2) and "fastdds_shm.xml" in m.why_no_input(2)
    assert dict(m.values(2))["incompatible QoS events"] == "2"


def test_map_on_disk_tells_deleted_and_replaced_apart(tmp_path):
    import os
    import shutil

    from r2former_ros.health import OK, WARN, MapOnDisk
    m = tmp_path / "map"
    m.mkdir()
    (m / "map.json").write_text("{}")
    watch = MapOnDisk(m)
    assert watch.status().level == OK and dict(watch.status().values)["map on disk"] == "as loaded"
    os.rename(m, tmp_path / "aside")
    assert watch.status().level == WARN and dict(watch.status().values)["map on disk"] == "deleted"
    shutil.copytree(tmp_path / "aside", m)          # same content, another file: a rebuild or a copy
    status = watch.status()
    assert status.level == WARN and dict(status.values)["map on disk"] == "replaced"
    assert "~/reload_map" in status.message
    shutil.rmtree(m)
    os.rename(tmp_path / "aside", m)                # the loaded files back under the name
    assert dict(watch.status().values)["map on disk"] == "as loaded"


@pytest.mark.parametrize("program", ["r2former_ros.localize_node", "r2former_core.cli.main"])
@pytest.mark.parametrize("preset,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_programs_default_openmp_waiting_to_passive_before_torch_loads(program, preset, expected):
    """The node modules import torch, the CLI's commands do; their packages set OMP_WAIT_POLICY first (OpenMP reads
    it when torch loads), and keep a value the user set (r2former_core/openmp.py)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    package = program.rsplit(".", 1)[0]
    code = (f"import sys, os, importlib; importlib.import_module('{package}'); before = 'torch' in sys.modules; "
            f"policy = os.environ.get('OMP_WAIT_POLICY'); importlib.import_module('{program}'); import json; "
            "print(json.dumps([before, policy, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(Path(__file__).parents[1])},
                         capture_output=True, text=True, timeout=120, check=True)
    torch_before, policy, torch_after = json.loads(out.stdout.strip().splitlines()[-1])
    assert not torch_before and policy == expected
    assert torch_after or program.endswith("cli.main"), "the node module loads torch (the CLI loads it per command)"
