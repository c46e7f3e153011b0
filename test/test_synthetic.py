"""Synthetic world: determinism, drives, conditions, geometry sanity, TUM/rosbag2 output and the CLI."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from r2former_core import synthetic as syn
from r2former_core.errors import ConfigError
from r2former_core.synthetic import CONDITIONS, LANE, Frame, SyntheticWorld, parse_conditions, write_drive
from r2former_core.synthetic.render import Camera

SIZE = (120, 160)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(5)


def _yaw(pose: np.ndarray) -> float:
    return 2 * math.atan2(pose[5], pose[6])


def _map_pose(world: SyntheticWorld, s: float, lateral: float = LANE) -> tuple[float, float, float]:
    (p,), (t,) = world.route.at(s)
    xy = p + lateral * np.array([-t[1], t[0]])
    return float(xy[0]), float(xy[1]), math.atan2(t[1], t[0])


def _desc(image: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(cv2.resize(image, (32, 24), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
    g = g.astype(np.float32).ravel()
    g -= g.mean()
    return g / (np.linalg.norm(g) + 1e-9)


def _parse_tum(path) -> tuple[np.ndarray, np.ndarray]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return np.array([float(r[0]) for r in rows]), np.array([[float(v) for v in r[1:]] for r in rows])


# ---------------------------------------------------------------- determinism and the shared world

def test_same_seed_gives_identical_world_images_and_poses(world):
    other = SyntheticWorld(5)
    assert other.route_length == world.route_length
    x, y, yaw = _map_pose(world, 30.0)
    for cond in (("day",), ("night", "rain"), ("winter", "fog")):
        a = world.render(x, y, yaw, cond, SIZE)
        assert a.shape == SIZE + (3,) and a.dtype == np.uint8
        assert np.array_equal(a, other.render(x, y, yaw, cond, SIZE))
    frames_a = list(world.drive("query", ("dusk",), frames=3, size=SIZE))
    frames_b = list(other.drive("query", ("dusk",), frames=3, size=SIZE))
    for fa, fb in zip(frames_a, frames_b):
        assert isinstance(fa, Frame) and fa.stamp == fb.stamp
        assert fa.pose.shape == (7,) and fa.pose.dtype == np.float64
        assert np.array_equal(fa.pose, fb.pose) and np.array_equal(fa.image, fb.image)


def test_different_seed_gives_a_different_world(world):
    other = SyntheticWorld(6)
    assert other.route_length != world.route_length
    a = [f.image for f in world.drive("map", frames=3, size=SIZE)]
    b = [f.image for f in other.drive("map", frames=3, size=SIZE)]
    assert all(np.abs(x.astype(int) - y).mean() > 5 for x, y in zip(a, b))


def test_map_and_query_drives_see_the_same_world(world):
    """A query pose rendered by a fresh instance equals the query frame minus traffic and noise."""
    q = next(iter(world.drive("query", ("day",), frames=1, size=SIZE)))
    x, y, yaw = q.pose[0], q.pose[1], _yaw(q.pose)
    fresh = SyntheticWorld(5)
    static_a = world.render(x, y, yaw, ("day",), SIZE)
    assert np.array_equal(static_a, fresh.render(x, y, yaw, ("day",), SIZE))
    # traffic is the only difference between the drive frame and the static render (day: no noise)
    changed = np.any(q.image != static_a, axis=-1).mean()
    assert changed < 0.5


def test_render_accepts_odd_sizes_and_an_rng(world):
    x, y, yaw = _map_pose(world, 80.0)
    img = world.render(x, y, yaw, ("rain",), (61, 83), rng=np.random.default_rng(1))
    assert img.shape == (61, 83, 3)
    again = world.render(x, y, yaw, ("rain",), (61, 83), rng=np.random.default_rng(1))
    assert np.array_equal(img, again)


# ---------------------------------------------------------------- drives

def test_map_drive_follows_the_lane_and_query_offsets_are_bounded(world):
    spacing = 3.0
    map_traj = world.trajectory("map", 120, spacing)
    query_traj = world.trajectory("query", 120, spacing)
    lateral_q, dyaw_q, along_m, along_q = [], [], [], []
    for pm, pq in zip(map_traj.poses, query_traj.poses):
        s, lat, heading = world.project(pm[0], pm[1])
        assert abs(lat - LANE) < 0.05
        assert abs(math.remainder(_yaw(pm) - heading, 2 * math.pi)) < math.radians(2)
        along_m.append(s)
        s, lat, heading = world.project(pq[0], pq[1])
        lateral_q.append(lat - LANE)
        dyaw_q.append(math.remainder(_yaw(pq) - heading, 2 * math.pi))
        along_q.append(s)
        assert pm[2] == pq[2] == pytest.approx(1.5)
    lateral_q, dyaw_q = np.array(lateral_q), np.degrees(dyaw_q)
    assert np.abs(lateral_q).max() <= 2.0 + 0.05
    assert np.abs(dyaw_q).max() <= 15.0 + 2.0          # + the route's own heading change within 1 m samples
    assert np.ptp(lateral_q) > 0.05 and np.ptp(dyaw_q) > 0.5   # the query really wanders
    # query frames fall between map frames
    gap = np.abs((np.array(along_q) - np.array(along_m) + world.route_length / 2) % world.route_length
                 - world.route_length / 2)
    assert np.all(gap > 0.1 * spacing) and np.all(gap < spacing)


def test_query_bounds_hold_for_several_seeds():
    for seed in (0, 1):
        w = SyntheticWorld(seed)
        traj = w.trajectory("query", 200)
        for p in traj.poses[::5]:
            _, lat, heading = w.project(p[0], p[1])
            assert abs(lat - LANE) <= 2.05
            assert abs(math.degrees(math.remainder(_yaw(p) - heading, 2 * math.pi))) <= 17.0


def test_stamps_are_10hz_from_a_fixed_epoch(world):
    m = world.trajectory("map", 5)
    q = world.trajectory("query", 5)
    assert m.stamps[0] == syn.EPOCH
    assert np.all(np.diff(m.stamps_ns) == 100_000_000) and np.all(np.diff(q.stamps_ns) == 100_000_000)
    assert q.stamps[0] != m.stamps[0]
    odom = world.trajectory("map", 5, substeps=2)
    assert len(odom.poses) == 9 and np.array_equal(odom.poses[::2], m.poses)


def test_traffic_moves_and_differs_between_drives(world):
    a0 = world.traffic("map", ("day",), 0.0)
    a1 = world.traffic("map", ("day",), 1.0)
    b0 = world.traffic("query", ("night",), 0.0)
    assert {m.kind for m in a0} == {"car", "person"}
    moved = [math.hypot(p.x - q.x, p.y - q.y) for p, q in zip(a0, a1)]
    assert max(moved) > 5.0 and min(moved) == 0.0           # driving cars and parked ones
    assert [(m.x, m.y) for m in a0] != [(m.x, m.y) for m in b0]


def test_invalid_arguments(world, tmp_path):
    with pytest.raises(ConfigError, match="allowed: day, dusk"):
        parse_conditions("day,snow")
    assert parse_conditions(" Night , rain ,night") == ("night", "rain")
    assert parse_conditions("") == ("day",)
    with pytest.raises(ConfigError, match="'map' or 'query'"):
        world.trajectory("side", 3)
    with pytest.raises(ConfigError, match="at least 1"):
        world.trajectory("map", 0)
    with pytest.raises(ConfigError, match="spacing must be positive"):
        world.trajectory("map", 3, spacing=0.0)
    with pytest.raises(ConfigError, match="storage"):
        write_drive(world, tmp_path / "a", frames=1, size=(24, 32), bag=True, storage="zip")
    with pytest.raises(ConfigError, match="only written into a bag"):
        write_drive(world, tmp_path / "b", frames=1, size=(24, 32), compressed=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- appearance

def test_conditions_visibly_change_the_image(world):
    x, y, yaw = _map_pose(world, 55.0)
    img = {c: world.render(x, y, yaw, (c,), SIZE).astype(np.float32) for c in CONDITIONS}
    mean = {c: float(v.mean()) for c, v in img.items()}
    grey = {c: cv2.cvtColor(v, cv2.COLOR_RGB2GRAY) for c, v in img.items()}
    assert mean["night"] < 0.5 * mean["day"]
    assert mean["night"] < mean["dusk"] < mean["day"]
    contrast = {c: g.std() / g.mean() for c, g in grey.items()}
    detail = {c: np.abs(cv2.Sobel(g, cv2.CV_32F, 1, 0)).mean() for c, g in grey.items()}
    assert contrast["fog"] < 0.85 * contrast["day"] and detail["fog"] < 0.8 * detail["day"]   # fog washes out
    lower = slice(SIZE[0] // 2, None)
    assert grey["winter"][lower].mean() > grey["day"][lower].mean() + 5    # snow on the ground
    for c in ("autumn", "rain", "winter"):
        assert np.abs(img[c] - img["day"]).mean() > 3, c
    # combinations compose: night + fog is darker than fog and flatter than night
    nf = world.render(x, y, yaw, ("night", "fog"), SIZE).astype(np.float32)
    assert nf.mean() < mean["fog"]


def test_night_has_lights(world):
    """Lit windows and street lamps make the night image far from uniformly dark."""
    x, y, yaw = _map_pose(world, 20.0)
    night = world.render(x, y, yaw, ("night",), (240, 320))
    assert np.percentile(night.max(-1), 99.5) > 150


def test_moving_the_camera_changes_the_image_and_near_views_are_more_alike(world):
    near, far, moved = [], [], []
    for s in (10.0, 90.0, 170.0, 250.0, 330.0):
        base = world.render(*_map_pose(world, s), ("day",), SIZE)
        d = _desc(base)
        step = world.render(*_map_pose(world, s + 1.0), ("day",), SIZE)
        moved.append(np.abs(step.astype(int) - base).mean())
        near.append(d @ _desc(step))
        far.append(d @ _desc(world.render(*_map_pose(world, s + 60.0), ("day",), SIZE)))
    assert min(moved) > 1.0
    assert np.mean(near) > np.mean(far) + 0.2


def test_lateral_motion_shows_parallax(world):
    """Sideways motion shifts near facades further across the image than distant ones."""
    size = (240, 320)
    near, far = [], []
    for s in (20.0, 60.0, 220.0, 300.0):
        x, y, yaw = _map_pose(world, s)
        x2, y2, _ = _map_pose(world, s, LANE + 0.5)
        a, b = (cv2.cvtColor(world.render(*p, yaw, ("day",), size), cv2.COLOR_RGB2GRAY).astype(np.float32)
                for p in ((x, y), (x2, y2)))
        depth = world.renderer.cast(Camera(x, y, yaw, *size))[0][0]       # nearest wall per column
        for c0 in range(0, size[1] - 40, 40):
            lo, hi = max(0, c0 - 60), min(size[1], c0 + 100)
            score = cv2.matchTemplate(b[60:180, lo:hi], a[60:180, c0:c0 + 40], cv2.TM_CCOEFF_NORMED)
            shift = lo + int(score.argmax()) - c0
            d = float(np.median(depth[c0:c0 + 40]))
            (near if d < 20 else far if d > 40 else []).append(shift)
    assert len(near) >= 3 and len(far) >= 3
    assert np.mean(near) > np.mean(far) + 3


def test_vehicles_occlude_the_scene(world):
    x, y, yaw = _map_pose(world, 100.0)
    free = world.render(x, y, yaw, ("day",), (240, 320))
    car = syn.Mover("car", x + 10 * math.cos(yaw), y + 10 * math.sin(yaw), yaw, 4.5, 1.8, 1.5, (200.0, 30.0, 30.0))
    blocked = world.render(x, y, yaw, ("day",), (240, 320), movers=[car])
    changed = np.any(free != blocked, axis=-1)
    assert changed[122:150, 140:180].mean() > 0.95          # the car hides the road ahead
    assert not changed[:100].any() and not changed[:, :80].any()   # ... and nothing above or beside it
    assert np.all(blocked[135, 150:170] == (200, 30, 30))


def test_place_recognition_signal(world):
    """Same-condition query frames are usually nearest to the map frame of the same place (tiny images)."""
    n = 30
    spacing = world.route_length / n
    m = np.array([_desc(f.image) for f in world.drive("map", ("day",), n, SIZE, spacing)])
    q = np.array([_desc(f.image) for f in world.drive("query", ("day",), n, SIZE, spacing)])
    best = (q @ m.T).argmax(1)
    err = np.minimum(np.abs(best - np.arange(n)), n - np.abs(best - np.arange(n)))
    assert np.mean(err <= 1) >= 0.5


# ---------------------------------------------------------------- output files

def test_tum_and_png_round_trip(world, tmp_path):
    out = write_drive(world, tmp_path / "drive", "query", "autumn", frames=3, size=(60, 80))
    frames = list(world.drive("query", ("autumn",), 3, (60, 80)))
    stamps, poses = _parse_tum(out / "poses.txt")
    assert (out / "poses.txt").read_text().startswith("#")
    np.testing.assert_allclose(stamps, [f.stamp for f in frames], rtol=0, atol=1e-6)
    np.testing.assert_allclose(poses, np.array([f.pose for f in frames]), rtol=0, atol=1e-8)
    files = sorted((out / "images").glob("*.png"))
    assert [float(p.stem) for p in files] == pytest.approx(list(stamps), abs=1e-6)
    assert [p.stem for p in files] == [f"{s:.6f}" for s in stamps]
    for path, frame in zip(files, frames):
        assert np.array_equal(cv2.imread(str(path))[..., ::-1], frame.image)
    with pytest.raises(FileExistsError):
        write_drive(world, out, "query", "autumn", frames=3, size=(60, 80))


@pytest.mark.parametrize("storage,compressed", [("sqlite3", False), ("mcap", False), ("sqlite3", True),
                                                ("mcap", True)])
def test_bag_output(world, tmp_path, storage, compressed):
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore
    ts = get_typestore(Stores.ROS2_KILTED)
    n, size = 3, (48, 64)
    out = write_drive(world, tmp_path, "map", ("night",), frames=n, size=size, bag=True, compressed=compressed,
                      storage=storage)
    assert not (out / "images").exists()
    stamps, poses = _parse_tum(out / "poses.txt")
    frames = list(world.drive("map", ("night",), n, size))
    odom = world.trajectory("map", n, substeps=2)
    topic = "/camera/image_raw/compressed" if compressed else "/camera/image_raw"
    msgtype = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    images, odoms = [], []
    with Reader(out / "bag") as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        assert types == {topic: msgtype, "/odom": "nav_msgs/msg/Odometry"}
        for conn, t_ns, raw in reader.messages():
            msg = ts.deserialize_cdr(raw, conn.msgtype)
            assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == t_ns
            (images if conn.topic == topic else odoms).append((t_ns, msg))
    assert len(images) == n and len(odoms) == 2 * n - 1
    np.testing.assert_allclose([t / 1e9 for t, _ in images], stamps, rtol=0, atol=1e-6)
    assert [t for t, _ in odoms] == list(odom.stamps_ns)
    for (_, msg), frame in zip(images, frames):
        if compressed:
            assert msg.format == "jpeg"
            decoded = cv2.imdecode(np.asarray(msg.data), cv2.IMREAD_COLOR)[..., ::-1]
            assert decoded.shape == size + (3,)
            assert np.abs(decoded.astype(int) - frame.image).mean() < 12
        else:
            assert (msg.height, msg.width, msg.encoding, msg.step) == (*size, "rgb8", size[1] * 3)
            assert np.array_equal(np.asarray(msg.data).reshape(*size, 3), frame.image)
    for (_, msg), pose in zip(odoms, odom.poses):
        assert msg.header.frame_id == "map" and msg.child_frame_id == "base_link"
        p, o = msg.pose.pose.position, msg.pose.pose.orientation
        np.testing.assert_allclose([p.x, p.y, p.z, o.x, o.y, o.z, o.w], pose, atol=1e-9)
    np.testing.assert_allclose(poses, odom.poses[::2], atol=1e-8)


# ---------------------------------------------------------------- command line

def test_cli_writes_a_drive(tmp_path, capsys):
    from r2former_core.cli.main import main
    out = tmp_path / "q"
    code = main(["synth", "--seed", "5", "--drive", "query", "--conditions", "night,fog", "--frames", "2",
                 "--width", "80", "--height", "60", "--out", str(out)])
    assert code == 0
    assert len(list((out / "images").glob("*.png"))) == 2
    assert len(_parse_tum(out / "poses.txt")[0]) == 2
    summary = capsys.readouterr().out
    assert "2 frames" in summary and "route" in summary and str(out) in summary


def test_cli_writes_a_bag(tmp_path):
    from r2former_core.cli.main import main
    code = main(["synth", "--seed", "5", "--drive", "map", "--frames", "2", "--width", "64", "--height", "48",
                 "--out", str(tmp_path), "--bag", "--compressed", "--storage", "mcap"])
    assert code == 0
    assert (tmp_path / "bag" / "metadata.yaml").exists() and (tmp_path / "poses.txt").exists()


def test_cli_rejects_bad_input(tmp_path, capsys):
    from r2former_core.cli.main import main
    base = ["synth", "--seed", "1", "--drive", "map", "--frames", "1", "--width", "32", "--height", "24"]
    assert main(base + ["--conditions", "day,snow", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "snow" in err and all(c in err for c in CONDITIONS)
    assert main(base + ["--compressed", "--out", str(tmp_path / "b")]) == 2
    assert main(base + ["--out", str(tmp_path / "c")]) == 0
    assert main(base + ["--out", str(tmp_path / "c")]) == 2          # refuses to overwrite a drive
    assert "already exists" in capsys.readouterr().err


def test_cli_help_explains_every_option(capsys):
    from r2former_core.cli import synth
    from r2former_core.cli.main import main
    assert synth.CONDITION_NAMES == CONDITIONS
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--seed", "--drive", "--conditions", "--frames", "--spacing", "--width", "--height", "--out",
                   "--bag", "--compressed", "--storage"):
        assert option in text
    assert ",".join(CONDITIONS) in text
