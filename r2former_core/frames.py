"""Frames of poses (REP-105, REP-103): which frame pair a pose describes, camera conventions, and the
base pose from a camera pose and its mounting.

A map's poses are the poses of a *child* frame (a camera, or the robot's base) in a *parent* frame
(`map`, or `odom`, ...). Sources report the pair (`PoseFrames`) from what their input names:
an Odometry message's `header.frame_id` / `child_frame_id`, a PoseStamped's `header.frame_id`, the
TF frames looked up, or `--pose-frames PARENT:CHILD` for inputs that name no frame (image folders).

Camera poses use the body convention of REP-103, x forward, y left, z up, whatever the frame is
called. A camera *optical* frame (z forward, x right, y down; REP-103 names it with the suffix
`_optical` or `_optical_frame`) is turned into the body convention when poses are read:
the stored orientation is the optical frame's rotated by `OPTICAL_TO_BODY`, the position is
unchanged. `camera_convention` chooses: `auto` (by the suffix of the child frame), `optical` (the
input poses are optical-convention camera poses, whatever the name, e.g. TUM files of a visual
SLAM system), `body` (never convert).

The published pose (the localize node): from the estimated camera pose to the base pose, with its
covariance, and the map -> odom correction.

Poses are `(7,)` arrays `x y z qx qy qz qw` (r2former_core.data.poses); a pose "of B in A" maps
B coordinates to A coordinates. Covariances are 6x6 over (x, y, z, roll, pitch, yaw) as in
`geometry_msgs/PoseWithCovariance`, with roll, pitch, yaw the ZYX Euler angles of the
orientation (what robot_localization and AMCL read).

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

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .data.poses import compose_poses, invert_poses, normalize_quat, quat_to_matrix, rpy_from_quat
from .errors import ConfigError, DataError

CAMERA_CONVENTIONS = ("auto", "body", "optical")
OPTICAL_SUFFIXES = ("_optical", "_optical_frame")
DEFAULT_PARENT = "map"
DEFAULT_FOLDER_CHILD = "camera"
ODOM_FRAME = "odom"

#: The pose of the body-convention frame (x forward, y left, z up) in the optical frame (z forward, x right,
#: y down) at the same origin: body x = optical z, body y = -optical x, body z = -optical y. Its inverse,
#: (-0.5, 0.5, -0.5, 0.5), is the camera_link -> camera_optical_frame rotation of REP-103 (rpy -pi/2, 0, -pi/2).
OPTICAL_TO_BODY = np.array([0.0, 0.0, 0.0, 0.5, -0.5, 0.5, 0.5])


def clean_frame_id(frame: str) -> str:
    """A frame id without surrounding blanks and leading '/' (ROS 1 style '/map' == 'map')."""
    return str(frame).strip().lstrip("/")


@dataclass(frozen=True)
class PoseFrames:
    """The frames a source's poses describe: the pose of `child` in `parent`.

    `child` is "" when the input does not name it (a PoseStamped topic without --pose-frames).
    `optical` is True when the input poses were of an optical-convention frame and were turned into
    the body convention (see the module docstring).
    """
    parent: str
    child: str = ""
    optical: bool = False

    def __str__(self) -> str:
        text = f"{self.parent} -> {self.child or '(child frame unknown)'}"
        return text + (" (optical frame, stored in the body convention)" if self.optical else "")


def parse_frame_pair(spec: str | Sequence[str], what: str = "frames") -> tuple[str, str]:
    """'PARENT:CHILD' (or a (parent, child) pair) -> (parent, child) frame ids; DataError when malformed."""
    parts = [str(p) for p in spec] if isinstance(spec, (tuple, list)) else str(spec).split(":")
    frames = [clean_frame_id(p) for p in parts]
    if len(frames) != 2 or not all(frames):
        raise DataError(f"{what} {spec!r}: expected PARENT:CHILD, e.g. map:base_link (the pose of CHILD "
                        "in PARENT)")
    if frames[0] == frames[1]:
        raise DataError(f"{what} {spec!r}: PARENT and CHILD are the same frame; give two different frames")
    return frames[0], frames[1]


def given_frames(spec: str | Sequence[str | None] | None) -> tuple[str, str]:
    """What a caller says about the frames: 'PARENT:CHILD', or a pair in which either may be None or ""
    (not given, e.g. `--frame-id map` alone); "" marks a frame that is not given."""
    if spec is None:
        return "", ""
    if isinstance(spec, str):
        return parse_frame_pair(spec, "pose frames")
    parent, child = (clean_frame_id(f) if f else "" for f in spec)
    if parent and child:
        return parse_frame_pair((parent, child), "pose frames")
    return parent, child


def frames_from_messages(seen: Mapping[tuple[str, str], int], given: tuple[str, str],
                         what: str) -> tuple[str, str, list[str]]:
    """(parent, child, warnings) of pose messages from the (header.frame_id, child_frame_id) pairs they
    carried (`seen`: pair -> count; child "" for PoseStamped / PoseWithCovarianceStamped), completed by
    `given` ((parent, child), "" = not given). `what` names the input in messages.

    The most frequent pair wins (a warning lists the others). What the messages name is used; `given`
    fills in what they leave empty, and a given frame that differs from a named one is a DataError
    (relabelling poses, e.g. odometry as `map`, would hide where they really are). An unnamed parent
    becomes `map`, an unnamed child stays "" (not recorded); both with a warning.
    """
    warnings: list[str] = []
    parent, child = max(seen.items(), key=lambda item: item[1])[0] if seen else ("", "")
    if len(seen) > 1:
        others = ", ".join(f"{p or '(empty)'} -> {c or '(empty)'} ({n})" for (p, c), n in seen.items())
        warnings.append(f"{what}: pose messages name several frame pairs ({others}); recording the most "
                        f"frequent, {parent or '(empty)'} -> {child or '(empty)'}")
    given_parent, given_child = given
    for role, named, said, field in (("parent", parent, given_parent, "header.frame_id"),
                                     ("child", child, given_child, "child_frame_id")):
        if named and said and named != said:
            raise DataError(f"the pose frames given name the {role} frame {said!r}, but the messages of {what} "
                            f"name {named!r} ({field}); leave the frames out (they are taken from the messages) "
                            "or give the ones the messages name")
    if not parent:
        parent = given_parent or DEFAULT_PARENT
        if not given_parent:
            warnings.append(f"{what}: the pose messages have an empty header.frame_id; assuming their frame is "
                            f"{parent!r} (give the frames as --pose-frames PARENT:CHILD)")
    child = child or given_child
    if not child:
        warnings.append(f"{what}: the pose messages do not name the frame whose pose they hold (PoseStamped and "
                        "PoseWithCovarianceStamped have no child_frame_id), so the map will not record it; give it "
                        f"as --pose-frames {parent}:CHILD (e.g. {parent}:camera_link or {parent}:base_link)")
    return parent, child, warnings


def check_convention(convention: str) -> str:
    """`convention` if it is one of CAMERA_CONVENTIONS; DataError otherwise."""
    if convention not in CAMERA_CONVENTIONS:
        raise DataError(f"camera convention {convention!r}: use one of {', '.join(CAMERA_CONVENTIONS)}")
    return convention


def is_optical_frame(frame: str) -> bool:
    """A camera optical frame by the REP-103 naming (suffix `_optical` or `_optical_frame`)."""
    return clean_frame_id(frame).endswith(OPTICAL_SUFFIXES)


def is_odom_frame(frame: str) -> bool:
    """An odometry frame (REP-105): `odom`, or a namespaced one ending in `/odom` (e.g. `robot1/odom`)."""
    frame = clean_frame_id(frame)
    return frame == ODOM_FRAME or frame.endswith("/" + ODOM_FRAME)


def uses_optical_convention(child: str, convention: str) -> bool:
    """Whether poses of `child` are in the optical convention and must be turned (see module docstring)."""
    if check_convention(convention) == "auto":
        return is_optical_frame(child)
    return convention == "optical"


def optical_to_body(poses: np.ndarray) -> np.ndarray:
    """Poses (..., 7) of an optical-convention camera frame -> the poses of its body-convention frame."""
    return compose_poses(np.asarray(poses, dtype=np.float64), OPTICAL_TO_BODY)


def to_body_convention(poses: np.ndarray, child: str, convention: str) -> tuple[np.ndarray, bool]:
    """(poses in the body convention, whether they were converted); NaN rows (unknown poses) stay NaN."""
    if not uses_optical_convention(child, convention):
        return poses, False
    out = np.array(poses, dtype=np.float64, copy=True)
    known = np.all(np.isfinite(out), axis=-1)
    if known.any():
        out[known] = optical_to_body(out[known])
    return out, True


def odometry_warning(parent: str) -> str | None:
    """The warning for poses in an odometry frame, or None for other frames."""
    if not is_odom_frame(parent):
        return None
    return (f"the map's poses are in the odometry frame {parent!r}: the map will drift with the odometry, and a "
            "localizer will report poses in that drifting frame. To build it in the map frame, take the poses from "
            "TF map -> camera while AMCL or slam_toolbox localizes the robot: record /tf and /tf_static with the "
            "images (or build live) and use --pose-topic /tf --tf-frames map:camera_link; live, AMCL's "
            "/amcl_pose (pose_with_covariance, base_link in map) is an alternative")


def warn_if_odometry_frame(parent: str, logger: logging.Logger) -> bool:
    """Log `odometry_warning` as a WARNING when `parent` is an odometry frame; True when it did."""
    message = odometry_warning(parent)
    if message:
        logger.warning(message)
    return message is not None


# --------------------------------------------------------------- the published pose

IDENTITY_POSE = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
# Pose of the optical frame (z forward, x right, y down) in the body frame at the same place
# (x forward, y left, z up): rpy (-pi/2, 0, -pi/2), the usual `camera_link -> camera_optical_frame`.
OPTICAL_IN_BODY = invert_poses(OPTICAL_TO_BODY) + 0.0     # + 0.0: no negative zeros


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
