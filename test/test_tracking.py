"""The tracker's filter on hand-made maps and likelihoods, and the Tracker's stamp handling, kidnap recovery
and candidate choice on a hand-made score table (r2former_core.tracking)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from r2former_core.data.poses import quat_from_yaw
from r2former_core.errors import ConfigError
from r2former_core.localizer import Localizer
from r2former_core.mapdb import MapDatabase
from r2former_core.options import LocalizerConfig, TrackingConfig
from r2former_core.pose import estimate_pose
from r2former_core.results import Candidate, LocalizationResult, TokenMatches
from r2former_core.tracking import MapBelief, ScoreNormaliser, Tracker, planar_increment

SPACING = 2.0


def road(n: int = 60, spacing: float = SPACING) -> np.ndarray:
    """Map poses along +x, heading +x, `spacing` apart."""
    poses = np.zeros((n, 7))
    poses[:, 0] = np.arange(n) * spacing
    poses[:, 3:] = quat_from_yaw(0.0)
    return poses


def concentrate(belief: MapBelief, entry: int, speed: float | None = None) -> None:
    """All of the belief on one entry (and one speed state, or spread over all speeds)."""
    belief.entries = np.array([entry])
    belief.mass = np.zeros((1, len(belief.speeds)))
    if speed is None:
        belief.mass[0] = 1.0 / len(belief.speeds)
    else:
        belief.mass[0, np.argmin(np.abs(belief.speeds - speed))] = 1.0
    belief.uniform = belief.elsewhere = 0.0


def mean_x(belief: MapBelief) -> float:
    m = belief.marginal()
    return float(m @ belief.xy[belief.entries, 0] / m.sum())


# ------------------------------------------------------------------------------------------- prediction

def test_prediction_moves_the_belief_along_the_heading_by_speed_times_dt():
    cfg = TrackingConfig(max_speed=10.0, speed_resolution=1.0, position_std=1.0, kidnap_rate=0.0)
    b = MapBelief(road(), SPACING, cfg)
    concentrate(b, 20, speed=10.0)
    b.predict(0.4)                                    # 4 m ahead: entry 22
    assert mean_x(b) == pytest.approx(44.0, abs=0.3)
    assert b.most_probable(1)[0] == 22
    concentrate(b, 20, speed=-5.0)
    b.predict(0.8)                                    # 4 m back: entry 18
    assert b.most_probable(1)[0] == 18
    # unknown speed: the belief spreads symmetrically, never further than max_speed * dt + 3 sigma
    concentrate(b, 30)
    b.predict(1.0)
    assert mean_x(b) == pytest.approx(60.0, abs=0.5)
    reach = np.abs(b.xy[b.entries, 0] - 60.0).max()
    sigma = math.hypot(cfg.position_std, 0.5 * cfg.accel_std * 1.0 ** 2)   # position noise of a 1 s step
    assert 8.0 <= reach <= 10.0 + 3 * sigma + 1e-9


def test_speed_is_estimated_from_the_observed_motion():
    """Without odometry, observations of a robot moving 2 entries per frame make the filter learn the speed,
    so that the prediction alone then follows the robot."""
    cfg = TrackingConfig(max_speed=20.0, speed_resolution=1.0, position_std=1.0, kidnap_rate=0.0, accel_std=1.0)
    b = MapBelief(road(100), SPACING, cfg)
    for k in range(12):
        if k:
            b.predict(0.4)
        true = 10 + 2 * k                             # 4 m per 0.4 s = 10 m/s
        lr = np.where(np.abs(np.arange(100) - true) <= 0, 3.0, -1.0)
        b.update(np.arange(100), lr, -1.0)
    assert b.place().speed == pytest.approx(10.0, abs=1.0)
    for _ in range(3):                                # no observations: prediction only
        b.predict(0.4)
    assert b.most_probable(1)[0] == pytest.approx(10 + 2 * 11 + 6, abs=1)


def test_odometry_moves_the_belief_by_the_increment_in_the_entry_frame():
    cfg = TrackingConfig(position_std=0.5, odom_noise=0.05, kidnap_rate=0.0)
    b = MapBelief(road(), SPACING, cfg)
    concentrate(b, 10, speed=0.0)
    b.predict(0.5, odometry=np.array([6.0, 0.0, 0.0]))
    assert b.most_probable(1)[0] == 13
    assert b.place().speed == pytest.approx(12.0, abs=cfg.max_speed / 10)   # speed states follow the odometry
    # an entry facing the other way is another place: turning round on the spot leaves this road
    concentrate(b, 10, speed=0.0)
    b.predict(0.5, odometry=np.array([0.0, 0.0, math.pi]))
    assert b.mass.sum() < 0.05 and b.elsewhere > 0.95


def test_driving_off_the_end_of_the_map_moves_the_belief_to_elsewhere():
    b = MapBelief(road(10), SPACING, TrackingConfig(position_std=1.0, kidnap_rate=0.0))
    concentrate(b, 9, speed=0.0)
    b.predict(1.0, odometry=np.array([20.0, 0.0, 0.0]))
    assert b.elsewhere > 0.99


def test_kidnap_rate_returns_belief_to_the_prior():
    cfg = TrackingConfig(kidnap_rate=1.0, kidnap_speed=0.0, elsewhere_prior=0.2)     # per second at any speed
    b = MapBelief(road(), SPACING, cfg)
    concentrate(b, 10, speed=0.0)
    b.predict(1.0, odometry=np.zeros(3))
    kept = math.exp(-1.0)
    assert b.mass.sum() == pytest.approx(kept, rel=0.02)          # (a little leaks off the map ends)
    assert b.uniform == pytest.approx((1 - kept) * 0.8, rel=1e-3)
    assert b.elsewhere == pytest.approx((1 - kept) * 0.2, rel=0.05)
    assert b.mass.sum() + b.uniform + b.elsewhere == pytest.approx(1.0)


@pytest.mark.parametrize("forward, share", [(0.0, 0.0), (2.0, 0.5), (4.0, 1.0), (8.0, 1.0)])
def test_kidnap_speed_makes_the_return_to_the_prior_a_rate_per_metre(forward, share):
    """kidnap_speed 4 m/s: 1 s at 0, 2, 4 and 8 m/s (odometry) leaks kidnap_rate x min(1, speed / 4)."""
    cfg = TrackingConfig(kidnap_rate=1.0, kidnap_speed=4.0, elsewhere_prior=0.2)
    b = MapBelief(road(), SPACING, cfg)
    concentrate(b, 10, speed=0.0)
    b.predict(1.0, odometry=np.array([forward, 0.0, 0.0]))
    assert b.uniform == pytest.approx((1 - math.exp(-share)) * 0.8, rel=1e-3, abs=1e-12)


def test_kidnap_speed_without_odometry_uses_the_filter_speed():
    cfg = TrackingConfig(kidnap_rate=1.0, kidnap_speed=20.0, max_speed=20.0, accel_std=0.0)
    b = MapBelief(road(), SPACING, cfg)
    concentrate(b, 10, speed=10.0)
    b.predict(0.5)
    assert b.uniform == pytest.approx((1 - math.exp(-0.5 * 0.5)) * 0.8, rel=0.05)


# ------------------------------------------------------------------------------------------- update

def test_update_is_bayes_rule_against_elsewhere_and_the_uniform_prior():
    cfg = TrackingConfig(elsewhere_prior=0.2)
    b = MapBelief(road(50), SPACING, cfg)
    assert (b.uniform, b.elsewhere) == pytest.approx((0.8, 0.2))
    b.update(np.array([5, 6]), np.array([2.0, 0.0]), rest_log_lr=-1.0)
    share = 0.8 / 50
    unnorm = {5: share * math.exp(2), 6: share, "rest": share * 48 * math.exp(-1), "else": 0.2}
    total = sum(unnorm.values())
    m = dict(zip(b.entries.tolist(), b.marginal()))
    assert m[5] == pytest.approx(unnorm[5] / total)
    assert m[6] == pytest.approx(unnorm[6] / total)
    assert b.uniform == pytest.approx(unnorm["rest"] / total)
    assert b.elsewhere == pytest.approx(unnorm["else"] / total)
    # a second update multiplies the support's mass (and the uniform prior's share there) by the ratios
    before = dict(zip(b.entries.tolist(), b.marginal()))
    share = b.uniform / 50
    b.update(np.array([5, 6]), np.array([0.0, 1.0]), rest_log_lr=0.0)
    after = dict(zip(b.entries.tolist(), b.marginal()))
    assert after[6] / after[5] == pytest.approx((before[6] + share) * math.e / (before[5] + share), rel=1e-6)
    with pytest.raises(ValueError, match="every support entry"):
        b.update(np.array([5]), np.array([0.0]), 0.0)


def test_new_hypotheses_take_the_belief_speed():
    """The uniform prior's share that an update adds at newly observed entries gets the belief's speed
    distribution (a kidnap moves the robot, not its speed); the support's own mass keeps its speeds."""
    cfg = TrackingConfig(max_speed=10.0, speed_resolution=1.0, elsewhere_prior=0.2)
    b = MapBelief(road(50), SPACING, cfg)
    nb = len(b.speeds)
    # empty support (start): every speed equally likely
    assert b.speed_distribution() == pytest.approx(np.full(nb, 1.0 / nb))
    b.update(np.array([5]), np.array([1.0]), rest_log_lr=0.0)
    assert b.mass[0] == pytest.approx(np.full(nb, b.mass[0, 0]))
    # a belief at entry 20 driving at 8 m/s, with a little mass that has no speed (anywhere, elsewhere)
    concentrate(b, 20, speed=8.0)
    b.mass *= 0.9
    b.uniform, b.elsewhere = 0.08, 0.02
    fast = int(np.argmin(np.abs(b.speeds - 8.0)))
    expected = np.full(nb, 0.1 / nb)
    expected[fast] += 0.9
    assert b.speed_distribution() == pytest.approx(expected)
    share = b.uniform / 50
    b.update(np.array([20, 40]), np.array([0.0, 2.0]), rest_log_lr=0.0)
    total = 0.9 + share * (1 + math.exp(2.0)) + share * 48 + 0.02
    row = {int(e): b.mass[k] for k, e in enumerate(b.entries)}
    assert row[40] == pytest.approx(share * math.exp(2.0) * expected / total)             # newborn: the speed
    assert row[20] == pytest.approx((0.9 * np.eye(nb)[fast] + share * expected) / total)   # kept: its own
    assert b.place().speed == pytest.approx(8.0, abs=1.0)


