"""Approximate-time pairing of images with poses: a short pose history, interpolated at image stamps.

Replaces message_filters' ApproximateTimeSynchronizer for the one case the map builder needs (an
image stream and a pose stream at different rates): the pose at an image's stamp is interpolated
(position linearly, orientation by slerp) between the bracketing pose samples, using
`r2former_core.data.poses.interpolate_poses` - the same rule the offline bag reader applies.
"""
from __future__ import annotations

import threading
from collections import deque
from enum import Enum

import numpy as np

from r2former_core.data.poses import interpolate_poses


class PoseLookup(Enum):
    OK = "ok"          # interpolated (or within tolerance of an end sample)
    WAIT = "wait"      # the stamp is newer than every pose so far: a later pose may still bracket it
    MISSING = "missing"  # no usable pose (too old for the buffer, or a dropout longer than max_gap)


class PoseBuffer:
    """The last `capacity` pose samples (thread-safe)."""

    def __init__(self, capacity: int = 2000, tolerance: float = 0.05, max_gap: float = 1.0) -> None:
        self._samples: deque[tuple[float, np.ndarray]] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.tolerance = tolerance
        self.max_gap = max_gap

    def add(self, stamp: float, pose: np.ndarray) -> None:
        with self._lock:
            self._samples.append((float(stamp), np.asarray(pose, dtype=np.float64).reshape(7)))

    def clear(self) -> None:
        """Forget every sample (e.g. when the stamps jump back: a looped bag, a sim-time reset)."""
        with self._lock:
            self._samples.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    @property
    def newest_stamp(self) -> float | None:
        with self._lock:
            return max((s for s, _ in self._samples), default=None)

    def lookup(self, stamp: float, final: bool = False) -> tuple[PoseLookup, np.ndarray | None]:
        """The pose at `stamp`; WAIT when no pose at or after `stamp` arrived yet (unless `final`:
        then the best answer now, OK within tolerance of the newest sample or MISSING)."""
        with self._lock:
            if not self._samples:
                return (PoseLookup.MISSING if final else PoseLookup.WAIT), None
            stamps = np.fromiter((s for s, _ in self._samples), dtype=np.float64, count=len(self._samples))
            poses = np.stack([p for _, p in self._samples])
        newest = float(stamps.max())
        out, valid = interpolate_poses(stamps, poses, np.array([stamp]), tolerance=self.tolerance,
                                       max_gap=self.max_gap)
        if stamp > newest and not final:
            # Within tolerance of the newest sample would be valid already, but a later sample gives
            # a better (interpolated) pose: wait for it.
            return PoseLookup.WAIT, None
        if valid[0]:
            return PoseLookup.OK, out[0]
        return PoseLookup.MISSING, None
