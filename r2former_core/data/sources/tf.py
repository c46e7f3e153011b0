"""TF (tf2_msgs/msg/TFMessage) as a pose source: a frame tree looked up at arbitrary stamps."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import DataError
from ...frames import clean_frame_id, parse_frame_pair
from ..poses import compose_poses, interpolate_poses, invert_poses
from .bag import header_stamp

_FRAMES_LISTED = 20  # how many frame names a TF error lists

_IDENTITY_POSE = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])


def parse_tf_frames(spec: str | Sequence[str]) -> tuple[str, str]:
    """'PARENT:CHILD' (or a (parent, child) pair) -> (parent, child) frame ids; DataError when malformed."""
    return parse_frame_pair(spec, "TF frames")


def frame_list(frames: Sequence[str]) -> str:
    """Frame names for a message (the first _FRAMES_LISTED of them)."""
    shown = ", ".join(frames[:_FRAMES_LISTED])
    return (shown + f", ... ({len(frames)} frames)") if len(frames) > _FRAMES_LISTED else (shown or "none")


class TransformTree:
    """Transforms between TF frames, looked up at arbitrary stamps (what `tf2` does, for recorded TF).

    Each edge parent -> child holds the pose of child in parent (`geometry_msgs/TransformStamped`
    with `header.frame_id` = parent, `child_frame_id` = child). Dynamic edges (from `/tf`) are
    sampled over time and interpolated at the query stamps with `interpolate_poses` (linear
    position, slerp orientation; `tolerance` / `max_gap` rules); static edges (from `/tf_static`)
    are time-invariant, the last one received wins. When an edge has dynamic samples, static ones
    for the same edge are ignored. Frames must form a tree: a frame on a looked-up path may have
    only one parent. Frame ids are compared without a leading '/'.

    `source` names where the transforms came from, for error messages.
    """

    def __init__(self, source: str = "TF") -> None:
        self.source = source
        self._dynamic: dict[tuple[str, str], tuple[list[float], list[np.ndarray]]] = {}
        self._static: dict[tuple[str, str], np.ndarray] = {}
        self._parents: dict[str, list[str]] = {}  # child -> its parents, in order of appearance
        self._frames: set[str] = set()
        self.transforms = 0  # accepted transforms (dynamic samples + static)
        self.rejected = 0  # transforms with a bad pose or frame ids, ignored

    # -- filling ---------------------------------------------------------------------------

    def add(self, parent: str, child: str, pose: np.ndarray, stamp: float = 0.0, static: bool = False) -> bool:
        """Add the pose (7,) of `child` in `parent` at `stamp`; False (and counted) when it is unusable."""
        parent, child = clean_frame_id(parent), clean_frame_id(child)
        pose = np.asarray(pose, dtype=np.float64)
        if (not parent or not child or parent == child or pose.shape != (7,) or not np.all(np.isfinite(pose))
                or np.linalg.norm(pose[3:]) < 1e-12 or (not static and not math.isfinite(stamp))):
            self.rejected += 1
            return False
        parents = self._parents.setdefault(child, [])
        if parent not in parents:
            parents.append(parent)
        self._frames.update((parent, child))
        if static:
            self._static[(parent, child)] = pose
        else:
            stamps, poses = self._dynamic.setdefault((parent, child), ([], []))
            stamps.append(float(stamp))
            poses.append(pose)
        self.transforms += 1
        return True

    def add_message(self, msg: Any, bag_time_ns: int, static: bool) -> None:
        """Add every transform of a deserialized tf2_msgs/msg/TFMessage (zero header stamps -> bag time)."""
        for tf in msg.transforms:
            t, r = tf.transform.translation, tf.transform.rotation
            pose = np.array([t.x, t.y, t.z, r.x, r.y, r.z, r.w], dtype=np.float64)
            self.add(tf.header.frame_id, tf.child_frame_id, pose, header_stamp(tf, bag_time_ns), static)

    # -- structure ---------------------------------------------------------------------------

    @property
    def frames(self) -> list[str]:
        return sorted(self._frames)

    def roots(self) -> list[str]:
        """Frames without a parent (one per tree of the forest)."""
        return sorted(f for f in self._frames if f not in self._parents)

    def _ancestors(self, frame: str) -> list[str]:
        """[frame, its parent, ..., its root]; DataError for a frame with several parents or a cycle."""
        chain = [frame]
        while chain[-1] in self._parents:
            parents = self._parents[chain[-1]]
            if len(parents) > 1:
                raise DataError(f"frame {chain[-1]!r} has several parents ({', '.join(parents)}) in {self.source}; "
                                "TF frames must form a tree (each child frame has one parent)")
            if parents[0] in chain:
                raise DataError(f"{self.source} has a cycle: {' -> '.join(reversed(chain + parents))}")
            chain.append(parents[0])
        return chain

    def path(self, parent: str, child: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Edges (p, c) from the common ancestor down to `parent`, and from it down to `child`.

        DataError when a frame is unknown (lists the frames seen) or the frames are in different
        trees (lists the roots).
        """
        parent, child = clean_frame_id(parent), clean_frame_id(child)
        unknown = [f for f in (parent, child) if f not in self._frames]
        if unknown:
            what = "frame " + " and ".join(repr(f) for f in unknown)
            raise DataError(f"{what} not in {self.source}; frames seen: {frame_list(self.frames)}")
        up_parent, up_child = self._ancestors(parent), self._ancestors(child)
        common = set(up_parent)
        lca = next((f for f in up_child if f in common), None)
        if lca is None:
            raise DataError(f"no TF path between {parent!r} and {child!r} in {self.source}: they are in different "
                            f"trees (tree roots: {frame_list(self.roots())}; {parent!r} is under "
                            f"{up_parent[-1]!r}, {child!r} under {up_child[-1]!r})")

        def down(chain: list[str]) -> list[tuple[str, str]]:
            below = chain[:chain.index(lca) + 1]  # frame ... lca
            return [(below[i + 1], below[i]) for i in reversed(range(len(below) - 1))]

        return down(up_parent), down(up_child)

    def is_static(self, edge: tuple[str, str]) -> bool:
        return edge not in self._dynamic

    def time_range(self, edge: tuple[str, str]) -> tuple[float, float] | None:
        """(first, last) sample stamp of a dynamic edge; None for a static edge."""
        if edge not in self._dynamic:
            return None
        stamps = self._dynamic[edge][0]
        return min(stamps), max(stamps)

    # -- lookup --------------------------------------------------------------------------------

    def _edge_poses(self, edge: tuple[str, str], stamps: np.ndarray, tolerance: float,
                    max_gap: float) -> tuple[np.ndarray, np.ndarray]:
        if edge in self._dynamic:
            samples, poses = self._dynamic[edge]
            return interpolate_poses(np.asarray(samples), np.stack(poses), stamps, tolerance, max_gap)
        pose = self._static[edge].copy()
        pose[3:] /= np.linalg.norm(pose[3:])
        return np.tile(pose, (len(stamps), 1)), np.ones(len(stamps), dtype=bool)

    def _chain_poses(self, edges: list[tuple[str, str]], stamps: np.ndarray, tolerance: float,
                     max_gap: float) -> tuple[np.ndarray, np.ndarray]:
        out = np.tile(_IDENTITY_POSE, (len(stamps), 1))
        valid = np.ones(len(stamps), dtype=bool)
        for edge in edges:
            poses, ok = self._edge_poses(edge, stamps, tolerance, max_gap)
            poses[~ok] = _IDENTITY_POSE  # keeps the math finite; the row is invalid anyway
            out = compose_poses(out, poses)
            valid &= ok
        return out, valid

    def lookup(self, parent: str, child: str, stamps: np.ndarray, tolerance: float = 0.05,
               max_gap: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Pose of `child` in `parent` at each stamp -> `(poses (N, 7), valid (N,))`.

        A stamp is valid when every dynamic edge on the path has a pose there (`interpolate_poses`
        rules); invalid rows are NaN. Raises DataError as `path` does.
        """
        stamps = np.asarray(stamps, dtype=np.float64).reshape(-1)
        to_parent, to_child = self.path(parent, child)
        base_parent, ok_parent = self._chain_poses(to_parent, stamps, tolerance, max_gap)
        base_child, ok_child = self._chain_poses(to_child, stamps, tolerance, max_gap)
        poses = compose_poses(invert_poses(base_parent), base_child)
        valid = ok_parent & ok_child
        poses[~valid] = np.nan
        return poses, valid
