"""Pose and covariance from reranked candidates."""
import numpy as np
import pytest

from r2former_core.data.poses import quat_from_yaw
from r2former_core.pose import PoseConfig, estimate_pose, normalised_scores


def poses_at(xy, yaw=None):
    p = np.zeros((len(xy), 7))
    p[:, :2] = xy
    p[:, 3:] = quat_from_yaw(np.zeros(len(xy)) if yaw is None else np.asarray(yaw))
    return p


def spd(c):
    return np.allclose(c, c.T) and np.all(np.linalg.eigvalsh(c) > 0)


def test_agreeing_candidates_give_high_confidence_and_small_covariance():
    p = poses_at([[0, 0], [1, 0], [2, 0], [100, 0], [200, 50]])
    agree = estimate_pose(p, np.array([0.95, 0.9, 0.85, 0.1, 0.05]), keyframe_spacing=1.0)
    split = estimate_pose(p[[0, 3, 4, 1, 2]], np.array([0.95, 0.94, 0.93, 0.1, 0.05]), keyframe_spacing=1.0)
    assert agree.confidence > 0.8 and split.confidence < 0.5
    assert spd(agree.covariance) and spd(split.covariance)
    assert np.trace(split.covariance[:2, :2]) > 5 * np.trace(agree.covariance[:2, :2])
    assert 0.0 < agree.pose[0] < 2.0          # weighted mean of the agreeing neighbours


def test_far_look_alikes_widen_the_covariance_boundedly():
    """A correct best place with confident look-alikes 130 m away: the covariance describes the chosen
    place (metres, not the tens of metres of the whole mixture), widened by the ambiguity."""
    near = poses_at([[0, 0], [2, 0], [4, 0], [130, 0], [131, 2]])
    clean = estimate_pose(near[:3], np.array([0.99, 0.98, 0.97]), keyframe_spacing=2.0)
    ambiguous = estimate_pose(near[[0, 3, 1, 4, 2]], np.array([0.99, 0.97, 0.97, 0.96, 0.95]), keyframe_spacing=2.0)
    assert np.sqrt(clean.covariance[0, 0]) < 3.0
    assert clean.covariance[0, 0] < ambiguous.covariance[0, 0] < 30 ** 2
    assert ambiguous.confidence < clean.confidence and spd(ambiguous.covariance)
    assert abs(ambiguous.pose[0]) < 5.0       # the far look-alikes do not pull the estimate


def test_covariance_floor_follows_keyframe_spacing_and_modes():
    p = poses_at([[5, 5]] * 3)
    fine = estimate_pose(p, np.ones(3), keyframe_spacing=0.5)
    coarse = estimate_pose(p, np.ones(3), keyframe_spacing=10.0)
    assert coarse.covariance[0, 0] == pytest.approx(25.0) and fine.covariance[0, 0] == pytest.approx(0.25)
    best = estimate_pose(poses_at([[0, 0], [2, 0]]), np.array([0.9, 0.9]), 1.0, PoseConfig(mode="best"))
    assert best.pose[0] == 0.0
    with pytest.raises(ValueError):
        estimate_pose(p, np.ones(3), 1.0, PoseConfig(mode="bogus"))


def test_yaw_spread_enters_covariance_and_low_confidence_inflates():
    p = poses_at([[0, 0], [0.5, 0], [1, 0]], yaw=[0, 0.5, -0.5])
    est = estimate_pose(p, np.array([0.9, 0.9, 0.9]), 1.0)
    assert est.covariance[5, 5] > np.deg2rad(3) ** 2 * 10
    weak = estimate_pose(p, np.array([0.1, 0.1, 0.1]), 1.0)
    assert weak.confidence < 0.2 and weak.covariance[0, 0] > 10 * est.covariance[0, 0]
    assert spd(weak.covariance)


def test_score_normalisation():
    assert np.all(normalised_scores("ransac", np.array([0, 0.25, 2])) == np.array([0, 0.5, 1]))
    assert np.all(normalised_scores("none", np.array([-0.2, 0.7])) == np.array([0, 0.7]))
