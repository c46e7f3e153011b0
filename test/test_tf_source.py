"""Poses from TF in a rosbag2: /tf (interpolated) + /tf_static chained between two frames.

Expected poses are computed independently here with 4x4 matrices (Rodrigues rotations), from edge
trajectories on which linear position + slerp interpolation is exact (constant velocity, constant
angular rate about a fixed axis), so interpolation between TF stamps can be checked to 1e-9.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from bagtools import write_image_pose_bag, write_tf_bag

from r2former_core.data.sources import PoseFrames, RosbagSource, TransformTree, open_source, parse_tf_frames
from r2former_core.errors import DataError

IMAGE_TOPIC = "/camera/image_raw"
IMAGE_STAMPS = 100.0 + 0.1 * np.arange(10) + 0.013   # between the TF stamps below
MAP_ODOM_STAMPS = 99.5 + 0.5 * np.arange(6)           # 99.5 .. 102.0, 2 Hz
ODOM_BASE_STAMPS = 99.95 + 0.1 * np.arange(14)        # 99.95 .. 101.25, 10 Hz


# --------------------------------------------------------------------------------------------
# Independent reference math
# --------------------------------------------------------------------------------------------

def rodrigues(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def quat_axis_angle(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    return np.concatenate([axis * np.sin(angle / 2), [np.cos(angle / 2)]])


def matrix_of_pose(pose: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(pose[3:], dtype=np.float64) / np.linalg.norm(pose[3:])
    m = np.eye(4)
    m[:3, :3] = [[w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
                 [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
                 [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z]]
    m[:3, 3] = pose[:3]
    return m


class Edge:
    """pose(t) of child in parent: position p0 + v t, rotation about a fixed axis at a constant rate."""

    def __init__(self, p0, v, axis, angle0, rate, t0=100.0):
        self.p0, self.v, self.axis = np.asarray(p0, float), np.asarray(v, float), np.asarray(axis, float)
        self.angle0, self.rate, self.t0 = angle0, rate, t0

    def pose(self, t: float) -> np.ndarray:
        dt = t - self.t0
        return np.concatenate([self.p0 + self.v * dt, quat_axis_angle(self.axis, self.angle0 + self.rate * dt)])

    def matrix(self, t: float) -> np.ndarray:
        dt = t - self.t0
        m = np.eye(4)
        m[:3, :3] = rodrigues(self.axis, self.angle0 + self.rate * dt)
        m[:3, 3] = self.p0 + self.v * dt
        return m


MAP_ODOM = Edge([5.0, -2.0, 0.1], [0.01, 0.02, 0.0], [0.1, 0.2, 1.0], 0.3, 0.01)         # slow drift
ODOM_BASE = Edge([1.0, 2.0, 0.0], [1.5, -0.4, 0.05], [0.05, -0.1, 1.0], -0.5, 0.6)        # moving
BASE_CAMERA = Edge([0.2, 0.0, 0.5], [0.0, 0.0, 0.0], [1.0, -1.0, 1.0], 2.0943951, 0.0)   # optical frame, static
BASE_LIDAR = Edge([-0.1, 0.05, 0.8], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], np.pi, 0.0)        # static


def expected(chain_matrix, stamps) -> np.ndarray:
    return np.stack([chain_matrix(t) for t in stamps])


def map_camera(t):
    return MAP_ODOM.matrix(t) @ ODOM_BASE.matrix(t) @ BASE_CAMERA.matrix(t)


def assert_poses(poses: np.ndarray, matrices: np.ndarray, atol: float = 1e-9) -> None:
    assert poses.shape == (len(matrices), 7) and np.all(np.isfinite(poses))
    got = np.stack([matrix_of_pose(p) for p in poses])
    assert np.max(np.abs(got - matrices)) < atol, np.max(np.abs(got - matrices))
    assert np.allclose(np.linalg.norm(poses[:, 3:], axis=1), 1.0, atol=1e-12)


def images(n: int, seed: int = 0, size=(120, 160)) -> list[np.ndarray]:
    import cv2
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
        out.append(cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC))
    return out


def robot_tf(map_odom_stamps=MAP_ODOM_STAMPS, odom_base_stamps=ODOM_BASE_STAMPS, extra=()):
    """/tf messages: map->odom and odom->base_link in separate messages (own stamps); '/map' tests '/' stripping."""
    messages = [(t, [(t, "/map", "odom", MAP_ODOM.pose(t))]) for t in map_odom_stamps]
    messages += [(t, [(t, "odom", "base_link", ODOM_BASE.pose(t))] + [e(t) for e in extra]) for t in odom_base_stamps]
    return sorted(messages, key=lambda m: m[0])


STATIC = [(0.0, "base_link", "camera", BASE_CAMERA.pose(0.0)), (0.0, "base_link", "/lidar", BASE_LIDAR.pose(0.0))]


@pytest.fixture(scope="module")
def tf_bag(tmp_path_factory):
    path = tmp_path_factory.mktemp("tf") / "bag"
    return write_tf_bag(path, images(len(IMAGE_STAMPS)), IMAGE_STAMPS, tf=robot_tf(), tf_static=STATIC)


# --------------------------------------------------------------------------------------------
# Poses
# --------------------------------------------------------------------------------------------

def test_pose_math_helpers_match_matrices():
    from r2former_core.data.poses import compose_poses, invert_poses
    a, b = ODOM_BASE.pose(100.37), BASE_CAMERA.pose(0.0)
    assert np.max(np.abs(matrix_of_pose(compose_poses(a, b)) - matrix_of_pose(a) @ matrix_of_pose(b))) < 1e-12
    assert np.max(np.abs(matrix_of_pose(invert_poses(a)) - np.linalg.inv(matrix_of_pose(a)))) < 1e-12


def test_map_camera_is_the_interpolated_chain(tf_bag):
    # image stamps lie strictly between TF stamps of both dynamic edges: interpolation is exercised
    tf_stamps = np.concatenate([MAP_ODOM_STAMPS, ODOM_BASE_STAMPS])
    assert not np.isin(np.round(IMAGE_STAMPS, 6), np.round(tf_stamps, 6)).any()
    source = RosbagSource(tf_bag, IMAGE_TOPIC, "/tf", tf_frames="map:camera")
    stamps, poses = source.poses()
    assert np.allclose(stamps, IMAGE_STAMPS, atol=1e-9) and len(source) == len(IMAGE_STAMPS)
    assert_poses(poses, expected(map_camera, stamps))
    assert "/tf, /tf_static" in source.tf_tree.source and "map -> camera" in source.description
    # records carry the same poses; a ROS 1 style '/map' in the option is the same frame
    assert np.array_equal(np.stack([r.pose for r in source]), poses)
    again = RosbagSource(tf_bag, IMAGE_TOPIC, "/tf", tf_frames="/map:/camera")
    assert np.array_equal(again.poses()[1], poses)


def test_inverse_and_cross_branch_lookups(tf_bag):
    stamps = IMAGE_STAMPS
    camera_map = RosbagSource(tf_bag, IMAGE_TOPIC, "/tf", tf_frames="camera:map").poses()[1]
    assert_poses(camera_map, expected(lambda t: np.linalg.inv(map_camera(t)), stamps))
    odom_camera = RosbagSource(tf_bag, IMAGE_TOPIC, "/tf", tf_frames=("odom", "camera")).poses()[1]
    assert_poses(odom_camera, expected(lambda t: ODOM_BASE.matrix(t) @ BASE_CAMERA.matrix(t), stamps))
    # siblings under base_link: up to the common ancestor and down again (static only)
    lidar_camera = RosbagSource(tf_bag, IMAGE_TOPIC, "/tf", tf_frames="lidar:camera").poses()[1]
    assert_poses(lidar_camera, expected(lambda t: np.linalg.inv(BASE_LIDAR.matrix(0)) @ BASE_CAMERA.matrix(0),
                                        stamps))
    # camera up to odom, then down the other branch is not possible: odom is an ancestor; camera -> odom inverts
    camera_odom = RosbagSource(tf_bag, IMAGE_TOPIC, "/tf", tf_frames="camera:odom").poses()[1]
    assert_poses(camera_odom, expected(lambda t: np.linalg.inv(ODOM_BASE.matrix(t) @ BASE_CAMERA.matrix(t)), stamps))


def test_transform_tree_directly_and_tf_static_latest_wins():
    tree = TransformTree("test")
    for t in (0.0, 1.0):
        tree.add("a", "b", ODOM_BASE.pose(100 + t), stamp=t)
    tree.add("b", "c", BASE_LIDAR.pose(0), static=True)
    tree.add("b", "c", BASE_CAMERA.pose(0), static=True)           # republished static: the last one wins
    assert not tree.add("b", "b", BASE_CAMERA.pose(0), static=True)  # self edge rejected
    assert not tree.add("b", "d", np.zeros(7), static=True)          # zero quaternion rejected
    assert tree.rejected == 2 and tree.frames == ["a", "b", "c"] and tree.roots() == ["a"]
    poses, valid = tree.lookup("a", "c", np.array([0.25, 1.02, 1.2]), tolerance=0.05)
    assert valid.tolist() == [True, True, False] and np.all(np.isnan(poses[2]))
    assert_poses(poses[:2], expected(lambda t: ODOM_BASE.matrix(100 + min(t, 1.0)) @ BASE_CAMERA.matrix(0),
                                     [0.25, 1.02]))
    # a frame on the path with two parents is not a tree
    tree.add("x", "b", BASE_LIDAR.pose(0), static=True)
    with pytest.raises(DataError, match=r"frame 'b' has several parents \(a, x\)"):
        tree.lookup("a", "c", np.array([0.5]))


def test_partial_coverage_skips_images_outside_tf(tmp_path):
    stamps = IMAGE_STAMPS
    tf = robot_tf(odom_base_stamps=99.95 + 0.1 * np.arange(6))  # odom->base_link ends at 100.45
    bag = write_tf_bag(tmp_path / "bag", images(10), stamps, tf=tf, tf_static=STATIC)
    source = RosbagSource(bag, IMAGE_TOPIC, "/tf", tf_frames="map:camera")
    assert len(source) == 5 and source.counts.no_pose == 5          # 100.013 .. 100.413 (100.513 > +0.05 s)
    assert_poses(source.poses()[1], expected(map_camera, stamps[:5]))
    kept = RosbagSource(bag, IMAGE_TOPIC, "/tf", tf_frames="map:camera", require_poses=False)
    assert len(kept) == 10 and np.all(np.isnan(kept.poses()[1][5:]))


def test_open_source_defaults_to_tf_topic(tf_bag):
    source = open_source(bag=tf_bag, image_topic=IMAGE_TOPIC, tf_frames="map:base_link")
    assert source.pose_topic == "/tf"
    assert_poses(source.poses()[1], expected(lambda t: MAP_ODOM.matrix(t) @ ODOM_BASE.matrix(t), IMAGE_STAMPS))
    with pytest.raises(DataError, match="--pose-topic /tf --tf-frames"):   # no pose message topic: hint at TF
        open_source(bag=tf_bag, image_topic=IMAGE_TOPIC)


# --------------------------------------------------------------------------------------------
# Frames: the pair recorded, optical frames in the body convention
# --------------------------------------------------------------------------------------------

BASE_CAMERA_LINK = Edge([0.25, -0.1, 0.6], [0.0, 0.0, 0.0], [0.0, 0.3, 1.0], 0.4, 0.0)   # body convention, static
REP103_OPTICAL = np.array([0.0, 0.0, 0.0, -0.5, 0.5, -0.5, 0.5])   # camera_link -> camera_optical_frame (REP-103)
OPTICAL_STATIC = [(0.0, "base_link", "camera_link", BASE_CAMERA_LINK.pose(0.0)),
                  (0.0, "camera_link", "camera_optical_frame", REP103_OPTICAL)]


def map_camera_link(t):
    return MAP_ODOM.matrix(t) @ ODOM_BASE.matrix(t) @ BASE_CAMERA_LINK.matrix(t)


@pytest.fixture(scope="module")
def optical_bag(tmp_path_factory):
    """A hand-made TF tree with a camera mounted the REP-103 way: camera_link (x forward, z up) and its
    camera_optical_frame (z forward, x right, y down) at the same origin."""
    path = tmp_path_factory.mktemp("optical") / "bag"
    return write_tf_bag(path, images(len(IMAGE_STAMPS)), IMAGE_STAMPS, tf=robot_tf(), tf_static=OPTICAL_STATIC)


def test_optical_frame_is_stored_in_the_body_convention(optical_bag):
    optical = RosbagSource(optical_bag, IMAGE_TOPIC, tf_frames="map:camera_optical_frame")
    assert optical.frames == PoseFrames("map", "camera_optical_frame", optical=True)
    # the stored pose is the body pose: that of camera_link, computed independently with matrices
    assert_poses(optical.poses()[1], expected(map_camera_link, IMAGE_STAMPS))
    assert np.array_equal(np.stack([r.pose for r in optical]), optical.poses()[1])
    link = RosbagSource(optical_bag, IMAGE_TOPIC, tf_frames="map:camera_link")
    assert link.frames == PoseFrames("map", "camera_link") and not link.frames.optical
    assert_poses(link.poses()[1], expected(map_camera_link, IMAGE_STAMPS))
    # --camera-convention body keeps the optical frame's own pose (z forward) ...
    raw = RosbagSource(optical_bag, IMAGE_TOPIC, tf_frames="map:camera_optical_frame", camera_convention="body")
    assert not raw.frames.optical
    assert_poses(raw.poses()[1], expected(lambda t: map_camera_link(t) @ matrix_of_pose(REP103_OPTICAL),
                                          IMAGE_STAMPS))
    # ... and optical turns any frame: here camera_link's pose is taken for an optical one
    forced = RosbagSource(optical_bag, IMAGE_TOPIC, tf_frames="map:camera_link", camera_convention="optical")
    assert forced.frames.optical
    assert_poses(forced.poses()[1], expected(lambda t: map_camera_link(t) @ np.linalg.inv(
        matrix_of_pose(REP103_OPTICAL)), IMAGE_STAMPS))


def test_tf_frames_name_the_pair(tf_bag):
    assert RosbagSource(tf_bag, IMAGE_TOPIC, tf_frames="odom:camera").frames == PoseFrames("odom", "camera")
    parent_only = RosbagSource(tf_bag, IMAGE_TOPIC, tf_frames="odom:camera", pose_frames=("odom", None))
    assert parent_only.frames == PoseFrames("odom", "camera")
    with pytest.raises(DataError, match="with TF, --tf-frames names the frames"):
        RosbagSource(tf_bag, IMAGE_TOPIC, tf_frames="odom:camera", pose_frames="map:camera")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_unknown_frame_lists_frames(tf_bag):
    with pytest.raises(DataError) as err:
        RosbagSource(tf_bag, IMAGE_TOPIC, "/tf", tf_frames="map:cam")
    assert "frame 'cam' not in the TF of bag" in one_line(err)
    assert "frames seen: base_link, camera, lidar, map, odom" in one_line(err)


def test_no_path_lists_roots(tmp_path):
    gps = Edge([0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0, 0, 1], 0.0, 0.0)
    tf = robot_tf(extra=[lambda t: (t, "world", "gps", gps.pose(t))])
    bag = write_tf_bag(tmp_path / "bag", images(3), IMAGE_STAMPS[:3], tf=tf, tf_static=STATIC)
    with pytest.raises(DataError) as err:
        RosbagSource(bag, IMAGE_TOPIC, "/tf", tf_frames="map:gps")
    assert "no TF path between 'map' and 'gps'" in one_line(err) and "tree roots: map, world" in one_line(err)


def test_no_tf_message(tmp_path):
    bag = write_tf_bag(tmp_path / "bag", images(3), IMAGE_STAMPS[:3], tf=[])
    with pytest.raises(DataError) as err:
        RosbagSource(bag, IMAGE_TOPIC, "/tf", tf_frames="map:camera")
    assert one_line(err).startswith("no TF message in bag") and "/tf hold no usable transform" in one_line(err)


def test_images_outside_tf_time_range(tmp_path):
    tf = robot_tf(map_odom_stamps=MAP_ODOM_STAMPS + 50, odom_base_stamps=ODOM_BASE_STAMPS + 50)
    bag = write_tf_bag(tmp_path / "bag", images(3), IMAGE_STAMPS[:3], tf=tf, tf_static=STATIC)
    with pytest.raises(DataError) as err:
        RosbagSource(bag, IMAGE_TOPIC, "/tf", tf_frames="map:camera")
    message = one_line(err)
    assert message.startswith(f"no image of '{IMAGE_TOPIC}' has a pose from /tf, /tf_static (map -> camera)")
    assert "image stamps 100.013000..100.213000 s, TF stamps 149.950000..151.250000 s" in message
    assert "same clock" in message


def test_tf_option_errors(tf_bag, tmp_path):
    with pytest.raises(DataError) as err:                  # TF topic without frames: say which frames exist
        RosbagSource(tf_bag, IMAGE_TOPIC, "/tf")
    assert "--tf-frames PARENT:CHILD" in one_line(err) and "frames seen: base_link, camera" in one_line(err)
    for spec in ("map", "map:", "a:b:c", "map:/map"):
        with pytest.raises(DataError, match="TF frames"):
            parse_tf_frames(spec)
    poses = np.tile([0, 0, 0, 0, 0, 0, 1.0], (3, 1))
    odom_bag = write_image_pose_bag(tmp_path / "odom", images(3), IMAGE_STAMPS[:3], poses, IMAGE_STAMPS[:3])
    with pytest.raises(DataError, match="is nav_msgs/msg/Odometry, not TF"):
        RosbagSource(odom_bag, IMAGE_TOPIC, "/odom", tf_frames="map:camera")
    with pytest.raises(DataError, match="TF frames go with a bag"):
        open_source(images=tmp_path, tf_frames="map:camera")


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_model):
    from r2former_core.model import save_model
    return save_model(tiny_model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def test_build_map_cli_from_tf(tf_bag, model_path, tiny_model, tmp_path):
    from r2former_core.cli.main import main
    from r2former_core.mapdb import MapDatabase
    out = tmp_path / "map"
    assert main(["build-map", "--bag", str(tf_bag), "--image-topic", IMAGE_TOPIC, "--pose-topic", "/tf",
                 "--tf-frames", "map:camera", "--out", str(out), "--model", str(model_path), "--device", "cpu"]) == 0
    db = MapDatabase.load(out, expected_fingerprint=tiny_model.fingerprint)
    assert len(db) == len(IMAGE_STAMPS)
    assert np.allclose(db.stamps, IMAGE_STAMPS, atol=1e-9)
    assert_poses(np.asarray(db.poses), expected(map_camera, db.stamps))
    assert (db.info.parent_frame, db.info.child_frame) == ("map", "camera")
    # the map's frames are the TF frames
    assert main(["build-map", "--bag", str(tf_bag), "--image-topic", IMAGE_TOPIC, "--tf-frames", "odom:camera",
                 "--out", str(tmp_path / "odom_map"), "--model", str(model_path), "--min-distance", "0.5"]) == 0
    odom_db = MapDatabase.load(tmp_path / "odom_map")
    assert (odom_db.info.frame_id, odom_db.info.child_frame) == ("odom", "camera")
    assert 1 < len(odom_db) < len(IMAGE_STAMPS)
    assert_poses(np.asarray(odom_db.poses),
                 expected(lambda t: ODOM_BASE.matrix(t) @ BASE_CAMERA.matrix(t), odom_db.stamps))


def test_build_map_cli_warns_about_odometry_frames_and_map_info_shows_the_pair(optical_bag, model_path, tmp_path,
                                                                               capsys):
    from r2former_core.cli.main import main
    from r2former_core.mapdb import MapDatabase
    common = ["--bag", str(optical_bag), "--image-topic", IMAGE_TOPIC, "--model", str(model_path), "--device", "cpu"]
    assert main(["build-map", *common, "--tf-frames", "odom:camera_link", "--out", str(tmp_path / "odom")]) == 0
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "odometry frame 'odom'" in warnings[0] and "drift" in warnings[0]
    assert "while AMCL or slam_toolbox" in warnings[0] and "--pose-topic /tf --tf-frames map:camera_link" in warnings[0]
    assert "poses of camera_link in odom" in out.out
    assert main(["build-map", *common, "--tf-frames", "map:camera_optical_frame", "--out", str(tmp_path / "map")]) == 0
    assert "WARNING" not in capsys.readouterr().err
    db = MapDatabase.load(tmp_path / "map")
    assert (db.info.parent_frame, db.info.child_frame) == ("map", "camera_optical_frame")
    assert_poses(np.asarray(db.poses), expected(map_camera_link, db.stamps))        # body convention
    assert main(["map-info", str(tmp_path / "map")]) == 0
    assert re.search(r"frames \(parent -> child\)\s+map -> camera_optical_frame", capsys.readouterr().out)
    assert main(["map-info", str(tmp_path / "odom"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["frame_id"], info["child_frame"]) == ("odom", "camera_link")


def test_build_map_cli_folder_frames(model_path, tmp_path, capsys):
    """--pose-frames for a folder; --frame-id is its parent alone; contradicting options fail in one line."""
    import cv2

    from r2former_core.cli.main import main
    from r2former_core.data.poses import write_tum
    from r2former_core.mapdb import MapDatabase
    folder = tmp_path / "images"
    folder.mkdir()
    for stamp, image in zip(IMAGE_STAMPS[:4], images(4)):
        cv2.imwrite(str(folder / f"{stamp:.6f}.png"), image)
    write_tum(tmp_path / "gt.txt", IMAGE_STAMPS[:4], np.stack([ODOM_BASE.pose(t) for t in IMAGE_STAMPS[:4]]))
    base = ["build-map", "--images", str(folder), "--poses", str(tmp_path / "gt.txt"), "--model", str(model_path)]
    cases = {"default": ([], ("map", "camera")), "given": (["--pose-frames", "world:front_camera"],
                                                            ("world", "front_camera")),
             "frame_id": (["--frame-id", "utm"], ("utm", "camera"))}
    for name, (options, frames) in cases.items():
        assert main(base + options + ["--out", str(tmp_path / name)]) == 0, name
        info = MapDatabase.load(tmp_path / name).info
        assert (info.parent_frame, info.child_frame) == frames, name
    capsys.readouterr()
    assert main(base + ["--frame-id", "map", "--pose-frames", "odom:camera", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name different parent frames" in err[0] and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["build-map", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--pose-frames is the complete form" in help_text and "--camera-convention {auto,body,optical}" in help_text


def test_build_map_cli_tf_errors_are_one_line(tf_bag, model_path, tmp_path, capsys):
    from r2former_core.cli.main import main
    assert main(["build-map", "--bag", str(tf_bag), "--image-topic", IMAGE_TOPIC, "--pose-topic", "/tf",
                 "--tf-frames", "map:nowhere", "--out", str(tmp_path / "m"), "--model", str(model_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "frame 'nowhere' not in the TF" in err[0]
    assert not (tmp_path / "m").exists()


def test_ros_build_map_offline_accepts_tf_frames(tf_bag, model_path, tiny_model, tmp_path, capsys):
    from r2former_core.mapdb import MapDatabase
    from r2former_ros import build_map_node
    assert "--tf-frames PARENT:CHILD" in build_map_node.build_parser().format_help()
    out = tmp_path / "ros_map"
    assert build_map_node.main(["build_map", "--bag", str(tf_bag), "--image-topic", IMAGE_TOPIC, "--pose-topic",
                                "/tf", "--tf-frames", "map:camera", "--out", str(out), "--model", str(model_path),
                                "--device", "cpu", "--min-distance", "0", "--min-angle", "0"]) == 0
    db = MapDatabase.load(out, expected_fingerprint=tiny_model.fingerprint)
    assert_poses(np.asarray(db.poses), expected(map_camera, db.stamps))
    assert (db.info.parent_frame, db.info.child_frame) == ("map", "camera")
    assert build_map_node.main(["build_map", "--live", "--tf-frames", "map:camera", "--out", str(tmp_path / "x")]) == 2
    assert "--tf-frames works only with --bag" in capsys.readouterr().err
