"""Wheel odometry of a ground robot, simulated from a ground-truth trajectory (seeded).

Real wheel odometry is locally good and globally wrong: a wheel radius that is off by a percent
scales every distance, a wheel-base error or an unequal tyre pressure turns the robot a little with
every metre driven (yaw drift), and wheel slip adds random noise. This module reproduces those three
effects so that the tracker's odometry path (`r2former_core.tracking`) is tested and measured on the
synthetic drives, where the ground truth is known.

For each step between consecutive ground-truth poses, the planar motion in the robot's frame
(forward dx, sideways dy, turn dyaw) is measured as

    distance  d' = d (1 + scale_error) + N(0, distance_noise^2 d)
    turn      dyaw' = dyaw + yaw_drift d + N(0, yaw_noise^2 d)
    heading   of the displacement in the robot frame: kept, plus N(0, yaw_noise^2 d)

with `scale_error` and `yaw_drift` drawn once per drive (systematic errors, seeded) and the noise
drawn per step. The measured increments are chained from the identity: the result is the robot's
pose in an `odom` frame whose origin is the first pose (REP-105), planar (z = 0, no roll/pitch).
The position error therefore grows with the distance driven (about `scale_error` x distance, plus
the yaw drift's quadratic growth), exactly what a localizer has to correct.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .data.poses import check_poses, compose_poses, invert_poses, quat_from_yaw, yaw_from_quat
from .errors import ConfigError


@dataclass(frozen=True)
class OdometryNoise:
    """Error model of wheel odometry; every value is a standard deviation."""
    scale_error: float = 0.02           # systematic distance scale error (fraction), drawn once per drive
    yaw_drift_deg_per_m: float = 0.05   # systematic turn per metre driven (degrees), drawn once per drive
    distance_noise: float = 0.02        # random distance error, metres per sqrt(metre)
    yaw_noise_deg: float = 0.2          # random turn error, degrees per sqrt(metre)

    def validate(self) -> OdometryNoise:
        for name in ("scale_error", "yaw_drift_deg_per_m", "distance_noise", "yaw_noise_deg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"odometry noise {name} must be a finite number >= 0, got {value!r}")
        return self


def planar_increments(poses: np.ndarray) -> np.ndarray:
    """(N-1, 3) motion between consecutive poses in the earlier pose's frame: forward, left, turn (rad)."""
    poses = check_poses(poses)
    rel = compose_poses(invert_poses(poses[:-1]), poses[1:])
    return np.column_stack([rel[:, 0], rel[:, 1], yaw_from_quat(rel[:, 3:])])


def chain_increments(increments: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """Poses (N+1, 7) from chaining planar increments (forward, left, turn) from `start` (default identity)."""
    inc = np.asarray(increments, np.float64).reshape(-1, 3)
    poses = np.zeros((len(inc) + 1, 7))
    poses[0] = [0, 0, 0, 0, 0, 0, 1] if start is None else start
    steps = np.zeros((len(inc), 7))
    steps[:, 0], steps[:, 1] = inc[:, 0], inc[:, 1]
    steps[:, 3:] = quat_from_yaw(inc[:, 2])
    for i, step in enumerate(steps):
        poses[i + 1] = compose_poses(poses[i], step)
    return poses


def simulate_odometry(poses: np.ndarray, seed: int, noise: OdometryNoise = OdometryNoise()) -> np.ndarray:
    """Noisy wheel odometry (N, 7) in an `odom` frame for ground-truth poses (N, 7) (seeded, see module doc)."""
    noise = noise.validate()
    poses = check_poses(poses)
    if len(poses) == 0:
        return poses.copy()
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x0D0])
    scale = 1.0 + rng.normal(0.0, noise.scale_error)
    drift = math.radians(rng.normal(0.0, noise.yaw_drift_deg_per_m))
    inc = planar_increments(poses) if len(poses) > 1 else np.zeros((0, 3))
    dist = np.hypot(inc[:, 0], inc[:, 1])
    yaw_sd = math.radians(noise.yaw_noise_deg) * np.sqrt(dist)
    measured_dist = np.maximum(dist * scale + rng.normal(0.0, 1.0, len(dist)) * noise.distance_noise * np.sqrt(dist), 0)
    heading = np.arctan2(inc[:, 1], inc[:, 0]) + rng.normal(0.0, 1.0, len(dist)) * yaw_sd
    turn = inc[:, 2] + drift * dist + rng.normal(0.0, 1.0, len(dist)) * yaw_sd
    measured = np.column_stack([measured_dist * np.cos(heading), measured_dist * np.sin(heading), turn])
    return chain_increments(measured)


__all__ = ["OdometryNoise", "chain_increments", "planar_increments", "simulate_odometry"]
