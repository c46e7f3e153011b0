"""The localize node on a robot, in separate processes over real topics.

* Frames: a camera mounted ahead of the base, offset sideways and turned (yaw) in the synthetic world;
  the map holds camera poses (child_frame "camera", built with r2former_core.mapping.build_map) and
  the query images are rendered from base pose * mounting. The published pose must be the base pose:
  with camera_pose_in_base, and with the mounting from TF (an optical camera frame on /tf_static,
  tf2_msgs built here from its definition) plus publish_tf (map -> odom checked on /tf).
* Lifecycle and namespaces: `__ns:=/robot1`, a `/**` params file and autostart false: nothing is
  published until configure and activate are called over the lifecycle services; then it localizes,
  /robot1/initialpose gets the initial pose, deactivate stops it, cleanup unloads it. A second
  localizer in /robot2 with its own map runs beside it.
* use_sim_time and zero stamps; diagnostics go ERROR after the camera stops.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import yaml
from rostools import (
    LATCHED,
    NodeProcess,
    RosProbe,
    build_test_map,
    diagnostic_values,
    line_poses,
    save_tiny_model,
    synthetic_images,
    wait_until,
    with_tf2_msgs,
)

pytestmark = pytest.mark.ros

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from r2former_core.data.poses import compose_poses, invert_poses  # noqa: E402
from r2former_core.data.sources import ListSource, PosedImage, PoseFrames  # noqa: E402
from r2former_core.frames import OPTICAL_IN_BODY, planar_error, pose_from_xyzrpy  # noqa: E402
from r2former_ros.conversions import pose_from_msg, pose_msg, rgb_to_image_msg, sec_to_stamp, stamp_to_ns  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(ROOT, "models", "r2former_tiny_demo.safetensors")
MOUNT = [0.9, -0.35, 1.5, 0.0, 0.0, -0.9]    # camera 0.9 m ahead, 0.35 m right, 1.5 m up, turned 52 deg right
SEED, MAP_FRAMES, QUERY_FRAMES, SPACING = 11, 50, 14, 2.0
MAX_POSITION_M, MAX_YAW_DEG = 4.0, 10.0      # localization error allowed per frame (map spacing 2 m)


def base_poses(trajectory) -> np.ndarray:
    poses = trajectory.poses.copy()
    poses[:, 2] = 0.0                          # the base on the ground; the mounting lifts the camera
    return poses


def render(world, camera_pose: np.ndarray, size) -> np.ndarray:
    yaw = 2 * math.atan2(camera_pose[5], camera_pose[6])
    return world.render(camera_pose[0], camera_pose[1], yaw, ("day",), size)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Map of camera poses of a mounted camera, and a query drive: base ground truth + rendered images."""
    pytest.importorskip("timm")
    from r2former_core.mapping import build_map
    from r2former_core.model import load_model
    from r2former_core.synthetic import SyntheticWorld
    root = tmp_path_factory.mktemp("robot_world")
    model = load_model(DEMO_MODEL, device="cpu")
    size = tuple(model.cfg.image_size)
    w = SyntheticWorld(SEED)
    mount = pose_from_xyzrpy(MOUNT)
    map_traj = w.trajectory("map", MAP_FRAMES, SPACING)
    cameras = compose_poses(base_poses(map_traj), mount)
    records = [PosedImage(f"map{i:03d}", float(s) / 1e9, cam, render(w, cam, size))
               for i, (s, cam) in enumerate(zip(map_traj.stamps_ns, cameras))]
    map_dir = root / "map"
    build_map(ListSource(records, PoseFrames("map", "camera")), model, map_dir, progress=False)
    query_traj = w.trajectory("query", QUERY_FRAMES, SPACING)
    bases = base_poses(query_traj)
    images = [render(w, cam, size) for cam in compose_poses(bases, mount)]
    return dict(root=root, map=map_dir, bases=bases, images=images, mount=mount)