def test_place_pose_and_covariance_come_from_the_posterior():
    b = MapBelief(road(), SPACING, TrackingConfig(spread_weight=1.0), min_position_std=0.5)
    b.entries = np.array([10, 11, 40])
    b.mass = np.zeros((3, len(b.speeds)))
    b.mass[:, 0] = [0.45, 0.45, 0.1]
    b.uniform = b.elsewhere = 0.0
    place = b.place()
    assert place.mass == pytest.approx(0.9)                    # entry 40 (60 m away) is another place
    assert sorted(place.entries.tolist()) == [10, 11]
    assert place.pose[0] == pytest.approx(21.0) and place.pose[1] == pytest.approx(0.0)
    # spread (1 m^2 along x) plus the floor (half the spacing)^2, widened by 1 / mass
    assert place.covariance[0, 0] == pytest.approx((1.0 + 1.0) / 0.9)
    assert place.covariance[1, 1] == pytest.approx(1.0 / 0.9)
    assert np.all(np.linalg.eigvalsh(place.covariance) > 0)
    # the defaults leave the spread out (it measured ~3.4 x the error along the drive): the floor only
    b.config = TrackingConfig()
    assert b.place().covariance[0, 0] == pytest.approx(1.0 / 0.9)
    b.config = TrackingConfig(spread_weight=0.25)
    assert b.place().covariance[0, 0] == pytest.approx((0.25 + 1.0) / 0.9)


