"""Keyframe selection: thin a dense posed sequence before it goes into a map.

The rule (greedy, one pass, in sequence order):

1. the first frame is always kept;
2. a later frame is a *candidate* when, compared with the last KEPT frame,
   its position moved by >= `min_distance` metres OR its orientation turned by >= `min_angle_deg`
   degrees (a threshold of 0 disables that criterion; when both are 0 every frame is a candidate);
3. a candidate is kept when, in addition, at least `min_interval` seconds passed since the last kept
   frame (`min_interval` is a rate limit; it needs `stamps`; 0 disables it).

Comparing with the last kept frame (not the previous frame) means slow drift still produces a
keyframe once it adds up, and a robot standing still produces none.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from .poses import angle_between_quats, check_poses

# Relative slack on the thresholds, so that e.g. frames exactly 2.0 m apart in theory but
# 1.9999999999999998 m apart in floating point still count as 2 m.
_EPS = 1e-9


def select_keyframes(poses: np.ndarray, min_distance: float = 0.0, min_angle_deg: float = 0.0,
                     stamps: np.ndarray | None = None, min_interval: float = 0.0) -> np.ndarray:
    """Indices (ascending, int64) of the keyframes of `poses` `(N, 7)`; see the module doc for the rule."""
    poses = check_poses(poses)
    n = len(poses)
    if min_distance < 0 or min_angle_deg < 0 or min_interval < 0:
        raise ConfigError("min_distance, min_angle_deg and min_interval must be >= 0")
    times = np.zeros(n)
    if min_interval > 0:
        if stamps is None:
            raise ValueError("min_interval needs the frame stamps (pass stamps=...)")
        times = np.asarray(stamps, dtype=np.float64).reshape(-1)
        if len(times) != n:
            raise ValueError(f"{len(times)} stamps but {n} poses")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if min_distance > 0 and not np.all(np.isfinite(poses[:, :3])):
        raise DataError("min_distance needs finite positions; some poses are unknown (NaN)")
    if min_angle_deg > 0 and not np.all(np.isfinite(poses[:, 3:])):
        raise DataError("min_angle_deg needs finite orientations; some poses are unknown (NaN)")

    spatial = min_distance > 0 or min_angle_deg > 0
    min_angle = np.radians(min_angle_deg)
    kept = [0]
    last = 0
    for i in range(1, n):
        if spatial:
            moved = min_distance > 0 and (
                np.linalg.norm(poses[i, :3] - poses[last, :3]) >= min_distance * (1 - _EPS))
            turned = min_angle_deg > 0 and not moved and (
                angle_between_quats(poses[last, 3:], poses[i, 3:]) >= min_angle * (1 - _EPS))
            if not (moved or turned):
                continue
        if min_interval > 0 and times[i] - times[last] < min_interval * (1 - _EPS):
            continue
        kept.append(i)
        last = i
    return np.asarray(kept, dtype=np.int64)
