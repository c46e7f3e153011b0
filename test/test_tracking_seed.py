"""Seeding the tracker from a known pose (the node's /initialpose): MapBelief.seed and Tracker.seed."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_tracking import SPACING, TableLocalizer, drive_tables, road, road_map  # noqa: F401 - fixture

from r2former_core.data.poses import quat_from_yaw
from r2former_core.options import TrackingConfig
from r2former_core.tracking import MapBelief, Tracker


def pose_at(x: float, y: float = 0.0, yaw: float = 0.0) -> np.ndarray:
    return np.concatenate([[x, y, 0.0], quat_from_yaw(yaw)])


def test_seed_puts_the_belief_on_the_entries_near_the_pose():
    b = MapBelief(road(), SPACING, TrackingConfig(elsewhere_prior=0.2))
    n = b.seed(np.array([40.0, 0.5]), 0.0, position_std=2.0, yaw_std=math.radians(30))
    assert n == len(b) and 3 <= n <= 7                     # within 3 sigma = 6 m: entries 17..23
    assert set(b.entries.tolist()) <= set(range(17, 24))
    assert b.most_probable(1)[0] == 20
    # the pose says the robot is on the map: "elsewhere" starts at half of 1 - min_mass, not at its prior
    assert b.marginal().sum() == pytest.approx(0.95) and b.elsewhere == pytest.approx(0.05) and b.uniform == 0.0
    assert np.allclose(b.mass[0], b.mass[0, 0])            # speed unknown: uniform over the speed states
    # facing the other way: no entry within 3 sigma of the heading
    assert b.seed(np.array([40.0, 0.0]), math.pi, position_std=2.0, yaw_std=math.radians(30)) == 0
    assert len(b) == 0 and b.uniform == pytest.approx(0.8)
    # off the map
    assert b.seed(np.array([40.0, 100.0]), 0.0, position_std=2.0, yaw_std=0.5) == 0


def test_tracker_seed_tracks_from_the_pose_and_a_wrong_seed_is_left(road_map):  # noqa: F811
    truth = [20 + k for k in range(25)]
    rerank, glob = drive_tables(truth, seed=3)
    loc = TableLocalizer(road_map, rerank, glob, top_k=20)
    cfg = TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2, lost_frames=3)
    tracker = Tracker(loc, cfg)
    cov = np.diag([4.0, 4.0, 1.0, 0.1, 0.1, 0.05])
    assert tracker.seed(pose_at(2 * 20), cov) > 0 and tracker.state == "tracking"
    first = tracker.step(50.0, features=(np.array([0]), None), with_matches=False)
    assert first.reranked == 8                           # tracked from the seed: not the whole top_k
    assert first.state == "tracking" and abs(first.pose[0] - 40.0) < 3.0
    # a wrong seed (30 m behind the robot): published on the first frame or two (an initial pose is trusted, as
    # AMCL trusts it), then contradicted, lost, and the robot found again
    tracker.seed(pose_at(2 * 5), cov)
    out = [tracker.step(60.0 + 0.2 * k, features=(np.array([k]), None), with_matches=False) for k in range(1, 25)]
    assert any(r.state == "lost" for r in out)
    wrong = [k for k, r in enumerate(out) if r.accepted and abs(r.pose[0] - 2 * truth[k + 1]) > 5]
    # the first frames (<= 6 m at 10 m/s): the return to the prior is per metre, and the seeded entries' low
    # scores are learned as their typical ones from the first frame on (docs/TRACKING.md "Fifth round")
    assert wrong in ([], [0], [0, 1], [0, 1, 2])
    assert all(r.accepted and abs(r.pose[0] - 2 * truth[k + 1]) < 3 for k, r in enumerate(out) if k >= 18)
    # no map entry near the pose: global search
    assert tracker.seed(pose_at(40.0, 200.0), cov) == 0 and tracker.state == "global"


def test_a_robot_seeded_while_it_stands_is_published_there(road_map):  # noqa: F811
    """Booted while parked, given an initial pose: its view repeats (no new evidence), yet the seeded place is
    published from the first frame on and stays published while it stands."""
    truth = [24] * 3
    rerank, glob = drive_tables(truth, seed=3)
    tracker = Tracker(TableLocalizer(road_map, rerank, glob, top_k=20), TrackingConfig())
    assert tracker.seed(pose_at(2 * 24), np.diag([1.0, 1.0, 1.0, 0.1, 0.1, 0.1])) > 0
    out = [tracker.step(100.0 + 0.1 * k, features=(np.array([0]), None), with_matches=False) for k in range(30)]
    assert all(r.accepted and abs(r.pose[0] - 48.0) < 2.0 for r in out)
    assert all(r.still for r in out[1:])