def publish_query(probe_pub, images, stamps, frame_id: str, before_each=None) -> None:
    for i, (image, stamp) in enumerate(zip(images, stamps)):
        if before_each is not None:
            before_each(i, stamp)
        msg = rgb_to_image_msg(image)
        msg.header.stamp = sec_to_stamp(stamp)
        msg.header.frame_id = frame_id
        probe_pub.publish(msg)
        time.sleep(0.6)


def check_base_poses(poses: list[PoseWithCovarianceStamped], stamps: np.ndarray, bases: np.ndarray) -> list:
    """Errors (m, deg) of the published poses against the ground-truth base poses, by stamp."""
    by_stamp = {round(float(s), 6): b for s, b in zip(stamps, bases)}
    errors = []
    for msg in poses:
        assert msg.header.frame_id == "map"
        truth = by_stamp[round(stamp_to_ns(msg.header.stamp) / 1e9, 6)]
        d, yaw = planar_error(pose_from_msg(msg.pose.pose), truth)
        errors.append((d, math.degrees(yaw)))
    return errors


def test_camera_pose_in_base_gives_the_base_pose(world):
    probe = RosProbe("mounted_probe")
    poses = probe.subscribe(PoseWithCovarianceStamped, "/r2former_localizer/pose")
    pub = probe.publisher(Image, "/front_camera/image")
    node = NodeProcess("r2former_ros.localize_node", [
        "--ros-args", "-r", "image:=/front_camera/image", "-p", f"map_path:={world['map']}",
        "-p", f"model_path:={DEMO_MODEL}", "-p", "device:=cpu", "-p", "qos_reliability:=reliable",
        "-p", "min_confidence:=0.0", "-p", "camera_pose_in_base:=[" + ", ".join(f"{v:.6f}" for v in MOUNT) + "]"],
        world["root"] / "logs")
    try:
        assert probe.wait_for_subscriber("/front_camera/image", 90), node.output()
        stamps = 500.0 + 0.1 * np.arange(QUERY_FRAMES)
        publish_query(pub, world["images"], stamps, "camera")
        # tracking (the default) publishes once a place holds the belief: from the second or third frame on
        assert poses.wait(QUERY_FRAMES - 4, 30), node.output()
        errors = check_base_poses(poses.snapshot(), stamps, world["bases"])
        good = [d < MAX_POSITION_M and yaw < MAX_YAW_DEG for d, yaw in errors]
        assert sum(good) >= 0.8 * len(errors), errors
        # the camera looks 52 degrees to the right: without the mounting every yaw would be off by that much
        assert np.median([yaw for _, yaw in errors]) < MAX_YAW_DEG
        cov = np.asarray(poses.last().pose.covariance).reshape(6, 6)
        assert np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() > 0
        assert "camera poses composed with camera_pose_in_base" in node.output()
    finally:
        node.stop()
        probe.close()