def test_covariance_grows_along_the_heading_with_the_speed_uncertainty():
    """Without odometry the published place moves by the estimated speed: a speed distribution with variance
    s^2 widens the covariance along the heading (not across it) by s^2 x speed_horizon^2; a single speed, or a
    prediction by odometry (the speed measured), adds nothing."""
    yaw = math.radians(30.0)
    poses = road(40)
    poses[:, 0], poses[:, 1] = np.arange(40) * SPACING * math.cos(yaw), np.arange(40) * SPACING * math.sin(yaw)
    poses[:, 3:] = quat_from_yaw(yaw)
    cfg = TrackingConfig(max_speed=10.0, speed_resolution=1.0, speed_horizon=1.5, spread_weight=0.0)
    b = MapBelief(poses, SPACING, cfg, min_position_std=0.5)
    floor = 1.0                                                  # (half the 2 m spacing)^2
    concentrate(b, 20, speed=6.0)
    assert b.place().covariance[:2, :2] == pytest.approx(floor * np.eye(2))
    # half of the mass at 4 m/s, half at 8 m/s: variance 4 (m/s)^2 -> 4 x 1.5^2 = 9 m^2 along the heading
    b.mass[0] = 0.0
    b.mass[0, np.argmin(np.abs(b.speeds - 4.0))] = b.mass[0, np.argmin(np.abs(b.speeds - 8.0))] = 0.5
    cov = b.place().covariance[:2, :2]
    along, across = np.array([math.cos(yaw), math.sin(yaw)]), np.array([-math.sin(yaw), math.cos(yaw)])
    assert along @ cov @ along == pytest.approx(floor + 9.0)
    assert across @ cov @ across == pytest.approx(floor)
    assert along @ cov @ across == pytest.approx(0.0, abs=1e-9)
    assert b.place().speed == pytest.approx(6.0)
    # the horizon scales it; 0 turns it off
    b.config = TrackingConfig(max_speed=10.0, speed_resolution=1.0, speed_horizon=0.0)
    assert b.place().covariance[:2, :2] == pytest.approx(floor * np.eye(2))
    b.config = cfg
    # predicted by odometry: the speed states are the odometry's, not an estimate; the term is off until a
    # prediction without odometry again
    b.predict(0.1, odometry=np.array([0.6, 0.0, 0.0]))
    assert b.odometry_predicted
    cov = b.place().covariance[:2, :2]
    assert along @ cov @ along == pytest.approx(across @ cov @ across, rel=1e-6)
    b.predict(0.1)
    assert not b.odometry_predicted
    cov = b.place().covariance[:2, :2]
    assert along @ cov @ along > across @ cov @ across + 1.0


def test_score_normaliser_discounts_entries_that_score_high_against_every_query():
    norm = ScoreNormaliser(4, window=20, prior=3.0)
    for _ in range(30):
        norm.add(np.array([0, 1, 2]), np.array([3.0, -1.0, -1.0]))   # entry 0 looks like every query
    excess = norm.excess(np.array([0, 1, 3]))
    assert excess[0] > 2.0
    assert excess[1] < 0
    assert excess[2] == 0.0                                          # never seen: no correction
    assert np.all(ScoreNormaliser(4, window=0).excess(np.array([0, 1])) == 0)


def test_tracking_config_ranges():
    with pytest.raises(ConfigError, match="max_speed"):
        TrackingConfig(max_speed=0.0).validate()
    with pytest.raises(ConfigError, match="min_mass"):
        TrackingConfig(min_mass=1.5).validate()


def test_planar_increment():
    a = np.r_[1.0, 2.0, 0.0, quat_from_yaw(math.pi / 2)]
    b = np.r_[1.0, 5.0, 0.0, quat_from_yaw(math.pi)]
    assert planar_increment(a, b) == pytest.approx([3.0, 0.0, math.pi / 2])


# ------------------------------------------------------------------------------------------- Tracker

class TableLocalizer(Localizer):
    """A Localizer whose scores come from a hand-made table: score[frame, entry]. The query's "global
    descriptor" is its frame number. Everything the Tracker does on top of it is the real code."""

    def __init__(self, mapdb: MapDatabase, rerank: np.ndarray, glob: np.ndarray, top_k: int = 20):
        self.config = LocalizerConfig(top_k=top_k)
        self.map = mapdb
        self.rerank_table, self.global_table = rerank, glob
        self.reranked_sets: list[np.ndarray] = []

    def retrieve(self, q_global):
        i = int(q_global[0])
        order = np.argsort(-self.global_table[i], kind="stable")[:self.config.top_k]
        return order, self.global_table[i, order]

    def global_scores(self, q_global, indices):
        return self.global_table[int(q_global[0]), np.asarray(indices)]

    def view_scale(self):
        """So that the default still_view_change (0.13) is a view change of 0.02."""
        return 0.02 / TrackingConfig().still_view_change

    def view_change(self, a, b):
        """Frames of the table are different views unless they are the same frame."""
        return 0.0 if int(a[0]) == int(b[0]) else 1.0

    def localize_features(self, q_global, q_local, rerank=None, retrieved=None, c_local=None, with_matches=True):
        i = int(q_global[0])
        idx = np.asarray(retrieved if retrieved is not None else self.retrieve(q_global)[0])
        self.reranked_sets.append(idx.copy())
        s = self.rerank_table[i, idx]
        order = np.argsort(-s, kind="stable")
        ranked = idx[order]
        est = estimate_pose(self.map.poses[ranked], s[order], self.map.keyframe_spacing())
        cands = [Candidate(int(j), self.map.names[int(j)], self.map.poses[int(j)], float(self.global_table[i, j]),
                           float(self.rerank_table[i, j]), float(self.rerank_table[i, j])) for j in ranked]
        return LocalizationResult(est.pose, est.covariance, est.confidence, False, "", int(ranked[0]), cands,
                                  TokenMatches(), {}, est.agreement).judge(self.config.min_confidence)


@pytest.fixture(scope="module")
def road_map(tmp_path_factory):
    poses = road(80)
    path = tmp_path_factory.mktemp("road") / "map"
    rng = np.random.default_rng(0)
    with MapDatabase.create(path, fingerprint="table", model_config={}, image_size=(8, 8), global_dim=4,
                            num_local=2, local_values=5) as w:
        w.add_batch(rng.normal(size=(80, 4)).astype(np.float32), np.zeros((80, 2, 5), np.float32), poses,
                    np.arange(80.0), [f"e{i}" for i in range(80)])
    return MapDatabase.load(path)


