"""build_map --live: images + poses from topics become a map (keyframes, interpolated poses)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from rostools import NodeProcess, RosProbe, save_tiny_model, synthetic_images

pytestmark = pytest.mark.ros

from geometry_msgs.msg import PoseStamped  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from r2former_ros.conversions import pose_msg, rgb_to_image_msg, sec_to_stamp  # noqa: E402


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_model):
    return save_tiny_model(tiny_model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture
def probe():
    p = RosProbe("build_map_probe")
    yield p
    p.close()


def test_live_build_map_keyframes_and_interpolated_poses(tmp_path, probe, model_file, tiny_model):
    from r2former_core.mapdb import MapDatabase
    out = tmp_path / "live_map"
    node = NodeProcess("r2former_ros.build_map_node",
                       ["--live", "--image-topic", "/cam/image", "--pose-topic", "/cam/pose", "--pose-type",
                        "pose_stamped", "--pose-frames", "map:camera_link", "--out", str(out), "--model",
                        str(model_file), "--device", "cpu", "--min-distance", "1.0", "--min-angle", "0",
                        "--ros-args", "-p", "qos_reliability:=reliable"], tmp_path / "logs")
    try:
        pose_pub = probe.publisher(PoseStamped, "/cam/pose")
        image_pub = probe.publisher(Image, "/cam/image")
        assert probe.wait_for_subscriber("/cam/image", 30) and probe.wait_for_subscriber("/cam/pose", 5), \
            node.output()
        time.sleep(0.5)
        images = synthetic_images(20, seed=5)
        for k in range(21):   # poses every 0.1 s, 0.5 m apart; images half-way between poses
            msg = PoseStamped()
            msg.header.stamp = sec_to_stamp(100.0 + 0.1 * k)
            msg.header.frame_id = "map"
            msg.pose = pose_msg([0.5 * k, 0, 0, 0, 0, 0, 1])
            pose_pub.publish(msg)
            if k < 20:
                img = rgb_to_image_msg(images[k])
                img.header.stamp = sec_to_stamp(100.05 + 0.1 * k)
                image_pub.publish(img)
            time.sleep(0.03)
        time.sleep(2.0)
        code, seconds = node.interrupt(10.0)
        output = node.output()
        assert code == 0, output
    finally:
        node.stop()
    db = MapDatabase.load(out, expected_fingerprint=tiny_model.fingerprint)
    # interpolated x = 0.25 + 0.5 k; a keyframe every 1.0 m -> k = 0, 2, ..., 18
    assert len(db) == 10, output
    assert np.allclose(db.poses[:, 0], 0.25 + np.arange(0, 20, 2) * 0.5)
    assert np.allclose(db.stamps, 100.05 + 0.1 * np.arange(0, 20, 2))
    assert db.thumbnail(0) is not None
    # PoseStamped names the parent (header.frame_id); --pose-frames the child
    assert (db.info.parent_frame, db.info.child_frame) == ("map", "camera_link")
    assert "WARN" not in output, output


def test_live_build_map_records_odometry_frames_warns_and_turns_optical_poses(tmp_path, probe, model_file):
    """Odometry names both frames; an odom parent is warned about; an optical child is stored in the body
    convention."""
    from r2former_core.frames import optical_to_body
    from r2former_core.mapdb import MapDatabase
    out = tmp_path / "odom_map"
    node = NodeProcess("r2former_ros.build_map_node",
                       ["--live", "--image-topic", "/cam/image", "--pose-topic", "/cam/odom", "--out", str(out),
                        "--model", str(model_file), "--device", "cpu", "--min-distance", "1.0", "--min-angle", "0",
                        "--ros-args", "-p", "qos_reliability:=reliable"], tmp_path / "logs")
    yaw = 0.4
    raw = np.array([0, 0, 0, 0, 0, np.sin(yaw / 2), np.cos(yaw / 2)])
    try:
        odom_pub = probe.publisher(Odometry, "/cam/odom")
        image_pub = probe.publisher(Image, "/cam/image")
        assert probe.wait_for_subscriber("/cam/image", 30) and probe.wait_for_subscriber("/cam/odom", 5), \
            node.output()
        time.sleep(0.5)
        images = synthetic_images(6, seed=9)
        for k in range(7):
            msg = Odometry()
            msg.header.stamp = sec_to_stamp(200.0 + 0.1 * k)
            msg.header.frame_id = "odom"
            msg.child_frame_id = "camera_optical_frame"
            msg.pose.pose = pose_msg([2.0 * k, 0, 0, *raw[3:]])
            odom_pub.publish(msg)
            if k < 6:
                img = rgb_to_image_msg(images[k])
                img.header.stamp = sec_to_stamp(200.0 + 0.1 * k)
                image_pub.publish(img)
            time.sleep(0.03)
        time.sleep(2.0)
        code, _ = node.interrupt(10.0)
        output = node.output()
        assert code == 0, output
    finally:
        node.stop()
    db = MapDatabase.load(out)
    assert (db.info.parent_frame, db.info.child_frame) == ("odom", "camera_optical_frame"), output
    assert len(db) == 6 and np.allclose(db.poses[:, 0], 2.0 * np.arange(6))
    np.testing.assert_allclose(db.poses[:, 3:], np.tile(optical_to_body(raw)[3:], (6, 1)), atol=1e-12)
    assert "odometry frame 'odom'" in output and "--tf-frames map:camera_link" in output


def test_live_build_map_without_input_writes_nothing(tmp_path, model_file):
    out = tmp_path / "empty_map"
    node = NodeProcess("r2former_ros.build_map_node",
                       ["--live", "--out", str(out), "--model", str(model_file), "--device", "cpu",
                        "--duration", "1.0"], tmp_path / "logs")
    try:
        assert node.wait(30) == 1, node.output()
        assert "no keyframes" in node.output()
        assert not out.exists()
        assert not list(tmp_path.glob("empty_map*"))
    finally:
        node.stop()


def test_offline_build_map_from_a_bag(tmp_path, model_file, tiny_model):
    from bagtools import write_image_pose_bag

    from r2former_core.mapdb import MapDatabase
    stamps = [10.0 + 0.1 * i for i in range(10)]
    poses = np.zeros((10, 7))
    poses[:, 0] = 0.5 * np.arange(10)
    poses[:, 6] = 1
    bag = write_image_pose_bag(tmp_path / "bag", synthetic_images(10, seed=7), stamps, poses=poses,
                               pose_stamps=stamps, storage="mcap")
    out = tmp_path / "bag_map"
    node = NodeProcess("r2former_ros.build_map_node",
                       ["--bag", str(bag), "--image-topic", "/camera/image_raw", "--pose-topic", "/odom",
                        "--out", str(out), "--model", str(model_file), "--device", "cpu", "--min-distance", "1.0",
                        "--min-angle", "0"], tmp_path / "logs")
    try:
        assert node.wait(60) == 0, node.output()
    finally:
        node.stop()
    db = MapDatabase.load(out, expected_fingerprint=tiny_model.fingerprint)
    assert db.poses[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert (db.info.parent_frame, db.info.child_frame) == ("map", "base_link")     # the bag's Odometry frames

    again = NodeProcess("r2former_ros.build_map_node",
                        ["--bag", str(bag), "--out", str(out), "--model", str(model_file), "--device", "cpu"],
                        tmp_path / "logs")
    try:
        assert again.wait(60) == 2
        assert "already exists" in again.output() and "Traceback" not in again.output()
    finally:
        again.stop()


def test_build_map_max_image_pixels_offline_option_and_live_parameter(tmp_path, model_file):
    """--max-image-pixels applies to every image of the bag (offline); live, it overrides the parameter."""
    from bagtools import write_image_pose_bag

    from r2former_core.data.image_limits import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels
    from r2former_ros import build_map_node
    stamps = [10.0 + 0.1 * i for i in range(4)]
    poses = np.zeros((4, 7))
    poses[:, 0] = np.arange(4)
    poses[:, 6] = 1
    bag = write_image_pose_bag(tmp_path / "bag", synthetic_images(4, seed=3), stamps, poses=poses,
                               pose_stamps=stamps, storage="mcap")       # 160 x 120 = 19,200 pixels each
    common = ["build_map", "--bag", str(bag), "--model", str(model_file), "--device", "cpu", "--min-distance", "0",
              "--min-angle", "0"]
    try:
        assert build_map_node.main([*common, "--out", str(tmp_path / "small"), "--max-image-pixels", "19199"]) == 2
        assert not (tmp_path / "small").exists()
        assert build_map_node.main([*common, "--out", str(tmp_path / "fits"), "--max-image-pixels", "19200"]) == 0
        assert (tmp_path / "fits" / "map.json").exists()
    finally:
        set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
    args = build_map_node.build_parser().parse_args(["--live", "--max-image-pixels", "640"])
    assert [(p.name, p.value) for p in build_map_node.parameter_overrides(args)] == [("max_image_pixels", 640)]
    args = build_map_node.build_parser().parse_args(["--live"])
    assert build_map_node.parameter_overrides(args) == []         # left out: the parameter (params file) decides
    spec = next(s for s in build_map_node.PARAMETERS if s.name == "max_image_pixels")
    assert (spec.default, spec.min, spec.max) == (DEFAULT_MAX_IMAGE_PIXELS, 1, 2 ** 30)


@pytest.mark.parametrize("durability", ["transient_local", "volatile"])
def test_live_build_map_joining_late_gets_the_history_only_when_transient_local(tmp_path, model_file, durability):
    """The bag is played completely before the map builder starts (the player stays up). A transient_local,
    reliable builder still receives every image and pose (the player's history, depth 100): nothing is lost to
    a subscriber that discovers the publisher late. A volatile builder receives nothing (the DDS contract the
    transient_local option exists for). The two topics' histories may arrive seconds apart (each is resent
    after the reader's acknack), hence a longer pose_wait."""
    from bagtools import write_image_pose_bag

    from r2former_core.mapdb import MapDatabase
    n = 10
    stamps = [10.0 + 0.1 * i for i in range(n)]
    poses = np.zeros((n, 7))
    poses[:, 0] = 2.0 * np.arange(n)
    poses[:, 6] = 1
    bag = write_image_pose_bag(tmp_path / "bag", synthetic_images(n, seed=3), stamps, poses=poses,
                               pose_stamps=stamps, storage="mcap")
    player = NodeProcess("r2former_ros.bag_player",
                         [str(bag), "--rate", "10", "--qos-depth", "100", "--qos-durability", "transient_local",
                          "--linger", "120"], tmp_path / "logs")
    out = tmp_path / "maps" / "late"
    out.parent.mkdir()
    node = None
    try:
        deadline = time.monotonic() + 60
        while "pass 1: published" not in player.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"published {2 * n} messages" in player.output(), player.output()
        node = NodeProcess("r2former_ros.build_map_node",
                           ["--live", "--image-topic", "/camera/image_raw", "--pose-topic", "/odom", "--out",
                            str(out), "--model", str(model_file), "--device", "cpu", "--min-distance", "0",
                            "--min-angle", "0", "--ros-args", "-p",
                            "qos_reliability:=reliable", "-p", "qos_depth:=100", "-p", "max_pending:=100",
                            "-p", f"qos_durability:={durability}", "-p", "pose_wait:=10.0"], tmp_path / "logs")
        deadline = time.monotonic() + (60 if durability == "transient_local" else 5)
        while time.monotonic() < deadline and f"keyframe {n - 1}:" not in node.output():
            time.sleep(0.05)
        code, _ = node.interrupt(30.0)
        output = node.output()
    finally:
        if node is not None:
            node.stop()
        player.stop()
    if durability == "transient_local":
        assert code == 0, output
        db = MapDatabase.load(out)
        assert db.poses[:, 0].tolist() == poses[:, 0].tolist(), output
        db.close()
    else:
        assert code == 1 and "no keyframes" in output and "0 images" in output, output
        assert not out.exists()
