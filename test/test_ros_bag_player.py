"""bag_player: a rosbag2 written with rosbags is published with its original stamps."""
from __future__ import annotations

import numpy as np
import pytest
from rostools import NodeProcess, RosProbe, synthetic_images

pytestmark = pytest.mark.ros

from bagtools import write_image_pose_bag  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402


@pytest.fixture
def probe():
    p = RosProbe("bag_player_probe")
    yield p
    p.close()


def _stamp(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_player_publishes_every_message_with_original_stamps(tmp_path, probe, storage):
    n = 8
    images = synthetic_images(n, seed=3)
    stamps = [1000.0 + 0.05 * i for i in range(n)]
    poses = np.array([[i, 0, 0, 0, 0, 0, 1] for i in range(n)], float)
    bag = write_image_pose_bag(tmp_path / "bag", images, stamps, poses=poses, pose_stamps=stamps, storage=storage)

    got_images = probe.subscribe(Image, "/camera/image_raw")
    got_odom = probe.subscribe(Odometry, "/odom")
    player = NodeProcess("r2former_ros.bag_player",
                         [str(bag), "--rate", "1", "--wait-for-subscribers", "20", "--start-delay", "0.3"],
                         tmp_path / "logs")
    try:
        code = player.wait(40)
        assert code == 0, player.output()
        assert got_images.wait(n, 5) and got_odom.wait(n, 5), player.output()
        assert len(got_images) == n and len(got_odom) == n
        assert [_stamp(m) for m in got_images.snapshot()] == pytest.approx(stamps, abs=1e-9)
        assert [_stamp(m) for m in got_odom.snapshot()] == pytest.approx(stamps, abs=1e-9)
        first = got_images.snapshot()[0]
        assert (first.height, first.width, first.encoding) == (120, 160, "rgb8")
        assert np.array_equal(np.frombuffer(bytes(first.data), np.uint8).reshape(120, 160, 3), images[0])
        assert [m.pose.pose.position.x for m in got_odom.snapshot()] == list(range(n))
        # paced at the recorded rate: 7 intervals of 50 ms = 350 ms (a margin for a busy machine, where the
        # first messages can reach the probe late and together; at --rate 4 the margin was too small)
        assert got_images.times[-1] - got_images.times[0] >= 0.2
    finally:
        player.stop()


def test_bag_player_topic_filter_and_unknown_topic(tmp_path, probe):
    n = 4
    stamps = [5.0 + 0.1 * i for i in range(n)]
    poses = np.array([[i, 0, 0, 0, 0, 0, 1] for i in range(n)], float)
    bag = write_image_pose_bag(tmp_path / "bag", synthetic_images(n), stamps, poses=poses, pose_stamps=stamps)

    got_odom = probe.subscribe(Odometry, "/odom")
    got_images = probe.subscribe(Image, "/camera/image_raw")
    player = NodeProcess("r2former_ros.bag_player",
                         [str(bag), "--topics", "/odom", "--rate", "10", "--wait-for-subscribers", "20"],
                         tmp_path / "logs")
    try:
        assert player.wait(40) == 0, player.output()
        assert got_odom.wait(n, 5)
        assert len(got_images) == 0
    finally:
        player.stop()

    bad = NodeProcess("r2former_ros.bag_player", [str(bag), "--topics", "/nope"], tmp_path / "logs")
    try:
        assert bad.wait(30) == 2
        out = bad.output()
        assert "/nope" in out and "/odom" in out and "Traceback" not in out
    finally:
        bad.stop()


def test_bag_player_waits_for_the_number_of_subscribers_asked(tmp_path, probe):
    """--subscribers TOPIC=2: the player starts only when both subscribers are matched, so the one that came
    late still gets every message (volatile topics do not replay what was sent before a match)."""
    import time

    n = 5
    stamps = [7.0 + 0.1 * i for i in range(n)]
    bag = write_image_pose_bag(tmp_path / "bag", synthetic_images(n), stamps)
    early = probe.subscribe(Image, "/camera/image_raw")
    player = NodeProcess("r2former_ros.bag_player",
                         [str(bag), "--rate", "10", "--wait-for-subscribers", "30",
                          "--subscribers", "/camera/image_raw=2"], tmp_path / "logs")
    try:
        time.sleep(2.0)                              # the player is up and waiting for the second subscriber
        assert len(early) == 0, player.output()
        late = probe.subscribe(Image, "/camera/image_raw")
        assert player.wait(40) == 0, player.output()
        assert early.wait(n, 5) and late.wait(n, 5), player.output()
        assert len(early) == n and len(late) == n
    finally:
        player.stop()

    bad = NodeProcess("r2former_ros.bag_player", [str(bag), "--subscribers", "/camera/image_raw"], tmp_path / "logs")
    try:
        assert bad.wait(30) == 2 and "TOPIC=N" in bad.output()
    finally:
        bad.stop()


@pytest.mark.parametrize("option", [["--ack-timeout", "-1"], ["--linger", "-0.5"], ["--start-delay", "-1"],
                                    ["--wait-for-subscribers", "-2"], ["--qos-depth", "0"], ["--rate", "0"]])
def test_bag_player_refuses_negative_times_and_depth(tmp_path, capsys, option):
    from r2former_ros.bag_player import main
    bag = write_image_pose_bag(tmp_path / "bag", synthetic_images(1, seed=1), [1.0], storage="mcap")
    assert main(["bag_player", str(bag), *option]) == 2
    assert "bag_player: error:" in capsys.readouterr().err