def test_mounting_from_tf_and_map_to_odom(world, tf2_msgs_path):
    """camera_pose_in_base empty: base_link -> front_camera_optical from /tf_static (an optical frame), and
    publish_tf: odom -> base_link on /tf, map -> odom broadcast back like AMCL. The same odometry on /odom
    (nav_msgs/Odometry) drives the tracker, composed with the mounting from TF (the map holds camera poses)."""
    from nav_msgs.msg import Odometry
    from tf2_msgs.msg import TFMessage

    from r2former_ros.qos import latched_qos
    from r2former_ros.tf_io import pose_from_transform, transform_stamped
    probe = RosProbe("tf_probe")
    poses = probe.subscribe(PoseWithCovarianceStamped, "/r2former_localizer/pose")
    tf_out = probe.subscribe(TFMessage, "/tf")
    static_pub = probe.publisher(TFMessage, "/tf_static", latched_qos(100))
    tf_pub = probe.publisher(TFMessage, "/tf")
    odom_pub = probe.publisher(Odometry, "/odom")
    diags = probe.subscribe(DiagnosticArray, "/diagnostics")
    pub = probe.publisher(Image, "/front_camera/image")
    optical_in_base = compose_poses(world["mount"], OPTICAL_IN_BODY)
    static_pub.publish(TFMessage(transforms=[transform_stamped("base_link", "front_camera_optical", optical_in_base,
                                                              0)]))
    odom_in_map = pose_from_xyzrpy([3.0, -2.0, 0.0, 0.0, 0.0, 0.25])      # odometry drifted from the map
    node = NodeProcess("r2former_ros.localize_node", [
        "--ros-args", "-r", "image:=/front_camera/image", "-p", f"map_path:={world['map']}",
        "-p", f"model_path:={DEMO_MODEL}", "-p", "device:=cpu", "-p", "qos_reliability:=reliable",
        "-p", "min_confidence:=0.0", "-p", "publish_tf:=true", "-p", "transform_tolerance:=0.5",
        "-p", "transform_timeout:=1.0", "-p", "odom_topic:=/odom"], world["root"] / "logs",
        env=with_tf2_msgs(os.environ.copy(), tf2_msgs_path))
    stamps = 700.0 + 0.1 * np.arange(QUERY_FRAMES)
    base_in_odom = compose_poses(invert_poses(odom_in_map), world["bases"])

    def odometry(i, stamp):
        for k in (i - 1, i, i + 1):            # odom -> base_link around the image stamp, as a driver sends it
            if 0 <= k < QUERY_FRAMES:
                tf_pub.publish(TFMessage(transforms=[transform_stamped("odom", "base_link", base_in_odom[k],
                                                                       int(round(stamps[k] * 1e9)))]))
                msg = Odometry()
                msg.header.stamp = sec_to_stamp(stamps[k])
                msg.header.frame_id, msg.child_frame_id = "odom", "base_link"
                msg.pose.pose = pose_msg(base_in_odom[k])
                odom_pub.publish(msg)
    try:
        assert probe.wait_for_subscriber("/front_camera/image", 90), node.output()
        assert probe.wait_for_subscriber("/tf", 20)
        publish_query(pub, world["images"], stamps, "front_camera_optical", before_each=odometry)
        assert poses.wait(QUERY_FRAMES - 4, 30), node.output()      # tracking: from the second or third frame
        errors = check_base_poses(poses.snapshot(), stamps, world["bases"])
        assert sum(d < MAX_POSITION_M and yaw < MAX_YAW_DEG for d, yaw in errors) >= 0.8 * len(errors), errors
        assert "mounting from TF" in node.output() and "TF via tf2" in node.output()
        # map -> odom on /tf: post-dated by transform_tolerance, close to the true odometry drift
        sent = [tf for m in tf_out.snapshot() for tf in m.transforms
                if tf.header.frame_id == "map" and tf.child_frame_id == "odom"]
        assert sent, node.output()
        stamps_ns = {int(round(s * 1e9)) + 500_000_000 for s in stamps}
        matched = [tf for tf in sent if stamp_to_ns(tf.header.stamp) in stamps_ns]
        assert matched
        d, yaw = planar_error(pose_from_transform(matched[-1].transform), odom_in_map)
        assert d < MAX_POSITION_M and math.degrees(yaw) < MAX_YAW_DEG
        # the tracker used the odometry of every frame (composed with the mounting from TF)
        def odometry_used() -> int:
            for array in reversed(diags.snapshot()[-20:]):
                values = diagnostic_values(array, "localization")
                if values is not None:
                    return int(values.get("odometry_used", -1))
            return -1
        assert wait_until(lambda: odometry_used() >= QUERY_FRAMES - 1, 5), odometry_used()
        assert "frame without odometry" not in node.output()
    finally:
        node.stop()
        probe.close()


# ---------------------------------------------------------------------------- lifecycle, namespaces

