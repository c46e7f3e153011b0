"""Frames of the published pose (REP-103/105): from the estimated camera pose to the base pose, with
its covariance, and the map -> odom correction. Plain numpy: no rclpy here.

Poses are `(7,)` arrays `x y z qx qy qz qw` (r2former_core.data.poses); a pose "of B in A" maps
B coordinates to A coordinates. Covariances are 6x6 over (x, y, z, roll, pitch, yaw) as in
`geometry_msgs/PoseWithCovariance`, with roll, pitch, yaw the ZYX Euler angles of the
orientation (what robot_localization and AMCL read).

Camera poses in a map use the body convention (x forward, y left, z up), whatever the frame is
called. A camera frame that follows the optical convention in TF (z forward, x right, y down;
REP-103 names it `*_optical` or `*_optical_frame`) is turned into the body frame at the same place
by `body_from_optical`.

Covariance propagation (`camera_to_base`): with the camera pose perturbed by a small position
error dp and a small rotation dtheta (about the map axes), the base pose
`T_base = T_camera * T_camera_base` moves by

    dp_base     = dp + dtheta x r          (r = p_base - p_camera, the lever arm in the map frame)
    dtheta_base = dtheta                   (the same rigid-body rotation)

and Euler-angle increments relate to dtheta by `dtheta = E(rpy) d_rpy`. Hence the Jacobian

    J = [[I, -[r]x E(rpy_camera)], [0, E(rpy_base)^-1 E(rpy_camera)]]

and `cov_base = J cov_camera J^T`: the yaw uncertainty moves the base sideways by |r| dyaw, and the
roll/pitch uncertainties are rotated by the mounting (a camera looking sideways has its roll
uncertainty in the base's pitch). Valid away from pitch = +-90 deg (Euler singularity).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from r2former_core.errors import ConfigError
from r2former_core.data.poses import (compose_poses, invert_poses, normalize_quat, quat_to_matrix,
                                      rpy_from_quat)

IDENTITY_POSE = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
# Pose of the optical frame (z forward, x right, y down) in the body frame at the same place
# (x forward, y left, z up): rpy (-pi/2, 0, -pi/2), the usual `camera_link -> camera_optical_frame`.
OPTICAL_IN_BODY = np.array([0.0, 0.0, 0.0, -0.5, 0.5, -0.5, 0.5])
OPTICAL_SUFFIXES = ("_optical", "_optical_frame")


class FrameError(ConfigError):
    """A mounting or transform that cannot be used (wrong length, not finite)."""


def quat_from_rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """ZYX Euler angles (radians) -> quaternion (x y z w), as tf2's `setRPY`."""
    cr, sr = math.cos(roll / 2), math.sin(roll / 2)
    cp, sp = math.cos(pitch / 2), math.sin(pitch / 2)
    cy, sy = math.cos(yaw / 2), math.sin(yaw / 2)
    return np.array([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy, cr * cp * cy + sr * sp * sy])


