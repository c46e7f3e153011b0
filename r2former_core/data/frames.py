"""Frames of poses (REP-105, REP-103): which frame pair a pose describes, and camera conventions.

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
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .poses import compose_poses

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