def drive_tables(truth: list[int], n_entries: int = 80, seed: int = 0,
                 global_hint: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a robot at map entry truth[k] in frame k: high at and next to the true entry, low and noisy
    elsewhere (like night scores of the demo model), with a look-alike stretch (entries 60-62) that scores
    high in every frame. global_hint[k]: "strong" (default; the global descriptor ranks the true place first),
    "weak" (among the top 20 but not first) or "none" (last)."""
    rng = np.random.default_rng(seed)
    rerank = rng.uniform(0.005, 0.12, (len(truth), n_entries))
    glob = rng.uniform(0.2, 0.6, (len(truth), n_entries))
    for k, t in enumerate(truth):
        hint = "strong" if global_hint is None else global_hint[k]
        for j, s in ((t - 1, 0.6), (t, 0.9), (t + 1, 0.6)):
            if 0 <= j < n_entries:
                rerank[k, j] = s
                glob[k, j] = {"strong": 0.6 + 0.3 * s, "weak": 0.57, "none": 0.1}[hint]
        rerank[k, 60:63] = 0.85                       # a look-alike place
    return rerank, glob


def run(tracker: Tracker, n: int, dt: float = 0.2, start: float = 100.0):
    return [tracker.step(start + k * dt, features=(np.array([k]), None), with_matches=False) for k in range(n)]


def test_tracker_locks_on_tracks_and_reranks_fewer_candidates(road_map):
    truth = [5 + k for k in range(40)]               # 2 m per 0.2 s = 10 m/s
    rerank, glob = drive_tables(truth)
    loc = TableLocalizer(road_map, rerank, glob, top_k=20)
    cfg = TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2)
    out = run(Tracker(loc, cfg), len(truth))
    assert out[0].state == "global" and out[0].reranked == 20
    late = out[10:]
    assert all(r.state == "tracking" and r.accepted for r in late)
    assert all(r.reranked <= 8 for r in late)
    errors = [abs(r.pose[0] - SPACING * t) for r, t in zip(out, truth) if r.accepted]
    assert max(errors) < 3.0                          # never on the look-alike place 110 m away
    assert out[-1].speed == pytest.approx(10.0, abs=2.0)
    # while tracking the global top candidates are reranked as well (to notice a kidnap)
    top = set(np.argsort(-glob[30], kind="stable")[:2].tolist())
    assert top <= set(loc.reranked_sets[30].tolist())


@pytest.mark.parametrize("kidnap_speed, most_wrong", [(0.0, 3), (20.0, 7)])
def test_tracker_recovers_from_a_kidnap(road_map, kidnap_speed, most_wrong):
    """Carried from entry 69 to entry 2 at 10 m/s, where at first even the global descriptor misses the place:
    the contradicted belief is published for a few frames at most, the tracker declares itself lost and reranks
    the whole top_k; once the place is among the global top 20 again it is found. With kidnap_rate per second
    (kidnap_speed 0) the old place is published for at most 3 frames; per metre below 20 m/s (the default)
    the return to the prior is half as fast at 10 m/s and the old place lasts up to 14 m (7 frames)."""
    truth = [40 + k for k in range(30)] + [2 + k for k in range(30)]
    hints = ["strong"] * 30 + ["none"] * 10 + ["weak"] * 20
    rerank, glob = drive_tables(truth, seed=1, global_hint=hints)
    loc = TableLocalizer(road_map, rerank, glob, top_k=20)
    cfg = TrackingConfig(max_speed=15.0, lost_frames=3, track_candidates=6, kidnap_candidates=2,
                         kidnap_speed=kidnap_speed)
    out = run(Tracker(loc, cfg), len(truth))
    assert out[29].state == "tracking" and out[29].accepted and abs(out[29].pose[0] - 2 * 69) < 3
    after = out[30:]
    wrong = [k for k, r in enumerate(after) if r.accepted and abs(r.pose[0] - 2 * truth[30 + k]) > 5]
    assert len(wrong) <= most_wrong                   # the old place is published for a few frames at most
    recovered = [k for k, r in enumerate(after) if r.accepted and abs(r.pose[0] - 2 * truth[30 + k]) < 3]
    assert recovered and wrong[-1] < recovered[0] <= 25
    if kidnap_speed == 0:                             # (per metre the belief stays around track_mass instead)
        lost = [k for k, r in enumerate(after) if r.state == "lost"]
        assert lost and lost[0] <= 20                 # weak contradicting evidence: it takes a while
        assert all(after[k + 1].reranked == 20 for k in lost if k + 1 < len(after))   # global search while lost
        assert lost[0] < recovered[0]
    assert all(r.accepted and abs(r.pose[0] - 2 * truth[30 + k]) < 3 for k, r in enumerate(after) if k >= 25)


def test_global_search_reranks_the_best_global_candidates_only(road_map):
    """While searching (global, lost) the tracker reranks the first `global_candidates` of the retrieval's
    order (not chosen by the belief), never more per frame than max(global_candidates, track + kidnap
    candidates); 0 = the whole top_k. The kidnap is still noticed and the new place found."""
    truth = [40 + k for k in range(30)] + [2 + k for k in range(30)]
    hints = ["strong"] * 30 + ["none"] * 10 + ["weak"] * 20
    rerank, glob = drive_tables(truth, seed=1, global_hint=hints)
    loc = TableLocalizer(road_map, rerank, glob, top_k=20)
    cfg = TrackingConfig(max_speed=15.0, lost_frames=3, track_candidates=6, kidnap_candidates=2,
                         global_candidates=8)
    out = run(Tracker(loc, cfg), len(truth))
    searching = [k for k, r in enumerate(out) if r.reranked > 0 and (k == 0 or out[k - 1].state != "tracking")]
    assert searching[0] == 0 and any(k > 30 for k in searching)       # at the start and after the kidnap
    for k in searching:
        assert loc.reranked_sets[k].tolist() == np.argsort(-glob[k], kind="stable")[:8].tolist()
    assert max(r.reranked for r in out) == 8
    after = out[30:]
    assert all(r.accepted and abs(r.pose[0] - 2 * truth[30 + k]) < 3 for k, r in enumerate(after) if k >= 25)
    # 0: the whole top_k, as a single frame
    loc.reranked_sets.clear()
    first = Tracker(loc, TrackingConfig(global_candidates=0)).step(0.0, features=(np.array([0]), None),
                                                                    with_matches=False)
    assert first.state == "global" and first.reranked == 20


def test_tracker_skips_duplicate_and_out_of_order_stamps_and_resets_on_a_jump_back(road_map):
    truth = [5 + k for k in range(12)]
    rerank, glob = drive_tables(truth, seed=2)
    loc = TableLocalizer(road_map, rerank, glob, top_k=20)
    tracker = Tracker(loc, TrackingConfig(reset_jump=1.0))
    for k in range(8):
        last = tracker.step(10.0 + 0.2 * k, features=(np.array([k]), None), with_matches=False)
    assert last.state == "tracking"
    support, n_calls = len(tracker.belief), len(loc.reranked_sets)
    dup = tracker.step(10.0 + 0.2 * 7, features=(np.array([8]), None))
    assert not dup.accepted and "duplicate stamp" in dup.reason and dup.reranked == 0
    old = tracker.step(10.0 + 0.2 * 5, features=(np.array([8]), None))
    assert not old.accepted and "out of order" in old.reason and old.reranked == 0
    assert len(loc.reranked_sets) == n_calls and len(tracker.belief) == support   # the filter is unchanged
    assert tracker.last_stamp == pytest.approx(10.0 + 0.2 * 7)
    nxt = tracker.step(10.0 + 0.2 * 8, features=(np.array([8]), None), with_matches=False)
    assert nxt.state == "tracking" and nxt.reranked > 0
    # a replayed bag: the stamp jumps back by more than reset_jump -> the filter starts again
    again = tracker.step(3.0, features=(np.array([0]), None), with_matches=False)
    assert again.state == "global" and again.reranked == 20 and tracker.last_stamp == 3.0
    # a long gap restarts the global search too
    tracker.step(3.2, features=(np.array([1]), None), with_matches=False)
    gap = tracker.step(3.2 + 60.0, features=(np.array([2]), None), with_matches=False)
    assert gap.reranked == 20


def test_published_covariance_is_wider_along_the_drive_only_without_odometry(road_map):
    """The same drive with and without odometry: without it the speed is the filter's estimate and the published
    covariance is wider along the heading (x) than across it; with odometry the speed is measured and the
    covariance is the floor in every direction. Both contain the error (this drive has no wrong place)."""
    truth = [5 + k for k in range(30)]
    rerank, glob = drive_tables(truth)
    cfg = TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2)
    for odometry in (False, True):
        tracker = Tracker(TableLocalizer(road_map, rerank, glob, top_k=20), cfg)
        out = [tracker.step(100.0 + 0.2 * k, features=(np.array([k]), None), with_matches=False,
                            odom_pose=road_map.poses[t] if odometry else None) for k, t in enumerate(truth)]
        published = [(r, t) for r, t in zip(out, truth) if r.accepted]
        assert len(published) >= 20
        for r, t in published:
            cov = r.covariance[:2, :2]
            if odometry:
                assert cov[0, 0] == pytest.approx(cov[1, 1], rel=1e-6)
            else:
                assert cov[0, 0] > 2.0 * cov[1, 1]
            e = r.pose[:2] - road_map.poses[t][:2]
            assert e @ np.linalg.solve(cov, e) <= 5.991


# ------------------------------------------------------------------------------------------- standing still

def test_hold_moves_the_speed_to_zero_and_keeps_the_place():
    cfg = TrackingConfig(max_speed=10.0, speed_resolution=1.0, position_std=1.0, kidnap_rate=0.0)
    b = MapBelief(road(), SPACING, cfg)
    concentrate(b, 20)                                        # every speed alike
    b.entries = np.array([20, 21])
    b.mass = np.vstack([b.mass[0] * 0.7, np.zeros(len(b.speeds))])
    b.mass[1, np.argmin(np.abs(b.speeds - 10.0))] = 0.3       # entry 21 only at 10 m/s
    before = b.marginal().copy()
    b.hold(0.0, 2.0)                                          # 2 s without moving more than ~1 m
    assert b.marginal() == pytest.approx(before)              # standing says nothing about where
    p = b.mass[0] / b.mass[0].sum()
    assert p @ np.abs(b.speeds) < 1.0                         # was 5.2 m/s on average
    assert b.mass[1, np.argmin(np.abs(b.speeds))] == pytest.approx(0.3)   # every speed ruled out: at rest
    # in steps: the same as at once
    c = MapBelief(road(), SPACING, cfg)
    concentrate(c, 20)
    d = MapBelief(road(), SPACING, cfg)
    concentrate(d, 20)
    c.hold(0.0, 0.2)
    c.hold(0.2, 0.6)
    d.hold(0.0, 0.6)
    assert c.mass == pytest.approx(d.mass)
    c.hold(0.6, 0.6)                                          # no time: no change
    assert c.mass == pytest.approx(d.mass)


def stand_and_drive(tracker: Tracker, truth: list[int], stop_at: int, standing: int, odom=None, cruise: float = 10.0,
                    accel: float = 2.0):
    """The robot drives `cruise` m/s along `truth` (one entry, 2 m, per frame), brakes at `accel` m/s^2 to a stop
    at frame `stop_at`, stands there while its camera repeats that view `standing` times at 10 Hz, and starts
    again at `accel`. Returns the results: moving up to the stop, standing, moving on."""
    def time_from_stop(d: float) -> float:           # seconds to cover d metres from rest (accelerating, then cruising)
        d_acc = cruise ** 2 / (2 * accel)
        return math.sqrt(2 * d / accel) if d <= d_acc else cruise / accel + (d - d_acc) / cruise

    t_stop = 100.0 + time_from_stop(SPACING * stop_at)
    out = []
    for k in range(len(truth)):
        pose = None if odom is None else odom[truth[k]]
        d = SPACING * abs(k - stop_at)
        if k < stop_at:
            out.append(tracker.step(t_stop - time_from_stop(d), features=(np.array([k]), None), with_matches=False,
                                    odom_pose=pose))
        elif k == stop_at:
            for r in range(standing + 1):
                out.append(tracker.step(t_stop + 0.1 * r, features=(np.array([k]), None), with_matches=False,
                                        odom_pose=pose))
        else:
            out.append(tracker.step(t_stop + 0.1 * standing + time_from_stop(d), features=(np.array([k]), None),
                                    with_matches=False, odom_pose=pose))
    return out


def test_a_standing_robot_adds_no_evidence_and_reranks_nothing(road_map):
    """At entry 24 the robot stands for 10 s: its repeated view is not reranked and does not change where the
    belief is; the speed goes to zero, and tracking goes on when it drives off again. With still_view_change 0
    every repeat is reranked and counted (as before)."""
    truth = [5 + k for k in range(40)]
    rerank, glob = drive_tables(truth, seed=3)
    cfg = TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2)
    loc = TableLocalizer(road_map, rerank, glob, top_k=20)
    tracker = Tracker(loc, cfg)
    out = stand_and_drive(tracker, truth, stop_at=19, standing=100)
    moving_before, standing, moving_after = out[:20], out[20:120], out[120:]
    assert moving_before[-5].accepted and moving_before[-5].speed == pytest.approx(10.0, abs=2.5)
    # from the second frame at the stop on the view is held: the last used result is repeated
    last_used, held = moving_before[-1], standing
    assert not last_used.still and last_used.reranked > 0
    assert all(r.still and r.reranked == 0 for r in held)
    assert all(r.accepted == last_used.accepted for r in held)
    assert all(r.pose == pytest.approx(last_used.pose) for r in held)
    assert all(r.confidence == pytest.approx(last_used.confidence) for r in held)
    assert held[0].frame is last_used.frame                    # the matches shown are the last used frame's
    assert abs(held[-1].speed) < 1.0
    assert len(loc.reranked_sets) == 20 + len(moving_after)    # nothing reranked while held
    assert not any(r.still for r in moving_after)
    errors = [abs(r.pose[0] - SPACING * t) for r, t in zip(moving_after, truth[20:]) if r.accepted]
    assert len(errors) >= 15 and max(errors) < 3.0
    assert moving_after[-1].speed == pytest.approx(10.0, abs=2.5)
    # off: every repeat is a new observation
    loc_off = TableLocalizer(road_map, rerank, glob, top_k=20)
    off = stand_and_drive(Tracker(loc_off, TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2,
                                                          still_view_change=0.0, update_spacing=0.0)),
                          truth, stop_at=19, standing=100)
    assert not any(r.still for r in off) and all(r.reranked > 0 for r in off[20:120])


def test_a_new_view_while_standing_is_used_and_a_repeated_view_is_held_while_searching(road_map):
    """A robot carried off while it stood (its view changes) is observed again at once. While searching, a
    repeated view is held as well: counted again and again it would make a place of one view's scores."""
    truth = [5 + k for k in range(20)] + [50 + k for k in range(20)]
    rerank, glob = drive_tables(truth, seed=4)
    loc = TableLocalizer(road_map, rerank, glob, top_k=20)
    tracker = Tracker(loc, TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2))
    out = [tracker.step(100.0 + 0.2 * k, features=(np.array([k]), None), with_matches=False) for k in range(20)]
    out += [tracker.step(104.0 + 0.1 * k, features=(np.array([19]), None), with_matches=False) for k in range(20)]
    assert out[19].accepted and all(r.still and r.accepted for r in out[20:40])
    carried = tracker.step(106.0, features=(np.array([20]), None), with_matches=False)
    assert not carried.still and carried.reranked > 0          # the new view: observed
    # at the start: the first view is used, its repeats are held (nothing published from one view)
    fresh = Tracker(TableLocalizer(road_map, rerank, glob, top_k=20), TrackingConfig())
    first = [fresh.step(50.0 + 0.1 * k, features=(np.array([0]), None), with_matches=False) for k in range(30)]
    assert first[0].reranked > 0 and not first[0].still
    assert all(r.still and r.reranked == 0 and not r.accepted and r.state == "global" for r in first[1:])
    assert first[-1].confidence == pytest.approx(first[0].confidence)
    # with still_view_change 0 the repeats are evidence: the belief sharpens on that one view
    counted = Tracker(TableLocalizer(road_map, rerank, glob, top_k=20), TrackingConfig(still_view_change=0.0,
                                                                                      update_spacing=0.0))
    again = [counted.step(50.0 + 0.1 * k, features=(np.array([0]), None), with_matches=False) for k in range(30)]
    assert all(r.reranked > 0 for r in again) and again[-1].confidence > first[-1].confidence


