"""Data layer: pose files and math, keyframes, image folders, rosbag2 bags, VG folders."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from bagtools import write_image_pose_bag

from r2former_core.data.keyframes import select_keyframes
from r2former_core.data.poses import (
    angle_between_quats,
    interpolate_poses,
    normalize_quat,
    quat_from_yaw,
    quat_to_matrix,
    read_pose_csv,
    read_tum,
    rpy_from_quat,
    slerp,
    write_pose_csv,
    write_tum,
    yaw_from_quat,
)
from r2former_core.data.sources import (
    ImageFolderSource,
    PosedImage,
    PoseFrames,
    RosbagSource,
    Source,
    VGFolderSource,
    is_vg_folder,
    list_topics,
    open_source,
    parse_vg_name,
)
from r2former_core.data.sources import bag as bag_access
from r2former_core.errors import DataError

IDENTITY = np.array([0.0, 0.0, 0.0, 1.0])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def trajectory(t: np.ndarray) -> np.ndarray:
    """Analytic trajectory on which linear + slerp interpolation is exact: constant velocity, constant yaw rate."""
    t = np.asarray(t, dtype=np.float64)
    pos = np.stack([2.0 * t + 1.0, -0.5 * t, 0.1 * t], axis=-1)
    return np.concatenate([pos, quat_from_yaw(0.3 * t)], axis=-1)


def sample_image(i: int, h: int = 12, w: int = 16) -> np.ndarray:
    """Distinct RGB image per index with different channels (to catch BGR/RGB swaps) and a gradient."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = (20 * i + 10) % 256
    img[..., 1] = np.linspace(0, 200, w, dtype=np.uint8)[None, :]
    img[..., 2] = (255 - 15 * i) % 256
    return img


def write_png(path: Path, image_rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))


def same_rotation(q0: np.ndarray, q1: np.ndarray, atol: float = 1e-9) -> bool:
    return bool(np.all(np.asarray(angle_between_quats(q0, q1)) < atol))


# --------------------------------------------------------------------------------------------
# Pose files
# --------------------------------------------------------------------------------------------

def test_tum_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    stamps = 1700000000.0 + np.sort(rng.uniform(0, 100, 20))
    poses = np.concatenate([rng.normal(size=(20, 3)) * 50, normalize_quat(rng.normal(size=(20, 4)))], axis=1)
    path = tmp_path / "sub" / "traj.txt"
    write_tum(path, stamps, poses)
    got_stamps, got_poses = read_tum(path)
    np.testing.assert_allclose(got_stamps, stamps, atol=1e-8, rtol=0)
    np.testing.assert_allclose(got_poses, poses, atol=1e-15, rtol=0)  # quaternions re-normalized


def test_tum_comments_blank_lines_and_normalization(tmp_path):
    path = tmp_path / "t.tum"
    path.write_text("# timestamp tx ty tz qx qy qz qw\n\n1.0 1 2 3 0 0 0 2  # comment\n"
                    "\t2.5\t4 5 6 0 0 0 1\n")
    stamps, poses = read_tum(path)
    np.testing.assert_array_equal(stamps, [1.0, 2.5])
    np.testing.assert_array_equal(poses, [[1, 2, 3, 0, 0, 0, 1], [4, 5, 6, 0, 0, 0, 1]])


@pytest.mark.parametrize("bad_line, reason", [
    ("3.0 1 2 3 0 0 1", "expected 8 values"),
    ("3.0 1 2 x 0 0 0 1", "non-numeric"),
    ("3.0 1 2 3 0 0 0 0", "zero quaternion"),
    ("3.0 1 2 nan 0 0 0 1", "non-finite"),
])
def test_tum_errors_name_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "t.txt"
    path.write_text(f"# header\n1.0 0 0 0 0 0 0 1\n\n{bad_line}\n")
    with pytest.raises(DataError, match=reason) as info:
        read_tum(path)
    assert f"{path}:4" in str(info.value)