def pose_from_xyzrpy(values: Sequence[float]) -> np.ndarray:
    """[x, y, z, roll, pitch, yaw] (metres, radians) -> pose (7,). FrameError for anything else."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.shape != (6,) or not np.all(np.isfinite(v)):
        raise FrameError(f"a pose is [x, y, z, roll, pitch, yaw] (6 finite numbers), got {list(values)!r}")
    return np.concatenate([v[:3], quat_from_rpy(*v[3:])])


def is_optical_frame(frame_id: str) -> bool:
    return frame_id.rstrip("/").endswith(OPTICAL_SUFFIXES)


def body_from_optical(optical_pose: np.ndarray) -> np.ndarray:
    """The pose of the body-convention camera frame, given the pose of the optical frame (same origin)."""
    return compose_poses(np.asarray(optical_pose, dtype=np.float64), invert_poses(OPTICAL_IN_BODY))


def euler_rate_matrix(rpy: np.ndarray) -> np.ndarray:
    """E with dtheta (rotation vector about the map axes) = E d(roll, pitch, yaw), ZYX angles."""
    _, pitch, yaw = (float(a) for a in rpy)
    cp, sp, cy, sy = math.cos(pitch), math.sin(pitch), math.cos(yaw), math.sin(yaw)
    return np.array([[cy * cp, -sy, 0.0],
                     [sy * cp, cy, 0.0],
                     [-sp, 0.0, 1.0]])


def skew(v: np.ndarray) -> np.ndarray:
    x, y, z = (float(a) for a in v)
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def compose_jacobian(pose_a: np.ndarray, pose_ab: np.ndarray) -> np.ndarray:
    """d(pose of `a * ab`) / d(pose a), both in (x, y, z, roll, pitch, yaw): `ab` is a fixed offset."""
    result = compose_poses(pose_a, pose_ab)
    lever = result[:3] - np.asarray(pose_a[:3], dtype=np.float64)
    e_a = euler_rate_matrix(rpy_from_quat(pose_a[3:]))
    e_result = euler_rate_matrix(rpy_from_quat(result[3:]))
    jac = np.eye(6)
    jac[:3, 3:] = -skew(lever) @ e_a
    jac[3:, 3:] = np.linalg.solve(e_result, e_a)
    return jac


def camera_to_base(camera_pose: np.ndarray, camera_cov: np.ndarray,
                   camera_in_base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pose and covariance of the base, from the camera's pose and covariance in the map and the
    camera's mounting (its pose in the base frame)."""
    camera_pose = np.asarray(camera_pose, dtype=np.float64)
    camera_in_base = np.asarray(camera_in_base, dtype=np.float64)
    if camera_in_base.shape != (7,) or not np.all(np.isfinite(camera_in_base)):
        raise FrameError(f"camera mounting must be a finite pose (7,), got {camera_in_base!r}")
    base_in_camera = invert_poses(camera_in_base)
    base_pose = compose_poses(camera_pose, base_in_camera)
    jac = compose_jacobian(camera_pose, base_in_camera)
    cov = jac @ np.asarray(camera_cov, dtype=np.float64) @ jac.T
    return base_pose, 0.5 * (cov + cov.T)


def odom_in_map(base_in_map: np.ndarray, base_in_odom: np.ndarray) -> np.ndarray:
    """The map -> odom transform (pose of odom in map) that puts the base where it was localized
    while odometry keeps it continuous: `T_map_odom = T_map_base * T_odom_base^-1` (what AMCL sends)."""
    return compose_poses(np.asarray(base_in_map, dtype=np.float64), invert_poses(base_in_odom))


def planar_error(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(horizontal distance in metres, absolute yaw difference in radians) between two poses."""
    d = float(np.linalg.norm(np.asarray(estimate[:2]) - np.asarray(truth[:2])))
    rel = compose_poses(invert_poses(normalize_quat_pose(truth)), normalize_quat_pose(estimate))
    return d, abs(float(rpy_from_quat(rel[3:])[2]))


def normalize_quat_pose(pose: np.ndarray) -> np.ndarray:
    pose = np.asarray(pose, dtype=np.float64).copy()
    pose[3:] = normalize_quat(pose[3:])
    return pose


def rotation_matrix(pose: np.ndarray) -> np.ndarray:
    return quat_to_matrix(np.asarray(pose, dtype=np.float64)[3:])


def map_pose_warning(map_child: str, base_frame: str, map_path: str) -> str:
    """Why the map's poses are published as they are, or "" when they are base poses / camera poses that
    the node composes with the mounting (see `poses_are_base`)."""
    if map_child:
        return ""
    return (f"map {map_path} does not record which frame its poses describe (built before maps recorded "
            f"child_frame): its poses are published as the pose of {base_frame!r}. If they are camera poses, "
            "rebuild it so the camera mounting is applied: `build_map --pose-topic /odom` records the odometry's "
            "child_frame_id, `--tf-frames map:camera` the TF pair, `--pose-frames map:camera` a folder's frames")


def poses_are_base(map_child: str, base_frame: str) -> bool:
    """True when the map's poses are published as they are: they describe `base_frame`, or the map does
    not say (maps built before child_frame was recorded)."""
    return not map_child or map_child.lstrip("/") == base_frame.lstrip("/")