def test_odometry_that_moves_overrules_an_unchanged_view(road_map):
    """With odometry a frame counts as standing only if the odometry has not moved either: a camera that sends
    the same image while the wheels turn (a frozen driver) is not taken for a standing robot. A standing robot
    with odometry keeps the odometry reference of the last used frame, so the increments add up."""
    truth = [5 + k for k in range(30)]
    rerank, glob = drive_tables(truth, seed=5)
    cfg = TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2)
    loc = TableLocalizer(road_map, rerank, glob, top_k=20)
    tracker = Tracker(loc, cfg)
    for k in range(15):
        last = tracker.step(100.0 + 0.2 * k, features=(np.array([k]), None), with_matches=False,
                            odom_pose=road_map.poses[truth[k]])
    assert last.accepted
    # the same view, the odometry standing: still
    still = tracker.step(103.1, features=(np.array([14]), None), with_matches=False,
                         odom_pose=road_map.poses[truth[14]])
    assert still.still and still.reranked == 0
    # the same view, the odometry 2 m on: not still
    moved = tracker.step(103.3, features=(np.array([14]), None), with_matches=False,
                         odom_pose=road_map.poses[truth[15]])
    assert not moved.still and moved.reranked > 0


class NoisyViews(TableLocalizer):
    """Frames in `group` are the same place seen with sensor noise: 1 - cosine `noise` between any two of
    them; `jump` frames differ from everything by `jump_change`."""

    def __init__(self, *args, group: set[int], noise: float, jump: set[int] = frozenset(), jump_change: float = 0.5,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.group, self.noise, self.jump, self.jump_change = group, noise, jump, jump_change

    def view_change(self, a, b):
        i, j = int(a[0]), int(b[0])
        if i == j:
            return 0.0
        if i in self.jump or j in self.jump:
            return self.jump_change
        return self.noise if i in self.group and j in self.group else 1.0


@pytest.mark.parametrize("odometry", [False, True])
def test_a_standing_robot_with_a_noisy_view_is_held_until_the_view_changes_for_real(road_map, odometry):
    """A standing camera's view changes a little with sensor noise (here 0.05, above still_view_change 0.02).
    Once the robot is known to stand (the odometry stands, or the view has been unchanged for a while and the
    filter's speed is at zero) changes up to 5 x still_view_change are held; a larger one (0.5) is used."""
    stop, n_noisy = 19, 30
    truth = [5 + k for k in range(stop + 1)] + [5 + stop] * (n_noisy + 1)
    group = set(range(stop, len(truth)))
    rerank, glob = drive_tables(truth, seed=6)
    loc = NoisyViews(road_map, rerank, glob, top_k=20, group=group, noise=0.05, jump={len(truth) - 1})
    tracker = Tracker(loc, TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2))
    odom = (lambda k: road_map.poses[truth[k]]) if odometry else (lambda k: None)
    out = [tracker.step(100.0 + 0.2 * k, features=(np.array([k]), None), with_matches=False, odom_pose=odom(k))
           for k in range(stop + 1)]
    t = 100.0 + 0.2 * stop
    if not odometry:       # the exact view repeated for 2 s: the filter learns that the robot stands
        out += [tracker.step(t + 0.1 * r, features=(np.array([stop]), None), with_matches=False)
                for r in range(1, 21)]
        assert all(r.still for r in out[-20:]) and abs(out[-1].speed) < 1.0
        t += 2.0
    noisy = [tracker.step(t + 0.1 * (r + 1), features=(np.array([k]), None), with_matches=False, odom_pose=odom(k))
             for r, k in enumerate(range(stop + 1, len(truth) - 1))]
    assert all(r.still and r.reranked == 0 for r in noisy)
    jumped = tracker.step(t + 0.1 * (len(noisy) + 1), features=(np.array([len(truth) - 1]), None),
                          with_matches=False, odom_pose=odom(len(truth) - 1))
    assert not jumped.still and jumped.reranked > 0
    # before the robot is known to stand, the same noise is news: after driving, the noisy frames are not held
    # as standing (coasted while the filter's speed says the robot has moved less than update_spacing, used
    # after that) ...
    fresh = Tracker(NoisyViews(road_map, rerank, glob, top_k=20, group=group, noise=0.05),
                    TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2))
    for k in range(stop + 1):
        fresh.step(100.0 + 0.2 * k, features=(np.array([k]), None), with_matches=False)
    rest = [fresh.step(100.0 + 0.2 * stop + 0.1 * (r + 1), features=(np.array([k]), None), with_matches=False)
            for r, k in enumerate(range(stop + 1, stop + 25))]
    assert not any(r.still for r in rest[:13]) and any(r.reranked > 0 for r in rest[:13])
    # ... but once the views have stayed that close for 1.5 s the robot is taken to stand: held from then on
    assert all(r.still and r.reranked == 0 for r in rest[16:])