@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("robots")
    images = synthetic_images(8, seed=4)
    model = save_tiny_model(tiny_model, root / "tiny.safetensors")
    map1 = build_test_map(tiny_model, images, line_poses(8), root / "map1", child_frame="base_link")
    far = line_poses(8)
    far[:, 0] += 100.0
    map2 = build_test_map(tiny_model, images, far, root / "map2", child_frame="base_link")
    params = root / "robot.yaml"
    doc = yaml.safe_load(open(os.path.join(ROOT, "config", "localize.yaml")).read())
    doc["/**"]["ros__parameters"].update(
        model_path=str(model), device="cpu", min_confidence=0.0, autostart=False, publish_initialpose=True,
        initialpose_min_confidence=0.0, localized_after=1, qos_reliability="reliable", top_k=5,
        diagnostics_rate=5.0, input_timeout_s=1.0, diagnostics_window=1.0, expected_image_rate_min=1.0,
        tracking=False)             # one pose per image (test_ros_tracking.py runs the tracker's lifecycle)
    params.write_text(yaml.safe_dump(doc))
    return dict(root=root, model=model, map1=map1, map2=map2, images=images, params=params)


def change_state(probe: RosProbe, node: str, transition: int) -> bool:
    req = ChangeState.Request()
    req.transition.id = transition
    return probe.call(ChangeState, f"{node}/change_state", req, timeout=60).success


def get_state(probe: RosProbe, node: str) -> str:
    return probe.call(GetState, f"{node}/get_state", GetState.Request()).current_state.label


def send(pub, image, stamp: float | None, frame_id: str = "camera") -> None:
    msg = rgb_to_image_msg(image)
    if stamp is not None:
        msg.header.stamp = sec_to_stamp(stamp)
    msg.header.frame_id = frame_id
    pub.publish(msg)