def test_tum_empty_and_missing(tmp_path):
    (tmp_path / "e.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="no poses"):
        read_tum(tmp_path / "e.txt")
    with pytest.raises(DataError, match="cannot read"):
        read_tum(tmp_path / "missing.txt")


def test_csv_full_header_any_order_extra_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("qw,Name,x,y,z,qx,qy,qz,comment\n1,a.png,1,2,3,0,0,0,first\n0,b,4,5,6,0,0,1,\n")
    names, poses = read_pose_csv(path)
    assert names == ["a.png", "b"]
    np.testing.assert_array_equal(poses, [[1, 2, 3, 0, 0, 0, 1], [4, 5, 6, 0, 0, 1, 0]])


def test_csv_planar_header_and_round_trip(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("name,yaw,x,y\nimg0,0,1,2\nimg1,1.5707963267948966,3,4\n")
    names, poses = read_pose_csv(path)
    assert names == ["img0", "img1"]
    np.testing.assert_array_equal(poses[:, :3], [[1, 2, 0], [3, 4, 0]])
    assert same_rotation(poses[0, 3:], IDENTITY)
    assert yaw_from_quat(poses[1, 3:]) == pytest.approx(math.pi / 2)
    out = tmp_path / "out.csv"
    write_pose_csv(out, names, poses)
    names2, poses2 = read_pose_csv(out)
    assert names2 == names
    np.testing.assert_array_equal(poses2, poses)


def test_csv_missing_columns_lists_accepted_headers(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("name,x,z\na,1,2\n")
    with pytest.raises(DataError) as info:
        read_pose_csv(path)
    msg = str(info.value)
    assert "name,x,y,z,qx,qy,qz,qw" in msg and "name,x,y,yaw" in msg


@pytest.mark.parametrize("body, line, reason", [
    ("a,1,2,0\nb,1,oops,0\n", 3, "non-numeric"),
    ("a,1,2,0\n\na,1,2,0\n", 4, "already used on line 2"),
    ("a,1,2,0\nb,1\n", 3, "columns"),
    (",1,2,0\n", 2, "empty name"),
])
def test_csv_errors_name_line(tmp_path, body, line, reason):
    path = tmp_path / "p.csv"
    path.write_text("name,x,y,yaw\n" + body)
    with pytest.raises(DataError, match=reason) as info:
        read_pose_csv(path)
    assert f"{path}:{line}" in str(info.value)


# --------------------------------------------------------------------------------------------
# Quaternions
# --------------------------------------------------------------------------------------------

def test_yaw_quat_round_trip_and_matrix():
    yaws = np.array([-3.0, -1.0, 0.0, 0.5, 2.0, 3.1])
    q = quat_from_yaw(yaws)
    assert q.shape == (6, 4)
    np.testing.assert_allclose(yaw_from_quat(q), yaws, atol=1e-12)
    assert yaw_from_quat(quat_from_yaw(0.7)) == pytest.approx(0.7)
    m = quat_to_matrix(quat_from_yaw(0.7))
    c, s = math.cos(0.7), math.sin(0.7)
    np.testing.assert_allclose(m, [[c, -s, 0], [s, c, 0], [0, 0, 1]], atol=1e-12)
    # roll about x then yaw: rpy recovers both
    roll_q = np.array([math.sin(0.2), 0.0, 0.0, math.cos(0.2)])  # roll = 0.4
    from r2former_core.data.poses import quat_multiply
    np.testing.assert_allclose(rpy_from_quat(quat_multiply(quat_from_yaw(1.0), roll_q)), [0.4, 0.0, 1.0],
                               atol=1e-12)
    with pytest.raises(ValueError):
        normalize_quat(np.zeros(4))


def test_slerp_endpoints_midpoint_and_shortest_path():
    q0, q1 = quat_from_yaw(0.0), quat_from_yaw(math.pi / 2)
    assert same_rotation(slerp(q0, q1, 0.0), q0)
    assert same_rotation(slerp(q0, q1, 1.0), q1)
    assert same_rotation(slerp(q0, q1, 0.5), quat_from_yaw(math.pi / 4))
    assert same_rotation(slerp(q0, -q1, 0.5), quat_from_yaw(math.pi / 4))  # q and -q: same rotation
    np.testing.assert_allclose(yaw_from_quat(slerp(q0, q1, np.array([0.25, 0.75]))), [math.pi / 8, 3 * math.pi / 8])
    # nearly identical quaternions (linear fallback) stay unit and in between
    q2 = quat_from_yaw(1e-6)
    assert yaw_from_quat(slerp(q0, q2, 0.5)) == pytest.approx(5e-7, rel=1e-6)
    assert angle_between_quats(q0, q1) == pytest.approx(math.pi / 2)
    assert angle_between_quats(q1, -q1) == pytest.approx(0.0, abs=1e-12)
    assert angle_between_quats(quat_from_yaw(3.0), quat_from_yaw(-3.0)) == pytest.approx(2 * math.pi - 6.0)


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------

def test_interpolation_exact_on_constant_velocity_trajectory():
    stamps = np.arange(0.0, 10.0, 0.2)
    queries = np.random.default_rng(1).uniform(0.0, stamps[-1], 200)
    got, valid = interpolate_poses(stamps, trajectory(stamps), queries, tolerance=0.05, max_gap=1.0)
    assert valid.all()
    expected = trajectory(queries)
    np.testing.assert_allclose(got[:, :3], expected[:, :3], atol=1e-9)
    assert np.all(angle_between_quats(got[:, 3:], expected[:, 3:]) < 1e-9)


def test_interpolation_accuracy_on_circle():
    """Circle of radius 5 at 1 rad/s sampled at 10 Hz: chord error <= r (1 - cos(dt/2))."""
    def circle(t):
        return np.concatenate([np.stack([5 * np.cos(t), 5 * np.sin(t), 0 * t], -1), quat_from_yaw(t + np.pi / 2)], -1)
    stamps = np.arange(0.0, 6.0, 0.1)
    queries = np.linspace(0.0, stamps[-1], 333)
    got, valid = interpolate_poses(stamps, circle(stamps), queries)
    assert valid.all()
    err = np.linalg.norm(got[:, :3] - circle(queries)[:, :3], axis=1)
    assert err.max() <= 5 * (1 - math.cos(0.05)) + 1e-9
    assert np.max(angle_between_quats(got[:, 3:], circle(queries)[:, 3:])) < 1e-9


def test_interpolation_tolerance_and_max_gap_rules():
    stamps = np.array([0.0, 1.0, 2.0, 10.0, 11.0])
    poses = trajectory(stamps)
    queries = np.array([-0.04, -0.06, 0.5, 1.0, 2.03, 6.0, 9.98, 11.04, 11.2, np.nan])
    got, valid = interpolate_poses(stamps, poses, queries, tolerance=0.05, max_gap=1.5)
    np.testing.assert_array_equal(valid, [True, False, True, True, True, False, True, True, False, False])
    np.testing.assert_allclose(got[0], poses[0])       # before first, within tolerance: first pose
    np.testing.assert_allclose(got[2, :3], trajectory(0.5)[:3])  # interpolated
    np.testing.assert_allclose(got[4], poses[2])       # in a dropout but near a sample: that sample
    np.testing.assert_allclose(got[6], poses[3])
    np.testing.assert_allclose(got[7], poses[4])       # after last, within tolerance
    assert np.isnan(got[~valid]).all()
    # with a larger max_gap the dropout is interpolated
    got, valid = interpolate_poses(stamps, poses, np.array([6.0]), tolerance=0.05, max_gap=10.0)
    assert valid[0]
    np.testing.assert_allclose(got[0, :3], trajectory(6.0)[:3])


def test_interpolation_unsorted_duplicates_and_degenerate_inputs():
    stamps = np.array([2.0, 0.0, 1.0, 1.0, 3.0])
    poses = trajectory(stamps)
    poses[3, :3] += 100.0  # the duplicate of t=1.0 (later in input order) is ignored
    got, valid = interpolate_poses(stamps, poses, np.array([0.5, 1.0, 2.5]))
    assert valid.all()
    np.testing.assert_allclose(got[:, :3], trajectory(np.array([0.5, 1.0, 2.5]))[:, :3], atol=1e-12)
    got, valid = interpolate_poses(np.array([5.0]), trajectory(np.array([5.0])), np.array([5.01, 5.2]))
    np.testing.assert_array_equal(valid, [True, False])
    got, valid = interpolate_poses(np.zeros(0), np.zeros((0, 7)), np.array([1.0]))
    assert not valid.any()


# --------------------------------------------------------------------------------------------
# Keyframes
# --------------------------------------------------------------------------------------------

def test_keyframes_straight_line_every_fourth():
    n = 21
    poses = np.zeros((n, 7))
    poses[:, 0] = 0.5 * np.arange(n)
    poses[:, 6] = 1.0
    np.testing.assert_array_equal(select_keyframes(poses, min_distance=2.0), [0, 4, 8, 12, 16, 20])
    np.testing.assert_array_equal(select_keyframes(poses), np.arange(n))  # no thresholds: keep all


def test_keyframes_rotation_only_and_combined():
    n = 13
    poses = np.zeros((n, 7))
    poses[:, 3:] = quat_from_yaw(np.radians(5.0 * np.arange(n)))
    np.testing.assert_array_equal(select_keyframes(poses, min_angle_deg=20.0), [0, 4, 8, 12])
    # distance alone never triggers on a rotation-only sequence
    np.testing.assert_array_equal(select_keyframes(poses, min_distance=0.1), [0])
    np.testing.assert_array_equal(select_keyframes(poses, min_distance=0.1, min_angle_deg=20.0), [0, 4, 8, 12])


def test_keyframes_min_interval_and_errors():
    n = 10
    poses = np.zeros((n, 7))
    poses[:, 0] = np.arange(n)
    poses[:, 6] = 1.0
    stamps = 0.1 * np.arange(n)
    np.testing.assert_array_equal(select_keyframes(poses, min_distance=1.0, stamps=stamps, min_interval=0.3),
                                  [0, 3, 6, 9])
    with pytest.raises(ValueError, match="stamps"):
        select_keyframes(poses, min_interval=0.3)
    nan = np.full((3, 7), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        select_keyframes(nan, min_distance=1.0)
    np.testing.assert_array_equal(select_keyframes(nan), [0, 1, 2])
    assert select_keyframes(np.zeros((0, 7))).size == 0


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

def make_stamped_folder(folder: Path, stamps, ext: str = ".png") -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = [sample_image(i) for i in range(len(stamps))]
    for stamp, image in zip(stamps, images):
        write_png(folder / f"{stamp:.6f}{ext}", image)
    return images


def test_image_folder_with_tum_interpolates_and_loads_lazily(tmp_path):
    image_stamps = 1700000000.0 + np.array([0.13, 0.47, 0.81, 1.15])
    images = make_stamped_folder(tmp_path / "imgs", image_stamps)
    pose_stamps = 1700000000.0 + np.arange(0.0, 1.6, 0.2)
    write_tum(tmp_path / "gt.txt", pose_stamps, trajectory(pose_stamps - 1700000000.0))
    src = ImageFolderSource(tmp_path / "imgs", tmp_path / "gt.txt")
    assert isinstance(src, Source) and len(src) == 4
    stamps, poses = src.poses()
    np.testing.assert_allclose(stamps, image_stamps)
    np.testing.assert_allclose(poses[:, :3], trajectory(image_stamps - 1700000000.0)[:, :3], atol=1e-6)
    records = list(src)
    assert [r.name for r in records] == [f"{s:.6f}.png" for s in image_stamps]
    for record, image in zip(records, images):
        assert isinstance(record, PosedImage) and record.has_pose
        np.testing.assert_array_equal(record.image, image)  # PNG is lossless; RGB order kept


def test_image_folder_images_without_pose(tmp_path, caplog):
    make_stamped_folder(tmp_path / "imgs", [10.0, 10.5, 20.0])  # 20.0 is far from every pose
    write_tum(tmp_path / "gt.tum", np.array([9.9, 10.6]), trajectory(np.array([0.0, 1.0])))
    with caplog.at_level(logging.WARNING):
        src = ImageFolderSource(tmp_path / "imgs", tmp_path / "gt.tum")
    assert src.names == ["10.000000.png", "10.500000.png"]
    assert "skipping 1 of 3 images" in caplog.text and "20.000000.png" in caplog.text
    src = ImageFolderSource(tmp_path / "imgs", tmp_path / "gt.tum", require_poses=False)
    assert len(src) == 3 and np.isnan(src.poses()[1][2]).all()
    write_tum(tmp_path / "far.txt", np.array([500.0, 501.0]), trajectory(np.array([0.0, 1.0])))
    with pytest.raises(DataError, match="clock of the poses"):
        ImageFolderSource(tmp_path / "imgs", tmp_path / "far.txt")


def test_image_folder_nanosecond_stems_and_extensions(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_png(folder / "1403636579763555584.PNG", sample_image(0))
    cv2.imwrite(str(folder / "1403636579863555584.JPEG"), sample_image(1))
    (folder / "notes.txt").write_text("not an image")
    write_tum(tmp_path / "gt.txt", np.array([1403636579.7, 1403636580.0]), trajectory(np.array([0.0, 0.3])))
    src = ImageFolderSource(folder, tmp_path / "gt.txt")
    np.testing.assert_allclose(src.poses()[0], [1403636579.763555584, 1403636579.863555584])
    assert len(list(src)) == 2


def test_image_folder_non_numeric_stems(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, i in [("frame_b.png", 1), ("frame_a.png", 0), ("frame_c.png", 2)]:
        write_png(folder / name, sample_image(i))
    t = np.array([3.0, 1.0, 2.0])  # unsorted on purpose: pairing is by time
    write_tum(tmp_path / "gt.txt", t, trajectory(t))
    with caplog.at_level(logging.INFO):
        src = ImageFolderSource(folder, tmp_path / "gt.txt")
    assert "not timestamps" in caplog.text
    assert src.names == ["frame_a.png", "frame_b.png", "frame_c.png"]
    np.testing.assert_allclose(src.poses()[0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(src.poses()[1], trajectory(np.array([1.0, 2.0, 3.0])))
    write_tum(tmp_path / "short.txt", t[:2], trajectory(t[:2]))
    with pytest.raises(DataError, match="Name each image by its stamp") as info:
        ImageFolderSource(folder, tmp_path / "short.txt")
    assert "frame_a.png" in str(info.value)


@pytest.mark.parametrize("header, rows", [
    ("name,x,y,z,qx,qy,qz,qw", ["a.png,1,2,3,0,0,0,1", "b,4,5,6,0,0,0,1"]),
    ("name,x,y,yaw,extra", ["a,1,2,0,x", "b.png,4,5,1.0,y"]),
])
def test_image_folder_with_csv(tmp_path, header, rows):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        write_png(folder / name, sample_image(i))
    (tmp_path / "p.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    src = ImageFolderSource(folder, tmp_path / "p.csv")  # c.png has no pose: skipped
    assert src.names == ["a.png", "b.png"]
    stamps, poses = src.poses()
    np.testing.assert_array_equal(stamps, [0.0, 1.0])  # no stamps in the names: the index
    np.testing.assert_allclose(poses[:, :2], [[1, 2], [4, 5]])
    records = list(src)
    np.testing.assert_array_equal(records[1].image, sample_image(1))


def test_image_folder_without_poses_and_errors(tmp_path):
    folder = tmp_path / "imgs"
    make_stamped_folder(folder, [1.0, 2.0])
    with pytest.raises(DataError, match="no poses"):
        ImageFolderSource(folder)
    src = ImageFolderSource(folder, require_poses=False)
    assert [r.has_pose for r in src] == [False, False]
    np.testing.assert_array_equal(src.poses()[0], [1.0, 2.0])
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope", require_poses=False)
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(DataError, match="unknown format"):
        ImageFolderSource(folder, tmp_path / "p.json")
    (tmp_path / "root" / "database").mkdir(parents=True)
    write_png(tmp_path / "root" / "database" / "x.png", sample_image(0))
    with pytest.raises(DataError, match="database/"):
        ImageFolderSource(tmp_path / "root", require_poses=False)


def test_image_folder_unreadable_image(tmp_path, caplog):
    folder = tmp_path / "imgs"
    make_stamped_folder(folder, [1.0, 3.0])
    (folder / "2.000000.jpg").write_bytes(b"\xff\xd8\xff garbage")
    t = np.array([0.0, 4.0])
    write_tum(tmp_path / "gt.txt", t, trajectory(t))
    src = ImageFolderSource(folder, tmp_path / "gt.txt", max_gap=5.0)
    assert len(src) == 3
    with pytest.raises(DataError, match=r"2\.000000\.jpg"):
        list(src)
    src = ImageFolderSource(folder, tmp_path / "gt.txt", max_gap=5.0, skip_unreadable=True)
    with caplog.at_level(logging.WARNING):
        assert [r.name for r in src] == ["1.000000.png", "3.000000.png"]
    assert src.skipped_unreadable == 1 and "2.000000.jpg" in caplog.text


# --------------------------------------------------------------------------------------------
# rosbag2
# --------------------------------------------------------------------------------------------

T0 = 1700000000.0
IMAGE_T = T0 + np.array([0.05, 0.38, 0.71, 1.04, 1.37])   # ~3 Hz
POSE_T = T0 + np.arange(0.0, 1.5, 0.2)                    # 5 Hz, never equal to an image stamp


def expected_rgb(image: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "mono8":
        return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return image


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
@pytest.mark.parametrize("image_type, encoding", [("raw", "rgb8"), ("raw", "bgr8"), ("raw", "mono8"),
                                                  ("compressed", "jpeg")])
@pytest.mark.parametrize("pose_type", ["odometry", "pose", "pose_cov"])
def test_rosbag_round_trip(tmp_path, storage, image_type, encoding, pose_type):
    images = [sample_image(i) for i in range(len(IMAGE_T))]
    bag = write_image_pose_bag(tmp_path / "bag", images, IMAGE_T, trajectory(POSE_T - T0), POSE_T,
                               image_type=image_type, encoding=encoding if image_type == "raw" else "rgb8",
                               pose_type=pose_type, storage=storage)
    src = RosbagSource(bag, "/camera/image_raw", "/odom")
    assert isinstance(src, Source) and len(src) == len(IMAGE_T)
    stamps, poses = src.poses()
    np.testing.assert_allclose(stamps, IMAGE_T, atol=1e-6, rtol=0)
    expected = trajectory(IMAGE_T - T0)
    np.testing.assert_allclose(poses[:, :3], expected[:, :3], atol=1e-5)
    assert np.all(angle_between_quats(poses[:, 3:], expected[:, 3:]) < 1e-6)
    records = list(src)
    assert [r.name for r in records] == [f"{s:.6f}" for s in IMAGE_T]
    for record, image in zip(records, images):
        assert record.image.shape == image.shape and record.image.dtype == np.uint8
        if image_type == "raw":
            np.testing.assert_array_equal(record.image, expected_rgb(image, encoding))
        else:
            assert np.abs(record.image.astype(int) - image.astype(int)).mean() < 8
    assert src.skipped_undecodable == 0


def test_rosbag_poses_do_not_decode_images(tmp_path, monkeypatch):
    images = [sample_image(i) for i in range(len(IMAGE_T))]
    bag = write_image_pose_bag(tmp_path / "bag", images, IMAGE_T, trajectory(POSE_T - T0), POSE_T,
                               image_type="compressed")

    def fail(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(bag_access, "decode_compressed", fail)
    monkeypatch.setattr(bag_access, "decode_raw", fail)
    src = RosbagSource(bag, "/camera/image_raw", "/odom")
    assert len(src.poses()[0]) == len(IMAGE_T)


def test_rosbag_images_without_pose_are_skipped_and_counted(tmp_path, caplog):
    image_t = np.concatenate([IMAGE_T, [T0 + 3.0]])   # last image after the poses end
    images = [sample_image(i) for i in range(len(image_t))]
    bag = write_image_pose_bag(tmp_path / "bag", images, image_t, trajectory(POSE_T - T0), POSE_T,
                               storage="mcap")
    with caplog.at_level(logging.WARNING):
        src = RosbagSource(bag, "/camera/image_raw", "/odom")
    assert len(src) == len(IMAGE_T) and src.counts.no_pose == 1
    assert "1 of 6 images have no pose" in caplog.text
    src = RosbagSource(bag, "/camera/image_raw", "/odom", require_poses=False)
    assert len(src) == 6 and not list(src)[-1].has_pose
    with pytest.raises(DataError, match="same clock"):
        RosbagSource(bag, "/camera/image_raw", "/odom", tolerance=0.01, max_gap=0.1)


def test_rosbag_corrupt_jpeg_is_skipped_and_counted(tmp_path, caplog):
    images: list = [sample_image(i) for i in range(len(IMAGE_T))]
    images[2] = b"\xff\xd8\xff\xe0 not really a jpeg"
    bag = write_image_pose_bag(tmp_path / "bag", images, IMAGE_T, trajectory(POSE_T - T0), POSE_T,
                               image_type="compressed", storage="mcap")
    src = RosbagSource(bag, "/camera/image_raw", "/odom")
    assert len(src) == len(IMAGE_T)  # found only when decoding
    with caplog.at_level(logging.WARNING):
        names = [r.name for r in src]
    assert names == [f"{s:.6f}" for i, s in enumerate(IMAGE_T) if i != 2]
    assert src.skipped_undecodable == 1
    assert f"{IMAGE_T[2]:.6f}" in caplog.text


def test_rosbag_missing_and_unsupported_topics(tmp_path):
    bag = write_image_pose_bag(tmp_path / "bag", [sample_image(0)], [T0], trajectory(np.zeros(1)), [T0],
                               extra_topics={"/scan": "sensor_msgs/msg/LaserScan"})
    assert list_topics(bag) == {"/camera/image_raw": "sensor_msgs/msg/Image", "/odom": "nav_msgs/msg/Odometry",
                                "/scan": "sensor_msgs/msg/LaserScan"}
    with pytest.raises(DataError) as info:
        RosbagSource(bag, "/cam", "/odom")
    msg = str(info.value)
    assert "'/cam'" in msg and "/camera/image_raw (sensor_msgs/msg/Image)" in msg
    assert "/scan (sensor_msgs/msg/LaserScan)" in msg
    with pytest.raises(DataError, match="pose topic '/gps'"):
        RosbagSource(bag, "/camera/image_raw", "/gps")
    with pytest.raises(DataError, match="supported image types"):
        RosbagSource(bag, "/scan", "/odom")
    with pytest.raises(DataError, match="supported pose types"):
        RosbagSource(bag, "/camera/image_raw", "/scan")


def test_rosbag_zero_header_stamps_use_bag_time_and_no_pose_topic(tmp_path):
    images = [sample_image(i) for i in range(3)]
    bag = write_image_pose_bag(tmp_path / "bag", images, IMAGE_T[:3], trajectory(POSE_T - T0), POSE_T,
                               zero_header_stamps=True, bag_time_offset=0.0, storage="sqlite3")
    src = RosbagSource(bag, "/camera/image_raw", "/odom")
    np.testing.assert_allclose(src.poses()[0], IMAGE_T[:3], atol=1e-6, rtol=0)
    np.testing.assert_allclose(src.poses()[1][:, :3], trajectory(IMAGE_T[:3] - T0)[:, :3], atol=1e-5)
    src = RosbagSource(bag, "/camera/image_raw")
    assert len(src) == 3 and np.isnan(src.poses()[1]).all()
    assert all(not r.has_pose for r in src)


def test_rosbag_path_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        RosbagSource(tmp_path / "nope", "/cam")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="metadata.yaml"):
        RosbagSource(tmp_path / "empty", "/cam")
    bag = write_image_pose_bag(tmp_path / "bag", [sample_image(0)], [T0], storage="mcap")
    storage_file = next(p for p in bag.iterdir() if p.suffix == ".mcap")
    assert list_topics(storage_file) == {"/camera/image_raw": "sensor_msgs/msg/Image"}  # a file inside: its folder


def test_scan_steps_read_assign_and_deduplicate(tmp_path, caplog):
    """The three steps of a bag's first pass, one by one: reading, pose assignment, de-duplication."""
    from r2former_core.data.sources.bag_scan import MessageCounter, ScanRequest, assign_poses, read_bag, unique_records
    image_t = [IMAGE_T[0], IMAGE_T[1], IMAGE_T[1] + 1e-8, IMAGE_T[2], T0 + 3.0]  # a repeated stamp, one unposed
    images = [sample_image(i) for i in range(len(image_t))]
    bag = write_image_pose_bag(tmp_path / "bag", images, image_t, trajectory(POSE_T - T0), POSE_T)
    request = ScanRequest(bag, "/camera/image_raw", "/odom")
    scan = read_bag(request)
    assert scan.counts.images == 5 and scan.counts.pose_msgs == len(POSE_T) and scan.tf_tree is None
    assert len(scan.pose_rows) == len(POSE_T) and scan.image_type == "sensor_msgs/msg/Image"
    np.testing.assert_allclose(scan.stamps, image_t, atol=1e-9, rtol=0)
    with caplog.at_level(logging.WARNING):
        poses, valid = assign_poses(scan, request, require_poses=True)
    assert valid.tolist() == [True, True, True, True, False] and scan.counts.no_pose == 1
    assert "1 of 5 images have no pose" in caplog.text
    np.testing.assert_allclose(poses[:4, :3], trajectory(np.asarray(image_t[:4]) - T0)[:, :3], atol=1e-5)
    records, duplicates = unique_records(scan.image_keys, scan.stamps, poses, valid, require_poses=True)
    assert duplicates == 1 and [r.stamp for r in records] == pytest.approx([image_t[0], image_t[1], image_t[3]])
    kept, _ = unique_records(scan.image_keys, scan.stamps, poses, valid, require_poses=False)
    assert len(kept) == 4 and np.isnan(kept[-1].pose).all()
    # the keys find messages again, also several at one bag time
    counter = MessageCounter()
    assert [counter.key(3, 10), counter.key(3, 10), counter.key(4, 10), counter.key(3, 11)] == \
        [(3, 10, 0), (3, 10, 1), (4, 10, 0), (3, 11, 0)]
    without_poses = ScanRequest(bag, "/camera/image_raw")
    poses, valid = assign_poses(read_bag(without_poses), without_poses, require_poses=False)
    assert valid.all() and np.isnan(poses).all()
    source = RosbagSource(bag, "/camera/image_raw", "/odom")
    assert len(source) == 3 and source.counts.duplicate_stamps == 1 and source.counts.no_pose == 1


# --------------------------------------------------------------------------------------------
# Frames of the poses
# --------------------------------------------------------------------------------------------

def odometry_bag(tmp_path: Path, name: str, pose_type: str = "odometry", frames=("map", "base_link")) -> Path:
    images = [sample_image(i) for i in range(3)]
    return write_image_pose_bag(tmp_path / name, images, IMAGE_T[:3], trajectory(POSE_T - T0), POSE_T,
                                pose_type=pose_type, pose_frames=frames)


def test_image_folders_record_the_given_frames(tmp_path):
    folder = tmp_path / "imgs"
    make_stamped_folder(folder, [1.0, 2.0])
    write_tum(tmp_path / "gt.txt", np.array([1.0, 2.0]), trajectory(np.array([0.0, 1.0])))
    default = open_source(images=folder, poses=tmp_path / "gt.txt")
    assert default.frames == PoseFrames("map", "camera")                 # the default: the files name no frame
    src = open_source(images=folder, poses=tmp_path / "gt.txt", pose_frames="/world:cam_front")
    assert src.frames == PoseFrames("world", "cam_front") and not src.frames.optical
    np.testing.assert_array_equal(src.poses()[1], default.poses()[1])   # body frames: poses as read
    parent_only = ImageFolderSource(folder, tmp_path / "gt.txt", pose_frames=("odom", None))   # --frame-id odom
    assert parent_only.frames == PoseFrames("odom", "camera")
    for bad in ("map", "map:map", "a:b:c"):
        with pytest.raises(DataError, match="pose frames"):
            open_source(images=folder, poses=tmp_path / "gt.txt", pose_frames=bad)
    with pytest.raises(DataError, match="auto, body, optical"):
        open_source(images=folder, poses=tmp_path / "gt.txt", camera_convention="sideways")


def test_image_folder_optical_convention_is_turned_to_body(tmp_path):
    """A TUM file of optical-frame camera poses (z forward, as visual SLAM writes them) becomes body poses."""
    folder = tmp_path / "imgs"
    make_stamped_folder(folder, [1.0, 2.0])
    write_tum(tmp_path / "gt.txt", np.array([1.0, 2.0]), trajectory(np.array([0.0, 1.0])))
    raw = ImageFolderSource(folder, tmp_path / "gt.txt").poses()[1]
    for kwargs in ({"camera_convention": "optical"}, {"pose_frames": "map:camera_optical_frame"}):
        src = ImageFolderSource(folder, tmp_path / "gt.txt", **kwargs)
        assert src.frames.optical
        poses = src.poses()[1]
        np.testing.assert_array_equal(poses[:, :3], raw[:, :3])
        for body, optical in zip(quat_to_matrix(poses[:, 3:]), quat_to_matrix(raw[:, 3:])):
            # body x = optical z (forward), body y = -optical x (left), body z = -optical y (up)
            np.testing.assert_allclose(body, np.stack([optical[:, 2], -optical[:, 0], -optical[:, 1]], 1),
                                       atol=1e-12)
        assert all(np.array_equal(r.pose, p) for r, p in zip(src, poses))
    body = ImageFolderSource(folder, tmp_path / "gt.txt", pose_frames="map:camera_optical_frame",
                             camera_convention="body")
    assert not body.frames.optical and np.array_equal(body.poses()[1], raw)


@pytest.mark.parametrize("pose_type, child", [("odometry", "base_footprint"), ("pose", ""), ("pose_cov", "")])
def test_rosbag_frames_come_from_the_messages(tmp_path, caplog, pose_type, child):
    bag = odometry_bag(tmp_path, "bag", pose_type, ("/world", "base_footprint"))
    with caplog.at_level(logging.WARNING):
        src = RosbagSource(bag, "/camera/image_raw", "/odom")
    assert src.frames == PoseFrames("world", child)         # header.frame_id; child_frame_id of Odometry only
    assert ("do not name the frame whose pose they hold" in caplog.text) == (child == "")
    if pose_type == "odometry":
        with pytest.raises(DataError, match=r"name 'base_footprint' \(child_frame_id\)"):
            RosbagSource(bag, "/camera/image_raw", "/odom", pose_frames="world:camera_link")
    else:   # PoseStamped names no child: --pose-frames completes it; the parent must agree
        src = RosbagSource(bag, "/camera/image_raw", "/odom", pose_frames="world:camera_link")
        assert src.frames == PoseFrames("world", "camera_link")
    with pytest.raises(DataError, match=r"parent frame 'map', but the messages .* name 'world' \(header.frame_id\)"):
        RosbagSource(bag, "/camera/image_raw", "/odom", pose_frames=("map", None))
    assert RosbagSource(bag, "/camera/image_raw").frames == PoseFrames("map", "")   # queries: no poses, no frames


def test_rosbag_frames_unnamed_or_mixed(tmp_path, caplog):
    empty = odometry_bag(tmp_path, "empty", "pose", ("", ""))
    with caplog.at_level(logging.WARNING):
        assert RosbagSource(empty, "/camera/image_raw", "/odom").frames == PoseFrames("map", "")
    assert "empty header.frame_id; assuming their frame is 'map'" in caplog.text
    assert RosbagSource(empty, "/camera/image_raw", "/odom", pose_frames="utm:gnss").frames == PoseFrames("utm", "gnss")
    pairs = [("map", "base_link")] * (len(POSE_T) - 2) + [("odom", "base_link")] * 2
    mixed = odometry_bag(tmp_path, "mixed", "odometry", pairs)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert RosbagSource(mixed, "/camera/image_raw", "/odom").frames == PoseFrames("map", "base_link")
    assert "several frame pairs" in caplog.text and "odom -> base_link (2)" in caplog.text


def test_frame_rules():
    from r2former_core import frames
    from r2former_core.cli.common import CAMERA_CONVENTIONS
    from r2former_core.frames import (
        OPTICAL_TO_BODY,
        is_odom_frame,
        is_optical_frame,
        odometry_warning,
        uses_optical_convention,
    )
    assert CAMERA_CONVENTIONS == frames.CAMERA_CONVENTIONS          # the CLI lists them without importing numpy
    assert [is_odom_frame(f) for f in ("odom", "/odom", "robot1/odom", "odom_combined", "map", "odometry")] == \
        [True, True, True, False, False, False]
    assert [is_optical_frame(f) for f in ("camera_optical_frame", "cam_optical", "camera_link", "optical")] == \
        [True, True, False, False]
    assert uses_optical_convention("camera", "optical") and not uses_optical_convention("cam_optical", "body")
    assert odometry_warning("map") is None and "--tf-frames map:camera_link" in odometry_warning("robot1/odom")
    # REP-103: camera_link -> camera_optical_frame is rpy (-pi/2, 0, -pi/2); OPTICAL_TO_BODY is its inverse
    roll, yaw = -math.pi / 2, -math.pi / 2
    rep103 = quat_to_matrix(np.array([0, 0, math.sin(yaw / 2), math.cos(yaw / 2)])) @ \
        quat_to_matrix(np.array([math.sin(roll / 2), 0, 0, math.cos(roll / 2)]))
    np.testing.assert_allclose(quat_to_matrix(OPTICAL_TO_BODY[3:]), rep103.T, atol=1e-12)


# --------------------------------------------------------------------------------------------
# VG benchmark folders
# --------------------------------------------------------------------------------------------

def test_parse_vg_name():
    pose, stamp = parse_vg_name("@0543256.96@4178906.70@10@S@037.75643@-122.50951@pano@1@90@0@0@12.5@20170101@@.jpg")
    np.testing.assert_allclose(pose[:3], [543256.96, 4178906.70, 12.5])
    assert same_rotation(pose[3:], IDENTITY)  # heading 90 (east) -> yaw 0
    assert stamp == 20170101.0
    pose, stamp = parse_vg_name("@10@20@@@@@@@0@@@@@@.jpg")  # heading 0 = north -> yaw +90 deg
    assert yaw_from_quat(pose[3:]) == pytest.approx(math.pi / 2)
    assert pose[2] == 0.0 and stamp is None
    pose, _ = parse_vg_name("@1.5@2.5@.jpg")  # short names: identity orientation
    np.testing.assert_allclose(pose, [1.5, 2.5, 0, 0, 0, 0, 1])
    for bad in ["frame.jpg", "@x@2@.jpg"]:
        with pytest.raises(DataError):
            parse_vg_name(bad)


def test_vg_folder_source_and_open_source(tmp_path):
    root = tmp_path / "pitts" / "images" / "test" / "database"
    root.mkdir(parents=True)
    names = ["@100.0@200.0@17@T@@@p1@0@180@@@@@@.jpg", "@110.0@205.0@17@T@@@p2@0@@@@@@@.jpg"]
    for i, name in enumerate(names):
        cv2.imwrite(str(root / name), sample_image(i))
    assert is_vg_folder(root) and not is_vg_folder(tmp_path / "pitts")
    src = VGFolderSource(root)
    assert src.names == sorted(names)
    stamps, poses = src.poses()
    np.testing.assert_array_equal(stamps, [0.0, 1.0])
    np.testing.assert_allclose(poses[:, :2], [[100, 200], [110, 205]])
    assert yaw_from_quat(poses[0, 3:]) == pytest.approx(math.radians(-90.0))  # heading 180 = south
    assert len([r for r in src if r.image is not None]) == 2
    assert isinstance(open_source(images=root), VGFolderSource)
    with pytest.raises(DataError, match="images/test/database"):
        VGFolderSource(tmp_path / "pitts")
    plain = tmp_path / "plain"
    make_stamped_folder(plain, [1.0])
    assert not is_vg_folder(plain)


# --------------------------------------------------------------------------------------------
# open_source
# --------------------------------------------------------------------------------------------

def test_open_source_picks_classes_and_topics(tmp_path):
    images = [sample_image(i) for i in range(3)]
    bag = write_image_pose_bag(tmp_path / "bag", images, IMAGE_T[:3], trajectory(POSE_T - T0), POSE_T,
                               pose_type="pose", pose_topic="/gt")
    src = open_source(bag=bag)  # the only image and pose topics are used
    assert isinstance(src, RosbagSource) and src.pose_topic == "/gt" and len(src) == 3
    assert "/camera/image_raw" in src.description
    src = open_source(bag=bag, require_poses=False)
    assert src.pose_topic is None

    folder = tmp_path / "imgs"
    make_stamped_folder(folder, [1.0, 2.0])
    write_tum(tmp_path / "gt.txt", np.array([1.0, 2.0]), trajectory(np.array([0.0, 1.0])))
    assert isinstance(open_source(images=folder, poses=tmp_path / "gt.txt"), ImageFolderSource)
    assert isinstance(open_source(images=folder, require_poses=False), ImageFolderSource)

    with pytest.raises(DataError, match="not both"):
        open_source(images=folder, bag=bag)
    with pytest.raises(DataError, match="give an image folder"):
        open_source()
    with pytest.raises(DataError, match="pose topic instead"):
        open_source(bag=bag, poses=tmp_path / "gt.txt")
    with pytest.raises(DataError, match="go with a bag"):
        open_source(images=folder, image_topic="/cam")

    two = write_image_pose_bag(tmp_path / "bag2", images, IMAGE_T[:3], trajectory(POSE_T - T0), POSE_T,
                               extra_topics={"/camera2/compressed": "sensor_msgs/msg/CompressedImage"})
    with pytest.raises(DataError, match="pass the image topic") as info:
        open_source(bag=two)
    assert "/camera2/compressed" in str(info.value) and "/camera/image_raw" in str(info.value)
    assert len(open_source(bag=two, image_topic="/camera/image_raw")) == 3
