"""Which filter for the tracker: the recursive Bayes filter over map entries x speed (r2former_core.tracking,
`MapBelief`) against a particle filter over (x, y, yaw, speed) (`ParticleBelief` below), on the same
observations, with the same Tracker around them (candidates, likelihoods, normalisation, publishing).

To compare filters in seconds rather than hours, every frame of every query drive is scored once against
EVERY map entry (global cosine and R2Former match probability; cached in --work as npz) and the Tracker runs on
a `TableLocalizer` that serves those scores: the reranker scores each (query, candidate) pair on its own, so a
filter that reranks a subset sees exactly what the real pipeline would give it. Timings here are the filters'
own (ms per frame of prediction + update); end-to-end timings are in bench/tracking_eval.py.

    .venv/bin/python bench/tracking_filters.py --model models/r2former_tiny_demo.safetensors \\
        --out bench/results/tracking_filters.json

The default sets are validation worlds (900, 901: model selection in training; 953, 954: never used), not the
held-out test worlds 950-952 of bench/tracking_eval.py: the filter and its parameters were chosen here. The
second round (global search, speed of new hypotheses; docs/TRACKING.md) was chosen on 20 worlds at night in fog,
each played in time order and kidnapped at several points, without the particle filter:

    .venv/bin/python bench/tracking_filters.py --model models/r2former_tiny_demo.safetensors \
        --sets night+fog-validation --particles 0 --orders drive,kidnap,kidnap@0.25,kidnap@0.75 \
        --variants "defaults,global search reranks all of top_k" --out bench/results/tracking_filters_night_fog.json

The third round (the published covariance) was chosen on the same 20 worlds with six more plays each (more
kidnaps, a slower robot, a varying speed: --orders calibration), 400 plays per row:

    .venv/bin/python bench/tracking_filters.py --model models/r2former_tiny_demo.safetensors \
        --sets night+fog-validation --particles 0 --orders calibration \
        --variants "second-round covariance (all of the spread; no speed term),speed horizon 1.25 s" \
        --out bench/results/tracking_filters_calibration.json

Besides the mean over the sets it prints figures pooled over all their frames, how many worlds meet the
issue's calibration band and gross-error bound one by one, and for each filter the share of all its plays
(every set, order, with and without odometry) inside the calibration band.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import (  # noqa: E402
    built_map,
    drive_source,
    machine_info,
    odometry_in_play_order,
    pool_summaries,
    tracking_drive,
    write_report,
)

from r2former_core.data.poses import yaw_from_quat  # noqa: E402
from r2former_core.localizer import Localizer  # noqa: E402
from r2former_core.options import LocalizerConfig, TrackingConfig  # noqa: E402
from r2former_core.pose import estimate_pose  # noqa: E402
from r2former_core.results import Candidate, LocalizationResult, TokenMatches  # noqa: E402
from r2former_core.tracking import MapBelief, Place, Tracker, _wrap  # noqa: E402

DEFAULT_SETS = "900:night+fog,901:night+fog,953:night+fog,954:night+fog,900:night,901:fog"
# The 20 night-and-fog validation worlds the candidate choice and the speed of new hypotheses were chosen on
# (900, 901: model selection in training; the others never used anywhere): --sets night+fog-validation
NIGHT_FOG_WORLDS = (900, 901, 953, 954, 955, 956, 957, 958, 959, 960, 962, 963, 964, 965, 966, 967, 968, 969, 970,
                    971)
_CAL = ("score_gain", "score_bias", "global_gain", "global_bias")
# The third round (the covariance, docs/TRACKING.md) was chosen on the same 20 worlds with these plays as well:
# more kidnaps, a slower robot and a speed that varies, where the filter finds a place before its speed
# ("speed lag") far more often than in the plain drive and kidnap plays: --orders calibration
PLAIN_ORDERS = "drive,kidnap,kidnap@0.25,kidnap@0.75"
STRESS_ORDERS = "kidnaps:3,kidnaps:3~slow,kidnaps:3~wave,kidnap~wave,drive~wave,kidnap@0.25~slow"
SPACING_M = 2.0        # the synthetic query drives: 2 m between frames (20 m/s at 10 Hz)


class UniformSpeedBirth(MapBelief):
    """New hypotheses with every speed equally likely (the first version of the filter)."""

    def speed_distribution(self) -> np.ndarray:
        return np.full(len(self.speeds), 1.0 / len(self.speeds))


class VarianceKeepingSpeed(MapBelief):
    """The speed changes between frames by as much variance as `accel_std` says, also when that is less than a
    speed state's width: the default transition (a Gaussian integrated over the states) moves about 14 x
    less variance per 0.1 s step between 2.5 m/s states than (accel_std dt)^2."""

    def _speed_transition(self, sigma: float) -> np.ndarray:
        res = self.speed_resolution
        if sigma >= res:
            return super()._speed_transition(sigma)
        nb = len(self.speeds)
        q = 0.5 * (sigma / res) ** 2                     # to each neighbouring state: variance sigma^2
        p = np.eye(nb) * (1.0 - 2.0 * q)
        idx = np.arange(nb)
        p[idx[1:], idx[:-1]] += q                        # b -> b + 1
        p[idx[:-1], idx[1:]] += q                        # b -> b - 1
        p[0, 0] += q                                     # the bounds: stay
        p[nb - 1, nb - 1] += q
        return p


class OdometrySpreadAlong(MapBelief):
    """With odometry, the published covariance takes in the place's spread along its heading (the belief over
    entries a keyframe or two ahead or behind), which the speed term covers without odometry; x `weight`."""
    weight = 1.0

    def place(self):
        p = super().place()
        if p is None or not self.odometry_predicted:
            return p
        m = self.marginal()[np.searchsorted(self.entries, p.entries)]
        w = m / m.sum()
        yaw = float(yaw_from_quat(p.pose[3:]))
        h = np.array([math.cos(yaw), math.sin(yaw)])
        along = (self.xy[p.entries] - p.pose[:2]) @ h
        p.covariance[:2, :2] += self.weight * float(w @ along ** 2) * np.outer(h, h) / max(p.mass, 0.05)
        return p


class OdometryHalfSpreadAlong(OdometrySpreadAlong):
    weight = 0.5


class NightStandingNoise(Tracker):
    """A standing camera's repeated view changes as the demo model's descriptor does at night in fog (sensor
    noise, traffic): the table repeats the frame exactly, so each repeat gets a change drawn from the
    measured distribution (`bench/results/still_view.json`, "night+fog: standing 1 s"); about half of them
    then count as new views (observations with the frame's scores again), as on a real camera."""

    PERCENTILES = (0, 1, 5, 50, 95, 99, 100)
    NIGHT_STANDING = (0.00446, 0.00693, 0.00899, 0.02533, 0.08794, 0.14266, 0.20255)

    def __init__(self, localizer, config=TrackingConfig(), belief=None):
        super().__init__(localizer, config, belief)
        rng = np.random.default_rng(0)
        exact = localizer.view_change

        def noisy(a, b):
            change = exact(a, b)
            return float(np.interp(rng.uniform(0, 100), self.PERCENTILES, self.NIGHT_STANDING)) if change == 0 \
                else change
        localizer.view_change = noisy


class NoveltyWeighted(Tracker):
    """Each observation weighed by how new its view is: the change from the last used frame over the map's
    median change between neighbouring entries, at most 1 (a frame a keyframe on counts fully, one 0.15 m on
    about a tenth): evidence per metre instead of per frame."""

    def __init__(self, localizer, config=TrackingConfig(), belief=None):
        super().__init__(localizer, config, belief)
        self._w = 1.0
        update = self.belief.update

        def weighted(entries, log_lr, rest_log_lr):
            return update(entries, np.asarray(log_lr) * self._w, rest_log_lr * self._w)
        self.belief.update = weighted

    def _observe(self, q_global, frame, top, top_scores):
        self._w = 1.0 if self._view is None else min(
            1.0, self.localizer.view_change(self._view, q_global) / self.localizer.view_scale())
        super()._observe(q_global, frame, top, top_scores)


class NoveltyWeightedNoise(NoveltyWeighted):
    """NoveltyWeighted, and the prediction's position noise per novelty too: position_std x sqrt(novelty)
    (noise per metre driven rather than per frame)."""

    def _still(self, stamp, change, increment):
        base = getattr(self, "_base_position_std", None)
        if base is None:
            base = self._base_position_std = self.belief.position_std
        w = 1.0 if change is None else min(1.0, change / self.localizer.view_scale())
        self.belief.position_std = base * math.sqrt(max(w, 0.05))
        return super()._still(stamp, change, increment)


class StillTime05(Tracker):
    """The robot taken to stand after 0.5 s of an unchanged view (before the ground-robot round; now 1.5 s: at
    1.5 m/s by night a moving robot's view changes in half a second about as little as a standing one's)."""

    def step(self, *args, **kwargs):
        from r2former_core import tracking
        saved, tracking._STILL_TIME = tracking._STILL_TIME, 0.5
        try:
            return super().step(*args, **kwargs)
        finally:
            tracking._STILL_TIME = saved


class HalfViewThreshold(Tracker):
    """Without odometry, a frame is coasted only while its view has changed by less than half of
    update_spacing x the map's neighbour change (by day one keyframe spacing changes the view by less than
    0.75 of the median for a third of the frames)."""

    def _too_near(self, stamp, change, increment):
        if increment is None and change is not None \
                and change >= 0.5 * self.config.update_spacing * self.localizer.view_scale():
            return False
        return super()._too_near(stamp, change, increment)


class StandingOdometryCoasts(Tracker):
    """Odometry under 5 cm coasts a frame whatever its view (before the fifth round): the frame of a kidnap,
    across which the odometry shows no motion, was republished at the old place."""

    def _too_near(self, stamp, change, increment):
        near = self._coast_distance(stamp)
        if near is not None and increment is not None:
            return math.hypot(increment[0], increment[1]) < near and abs(increment[2]) < 0.2
        return super()._too_near(stamp, change, increment)


class NoNormalisingAtSlowPlaces(Tracker):
    """The entries' typical scores are not learned at the published place while its speed is under 0.5 m/s
    (before the fifth round; now only while the tracker holds the robot for standing): a belief stuck at a
    look-alike place with no speed kept its entries' scores from looking typical there."""

    def _observe(self, q_global, frame, top, top_scores):
        last = self._last
        saved = self._held
        if last is not None and last.accepted and abs(last.speed) < 0.5:
            self._held = max(self._held, 1e-9)
        try:
            super()._observe(q_global, frame, top, top_scores)
        finally:
            self._held = saved


class FourthRound(StandingOdometryCoasts, NoNormalisingAtSlowPlaces):
    """The tracker of the fourth round: both of the above."""


class BeliefFirstGlobalSearch(Tracker):
    """Global search reranks the belief's most probable entries first (half of global_candidates), then the
    global top: the belief chooses what may confirm it."""

    def _candidates(self, top: np.ndarray) -> np.ndarray:
        if self.state == "tracking":
            return super()._candidates(top)
        n = self.config.global_candidates or len(top)
        own = self.belief.most_probable(n // 2)
        return np.concatenate([own, top[~np.isin(top, own)][:n - len(own)]])


@dataclass
class Variant:
    """The entries filter with one thing changed: configuration fields, the belief or the Tracker class."""
    config: dict = field(default_factory=dict)
    belief: type[MapBelief] | None = None
    tracker: type[Tracker] = Tracker


class SpeedGate(Tracker):
    """Publishes only once the speed is resolved: the place's speed standard deviation at most `max_std` m/s
    (without odometry; with odometry the speed is measured)."""

    max_std = 3.0

    def _publish(self, stamp: float, frame: LocalizationResult, reranked: int):
        result = super()._publish(stamp, frame, reranked)
        belief = self.belief
        place = belief.place()
        if result.accepted and place is not None and not belief.odometry_predicted:
            near = np.isin(belief.entries, place.entries)
            p = belief.mass[near].sum(0)
            p = p / p.sum()
            std = math.sqrt(max(float(p @ belief.speeds ** 2) - float(p @ belief.speeds) ** 2, 0.0))
            if std > self.max_std:
                result.accepted, result.reason = False, f"speed not resolved (std {std:.1f} m/s)"
        return result


# What matters (the entries filter with one thing changed); the two quick tries are the first two
# rows below the defaults: no direction (random walk, speed redrawn every frame) with raw scores
VARIANTS = {
    "defaults": Variant(),
    "random walk + raw scores": Variant({"accel_std": 100.0, "normalise_window": 0}),
    "random walk (no speed states)": Variant({"accel_std": 100.0}),
    "raw scores (no normalisation)": Variant({"normalise_window": 0}),
    "untempered calibration (x 1/0.7)": Variant({k: getattr(TrackingConfig(), k) / 0.7 for k in _CAL}),
    "publish at min_mass 0.5": Variant({"min_mass": 0.5}),
    "5 kidnap candidates + 30 own": Variant({"kidnap_candidates": 5, "track_candidates": 30}),
    "global search reranks all of top_k": Variant({"global_candidates": 0}),
    "global search: the belief's entries first": Variant(tracker=BeliefFirstGlobalSearch),
    "new hypotheses with uniform speed": Variant(belief=UniformSpeedBirth),
    "first version (both of the above)": Variant({"global_candidates": 0}, belief=UniformSpeedBirth),
    # the covariance (third round): spread_weight 0 and speed_horizon 2 s are the defaults
    "second-round covariance (all of the spread; no speed term)": Variant({"spread_weight": 1.0,
                                                                          "speed_horizon": 0.0}),
    "all of the spread + speed term": Variant({"spread_weight": 1.0}),
    "half of the spread + speed term": Variant({"spread_weight": 0.5}),
    "a quarter of the spread + speed term": Variant({"spread_weight": 0.25}),
    "no speed term": Variant({"speed_horizon": 0.0}),
    "every frame is evidence (still_view_change 0)": Variant({"still_view_change": 0.0}),
    "speed changes by accel_std's variance": Variant(belief=VarianceKeepingSpeed),
    "kidnap rate per second (kidnap_speed 0; before the ground-robot round)": Variant({"kidnap_speed": 0.0}),
    "a standing camera's view as noisy as at night": Variant(tracker=NightStandingNoise),
    "still_view_change 0.5 (update about every metre)": Variant({"still_view_change": 0.5}),
    "ground robot: max_speed 3": Variant({"max_speed": 3.0}),
    "evidence weighed by the view's novelty": Variant(tracker=NoveltyWeighted),
    "evidence and position noise weighed by the view's novelty": Variant(tracker=NoveltyWeightedNoise),
    "ground robot: max_speed 3 and position_std 0.3": Variant({"max_speed": 3.0, "position_std": 0.3}),
    **{f"update every {u:g} keyframe spacing + kidnap rate "
       f"{'per second' if not k else f'per metre ({k:g} m/s)'}": Variant(
        {"update_spacing": u, "kidnap_speed": float(k)}) for u in (0.5, 0.75, 1.0) for k in (0, 10, 20)},
    "kidnap rate per metre (10 m/s)": Variant({"kidnap_speed": 10.0}),
    "standing after 0.5 s (before the ground-robot round)": Variant(tracker=StillTime05),
    "every frame; kidnap rate per second; standing after 0.5 s (odometry stands below 5 cm)": Variant(
        {"update_spacing": 0.0, "kidnap_speed": 0.0}, tracker=StillTime05),
    **{f"ground robot: update every {u:g} keyframe spacing + kidnap rate per metre (20 m/s) + max_speed 3"
       f"{f' + accel_std {a:g}' if a != 4 else ''}": Variant(
           {"update_spacing": u, "kidnap_speed": 20.0, "max_speed": 3.0, "accel_std": a})
       for u in (0.5, 0.75, 1.0) for a in (4.0, 1.0)},
    "view-based coasting at 0.5 keyframe spacing": Variant(tracker=HalfViewThreshold),
    "standing odometry coasts whatever the view (before the fifth round)": Variant(tracker=StandingOdometryCoasts),
    "no typical scores learned at a slow place (before the fifth round)": Variant(tracker=NoNormalisingAtSlowPlaces),
    "fourth round (both of the above)": Variant(tracker=FourthRound),
    "odometry: the place's spread along the heading in the covariance": Variant(belief=OdometrySpreadAlong),
    "odometry: half of the place's spread along the heading in the covariance": Variant(
        belief=OdometryHalfSpreadAlong),
    "update every 0.75 keyframe spacing or 2 s": Variant({"update_spacing": 0.75, "max_update_interval": 2.0}),
    "speed horizon 0.75 s": Variant({"speed_horizon": 0.75}),
    "speed horizon 1.25 s": Variant({"speed_horizon": 1.25}),
    "second-round covariance; publish once the speed is resolved (std <= 3 m/s)": Variant(
        {"spread_weight": 1.0, "speed_horizon": 0.0}, tracker=SpeedGate),
}


# ------------------------------------------------------------------------------------------ score tables

def score_table(model, seed: int, cond: str, work: Path, size: tuple[int, int], map_frames: int,
                query_frames: int, query_spacing: float | None = None) -> Path:
    """npz with every query frame's global cosine and match probability against every map entry, and its global
    descriptor (`query_global`: the tracker's test for an unchanged view)."""
    from r2former_core.features import extract_image

    tag = f"{size[0]}x{size[1]}"
    gap = "" if query_spacing is None else f"_{query_spacing:g}m"
    out = work / f"table2_{seed}_{cond}_{map_frames}_{query_frames}{gap}_{tag}_{model.fingerprint}.npz"
    if out.is_file():
        return out
    mdir = tracking_drive(work, seed, "map", "day", map_frames, size)
    mapdb = built_map(model, work / f"map_{seed}_{map_frames}_{tag}_{model.fingerprint}", mdir)
    src = drive_source(tracking_drive(work, seed, "query", cond, query_frames, size, query_spacing))
    c_global = np.asarray(mapdb.global_desc, np.float32)
    c_local = mapdb.local(np.arange(len(mapdb)))
    glob, rerank, poses, stamps, descs = [], [], [], [], []
    for rec in src:
        g, loc = extract_image(model, rec.image)
        descs.append(g)
        glob.append(c_global @ g)
        rerank.append(model.rerank(g, loc, c_global, c_local).match_prob.numpy())
        poses.append(rec.pose)
        stamps.append(rec.stamp)
    np.savez(out, global_scores=np.array(glob), rerank=np.array(rerank), query_poses=np.array(poses),
             stamps=np.array(stamps), map_poses=mapdb.poses, query_global=np.array(descs, np.float32))
    return out


class _TableMap:
    def __init__(self, poses: np.ndarray):
        self.poses = poses
        self.names = [str(i) for i in range(len(poses))]
        self._spacing = float(np.median(np.linalg.norm(np.diff(poses[:, :3], axis=0), axis=1)))

    def keyframe_spacing(self) -> float:
        return self._spacing

    def __len__(self) -> int:
        return len(self.poses)


class TableLocalizer(Localizer):
    """Serves a score table: the query's "global descriptor" is its frame number."""

    def __init__(self, table, top_k: int = 100):
        self.config = LocalizerConfig(top_k=top_k)
        self.map = _TableMap(table["map_poses"])
        self.glob, self.rerank = table["global_scores"], table["rerank"]
        self.query_global = table.get("query_global")

    def retrieve(self, q_global):
        i = int(q_global[0])
        order = np.argsort(-self.glob[i], kind="stable")[:self.config.top_k]
        return order, self.glob[i, order]

    def global_scores(self, q_global, indices):
        return self.glob[int(q_global[0]), np.asarray(indices)]

    def view_scale(self):
        """The table has no map descriptors: the median of the 20 validation worlds' day maps with the demo model
        (0.152 = median over the worlds of `map_view_scale`; 0.123-0.181 per world), so `still_view_change`
        0.13 is a view change of 0.02."""
        return 0.152

    def view_change(self, a, b):
        """From the table's query descriptors (`query_global`); without them, 0 for the same frame, else 1."""
        i, j = int(round(float(a[0]))), int(round(float(b[0])))
        if self.query_global is None:
            return 0.0 if i == j else 1.0
        return float(1.0 - self.query_global[i] @ self.query_global[j])

    def localize_features(self, q_global, q_local, rerank=None, retrieved=None, c_local=None, with_matches=True):
        i = int(q_global[0])
        idx = np.asarray(retrieved if retrieved is not None else self.retrieve(q_global)[0])
        s = self.rerank[i, idx]
        order = np.argsort(-s, kind="stable")
        ranked = idx[order]
        est = estimate_pose(self.map.poses[ranked], s[order], self.map.keyframe_spacing(), self.config.pose)
        cands = [Candidate(int(j), "", self.map.poses[int(j)], float(self.glob[i, j]), float(self.rerank[i, j]),
                           float(self.rerank[i, j])) for j in ranked]
        return LocalizationResult(est.pose, est.covariance, est.confidence, False, "", int(ranked[0]), cands,
                                  TokenMatches(), {}, est.agreement).judge(self.config.min_confidence)


# ------------------------------------------------------------------------------------------ particle filter

class ParticleBelief:
    """A particle filter over (x, y, yaw, speed) with the same interface as MapBelief (what the Tracker uses).

    Motion: odometry increments in each particle's frame plus noise, or its speed along its heading (speed
    changes by accel_std, bounded by max_speed; heading diffuses). Observation: a particle's likelihood ratio
    is the kernel-weighted mean of the likelihood ratios of the map entries around it (position within the
    keyframe spacing, heading within heading_std_deg). "Anywhere on the map" (kidnap prior) and "elsewhere"
    are the same scalars as in MapBelief; the uniform prior's share at observed entries becomes new particles
    there (importance weight = share x likelihood ratio). Resampled (systematic) when the effective sample
    size falls below half."""

    def __init__(self, map_poses: np.ndarray, keyframe_spacing: float, config: TrackingConfig, particles: int = 2000,
                 seed: int = 0):
        self.inner = MapBelief(map_poses, keyframe_spacing, config)       # geometry helpers and place()
        self.config = config
        self.n = particles
        self.rng = np.random.default_rng(seed)
        self.xy, self.yaw, self.spacing = self.inner.xy, self.inner.yaw, self.inner.spacing
        self.mode_radius = self.inner.mode_radius
        self.reset()

    def reset(self) -> None:
        self.p = np.zeros((0, 4))          # x, y, yaw, speed
        self.w = np.zeros(0)
        self.elsewhere = self.config.elsewhere_prior
        self.uniform = 1.0 - self.elsewhere

    @property
    def num_entries(self) -> int:
        return len(self.xy)

    def _nearest(self) -> np.ndarray:
        if not len(self.p):
            return np.zeros(0, np.int64)
        grid = self.inner._grid
        near = np.full(len(self.p), -1, np.int64)
        # particles lie near entries: the nearest entry among the neighbours of the particle's own cell
        keys = np.floor(self.p[:, :2] / grid.cell).astype(np.int64)
        codes = grid._code(keys)
        best = np.full(len(self.p), np.inf)
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                c = grid._code(keys + np.array([dx, dy]))
                pos = np.minimum(np.searchsorted(grid.codes, c), len(grid.codes) - 1)
                found = grid.codes[pos] == c
                members = np.where(found[:, None], grid.members[pos], -1)
                d2 = np.where(members >= 0, ((self.xy[np.maximum(members, 0)] - self.p[:, None, :2]) ** 2).sum(-1),
                              np.inf)
                j = d2.argmin(1)
                better = d2[np.arange(len(d2)), j] < best
                best[better] = d2[np.arange(len(d2)), j][better]
                near[better] = members[np.arange(len(d2)), j][better]
        del codes
        return near

    @property
    def entries(self) -> np.ndarray:
        near = self._nearest()
        return np.unique(near[near >= 0])

    def marginal(self) -> np.ndarray:
        near = self._nearest()
        ok = near >= 0
        ent, inv = np.unique(near[ok], return_inverse=True)
        return np.bincount(inv, weights=self.w[ok], minlength=len(ent))

    def __len__(self) -> int:
        return len(self.entries)

    def most_probable(self, n: int) -> np.ndarray:
        ent = self.entries
        if not len(ent):
            return ent
        return ent[np.argsort(-self.marginal(), kind="stable")[:n]]

    def predict(self, dt: float, odometry: np.ndarray | None = None) -> None:
        cfg = self.config
        if dt <= 0:
            return
        keep = math.exp(-cfg.kidnap_rate * dt)
        if len(self.p):
            n = len(self.p)
            noise = self.rng.normal(size=(n, 3))
            if odometry is not None:
                dx, dy, dyaw = (float(v) for v in odometry)
                d = math.hypot(dx, dy)
                sd = max(cfg.odom_noise * d, 0.05)
                c, s = np.cos(self.p[:, 2]), np.sin(self.p[:, 2])
                self.p[:, 0] += c * dx - s * dy + noise[:, 0] * sd
                self.p[:, 1] += s * dx + c * dy + noise[:, 1] * sd
                self.p[:, 2] += dyaw + noise[:, 2] * math.radians(2.0)
                self.p[:, 3] = dx / dt
            else:
                self.p[:, 3] = np.clip(self.p[:, 3] + self.rng.normal(size=n) * cfg.accel_std * dt,
                                       -cfg.max_speed, cfg.max_speed)
                step = self.p[:, 3] * dt
                jitter = 0.5 * cfg.accel_std * dt * dt + 0.1
                self.p[:, 0] += np.cos(self.p[:, 2]) * step + noise[:, 0] * jitter
                self.p[:, 1] += np.sin(self.p[:, 2]) * step + noise[:, 1] * jitter
                self.p[:, 2] += noise[:, 2] * math.radians(5.0) * math.sqrt(dt)
        self.w *= keep
        self.uniform = self.uniform * keep + (1 - keep) * (1 - cfg.elsewhere_prior)
        self.elsewhere = self.elsewhere * keep + (1 - keep) * cfg.elsewhere_prior
        self._normalise()

    def _likelihood(self, entries: np.ndarray, lr: np.ndarray, rest: float) -> np.ndarray:
        """Kernel-weighted mean likelihood ratio of the entries around each particle."""
        table = np.full(self.num_entries, math.exp(rest))
        table[entries] = lr
        near = self._nearest()
        out = np.full(len(self.p), math.exp(rest))
        ok = near >= 0
        if not ok.any():
            return out
        # the nearest entry and its neighbours within 2 spacings (pairs from the grid)
        src = np.unique(near[ok])
        row, dest = self.inner._grid.pairs(src, 2.0 * self.spacing)
        pos = np.searchsorted(src, near[ok])
        starts = np.searchsorted(row, np.arange(len(src)))
        ends = np.r_[starts[1:], len(row)]
        sig, sig_h = max(self.spacing, 1.0), math.radians(self.config.heading_std_deg)
        idx = np.flatnonzero(ok)
        for k, (a, b) in enumerate(zip(starts, ends)):
            members = np.flatnonzero(pos == k)
            if not len(members):
                continue
            cand = dest[a:b]
            pp = self.p[idx[members]]
            d2 = ((pp[:, None, :2] - self.xy[cand][None]) ** 2).sum(-1)
            dh = _wrap(pp[:, None, 2] - self.yaw[cand][None])
            kern = np.exp(-0.5 * d2 / sig ** 2 - 0.5 * (dh / sig_h) ** 2)
            z = kern.sum(1)
            out[idx[members]] = np.where(z > 1e-9, (kern * table[cand][None]).sum(1) / np.maximum(z, 1e-300),
                                         math.exp(rest))
        return out

    def update(self, entries: np.ndarray, log_lr: np.ndarray, rest_log_lr: float) -> None:
        entries = np.asarray(entries, np.int64)
        lr = np.exp(np.asarray(log_lr, np.float64))
        if len(self.p):
            self.w = self.w * self._likelihood(entries, lr, rest_log_lr)
        # the uniform prior's share at the observed entries becomes particles there
        share = self.uniform / self.num_entries
        new_w = share * lr
        per = max(1, self.n // 200)
        spawn = np.repeat(entries, per)
        if len(spawn):
            p = np.zeros((len(spawn), 4))
            p[:, :2] = self.xy[spawn] + self.rng.normal(size=(len(spawn), 2)) * 0.5 * self.spacing
            p[:, 2] = self.yaw[spawn] + self.rng.normal(size=len(spawn)) * math.radians(10)
            p[:, 3] = self.rng.uniform(-self.config.max_speed, self.config.max_speed, len(spawn))
            self.p = np.vstack([self.p, p])
            self.w = np.r_[self.w, np.repeat(new_w / per, per)]
        self.uniform = share * max(self.num_entries - len(entries), 0) * math.exp(rest_log_lr)
        self._normalise()
        self._resample()

    def hold(self, since: float, until: float) -> None:
        """MapBelief.hold for particles: each particle's weight by its speed, the mass on the map kept."""
        if until <= since or not len(self.p):
            return
        before = float(self.w.sum())
        w = self.w * np.exp(-0.5 * self.p[:, 3] ** 2 * (until ** 2 - since ** 2) / self.inner.position_std ** 2)
        if w.sum() > 1e-12 * before:
            self.w = w * (before / w.sum())
        else:
            self.p[:, 3] = 0.0

    def _normalise(self) -> None:
        total = float(self.w.sum()) + self.uniform + self.elsewhere
        self.w /= total
        self.uniform /= total
        self.elsewhere /= total

    def _resample(self) -> None:
        on_map = float(self.w.sum())
        if not len(self.p) or on_map <= 0:
            return
        ess = on_map ** 2 / float((self.w ** 2).sum())
        if len(self.p) <= self.n and ess >= self.n / 2:
            return
        c = np.cumsum(self.w / on_map)
        u = (self.rng.random() + np.arange(self.n)) / self.n
        pick = np.minimum(np.searchsorted(c, u), len(c) - 1)
        self.p = self.p[pick].copy()
        self.w = np.full(self.n, on_map / self.n)

    def place(self) -> Place | None:
        near = self._nearest()
        ok = near >= 0
        if not ok.any():
            return None
        ent, inv = np.unique(near[ok], return_inverse=True)
        m = np.bincount(inv, weights=self.w[ok], minlength=len(ent))
        b = ent[int(np.argmax(m))]
        p, w = self.p[ok], self.w[ok]
        sel = (np.linalg.norm(p[:, :2] - self.xy[b], axis=1) <= self.mode_radius) & (
            np.abs(_wrap(p[:, 2] - self.yaw[b])) <= math.radians(60))
        mass = float(w[sel].sum())
        if mass <= 0:
            return None
        ww = w[sel] / mass
        pose = self.inner.poses[b].copy()
        pose[:2] = ww @ p[sel, :2]
        d = p[sel, :2] - pose[:2]
        cov = np.zeros((6, 6))
        cov[:2, :2] = (ww[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) + 0.25 * np.eye(2)
        cov[2, 2] = 0.25
        cov[3, 3] = cov[4, 4] = math.radians(10) ** 2
        cov[5, 5] = float(ww @ _wrap(p[sel, 2] - self.yaw[b]) ** 2) + math.radians(3) ** 2
        cov[:3, :3] /= max(mass, 0.05)
        return Place(pose=pose, covariance=cov, mass=mass, entries=np.unique(near[ok][sel]),
                     speed=float(ww @ p[sel, 3]))


# ------------------------------------------------------------------------------------------ runs

def run(table, order: np.ndarray, make_belief, cfg: TrackingConfig, odometry: np.ndarray | None,
        tracker_cls: type[Tracker] = Tracker, dt: np.ndarray | None = None) -> dict:
    """The tracker on a score table, frames played in `order`, `dt` seconds after the one before (0.1).
    A frame repeated in `order` is the camera of a standing robot (plays "~stops"): the figures are over the
    frames where the robot moves; `standing_frames`, `reranked_per_frame_all`, `standing_still` (frames the
    tracker took for standing), `standing_published` and `standing_gross` (> 25 m off) count the repeats."""
    from r2former_core.evaluation import CHI2_2D_95, GROSS_M, SequenceFrame, SequenceResult
    loc = TableLocalizer(table)
    tracker = tracker_cls(loc, cfg, belief=make_belief(loc) if make_belief else None)
    res = SequenceResult()
    stamps = table["stamps"][0] + play_times(len(order), dt)
    filter_ms, reranked, still, coasted, standing_published, standing_gross = [], [], 0, 0, 0, 0
    for k, i in enumerate(order):
        t = time.perf_counter()
        r = tracker.step(stamps[k], features=(np.array([i]), None),
                         odom_pose=None if odometry is None else odometry[k], with_matches=False)
        filter_ms.append((time.perf_counter() - t) * 1000)
        reranked.append(r.reranked)
        still += int(r.still)
        coasted += int(r.coasted)
        if k and order[k - 1] == i:
            if r.accepted:
                standing_published += 1
                standing_gross += int(np.linalg.norm(r.pose[:2] - table["query_poses"][i][:2]) > GROSS_M)
            continue
        fr = SequenceFrame(str(i), stamps[k], table["query_poses"][i])
        res.add(fr, r.pose, r.covariance, r.accepted, filter_ms[-1], r.reranked, r.state)
    out = res.summary()
    out["filter_ms"] = float(np.mean(filter_ms))
    out["standing_frames"] = len(order) - out["frames"]
    out["standing_still"] = still
    out["coasted_frames"] = coasted
    out["standing_published"], out["standing_gross"] = standing_published, standing_gross
    out["reranked_per_frame_all"] = float(np.mean(reranked))
    err, m2 = np.asarray(res.errors_m), np.asarray(res.mahalanobis2)
    with np.errstate(invalid="ignore"):     # published poses outside their ellipse yet on the right road
        out["outside_5_25m"] = int(np.sum((m2 > CHI2_2D_95) & (err > 5.0) & (err <= GROSS_M)))
    return out


def single(table, order: np.ndarray) -> dict:
    from r2former_core.evaluation import SequenceFrame, SequenceResult
    loc = TableLocalizer(table)
    res = SequenceResult()
    for k, i in enumerate(order):
        if k and order[k - 1] == i:      # a standing robot's repeated view (~stops): counted once
            continue
        r = loc.localize_features(np.array([i]), None)
        res.add(SequenceFrame(str(i), 0.0, table["query_poses"][i]), r.pose, r.covariance, r.accepted, 0.0,
                len(r.candidates), "single")
    return res.summary()


# segments of "kidnaps:K" in play order: every jump carries the robot to another part of the loop
_SEGMENT_ORDER = {1: (1, 0), 2: (1, 2, 0), 3: (2, 0, 3, 1), 4: (2, 4, 0, 3, 1)}


def play_order(name: str, n: int) -> np.ndarray:
    """Frame order of a run: "drive" (time order), "kidnap[@F]" (from F of the drive to its end, then from
    its start: at that point the robot is carried back; F = 0.5 by default) or "kidnaps:K" (the drive cut
    into K + 1 equal parts played in a fixed shuffled order: K kidnaps, 1 <= K <= 4). A speed suffix
    (~slow, ~wave) changes only the times, ~stops repeats frames as well (`play`)."""
    name = name.partition("~")[0]
    if name == "drive":
        return np.arange(n)
    if name.startswith("kidnaps:"):
        k = int(name.split(":")[1]) if name.split(":")[1].isdigit() else 0
        if k not in _SEGMENT_ORDER:
            raise SystemExit(f"unknown order {name!r}: kidnaps:K with 1 <= K <= 4")
        cuts = np.linspace(0, n, k + 2).astype(int)
        return np.concatenate([np.arange(cuts[j], cuts[j + 1]) for j in _SEGMENT_ORDER[k]])
    base, _, frac = name.partition("@")
    if base != "kidnap" or not 0 < (f := float(frac or 0.5)) < 1:
        raise SystemExit(f"unknown order {name!r}: drive, kidnap, kidnap@F with 0 < F < 1 or kidnaps:K")
    c = int(n * f)
    return np.r_[np.arange(c, n), np.arange(c)]


def play(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame order and the seconds between frames of a run: `play_order`'s name, optionally with a speed:
    "~slow" (10 m/s: the frames 0.2 s apart), "~wave" (a speed varying smoothly between 6 and 22 m/s with a
    15 s period, at most 3.4 m/s^2, continued across the kidnaps) or "~stops" (10 m/s with three stops of
    10 s: `stops`); without one, 20 m/s (0.1 s)."""
    order = play_order(name, n)
    speed = name.partition("~")[2]
    if speed == "":
        return order, np.full(len(order), 0.1)
    if speed == "slow":
        return order, np.full(len(order), 0.2)
    if speed == "wave":
        dt, t = np.zeros(len(order)), 0.0
        for k in range(len(order)):
            dt[k] = SPACING_M / (14.0 - 8.0 * math.cos(2 * math.pi * t / 15.0))
            t += dt[k]
        return order, dt
    if speed == "stops":
        return stops(order)
    raise SystemExit(f"unknown speed {speed!r} in {name!r}: ~slow, ~wave or ~stops")


def stops(order: np.ndarray, cruise: float = 10.0, accel: float = 2.0, seconds: float = 10.0,
          at: tuple[float, ...] = (0.25, 0.5, 0.75)) -> tuple[np.ndarray, np.ndarray]:
    """A robot that stops three times (at a quarter, half and three quarters of the play) for `seconds`:
    between stops it drives `cruise` m/s, braking and starting at `accel` m/s^2; while it stands its camera
    sends the same view at 10 Hz (the frame repeated in the order). The table's frames are 2 m apart, so
    braking and starting are frames further apart in time."""
    n = len(order)
    halts = sorted({min(n - 1, max(1, int(round(f * n)))) for f in at})
    # speed at each point of the play (in metres from the start), slowed to zero at the stops
    s = np.linspace(0.0, SPACING_M * (n - 1), 20 * (n - 1) + 1)
    to_stop = np.min(np.abs(s[:, None] - SPACING_M * np.asarray(halts)[None, :]), axis=1)
    v = np.maximum(np.minimum(cruise, np.sqrt(2 * accel * to_stop)), 0.05)
    seg = (1.0 / v[:-1] + 1.0 / v[1:]) / 2 * np.diff(s)       # trapezoid of ds / v
    step_dt = np.add.reduceat(seg, np.arange(0, len(seg), 20))
    frames, dts = [], []
    for k in range(n):
        frames.append(order[k])
        dts.append(0.1 if k == 0 else float(step_dt[k - 1]))
        if k in halts:
            repeats = int(round(seconds / 0.1))
            frames += [order[k]] * repeats
            dts += [0.1] * repeats
    return np.asarray(frames), np.asarray(dts)


def play_times(n: int, dt: np.ndarray | None) -> np.ndarray:
    """Stamps (from 0) of n frames played `dt` seconds after the one before (dt[0] unused; None: 0.1 s)."""
    if dt is None:
        return 0.1 * np.arange(n)
    return np.r_[0.0, np.cumsum(np.asarray(dt, np.float64)[1:n])]


def pool(summaries: list[dict]) -> dict:
    """Figures over all frames of several runs (from their summaries)."""
    out = pool_summaries(summaries, ("within_5m", "gross_error_rate", "reranked_per_frame", "published"))
    out["gross_frames"] = int(round(out["gross_error_rate"] * out["frames"]))
    # the calibration band, world by world
    out["worlds_calibrated"] = sum(1 for s in summaries if s["calibration"] is not None
                                   and 0.90 <= s["calibration"] <= 0.98)
    out["worlds_too_narrow"] = sum(1 for s in summaries if s["calibration"] is not None and s["calibration"] < 0.90)
    out["worlds"] = len(summaries)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (any format load_model reads)")
    p.add_argument("--sets", default=DEFAULT_SETS,
                   help=f"query sets SEED:CONDITIONS (conditions joined by +), comma separated, or "
                        f"night+fog-validation (the 20 worlds {', '.join(map(str, NIGHT_FOG_WORLDS))} at night in "
                        f"fog) (default {DEFAULT_SETS})")
    p.add_argument("--orders", default="drive,kidnap",
                   help="play orders, comma separated: drive (time order), kidnap (second half first), kidnap@F "
                        "(from fraction F of the drive on first), kidnaps:K (K kidnaps, 1-4), each optionally "
                        "with a speed ~slow (10 m/s), ~wave (6-22 m/s) or ~stops (10 m/s, three 10 s stops); "
                        "'calibration' = the third round's 10 "
                        f"plays ({PLAIN_ORDERS},{STRESS_ORDERS}) (default drive,kidnap)")
    p.add_argument("--size", default="256x320", help="rendered image size HxW (default 256x320, as the demo)")
    p.add_argument("--map-frames", type=int, default=210, help="frames of the map drive, once around (default 210)")
    p.add_argument("--query-frames", type=int, default=160, help="frames of each query drive (default 160)")
    p.add_argument("--query-spacing", type=float, default=None,
                   help="metres between query frames (default: 2 m, 20 m/s at the plays' 10 Hz); e.g. 0.15 for a "
                        "ground robot at 1.5 m/s (the ~wave and ~stops speeds assume 2 m)")
    p.add_argument("--particles", type=int, default=2000,
                   help="particles of the particle filter (default 2000; 0 = leave the particle filter out)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="entries-filter variants to run besides the filter comparison, comma separated, from: "
                        f"{', '.join(VARIANTS)} (default all; '' = none)")
    p.add_argument("--work", default="runs/tracking", help="drives, maps and score tables (default runs/tracking)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default="bench/results/tracking_filters.json", help="JSON report path")
    args = p.parse_args(argv)
    sets = ",".join(f"{w}:night+fog" for w in NIGHT_FOG_WORLDS) if args.sets == "night+fog-validation" else args.sets
    orders = f"{PLAIN_ORDERS},{STRESS_ORDERS}" if args.orders == "calibration" else args.orders
    unknown = [v for v in filter(None, args.variants.split(",")) if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    from r2former_core.model import load_model
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    size = tuple(int(v) for v in args.size.split("x"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = TrackingConfig()
    # (belief factory, config, tracker class) per row: the two filters on the defaults, then the entries
    # filter's variants
    setups = {"entries": (None, cfg, Tracker)}
    if args.particles > 0:
        setups["particles"] = (lambda loc: ParticleBelief(loc.map.poses, loc.map.keyframe_spacing(), cfg,
                                                          particles=args.particles), cfg, Tracker)
    for name in filter(None, args.variants.split(",")):
        if name != "defaults":
            v = VARIANTS[name]
            config = TrackingConfig(**v.config)
            make = (lambda loc, b=v.belief, c=config: b(loc.map.poses, loc.map.keyframe_spacing(), c)) \
                if v.belief else None
            setups[f"entries: {name}"] = (make, config, v.tracker)
    report: dict = {"sets": {}, "meta": {"machine": machine_info(torch.get_num_threads()),
                                        "model": args.model, "size": list(size), "map_frames": args.map_frames,
                                         "query_frames": args.query_frames, "query_spacing": args.query_spacing,
                                         "particles": args.particles,
                                         "orders": orders}}
    for item in tqdm(sets.split(","), desc="sets", unit="set", disable=None):
        seed, cond = item.split(":")
        table = dict(np.load(score_table(model, int(seed), cond, work, size, args.map_frames, args.query_frames,
                                         args.query_spacing)))
        n = len(table["stamps"])
        rows = {}
        for oname in orders.split(","):
            order, dt = play(oname, n)
            rows[f"single/{oname}"] = single(table, order)
            for fname, (make, config, tracker_cls) in setups.items():
                for odo in (False, True):
                    odom = odometry_in_play_order(table["query_poses"], order, int(seed)) if odo else None
                    rows[f"{fname}/{oname}{'/odometry' if odo else ''}"] = run(table, order, make, config, odom,
                                                                               tracker_cls, dt)
        report["sets"][item] = rows
        print(f"\n== {item}")
        print(f"{'run':<60} {'within 5 m':>10} {'> 25 m':>7} {'in 95%':>7} {'reranked':>9} {'filter ms':>10}")
        for name, s in rows.items():
            cal = "-" if s["calibration"] is None else f"{100 * s['calibration']:.0f}%"
            print(f"{name:<60} {100 * s['within_5m']:>9.1f}% {100 * s['gross_error_rate']:>6.1f}% {cal:>7} "
                  f"{s['reranked_per_frame']:>9.1f} {s.get('filter_ms', 0):>10.1f}")
    names = list(next(iter(report["sets"].values())))
    mean = {n: {k: float(np.mean([r[n][k] for r in report["sets"].values() if r[n][k] is not None]))
                for k in ("within_5m", "gross_error_rate", "calibration", "reranked_per_frame")}
            for n in names}
    for n in names:
        if "filter_ms" in report["sets"][next(iter(report["sets"]))][n]:
            mean[n]["filter_ms"] = float(np.mean([r[n]["filter_ms"] for r in report["sets"].values()]))
    report["mean"] = mean
    report["pooled"] = {n: pool([r[n] for r in report["sets"].values()]) for n in names}
    for n in names:     # the issue's gross-error target world by world: at most a quarter of single frames'
        ref = "single/" + n.removesuffix("/odometry").rsplit("/", 1)[1]    # (variant names may hold a "/")
        report["pooled"][n]["worlds_gross_quarter"] = sum(
            1 for r in report["sets"].values() if r[n]["gross_error_rate"] <= r[ref]["gross_error_rate"] / 4 + 1e-9)
    print(f"\n== mean of {len(report['sets'])} sets")
    for name, s in mean.items():
        print(f"{name:<60} {100 * s['within_5m']:>9.1f}% {100 * s['gross_error_rate']:>6.1f}% "
              f"{100 * s['calibration']:>6.0f}% {s['reranked_per_frame']:>9.1f} {s.get('filter_ms', 0):>10.1f}")
    print(f"\n== pooled over the {len(report['sets'])} sets (frames), worlds with 90-98 % inside the 95 % ellipse")
    print(f"{'run':<60} {'within 5 m':>10} {'> 25 m':>7} {'frames':>6} {'in 95%':>7} {'reranked':>9} "
          f"{'in band':>8} {'< 90 %':>6} {'gross <= single/4':>17}")
    for name, s in report["pooled"].items():
        cal = "-" if s["calibration"] is None else f"{100 * s['calibration']:.1f}%"
        print(f"{name:<60} {100 * s['within_5m']:>9.1f}% {100 * s['gross_error_rate']:>6.1f}% {s['gross_frames']:>6} "
              f"{cal:>7} {s['reranked_per_frame']:>9.1f} {s['worlds_calibrated']:>5}/{s['worlds']:<2} "
              f"{s['worlds_too_narrow']:>6} {s['worlds_gross_quarter']:>14}/{s['worlds']:<2}")
    report["plays"] = {f: all_plays([r[n] for r in report["sets"].values() for n in names
                                     if n.startswith(f + "/")]) for f in setups}
    print("\n== every play of each filter (all sets, orders, with and without odometry): plays with 90-98 % inside "
          "the 95 % ellipse")
    print(f"{'filter':<60} {'plays':>5} {'in band':>7} {'< 90 %':>6} {'> 98 %':>6} {'in 95%':>7} {'within 5 m':>10} "
          f"{'> 25 m':>7} {'5-25 m outside':>14}")
    for name, s in report["plays"].items():
        print(f"{name:<60} {s['plays']:>5} {100 * s['in_band']:>6.1f}% {100 * s['too_narrow']:>5.1f}% "
              f"{100 * s['too_wide']:>5.1f}% {100 * s['calibration']:>6.1f}% {100 * s['within_5m']:>9.1f}% "
              f"{100 * s['gross_error_rate']:>6.2f}% {s['outside_5_25m']:>14}")
    write_report(args.out, report)
    return 0


def all_plays(summaries: list[dict]) -> dict:
    """Calibration play by play (each run of a filter on one set), and pooled figures over all of them."""
    cal = [s["calibration"] for s in summaries if s["calibration"] is not None]
    out = pool(summaries)
    return {"plays": len(summaries), "plays_publishing": len(cal),
            "in_band": float(np.mean([0.90 <= c <= 0.98 for c in cal])) if cal else 0.0,
            "too_narrow": float(np.mean([c < 0.90 for c in cal])) if cal else 0.0,
            "too_wide": float(np.mean([c > 0.98 for c in cal])) if cal else 0.0,
            "calibration": out["calibration"], "within_5m": out["within_5m"],
            "gross_error_rate": out["gross_error_rate"], "published": out["published"],
            "outside_5_25m": sum(s.get("outside_5_25m", 0) for s in summaries)}


if __name__ == "__main__":
    raise SystemExit(main())
