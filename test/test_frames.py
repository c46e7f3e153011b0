"""r2former_core.frames: base pose from the camera pose and its mounting, covariance propagation
(hand-made cases and a Monte-Carlo check), optical frames, the map -> odom correction."""
from __future__ import annotations

import math

import numpy as np
import pytest

from r2former_core.data.poses import compose_poses, invert_poses, rpy_from_quat
from r2former_core.frames import (
    OPTICAL_IN_BODY,
    FrameError,
    camera_to_base,
    compose_jacobian,
    is_optical_frame,
    odom_in_map,
    optical_to_body,
    planar_error,
    pose_from_xyzrpy,
    quat_from_rpy,
)


def pose(x, y, z, roll=0.0, pitch=0.0, yaw=0.0):
    return pose_from_xyzrpy([x, y, z, roll, pitch, yaw])


def wrap(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


def test_quat_from_rpy_inverts_rpy_from_quat():
    rng = np.random.default_rng(0)
    for _ in range(50):
        rpy = rng.uniform([-3, -1.4, -3], [3, 1.4, 3])
        assert np.allclose(rpy_from_quat(quat_from_rpy(*rpy)), rpy, atol=1e-12)


def test_mounting_in_front_and_above():
    """Camera 0.5 m ahead of and 1 m above the base; the robot heads +y (yaw 90 deg)."""
    camera = pose(10.0, 5.0, 1.2, yaw=math.pi / 2)
    base, _ = camera_to_base(camera, np.eye(6) * 0.01, pose(0.5, 0.0, 1.0))
    assert np.allclose(base[:3], [10.0, 4.5, 0.2], atol=1e-12)
    assert np.isclose(rpy_from_quat(base[3:])[2], math.pi / 2)


def test_sideways_camera_gives_the_base_heading():
    """A camera looking left (mounting yaw +90 deg) that looks along +y in the map: the base heads +x."""
    camera = pose(3.0, 4.0, 0.0, yaw=math.pi / 2)
    base, _ = camera_to_base(camera, np.eye(6) * 0.01, pose(0.0, 0.2, 0.0, yaw=math.pi / 2))
    assert np.isclose(rpy_from_quat(base[3:])[2], 0.0, atol=1e-12)
    assert np.allclose(base[:3], [3.0, 3.8, 0.0], atol=1e-12)   # camera 0.2 m left of the base
    # without the mounting the yaw would be off by 90 degrees
    assert planar_error(camera, base)[1] == pytest.approx(math.pi / 2)


def test_lever_arm_turns_yaw_uncertainty_into_lateral_uncertainty():
    """Camera 1 m ahead of the base, heading +x: a yaw error dpsi moves the base by -1 m * dpsi along y."""
    cov = np.diag([0.25, 0.25, 0.01, 0.01, 0.04, 0.09])
    _, base_cov = camera_to_base(pose(0.0, 0.0, 0.0), cov, pose(1.0, 0.0, 0.0))
    assert base_cov[0, 0] == pytest.approx(0.25)
    assert base_cov[1, 1] == pytest.approx(0.25 + 0.09)
    assert base_cov[1, 5] == pytest.approx(-0.09) and base_cov[5, 1] == pytest.approx(-0.09)
    assert base_cov[5, 5] == pytest.approx(0.09)
    # a camera 1.5 m above the base: yaw does not move the base, pitch and roll do (lever 1.5 m)
    _, above = camera_to_base(pose(0.0, 0.0, 0.0), cov, pose(0.0, 0.0, 1.5))
    assert np.allclose(above[5, :3], 0.0)
    assert above[0, 0] == pytest.approx(0.25 + 1.5 ** 2 * 0.04) and above[1, 1] == pytest.approx(0.25 + 1.5 ** 2 * 0.01)


def test_sideways_camera_swaps_roll_and_pitch_uncertainty():
    cov = np.diag([0.1, 0.2, 0.01, 0.01, 0.04, 0.09])
    _, base_cov = camera_to_base(pose(0.0, 0.0, 0.0, yaw=math.pi / 2), cov, pose(0.0, 0.0, 0.0, yaw=math.pi / 2))
    assert base_cov[3, 3] == pytest.approx(0.04) and base_cov[4, 4] == pytest.approx(0.01)
    assert base_cov[5, 5] == pytest.approx(0.09)
    assert np.allclose(base_cov[:3, :3], cov[:3, :3])      # position rotates with nothing: same point


@pytest.mark.parametrize("mount", [[0.3, -0.2, 0.8, 0.1, 0.3, 1.2], [1.5, 0.4, 0.0, 0.0, 0.0, -math.pi / 2],
                                   [-0.6, 0.0, 1.1, 0.0, -0.2, math.pi]])
def test_covariance_propagation_matches_monte_carlo(mount):
    rng = np.random.default_rng(1)
    camera = pose(4.0, -2.0, 1.0, 0.05, -0.1, 0.7)
    a = rng.normal(size=(6, 6))
    stds = np.array([0.05, 0.08, 0.03, 0.01, 0.015, 0.03])
    corr = a @ a.T + 6 * np.eye(6)
    corr /= np.sqrt(np.outer(np.diag(corr), np.diag(corr)))
    cov = corr * np.outer(stds, stds)
    mounting = pose_from_xyzrpy(mount)
    base, base_cov = camera_to_base(camera, cov, mounting)

    n = 200_000
    samples = rng.multivariate_normal(np.zeros(6), cov, size=n)
    cam_rpy = rpy_from_quat(camera[3:]) + samples[:, 3:]
    r, p, y = cam_rpy.T
    cr, sr, cp, sp, cy, sy = np.cos(r / 2), np.sin(r / 2), np.cos(p / 2), np.sin(p / 2), np.cos(y / 2), np.sin(y / 2)
    quats = np.stack([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy,
                      cr * cp * cy + sr * sp * sy], axis=1)
    cams = np.concatenate([camera[:3] + samples[:, :3], quats], axis=1)
    bases = compose_poses(cams, invert_poses(mounting))
    d = np.concatenate([bases[:, :3] - base[:3], wrap(rpy_from_quat(bases[:, 3:]) - rpy_from_quat(base[3:]))], 1)
    empirical = np.cov(d.T)
    scale = np.sqrt(np.outer(np.diag(base_cov), np.diag(base_cov)))
    assert np.abs(empirical - base_cov).max() / scale.max() < 0.02
    assert np.all(np.abs(empirical - base_cov) <= 0.03 * scale + 1e-9), (empirical - base_cov) / scale
    # the mean agrees with the composed pose (second-order bias well below the spread)
    assert np.all(np.abs(d.mean(0)) < 0.1 * np.sqrt(np.diag(base_cov)))


def test_jacobian_matches_finite_differences():
    a, ab = pose(1.0, 2.0, 0.5, 0.1, -0.2, 2.0), pose(0.4, -0.3, 0.2, 0.3, 0.1, -1.0)
    jac = compose_jacobian(a, ab)
    eps = 1e-6
    base = compose_poses(a, ab)
    ref_rpy = rpy_from_quat(a[3:])
    numeric = np.zeros((6, 6))
    for i in range(6):
        v = np.concatenate([a[:3], ref_rpy])
        v[i] += eps
        out = compose_poses(pose_from_xyzrpy(v), ab)
        numeric[:3, i] = (out[:3] - base[:3]) / eps
        numeric[3:, i] = wrap(rpy_from_quat(out[3:]) - rpy_from_quat(base[3:])) / eps
    assert np.allclose(jac, numeric, atol=1e-5)


def test_optical_frames():
    assert is_optical_frame("camera_optical_frame") and is_optical_frame("cam_optical")
    assert not is_optical_frame("camera_link") and not is_optical_frame("optical_camera")
    assert np.allclose(optical_to_body(OPTICAL_IN_BODY), [0, 0, 0, 0, 0, 0, 1], atol=1e-12)
    # the optical z axis is the body x axis: a point 1 m ahead in the body frame is (0, 0, 1) optical
    optical = compose_poses(pose(0.2, 0.0, 1.0, yaw=0.5), OPTICAL_IN_BODY)
    body = optical_to_body(optical)
    assert np.allclose(body, pose(0.2, 0.0, 1.0, yaw=0.5), atol=1e-12)


def test_odom_in_map_recovers_the_correction():
    truth = pose(5.0, -3.0, 0.0, yaw=0.4)
    base_in_odom = pose(2.0, 1.0, 0.0, yaw=-1.1)
    base_in_map = compose_poses(truth, base_in_odom)
    assert np.allclose(odom_in_map(base_in_map, base_in_odom), truth, atol=1e-12)


@pytest.mark.parametrize("values", [[1.0, 2.0], [0, 0, 0, 0, 0, float("nan")], [0] * 7])
def test_bad_mounting_is_a_clear_error(values):
    with pytest.raises(FrameError, match="roll, pitch, yaw"):
        pose_from_xyzrpy(values)
