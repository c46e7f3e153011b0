"""A bounded TF cache (what tf2's BufferCore does, for the lookups this package needs). No rclpy.

Edges parent -> child hold the pose of child in parent. Dynamic edges (`/tf`) keep the samples of
the last `cache_time` seconds and are interpolated at the query stamp (linear position, slerp; no
extrapolation: a stamp after the newest sample is "not yet available", one before the oldest
"too old"); static edges (`/tf_static`) hold one pose for all times. A lookup chains the edges
through the common ancestor of the two frames. Stamp 0 means "the latest time every edge of the
chain has" (tf2's `Time()`). Frame ids are compared without a leading '/'. Thread-safe.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from r2former_core.data.poses import compose_poses, interpolate_poses, invert_poses

IDENTITY = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])


class TransformLookupError(LookupError):
    """No transform between two frames at a stamp; `retry` is True when waiting may help (data not yet
    received: unknown frame or a stamp newer than the newest sample)."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def clean(frame_id: str) -> str:
    return frame_id.strip().lstrip("/")


@dataclass
class _Edge:
    parent: str
    static_pose: np.ndarray | None = None
    samples: deque = field(default_factory=deque)   # (stamp s, pose (7,)), ascending


class TransformCache:
    def __init__(self, cache_time: float = 10.0, max_gap: float = 1.0) -> None:
        self.cache_time = float(cache_time)
        self.max_gap = float(max_gap)   # samples further apart than this are not interpolated across
        self._edges: dict[str, _Edge] = {}   # child -> edge (a frame has one parent)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ filling
    def add(self, parent: str, child: str, pose: np.ndarray, stamp: float, static: bool = False) -> bool:
        """Add the pose of `child` in `parent`; False when unusable (empty or equal ids, non-finite pose).
        A child re-parented to another frame replaces its edge (tf2 warns and does the same)."""
        parent, child = clean(parent), clean(child)
        pose = np.asarray(pose, dtype=np.float64)
        if not parent or not child or parent == child or pose.shape != (7,) or not np.all(np.isfinite(pose)):
            return False
        if np.linalg.norm(pose[3:]) < 1e-9:
            return False
        with self._lock:
            edge = self._edges.get(child)
            if edge is None or edge.parent != parent:
                edge = self._edges[child] = _Edge(parent)
            if static:
                edge.static_pose = pose.copy()
                edge.samples.clear()
                return True
            edge.static_pose = None
            stamp = float(stamp)
            if edge.samples and stamp < edge.samples[-1][0]:
                items = sorted([*edge.samples, (stamp, pose.copy())], key=lambda s: s[0])
                edge.samples = deque(items)
            else:
                edge.samples.append((stamp, pose.copy()))
            newest = edge.samples[-1][0]
            while len(edge.samples) > 2 and edge.samples[0][0] < newest - self.cache_time:
                edge.samples.popleft()
            return True

    @property
    def frames(self) -> list[str]:
        with self._lock:
            return sorted(set(self._edges) | {e.parent for e in self._edges.values()})

    # ------------------------------------------------------------------ lookup
    def _chain(self, frame: str) -> list[str]:
        chain = [frame]
        while chain[-1] in self._edges:
            parent = self._edges[chain[-1]].parent
            if parent in chain:
                break
            chain.append(parent)
        return chain

    def _edge_pose(self, child: str, stamp: float) -> np.ndarray:
        edge = self._edges[child]
        if edge.static_pose is not None:
            return edge.static_pose
        samples = edge.samples
        if stamp == 0.0:
            return samples[-1][1]
        newest, oldest = samples[-1][0], samples[0][0]
        if stamp > newest:
            raise TransformLookupError(f"{edge.parent} -> {child}: stamp {stamp:.3f} is after the newest transform "
                                       f"({newest:.3f}); waiting for newer data", retry=True)
        stamps = np.fromiter((s for s, _ in samples), dtype=np.float64, count=len(samples))
        poses = np.stack([p for _, p in samples])
        out, valid = interpolate_poses(stamps, poses, np.array([stamp]), tolerance=0.0, max_gap=self.max_gap)
        if not valid[0]:
            why = (f"before the oldest transform ({oldest:.3f})" if stamp < oldest
                   else f"in a gap of more than {self.max_gap:g} s between transforms")
            raise TransformLookupError(f"{edge.parent} -> {child}: stamp {stamp:.3f} is {why}", retry=False)
        return out[0]

    def _latest_common(self, edges: list[str]) -> float:
        newest = [self._edges[c].samples[-1][0] for c in edges if self._edges[c].static_pose is None]
        return min(newest) if newest else 0.0

    def lookup(self, target: str, source: str, stamp: float = 0.0) -> np.ndarray:
        """Pose of frame `source` in frame `target` at `stamp` (seconds; 0 = latest common time), i.e.
        tf2's `lookup_transform(target, source, stamp)`. TransformLookupError when not available."""
        target, source = clean(target), clean(source)
        with self._lock:
            if target == source:
                return IDENTITY.copy()
            up_t, up_s = self._chain(target), self._chain(source)
            if len(up_t) == 1 and target not in {e.parent for e in self._edges.values()}:
                raise TransformLookupError(f"frame {target!r} does not exist (known: "
                                           f"{', '.join(self._known()) or 'none'})", retry=True)
            if len(up_s) == 1 and source not in {e.parent for e in self._edges.values()}:
                raise TransformLookupError(f"frame {source!r} does not exist (known: "
                                           f"{', '.join(self._known()) or 'none'})", retry=True)
            common = next((f for f in up_s if f in up_t), None)
            if common is None:
                raise TransformLookupError(f"frames {target!r} and {source!r} are not connected (trees rooted at "
                                           f"{up_t[-1]!r} and {up_s[-1]!r})", retry=True)
            down_t = up_t[:up_t.index(common)]     # frames below `common` on the target side (their edges)
            down_s = up_s[:up_s.index(common)]
            if stamp == 0.0:
                stamp = self._latest_common(down_t + down_s)
            common_target = IDENTITY.copy()        # pose of target in common
            for child in reversed(down_t):
                common_target = compose_poses(common_target, self._edge_pose(child, stamp))
            common_source = IDENTITY.copy()
            for child in reversed(down_s):
                common_source = compose_poses(common_source, self._edge_pose(child, stamp))
            return compose_poses(invert_poses(common_target), common_source)

    def _known(self) -> list[str]:
        return sorted(set(self._edges) | {e.parent for e in self._edges.values()})