def test_the_view_scale_is_the_median_change_between_neighbouring_map_entries(tmp_path):
    """`map_view_scale`: consecutive entries of one session within 3 keyframe spacings; the step between two
    sessions and far jumps are not neighbours. The tracker's threshold is still_view_change times it."""
    from r2former_core.localizer import map_view_scale
    n = 41
    angles = np.r_[np.arange(20) * 0.1, 5.0 + np.arange(21) * 0.2]     # session 2 turns twice as fast per entry
    desc = np.stack([np.cos(angles), np.sin(angles), np.zeros(n), np.zeros(n)], 1).astype(np.float32)
    poses = road(n)
    poses[20:, 1] = 500.0                                             # session 2 lies elsewhere
    sessions = np.r_[np.zeros(20), np.ones(21)].astype(np.int32)
    path = tmp_path / "map"
    with MapDatabase.create(path, fingerprint="scale", model_config={}, image_size=(8, 8), global_dim=4,
                            num_local=2, local_values=5) as w:
        w.add_batch(desc[:20], np.zeros((20, 2, 5), np.float32), poses[:20], np.arange(20.0),
                    [f"a{i}" for i in range(20)])
    mapdb = MapDatabase.load(path)
    assert map_view_scale(mapdb) == pytest.approx(1 - math.cos(0.1), rel=1e-4)
    # a second session: its own steps count, the jump between the sessions does not
    steps = np.r_[np.full(19, 1 - math.cos(0.1)), np.full(20, 1 - math.cos(0.2))]
    assert map_view_scale(_Map(poses, desc, sessions)) == pytest.approx(float(np.median(steps)), rel=1e-4)


