"""Pose and covariance from candidates of a multi-session map (hand-made candidates)."""
import numpy as np
import pytest

from r2former_core.data.poses import quat_from_yaw
from r2former_core.pose import PoseConfig, estimate_pose, top_per_session


def poses_at(xy):
    p = np.zeros((len(xy), 7))
    p[:, :2] = xy
    p[:, 3:] = quat_from_yaw(np.zeros(len(xy)))
    return p


# One drive's reranked candidates: the right place P around x = 0 (three neighbouring keyframes) and a
# look-alike Q 120 m away (three keyframes), interleaved by score as a reranker ranks them.
XY = [[0, 0], [120, 0], [2.5, 0], [122.5, 0], [-2.5, 0], [117.5, 0]]
SCORES = np.array([0.92, 0.90, 0.86, 0.85, 0.80, 0.79])
CFG = PoseConfig(top=4)


def same(a, b):
    return (np.allclose(a.pose, b.pose) and np.allclose(a.covariance, b.covariance)
            and a.confidence == pytest.approx(b.confidence) and a.agreement == pytest.approx(b.agreement))


def test_a_duplicated_session_changes_nothing():
    """A map merged with a copy of itself: every candidate twice, once per session. No new evidence, so the
    estimate must be the single map's; counting by overall rank would let the duplicates of the chosen
    place push the look-alikes out of the top candidates and fake confidence."""
    single = estimate_pose(poses_at(XY), SCORES, 2.5, CFG)
    twice = np.repeat(np.arange(len(XY)), 2)                     # A0 B0 A1 B1 ...: equal scores side by side
    sessions = np.tile([0, 1], len(XY))
    merged = estimate_pose(poses_at(XY)[twice], SCORES[twice], 2.5, CFG, sessions=sessions)
    assert same(single, merged)
    assert merged.sessions_agreeing == 2
    # without session ids the same candidates are read as one drive: the top 4 are P, P, Q, Q
    naive = estimate_pose(poses_at(XY)[twice], SCORES[twice], 2.5, CFG)
    assert not same(single, naive)


def test_an_agreeing_session_strengthens_the_estimate():
    """Night drive: P and its look-alike Q score alike. A day session also has P (1 m beside the night
    keyframe, another lane) and does not confuse it with Q: more confidence, a smaller covariance."""
    night = estimate_pose(poses_at([[0, 0], [120, 0]]), np.array([0.90, 0.89]), 2.5)
    both = estimate_pose(poses_at([[0, 0], [120, 0], [1, 1], [121, 1]]), np.array([0.90, 0.89, 0.88, 0.40]),
                         2.5, sessions=np.array([1, 1, 0, 0]))
    assert both.agreement > night.agreement + 0.1          # 0.67 against 0.52
    assert both.confidence > night.confidence + 0.1
    assert np.trace(both.covariance[:2, :2]) < 0.8 * np.trace(night.covariance[:2, :2])
    assert both.sessions_agreeing == 2 and night.sessions_agreeing == 1


def test_other_sessions_at_the_chosen_place_are_agreement_not_look_alikes():
    """Entries of another drive at the chosen place (a few metres off: another lane, other keyframe
    positions) add to the agreement; only places beyond the agreement radius count against it."""
    alone = estimate_pose(poses_at([[0, 0], [60, 0]]), np.array([0.9, 0.6]), 1.0)
    with_other = estimate_pose(poses_at([[0, 0], [60, 0], [3.5, -2.0]]), np.array([0.9, 0.6, 0.85]), 1.0,
                               sessions=np.array([0, 0, 1]))
    assert with_other.agreement > alone.agreement
    assert with_other.sessions_agreeing == 2
    # the weighted position moves towards the other drive's entry, in proportion to its weight
    assert 0 < with_other.pose[0] < 3.5


def test_a_session_that_does_not_match_is_ignored():
    """Day entries of the place scored low against a night query carry almost no weight either way."""
    night = estimate_pose(poses_at([[0, 0], [2.5, 0], [120, 0]]), np.array([0.9, 0.88, 0.5]), 2.5)
    plus_day = estimate_pose(poses_at([[0, 0], [2.5, 0], [120, 0], [0, 1], [80, 0]]),
                             np.array([0.9, 0.88, 0.5, 0.2, 0.15]), 2.5, sessions=np.array([1, 1, 1, 0, 0]))
    assert plus_day.confidence == pytest.approx(night.confidence, abs=1e-3)
    assert plus_day.sessions_agreeing == 1


def test_top_per_session_and_bad_input():
    assert top_per_session(np.array([0, 1, 0, 0, 1, 2, 0]), 2).tolist() == [0, 1, 2, 4, 5]
    with pytest.raises(ValueError, match="session ids"):
        estimate_pose(poses_at([[0, 0]]), np.array([0.9]), 1.0, sessions=np.array([0, 1]))
