"""The simulated wheel odometry (r2former_core.odometry) and `r2former synth --odometry`."""
from __future__ import annotations

import numpy as np
import pytest

from r2former_core.cli.main import main
from r2former_core.data.poses import compose_poses, invert_poses, read_tum
from r2former_core.errors import ConfigError
from r2former_core.odometry import OdometryNoise, chain_increments, planar_increments, simulate_odometry
from r2former_core.synthetic import SyntheticWorld


@pytest.fixture(scope="module")
def drive():
    return SyntheticWorld(11).trajectory("query", 200, substeps=2)      # ~400 m, 20 Hz


def relative_to_start(poses):
    return compose_poses(invert_poses(poses[0])[None], poses)


def test_without_noise_the_odometry_is_the_trajectory_seen_from_its_start(drive):
    odom = simulate_odometry(drive.poses, seed=1, noise=OdometryNoise(0, 0, 0, 0))
    truth = relative_to_start(drive.poses)
    assert np.allclose(odom[0], [0, 0, 0, 0, 0, 0, 1])
    assert np.abs(odom[:, :2] - truth[:, :2]).max() < 1e-9
    assert np.allclose(chain_increments(planar_increments(drive.poses))[:, :2], truth[:, :2])


def test_odometry_is_seeded(drive):
    a, b = simulate_odometry(drive.poses, 3), simulate_odometry(drive.poses, 3)
    c = simulate_odometry(drive.poses, 4)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_drift_grows_with_the_distance_driven(drive):
    truth = relative_to_start(drive.poses)
    dist = np.r_[0, np.cumsum(np.linalg.norm(np.diff(drive.poses[:, :2], axis=0), axis=1))]
    near, far = np.searchsorted(dist, 50.0), np.searchsorted(dist, 350.0)
    errors = np.array([np.linalg.norm(simulate_odometry(drive.poses, s)[:, :2] - truth[:, :2], axis=1)
                       for s in range(12)])
    assert np.median(errors[:, far]) > 3 * np.median(errors[:, near])
    assert np.median(errors[:, near]) > 0.01                      # noisy from the start
    # locally good: one step's increment is within a few percent of the true one
    odom = simulate_odometry(drive.poses, 0)
    step_true = np.linalg.norm(np.diff(truth[:, :2], axis=0), axis=1)
    step_odom = np.linalg.norm(np.diff(odom[:, :2], axis=0), axis=1)
    assert np.median(np.abs(step_odom - step_true) / step_true) < 0.1


def test_noise_values_are_checked():
    with pytest.raises(ConfigError, match="scale_error"):
        OdometryNoise(scale_error=-0.1).validate()


def test_synth_writes_odometry_at_the_frame_stamps(tmp_path):
    out = tmp_path / "q"
    assert main(["synth", "--seed", "5", "--drive", "query", "--frames", "12", "--width", "32", "--height", "24",
                 "--out", str(out), "--odometry"]) == 0
    stamps, odom = read_tum(out / "odometry.txt")
    gt_stamps, gt = read_tum(out / "poses.txt")
    assert len(stamps) == 12 and np.allclose(stamps, gt_stamps, atol=1e-6)
    assert np.allclose(odom[0], [0, 0, 0, 0, 0, 0, 1])
    inc_true, inc_odom = planar_increments(gt), planar_increments(odom)
    assert np.allclose(inc_odom[:, :2], inc_true[:, :2], atol=0.2)    # locally close to the ground truth
    assert not np.allclose(odom[:, :2], relative_to_start(gt)[:, :2], atol=1e-6)