class _Map:
    """What map_view_scale reads of a MapDatabase."""

    def __init__(self, poses: np.ndarray, global_desc: np.ndarray, sessions: np.ndarray):
        self.poses, self.global_desc, self.sessions = poses, global_desc, sessions

    def keyframe_spacing(self) -> float:
        return SPACING

    def __len__(self) -> int:
        return len(self.poses)


def test_a_frozen_camera_is_noticed_when_the_odometry_moves(road_map):
    """The camera driver repeats its last image while the robot drives (odometry 2 m per frame): the frames are
    used (the odometry moves) and the distance driven with an unchanged view is reported; a new view resets it."""
    truth = [5 + k for k in range(20)]
    rerank, glob = drive_tables(truth, seed=7)
    tracker = Tracker(TableLocalizer(road_map, rerank, glob, top_k=20), TrackingConfig(max_speed=15.0))
    for k in range(10):
        r = tracker.step(100.0 + 0.2 * k, features=(np.array([k]), None), with_matches=False,
                         odom_pose=road_map.poses[truth[k]])
        assert r.frozen_view_m == 0.0
    frozen = [tracker.step(102.0 + 0.2 * j, features=(np.array([9]), None), with_matches=False,
                           odom_pose=road_map.poses[truth[10 + j]]) for j in range(4)]
    assert all(not r.still and r.reranked > 0 for r in frozen)
    assert [r.frozen_view_m for r in frozen] == pytest.approx([2.0, 4.0, 6.0, 8.0], abs=1e-6)
    fresh = tracker.step(102.8, features=(np.array([14]), None), with_matches=False,
                         odom_pose=road_map.poses[truth[14]])
    assert fresh.frozen_view_m == 0.0


# ------------------------------------------------------------------------------------ a slow robot: coasting

class ViewsAlongTheRoad(TableLocalizer):
    """Frame k is seen at x[k] on the road: the view changes in proportion to the distance between two frames,
    by the map's neighbour change (view_scale) per keyframe spacing."""

    def __init__(self, *args, x: np.ndarray, **kwargs):
        super().__init__(*args, **kwargs)
        self.x = np.asarray(x, np.float64)

    def view_change(self, a, b):
        return self.view_scale() * abs(self.x[int(a[0])] - self.x[int(b[0])]) / SPACING


def slow_drive(road_map, step: float, n: int, cfg: TrackingConfig, dt: float = 0.1, odometry: bool = False,
               seed: int = 11):
    """A robot driving `step` metres per frame from x = 10 m; scores of the nearest map entry."""
    x = 10.0 + step * np.arange(n)
    truth = [int(round(v / SPACING)) for v in x]
    rerank, glob = drive_tables(truth, seed=seed)
    loc = ViewsAlongTheRoad(road_map, rerank, glob, top_k=20, x=x)
    tracker = Tracker(loc, cfg)
    out = []
    for k in range(n):
        odom = None
        if odometry:
            odom = road(1)[0]
            odom[0] = x[k]
        out.append(tracker.step(100.0 + dt * k, features=(np.array([k]), None), odom_pose=odom, with_matches=False))
    return x, out


def test_a_slow_robot_with_odometry_is_observed_once_per_update_spacing_and_dead_reckoned_between(road_map):
    """0.25 m per frame, update_spacing 1 (2 m): every 8th frame is used; the frames between are coasted
    (nothing reranked, no evidence) and publish the last used frame's place moved by the odometry since."""
    cfg = TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2, update_spacing=1.0,
                         max_update_interval=5.0)
    x, out = slow_drive(road_map, 0.25, 80, cfg, odometry=True)
    used = [k for k, r in enumerate(out) if not r.coasted]
    assert used == list(range(0, 80, 8))
    assert all(r.reranked == 0 and not r.still for r in out if r.coasted)
    assert all(r.reranked > 0 for k, r in enumerate(out) if k in used)
    late = out[40:]
    assert all(r.accepted for r in late)
    assert max(abs(r.pose[0] - v) for r, v in zip(late, x[40:])) < 2.5
    for k in range(41, 48):                     # dead reckoning: the last used place + the odometry since
        assert out[k].pose[0] - out[40].pose[0] == pytest.approx(x[k] - x[40], abs=1e-6)
        assert out[k].covariance[0, 0] > out[40].covariance[0, 0]
    # every frame is evidence without update_spacing
    _, every = slow_drive(road_map, 0.25, 24, TrackingConfig(max_speed=15.0, update_spacing=0.0), odometry=True)
    assert not any(r.coasted for r in every) and all(r.reranked > 0 for r in every)


