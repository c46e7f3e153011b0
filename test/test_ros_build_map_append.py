"""build_map --live --append: a live drive becomes a new session of an existing map."""
from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
from rostools import NodeProcess, RosProbe, build_test_map, line_poses, save_tiny_model, synthetic_images

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
    p = RosProbe("build_map_append_probe")
    yield p
    p.close()


def drive_live(probe: RosProbe, node: NodeProcess, msg_type: type, frames: tuple[str, str], count: int) -> None:
    """Publish `count` images, each with a pose 2 m further along +y at the image's stamp."""
    pose_pub = probe.publisher(msg_type, "/cam/pose")
    image_pub = probe.publisher(Image, "/cam/image")
    assert probe.wait_for_subscriber("/cam/image", 60) and probe.wait_for_subscriber("/cam/pose", 5), node.output()
    time.sleep(0.5)
    images = synthetic_images(count + 1, seed=11)
    for k in range(count + 1):
        msg = msg_type()
        msg.header.stamp = sec_to_stamp(300.0 + 0.1 * k)
        msg.header.frame_id = frames[0]
        pose = pose_msg([0.0, 2.0 * k, 0, 0, 0, 0, 1])
        if msg_type is Odometry:
            msg.child_frame_id = frames[1]
            msg.pose.pose = pose
        else:
            msg.pose = pose
        pose_pub.publish(msg)
        if k < count:
            img = rgb_to_image_msg(images[k])
            img.header.stamp = sec_to_stamp(300.0 + 0.1 * k)
            image_pub.publish(img)
        time.sleep(0.03)
    time.sleep(2.0)


def test_live_drive_is_appended_as_a_new_session(tmp_path, probe, model_file, tiny_model):
    from r2former_core.mapdb import MapDatabase
    base = build_test_map(tiny_model, synthetic_images(5, seed=1), line_poses(5, 2.0), tmp_path / "campus",
                          child_frame="camera_link")
    before = MapDatabase.load(base)
    node = NodeProcess("r2former_ros.build_map_node",
                       ["--live", "--image-topic", "/cam/image", "--pose-topic", "/cam/pose", "--pose-type",
                        "pose_stamped", "--append", str(base), "--session-name", "night", "--conditions",
                        "night,rain", "--model", str(model_file), "--device", "cpu", "--min-distance", "1.0",
                        "--ros-args", "-p", "qos_reliability:=reliable"], tmp_path / "logs")
    try:
        drive_live(probe, node, PoseStamped, ("map", ""), 6)
        assert len(MapDatabase.load(base)) == 5          # the map is only replaced at the end
        code, _ = node.interrupt(15.0)
        output = node.output()
        assert code == 0, output
    finally:
        node.stop()
    db = MapDatabase.load(base, verify="full")
    assert len(db) == 11 and db.sessions.tolist() == [0] * 5 + [1] * 6, output
    assert [(s.name, s.conditions) for s in db.info.sessions] == [("", ()), ("night", ("night", "rain"))]
    assert db.info.sessions[1].source == "live /cam/image + /cam/pose (pose_stamped)"
    np.testing.assert_array_equal(db.global_desc[:5], before.global_desc)
    np.testing.assert_allclose(db.poses[5:, 1], 2.0 * np.arange(6))
    assert "11 images in 2 session(s), 6 from this drive" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["campus", "logs"]


def test_live_append_with_other_frames_is_refused_and_leaves_the_map(tmp_path, probe, model_file, tiny_model):
    from r2former_core.mapdb import MapDatabase
    base = build_test_map(tiny_model, synthetic_images(3, seed=2), line_poses(3, 2.0), tmp_path / "campus",
                          child_frame="camera_link")
    digest = hashlib.sha256((base / "map.json").read_bytes()).hexdigest()
    node = NodeProcess("r2former_ros.build_map_node",
                       ["--live", "--image-topic", "/cam/image", "--pose-topic", "/cam/pose", "--append", str(base),
                        "--model", str(model_file), "--device", "cpu", "--ros-args", "-p",
                        "qos_reliability:=reliable"], tmp_path / "logs")
    try:
        drive_live(probe, node, Odometry, ("odom", "base_link"), 3)
        code = node.wait(30)                              # the node stops by itself at the first keyframe
        output = node.output()
    finally:
        node.stop()
    assert code == 2, output
    assert "hold the pose of base_link in odom, map" in output and "must have its map's frames" in output
    assert hashlib.sha256((base / "map.json").read_bytes()).hexdigest() == digest
    assert len(MapDatabase.load(base, verify="full")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["campus", "logs"]