def test_namespaced_lifecycle_node_and_a_second_robot(small):
    probe = RosProbe("robots_probe")
    p1 = probe.subscribe(PoseWithCovarianceStamped, "/robot1/r2former_localizer/pose")
    init1 = probe.subscribe(PoseWithCovarianceStamped, "/robot1/initialpose")
    init_global = probe.subscribe(PoseWithCovarianceStamped, "/initialpose")
    state1 = probe.subscribe(String, "/robot1/r2former_localizer/state", LATCHED)
    p2 = probe.subscribe(PoseWithCovarianceStamped, "/robot2/r2former_localizer/pose")
    cam1, cam2 = probe.publisher(Image, "/robot1/camera/image"), probe.publisher(Image, "/robot2/camera/image")
    common = ["--params-file", str(small["params"]), "-r", "image:=camera/image"]
    robot1 = NodeProcess("r2former_ros.localize_node", ["--ros-args", "-r", "__ns:=/robot1", *common,
                                                        "-p", f"map_path:={small['map1']}"], small["root"] / "logs")
    robot2 = NodeProcess("r2former_ros.localize_node", ["--ros-args", "-r", "__ns:=/robot2", *common,
                                                        "-p", f"map_path:={small['map2']}", "-p", "autostart:=true"],
                         small["root"] / "logs")
    node1 = "/robot1/r2former_localizer"
    try:
        assert get_state(probe, node1) == "unconfigured"
        # not configured: no camera subscription, nothing published
        assert probe.wait_for_subscriber("/robot2/camera/image", 60), robot2.output()   # robot2 autostarts
        send(cam1, small["images"][2], 10.0)
        time.sleep(1.0)
        assert probe.node.count_subscribers("/robot1/camera/image") == 0
        assert len(p1) == 0 and len(state1) == 0

        assert change_state(probe, node1, Transition.TRANSITION_CONFIGURE), robot1.output()
        assert get_state(probe, node1) == "inactive"
        send(cam1, small["images"][2], 10.5)
        time.sleep(0.5)
        assert len(p1) == 0 and probe.node.count_subscribers("/robot1/camera/image") == 0
        assert change_state(probe, node1, Transition.TRANSITION_ACTIVATE)
        assert get_state(probe, node1) == "active"
        assert probe.wait_for_subscriber("/robot1/camera/image", 20)
        assert state1.wait(1, 10) and state1.last().data == "not_localized"

        # each robot localizes against its own map
        send(cam1, small["images"][3], 11.0)
        send(cam2, small["images"][3], 11.0)
        assert p1.wait(1, 30) and p2.wait(1, 30), robot1.output() + robot2.output()
        assert pose_from_msg(p1.last().pose.pose)[0] < 50.0 < pose_from_msg(p2.last().pose.pose)[0]
        # initialpose is relative: /robot1/initialpose, never the global one
        assert init1.wait(1, 10)
        assert init1.last().header.frame_id == "map"
        assert len(init_global) == 0

        # deactivate: the camera is unsubscribed and nothing is published
        assert change_state(probe, node1, Transition.TRANSITION_DEACTIVATE)
        assert wait_until(lambda: probe.node.count_subscribers("/robot1/camera/image") == 0, 10)
        n = len(p1)
        send(cam1, small["images"][4], 12.0)
        time.sleep(1.0)
        assert len(p1) == n
        assert change_state(probe, node1, Transition.TRANSITION_CLEANUP)
        assert get_state(probe, node1) == "unconfigured"
        assert "cleaned up" in robot1.output()
        assert change_state(probe, node1, Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
        assert get_state(probe, node1) == "finalized"
        assert robot1.alive() and robot2.alive() and "Traceback" not in robot1.output()
    finally:
        robot1.stop()
        robot2.stop()
        probe.close()


def test_sim_time_zero_stamps_and_diagnostics_after_the_camera_stops(small):
    """use_sim_time: a zero stamp becomes the /clock time of receipt; the input status goes ERROR within a
    few seconds after the camera stops, and hardware_id names the camera frame."""
    from rosgraph_msgs.msg import Clock
    probe = RosProbe("sim_probe")
    poses = probe.subscribe(PoseWithCovarianceStamped, "/robot3/r2former_localizer/pose")
    diags = probe.subscribe(DiagnosticArray, "/diagnostics")
    clock = probe.publisher(Clock, "/clock")
    cam = probe.publisher(Image, "/robot3/camera/image")
    node = NodeProcess("r2former_ros.localize_node", [
        "--ros-args", "-r", "__ns:=/robot3", "--params-file", str(small["params"]), "-r", "image:=camera/image",
        "-p", f"map_path:={small['map1']}", "-p", "autostart:=true", "-p", "use_sim_time:=true"],
        small["root"] / "logs")
    sim_now = [1234.0]

    def tick():
        sim_now[0] += 0.05
        clock.publish(Clock(clock=sec_to_stamp(sim_now[0])))

    def statuses():
        """The statuses of robot3's newest diagnostics (other nodes publish on /diagnostics too)."""
        for msg in reversed(diags.snapshot()[-50:]):
            if any(s.name.startswith("robot3/r2former_localizer: ") for s in msg.status):
                return {s.name: s for s in msg.status}
        return {}
    try:
        assert probe.wait_for_subscriber("/robot3/camera/image", 60), node.output()
        for i in range(30):                          # a 10 Hz camera with zero stamps, /clock running
            tick()
            if i % 2 == 0:
                send(cam, small["images"][i % 8], None, frame_id="robot3_front_camera")
            time.sleep(0.05)
        assert poses.wait(1, 20), node.output()
        stamp = stamp_to_ns(poses.last().header.stamp) / 1e9
        assert 1234.0 < stamp <= sim_now[0] + 1e-6, (stamp, sim_now[0])    # sim time of receipt, not wall time

        name = "robot3/r2former_localizer: input images"
        assert wait_until(lambda: name in statuses(), 10)
        assert statuses()[name].hardware_id == "robot3_front_camera"
        t_stop = time.monotonic()                    # the camera stops; /clock keeps running
        deadline = t_stop + 8.0
        level = None
        while time.monotonic() < deadline:
            tick()
            status = statuses().get(name)
            level = status.level[0] if status is not None else None
            if level is not None and level >= 2:
                break
            time.sleep(0.05)
        assert level is not None and level >= 2, [(s.name, s.level, s.message) for s in statuses().values()]
        assert "no image" in statuses()[name].message
        loc = next(s for n, s in statuses().items() if n.endswith(": localization"))
        assert loc.level[0] >= 2
    finally:
        node.stop()
        probe.close()