@pytest.mark.parametrize("interval, period", [(5.0, 4), (0.25, 3)])
def test_a_slow_robot_without_odometry_is_observed_when_its_view_has_moved_or_the_interval_passed(
        road_map, interval, period):
    """0.5 m per frame, no odometry: while tracking a frame is used once its view has changed by update_spacing x
    the map's neighbour change (here 2 m: every 4th frame), or max_update_interval after the last used frame,
    or once the filter's speed says the robot may have moved that far; the coasted frames republish the last
    result as it was and leave the filter unchanged."""
    cfg = TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2, update_spacing=1.0,
                         max_update_interval=interval)
    x, out = slow_drive(road_map, 0.5, 60, cfg)
    used = [k for k, r in enumerate(out) if not r.coasted]
    # while searching every frame is used (no speed yet to tell a slow robot from a fast one), from the first
    # frame that tracks on every `period`-th
    k0 = next(k for k, r in enumerate(out) if r.state == "tracking")
    assert 0 < k0 < 20 and used[:k0 + 1] == list(range(k0 + 1))
    # ... at the latest once the view has moved 2 m or the interval has passed, earlier when the filter's speed
    # (plus its uncertainty) says the robot may have moved that far; never two frames 0.5 m apart in a row
    gaps = np.diff([u for u in used if u >= k0])
    assert gaps.min() >= 2 and gaps.max() <= period and len(used) < 60 - 15
    for k, r in enumerate(out):
        if r.coasted:
            last = out[max(u for u in used if u < k)]
            assert r.reranked == 0 and np.array_equal(r.pose, last.pose, equal_nan=True)
            assert r.confidence == last.confidence and r.support == last.support
    assert all(r.accepted for r in out[30:])
    assert max(abs(r.pose[0] - v) for r, v in zip(out[30:], x[30:])) < 4.0


class CountingExtract(ViewsAlongTheRoad):
    """`extract` of an "image" that is the frame number, counting its calls (the network's forward pass)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extracted: list[int] = []

    def extract(self, image):
        self.extracted.append(int(image[0]))
        return np.array([int(image[0])]), None


def test_frames_the_odometry_coasts_are_not_run_through_the_network(road_map):
    """With odometry, a frame that moved more than a standing robot's 5 cm and less than update_spacing is
    coasted whatever its view: given an image, the tracker does not extract its features. The results are
    those of the same frames given as features."""
    x = 10.0 + 0.25 * np.arange(64)
    truth = [int(round(v / SPACING)) for v in x]
    rerank, glob = drive_tables(truth, seed=12)
    cfg = TrackingConfig(max_speed=15.0, track_candidates=6, kidnap_candidates=2, max_update_interval=5.0)
    runs = {}
    for mode in ("image", "features"):
        loc = CountingExtract(road_map, rerank, glob, top_k=20, x=x)
        tracker = Tracker(loc, cfg)
        out = []
        for k in range(len(x)):
            odom = road(1)[0]
            odom[0] = x[k]
            kwargs = {"image": np.array([k])} if mode == "image" else {"features": (np.array([k]), None)}
            out.append(tracker.step(100.0 + 0.1 * k, odom_pose=odom, with_matches=False, **kwargs))
        runs[mode] = (out, loc.extracted)
    out, extracted = runs["image"]
    used = [k for k, r in enumerate(out) if not r.coasted]
    assert extracted == used and len(used) <= len(x) // 5          # one frame in 6 (1.5 m / 0.25 m) needs the network
    assert all("extract" not in r.timings_ms for r in out if r.coasted)
    assert runs["features"][1] == []
    for a, b in zip(out, runs["features"][0]):
        assert a.coasted == b.coasted and a.accepted == b.accepted
        assert np.array_equal(a.pose, b.pose, equal_nan=True)


def test_a_robot_carried_away_with_odometry_standing_is_observed_not_coasted(road_map):
    """A kidnap with odometry: the robot is carried from entry 69 to entry 2 and the odometry shows no motion
    across it. Under 5 cm the odometry stands, and a view that changed more than a standing robot's may is news:
    the frame is used (reranked, an observation), not coasted as "nearer than update_spacing" at the old place.
    Then the tracker recovers as without odometry; a standing robot's unchanged view is still held."""
    truth = [40 + k for k in range(30)] + [2 + k for k in range(30)]
    hints = ["strong"] * 30 + ["none"] * 10 + ["weak"] * 20
    rerank, glob = drive_tables(truth, seed=1, global_hint=hints)
    loc = TableLocalizer(road_map, rerank, glob, top_k=20)
    cfg = TrackingConfig(max_speed=15.0, lost_frames=3, track_candidates=6, kidnap_candidates=2)
    tracker = Tracker(loc, cfg)
    odom_x = [2.0 * t for t in truth[:30]] + [2.0 * (truth[29] + k) for k in range(30)]   # frame 30: no motion
    out = []
    for k in range(len(truth)):
        odom = road(1)[0]
        odom[0] = odom_x[k]
        out.append(tracker.step(100.0 + 0.2 * k, features=(np.array([k]), None), odom_pose=odom,
                                with_matches=False))
    assert out[29].state == "tracking" and abs(out[29].pose[0] - 2 * 69) < 3
    assert not out[30].coasted and not out[30].still and out[30].reranked > 0
    assert not any(r.coasted or r.still for r in out)          # 2 m per frame: every frame is used
    after = out[30:]
    wrong = [k for k, r in enumerate(after) if r.accepted and abs(r.pose[0] - 2 * truth[30 + k]) > 5]
    assert len(wrong) <= 7
    assert all(r.accepted and abs(r.pose[0] - 2 * truth[30 + k]) < 3 for k, r in enumerate(after) if k >= 25)
    # the same frame 30 repeated (the view unchanged) with the odometry standing is held, not used
    again = tracker.step(100.0 + 0.2 * 60, features=(np.array([59]), None), odom_pose=odom, with_matches=False)
    assert again.still and again.reranked == 0
