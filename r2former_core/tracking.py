"""Tracking: a recursive Bayes filter over the map's entries that follows the robot between frames.

Single-frame localization answers every frame on its own, so a look-alike place wins now and then
and the pose jumps across the map. A robot moves continuously and the map is a set of posed images
along its drives; the tracker uses both (docs/TRACKING.md has the design, the measurements and why
this form was chosen over a particle filter).

The belief is a probability over (map entry, speed along the entry's heading), kept for the few
hundred entries where the robot can be (the support), plus two scalars: *anywhere on the map*
(spread uniformly over all entries: the prior a kidnap falls back to) and *elsewhere* (not on the
map: the observation is explained by no entry). Per frame:

1. predict: with an odometry increment (forward, left, turn in the robot frame) every entry's mass
   moves to the entries near the entry's pose composed with the increment; without odometry each
   speed state moves its mass along the entry's heading by speed x dt and the speed changes by at
   most a few m/s^2 (`accel_std`), bounded by `max_speed`. So the filter estimates a velocity: the
   motion has a direction even without odometry. A little of the belief returns to the prior every
   second (`kidnap_rate`), which is what lets a new place take over after a kidnap.
2. choose candidates: while tracking, the support's most probable entries (`track_candidates`) plus a
   few of the global top-k (`kidnap_candidates`, to notice a kidnap); otherwise (global search, lost) the
   best `global_candidates` of the global top-k, chosen by the retrieval and not by the belief (which is
   not to be trusted yet), so that no frame reranks more than that. The localizer reranks exactly these.
3. update: each reranked entry's score becomes a likelihood ratio against "elsewhere" (calibrated:
   log LR = score_gain x normalised logit + score_bias, bounded by `max_log_lr`); entries not reranked
   use their global cosine (global_gain, global_bias). The logit is normalised by the entry's typical
   score (`ScoreNormaliser`: look-alike stretches that score high against every query count less) and by
   the frame's level (the median of its global top candidates), and counts only as far as the entry's
   typical score is known. Hypotheses the update adds (the "anywhere" share at newly observed entries)
   take the belief's current speed distribution: a kidnap moves the robot, not its speed.
4. publish: the most probable entry and its neighbours within `mode_radius` form the place; its
   probability is the confidence. Pose = mass-weighted position (orientation of the most probable
   entry), covariance = a floor (half the keyframe spacing) plus `spread_weight` x the place's spread
   and, without odometry, the speed's variance x `speed_horizon`^2 along the heading (an uncertain speed
   puts the robot ahead of or behind the place), widened when the place holds less than all of the
   belief. Below `min_mass` nothing is published: a split belief is not a pose.

Standing still: a camera on a robot that stands sends the same view again and again, and counting each
repeat as a new observation would sharpen the belief on whatever entry that view scores best against
(at night a look-alike as often as not). A frame whose global descriptor differs from the last frame used
by less than `still_view_change` times the map's typical change between neighbouring entries
(`Localizer.view_scale`), and whose odometry, if any, has not moved either, is held, in every state: no
observation, nothing reranked, the last result repeated; after 1.5 s the speed goes to zero
(`MapBelief.hold`) and, once the robot is known to stand, a change up to 5 times that is still held.

A slow robot (`update_spacing`): frames nearer than that fraction of the map's keyframe spacing to the last
used frame (by odometry; without it, by the view's change and the filter's speed) are coasted for up to
`max_update_interval` s: no observation, nothing reranked, the last result republished (moved by the
odometry since). The calibration was fitted on frames about a keyframe spacing apart; observed every
0.15 m, the same view counted a dozen times and made the belief sure of whatever it first favoured.
The return to the prior is per metre below `kidnap_speed` for the same reason. Odometry that stands
(under 5 cm) under a view that changed more than a standing robot's may is not "near": the robot was
carried (a kidnap shows no odometry), and the frame is used.

States: `global` (no place yet: global search), `tracking` (a place holds at least
`track_mass`), `lost` (below it for `lost_frames` frames: global search again until a place holds it).

Stamps: frames must come in time order. A frame with the stamp of the last one (a duplicate) or an
older one (out of order, less than `reset_jump` seconds back) is not used: the result is not accepted,
nothing is reranked and the filter is unchanged. A stamp more than `reset_jump` seconds before the last
(a replayed or looped bag) resets the filter, and a gap longer than `max_gap` seconds restarts the
global search (a prediction over such a gap says nothing).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .data.poses import compose_poses, invert_poses, normalize_quat, quat_from_yaw, quat_multiply, yaw_from_quat
from .localizer import Localizer
from .options import TrackingConfig
from .pose import normalised_scores
from .results import LocalizationResult

log = logging.getLogger(__name__)

STATES = ("global", "tracking", "lost")
_MODE_HEADING = math.radians(60.0)      # entries facing further away than this are another place
_OFF_MAP = math.exp(-0.5 * 3.0 ** 2)    # weight of "no entry there": as if one entry sat 3 sigma away
_PRUNE = 1e-5                           # entries below this fraction of the most probable one are dropped
_STILL_ODOM_M = 0.05                    # m: odometry moving more than this is motion, whatever the view
_STILL_TURN = 0.2                       # rad: odometry turning more than this is motion, whatever the view
_STILL_TIME = 1.5                       # s of an unchanged view after which the robot is taken to stand
_STANDING_TOLERANCE = 5.0               # x still_view_change: the view change a standing robot's frames may show


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def _erf(x: np.ndarray) -> np.ndarray:
    """Error function (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7); numpy has none."""
    x = np.asarray(x, dtype=np.float64)
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-a * a))


def planar_increment(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """(forward, left, turn) motion from pose `previous` to pose `current` (7,), in the previous pose's frame."""
    rel = compose_poses(invert_poses(np.asarray(previous, np.float64)), np.asarray(current, np.float64))
    return np.array([rel[0], rel[1], float(yaw_from_quat(rel[3:]))])


def _dead_reckon(pose: np.ndarray, covariance: np.ndarray, increment: np.ndarray,
                 odom_noise: float) -> tuple[np.ndarray, np.ndarray]:
    """`pose` (7,) moved by a planar odometry `increment` (forward, left, turn in the robot frame); the
    covariance grows by (odom_noise x distance)^2 in x and y (and the turn's share in yaw)."""
    forward, left, turn = (float(v) for v in increment)
    out = np.array(pose, np.float64, copy=True)
    yaw = float(yaw_from_quat(out[3:]))               # planar, as the filter's prediction (MapBelief.predict)
    out[0] += forward * math.cos(yaw) - left * math.sin(yaw)
    out[1] += forward * math.sin(yaw) + left * math.cos(yaw)
    out[3:] = normalize_quat(quat_multiply(quat_from_yaw(turn), out[3:]))
    cov = np.array(covariance, np.float64, copy=True)
    grow = (odom_noise * math.hypot(forward, left)) ** 2
    cov[0, 0] += grow
    cov[1, 1] += grow
    cov[5, 5] += (odom_noise * turn) ** 2
    return out, cov


class _Grid:
    """Map entries bucketed by position, for "which entries lie within r of these entries" in a few numpy calls."""

    def __init__(self, xy: np.ndarray, cell: float):
        self.xy = np.asarray(xy, np.float64)
        self.cell = float(cell)
        keys = np.floor(self.xy / self.cell).astype(np.int64)
        self.keys = keys
        codes = self._code(keys)
        order = np.argsort(codes, kind="stable")
        self.codes, starts, counts = np.unique(codes[order], return_index=True, return_counts=True)
        width = int(counts.max()) if len(counts) else 1
        self.members = np.full((len(self.codes), width), -1, np.int64)     # entries of each cell, -1 padded
        col = np.arange(len(order)) - np.repeat(starts, counts)
        self.members[np.repeat(np.arange(len(self.codes)), counts), col] = order

    @staticmethod
    def _code(keys: np.ndarray) -> np.ndarray:
        return (keys[..., 0] + (1 << 31)) * (1 << 32) + (keys[..., 1] + (1 << 31))

    def pairs(self, sources: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """(source, entry) index pairs with the entry within `radius` of the source entry, sorted by source
        position in `sources` (every source pairs with itself)."""
        sources = np.asarray(sources, np.int64)
        rings = int(math.ceil(radius / self.cell))
        off = np.arange(-rings, rings + 1)
        offsets = np.stack(np.meshgrid(off, off, indexing="ij"), -1).reshape(-1, 2)
        cells = self._code(self.keys[sources][:, None, :] + offsets[None, :, :])       # (S, O)
        pos = np.minimum(np.searchsorted(self.codes, cells), len(self.codes) - 1)
        found = self.codes[pos] == cells
        cand = np.where(found[..., None], self.members[pos], -1).reshape(len(sources), -1)   # (S, O*W)
        rows, cols = np.nonzero(cand >= 0)
        ent = cand[rows, cols]
        d2 = ((self.xy[ent] - self.xy[sources[rows]]) ** 2).sum(1)
        keep = d2 <= radius * radius
        return rows[keep], ent[keep]


@dataclass
class Place:
    """The belief's most probable place."""
    pose: np.ndarray          # (7,) map frame
    covariance: np.ndarray    # (6, 6) x y z roll pitch yaw
    mass: float               # probability that the robot is there
    entries: np.ndarray       # map entries forming the place
    speed: float              # m/s along the heading (mean over the place)
    speed_std: float = 0.0    # m/s, its standard deviation


class MapBelief:
    """The filter itself (no model, no ROS): probability over (map entry, speed) plus "anywhere on the map"
    and "elsewhere". See the module docstring for the model."""

    def __init__(self, map_poses: np.ndarray, keyframe_spacing: float, config: TrackingConfig = TrackingConfig(),
                 min_position_std: float = 0.5, min_yaw_std_deg: float = 3.0, roll_pitch_std_deg: float = 10.0):
        self.config = config.validate()
        poses = np.asarray(map_poses, np.float64)
        self.poses = poses
        self.xy = poses[:, :2].copy()
        self.z = poses[:, 2].copy()
        self.yaw = np.asarray(yaw_from_quat(poses[:, 3:]), np.float64).reshape(-1)
        self.heading = np.stack([np.cos(self.yaw), np.sin(self.yaw)], 1)
        self.spacing = max(float(keyframe_spacing), 0.1)
        self.speed_resolution = config.speed_resolution or config.max_speed / 10.0
        n = int(math.ceil(config.max_speed / self.speed_resolution - 1e-9))
        self.speeds = np.clip(np.arange(-n, n + 1) * self.speed_resolution, -config.max_speed, config.max_speed)
        self.position_std = config.position_std or self.spacing
        self.mode_radius = config.mode_radius or max(10.0, 4.0 * self.spacing)
        self.min_position_std = float(min_position_std)
        self.min_yaw_std = math.radians(min_yaw_std_deg)
        self.roll_pitch_std = math.radians(roll_pitch_std_deg)
        self._grid = _Grid(self.xy, max(self.mode_radius, 4.0 * self.spacing))
        self._speed_cache: dict[float, np.ndarray] = {}
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to the prior: anywhere on the map, or elsewhere."""
        self.entries = np.zeros(0, np.int64)
        self.mass = np.zeros((0, len(self.speeds)))
        self.elsewhere = self.config.elsewhere_prior
        self.uniform = 1.0 - self.elsewhere
        self.odometry_predicted = False     # the last prediction moved the belief by odometry (speed measured)

    def __len__(self) -> int:
        """Support size: map entries the belief holds explicitly."""
        return len(self.entries)

    @property
    def num_entries(self) -> int:
        return len(self.xy)

    def marginal(self) -> np.ndarray:
        """Probability of each support entry (summed over speeds)."""
        return self.mass.sum(1)

    def speed_distribution(self) -> np.ndarray:
        """Probability of each speed state: the support's mass summed over entries, with the mass that has no
        speed (anywhere on the map, elsewhere) spread evenly over the states. New hypotheses start from it:
        when the robot is carried elsewhere (a kidnap) or the belief was on a look-alike place, the place
        changes but the robot's speed does not, so a place found anew need not learn the speed again. With
        an empty support (start, reset) it is uniform."""
        p = self.mass.sum(0) + (self.uniform + self.elsewhere) / len(self.speeds)
        total = float(p.sum())
        return p / total if total > 0 else np.full(len(self.speeds), 1.0 / len(self.speeds))

    def most_probable(self, n: int) -> np.ndarray:
        """Up to n support entries, most probable first."""
        if not len(self.entries) or n <= 0:
            return np.zeros(0, np.int64)
        m = self.marginal()
        order = np.argsort(-m, kind="stable")[:n]
        return self.entries[order]

    # ------------------------------------------------------------------ predict
    def _speed_transition(self, sigma: float) -> np.ndarray:
        """P[b', b]: probability of speed state b' after b, Gaussian change of std sigma, bounded by the bins."""
        key = round(sigma, 4)
        if key not in self._speed_cache:
            v = self.speeds
            half = 0.5 * self.speed_resolution
            if sigma < 1e-6:
                p = np.eye(len(v))
            else:
                z = np.sqrt(2.0) * sigma
                p = 0.5 * (_erf((v[:, None] + half - v[None, :]) / z) - _erf((v[:, None] - half - v[None, :]) / z))
                p /= p.sum(0, keepdims=True)
            if len(self._speed_cache) > 64:
                self._speed_cache.clear()
            self._speed_cache[key] = p
        return self._speed_cache[key]

    def _speed_prior(self, speed: float, sigma: float) -> np.ndarray:
        p = np.exp(-0.5 * ((self.speeds - speed) / max(sigma, 1e-3)) ** 2)
        total = p.sum()
        return p / total if total > 0 else np.full(len(self.speeds), 1.0 / len(self.speeds))

    def predict(self, dt: float, odometry: np.ndarray | None = None) -> None:
        """Move the belief over `dt` seconds; `odometry` = (forward, left, turn) since the last frame, or None."""
        cfg = self.config
        if dt <= 0:
            return
        keep = math.exp(-cfg.kidnap_rate * dt * self._kidnap_share(dt, odometry))
        leaked = 0.0
        self.odometry_predicted = odometry is not None
        if len(self.entries):
            src = self.entries
            if odometry is not None:
                dx, dy, dyaw = (float(v) for v in odometry)
                sigma = math.hypot(self.position_std, cfg.odom_noise * math.hypot(dx, dy))
                reach = math.hypot(dx, dy)
            else:
                dx = dy = dyaw = 0.0
                sigma = math.hypot(self.position_std, 0.5 * cfg.accel_std * dt * dt)
                reach = cfg.max_speed * dt
            row, dest = self._grid.pairs(src, reach + 3.0 * sigma)
            i = src[row]
            # destination relative to the source entry, in the source entry's frame (along, left)
            rel = self.xy[dest] - self.xy[i]
            h = self.heading[i]
            along = rel[:, 0] * h[:, 0] + rel[:, 1] * h[:, 1]
            left = rel[:, 1] * h[:, 0] - rel[:, 0] * h[:, 1]
            turn = _wrap(self.yaw[dest] - self.yaw[i] - dyaw)
            log_k = -0.5 * (turn / math.radians(cfg.heading_std_deg)) ** 2
            if odometry is not None:
                k = np.exp(log_k - 0.5 * ((along - dx) ** 2 + (left - dy) ** 2) / sigma ** 2)[:, None]
                weight = self.marginal()[:, None]
            else:
                k = np.exp((log_k - 0.5 * left ** 2 / sigma ** 2)[:, None]
                           - 0.5 * ((along[:, None] - self.speeds[None, :] * dt) / sigma) ** 2)
                weight = self.mass
            z = np.add.reduceat(k, np.searchsorted(row, np.arange(len(src))), axis=0)   # every source has a pair
            leaked = float((weight * (_OFF_MAP / (z + _OFF_MAP))).sum())
            flow = weight[row] * k / (z[row] + _OFF_MAP)                                  # (pairs, B or 1)
            dest_u, inv = np.unique(dest, return_inverse=True)
            order = np.argsort(inv, kind="stable")
            moved = np.add.reduceat(flow[order], np.searchsorted(inv[order], np.arange(len(dest_u))), axis=0)
            if odometry is not None:
                spread = math.hypot(self.speed_resolution, cfg.odom_noise * abs(dx) / dt)
                mass = moved * self._speed_prior(dx / dt, spread)[None, :]
            else:
                mass = moved @ self._speed_transition(cfg.accel_std * dt).T
            self.entries, self.mass = dest_u, mass
            self._prune()
        prior_else = cfg.elsewhere_prior
        self.mass *= keep
        self.uniform = self.uniform * keep + (1.0 - keep) * (1.0 - prior_else)
        self.elsewhere = (self.elsewhere + leaked) * keep + (1.0 - keep) * prior_else
        self._normalise()

    def _kidnap_share(self, dt: float, odometry: np.ndarray | None) -> float:
        """The share of `kidnap_rate` for a step: 1, or with `kidnap_speed` the speed over it (at most 1), the
        speed from the odometry or else the belief's mean |speed|: a rate per metre driven below it."""
        ref = self.config.kidnap_speed
        if ref <= 0:
            return 1.0
        if odometry is not None:
            speed = math.hypot(float(odometry[0]), float(odometry[1])) / dt
        else:
            speed = float(self.speed_distribution() @ np.abs(self.speeds))
        return min(1.0, speed / ref)

    # ------------------------------------------------------------------ update
    def update(self, entries: np.ndarray, log_lr: np.ndarray, rest_log_lr: float) -> None:
        """Bayes update with per-entry log likelihood ratios (against "elsewhere").

        `entries` must include every support entry; `rest_log_lr` applies to the map entries not listed
        (the part of "anywhere on the map" that was not observed)."""
        entries = np.asarray(entries, np.int64)
        lr = np.exp(np.asarray(log_lr, np.float64))
        order = np.argsort(entries)
        entries, lr = entries[order], lr[order]
        nb = len(self.speeds)
        share = self.uniform / self.num_entries
        birth = self.speed_distribution()
        if len(self.entries):
            pos = np.searchsorted(entries, self.entries)
            if np.any(pos >= len(entries)) or np.any(entries[np.minimum(pos, len(entries) - 1)] != self.entries):
                raise ValueError("update: every support entry needs a likelihood")
            self.mass = self.mass * lr[pos][:, None]
        # the uniform prior's share at the observed entries joins the support, with the robot's speed as the
        # belief has it (before this update's ratios)
        merged = np.union1d(self.entries, entries)
        mass = np.zeros((len(merged), nb))
        if len(self.entries):
            mass[np.searchsorted(merged, self.entries)] = self.mass
        mass[np.searchsorted(merged, entries)] += (share * lr)[:, None] * birth[None, :]
        self.entries, self.mass = merged, mass
        unobserved = max(self.num_entries - len(entries), 0)
        self.uniform = share * unobserved * math.exp(rest_log_lr)
        self._normalise()
        self._prune()

    def hold(self, since: float, until: float) -> None:
        """The view has not changed for `until` seconds since the last frame the filter used (`since` of them
        already held): the robot moved less than about `position_std` in that time, so each speed state v is
        weighed by exp(-(v t / position_std)^2 / 2) for t = until (in steps: the factor for `since` was applied
        before). Each entry keeps its probability (standing says nothing about where), only its speed changes;
        an entry whose every speed is ruled out stands at speed 0."""
        if until <= since or not len(self.entries):
            return
        f = np.exp(-0.5 * self.speeds ** 2 * (until ** 2 - since ** 2) / self.position_std ** 2)
        before = self.marginal()
        mass = self.mass * f[None, :]
        after = mass.sum(1)
        zero = np.zeros(len(self.speeds))
        zero[int(np.argmin(np.abs(self.speeds)))] = 1.0
        ok = after > 1e-12 * np.maximum(before, 1e-300)
        mass[ok] *= (before[ok] / after[ok])[:, None]
        mass[~ok] = before[~ok, None] * zero[None, :]
        self.mass = mass

    def _normalise(self) -> None:
        total = float(self.mass.sum()) + self.uniform + self.elsewhere
        if not math.isfinite(total) or total <= 0:
            log.warning("tracking belief degenerate (total %r): reset to the prior", total)
            self.reset()
            return
        self.mass /= total
        self.uniform /= total
        self.elsewhere /= total

    def _prune(self) -> None:
        if not len(self.entries):
            return
        m = self.marginal()
        keep = m >= _PRUNE * m.max()
        if keep.sum() > self.config.max_support:
            keep &= m >= np.sort(m)[-self.config.max_support]
        if not keep.all():
            self.uniform += float(m[~keep].sum())
            self.entries, self.mass = self.entries[keep], self.mass[keep]

    def seed(self, xy: np.ndarray, yaw: float, position_std: float, yaw_std: float) -> int:
        """Put the belief on the entries near a given pose (an operator's initial pose): Gaussian in position
        (`position_std` m) and heading (`yaw_std` rad) out to 3 sigma, speed unknown (uniform). The pose says
        the robot is on the map, so "elsewhere" starts at half of 1 - `min_mass` (if its prior is higher):
        the seeded place is published from the first frame, as AMCL publishes an initial pose, also for a
        robot that stands (its repeated views are no new evidence, and a map entry's score counts only once
        the entry has been seen a few times); views that disagree take the mass away within a frame or two.
        Returns the number of entries seeded; 0 (no entry near it): the belief is the prior."""
        self.reset()
        d2 = ((self.xy - np.asarray(xy, np.float64)[:2]) ** 2).sum(1)
        dyaw = _wrap(self.yaw - float(yaw))
        near = np.flatnonzero((d2 <= (3.0 * position_std) ** 2) & (np.abs(dyaw) <= 3.0 * yaw_std))
        if not len(near):
            return 0
        self.elsewhere = min(self.elsewhere, 0.5 * (1.0 - self.config.min_mass))
        w = np.exp(-0.5 * d2[near] / position_std ** 2 - 0.5 * (dyaw[near] / yaw_std) ** 2)
        nb = len(self.speeds)
        self.entries = near.astype(np.int64)
        self.mass = np.repeat((w / w.sum() * (1.0 - self.elsewhere))[:, None] / nb, nb, axis=1)
        self.uniform = 0.0
        self._prune()
        return len(self.entries)

    # ------------------------------------------------------------------ estimate
    def place(self) -> Place | None:
        """The most probable place (None while the belief holds no entry)."""
        if not len(self.entries):
            return None
        m = self.marginal()
        best = int(np.argmax(m))
        b = self.entries[best]
        near = (np.linalg.norm(self.xy[self.entries] - self.xy[b], axis=1) <= self.mode_radius) & (
            np.abs(_wrap(self.yaw[self.entries] - self.yaw[b])) <= _MODE_HEADING)
        ent = self.entries[near]
        mass = float(m[near].sum())
        if mass <= 0:
            return None
        w = m[near] / mass
        pose = self.poses[b].copy()
        pose[:2] = w @ self.xy[ent]
        pose[2] = w @ self.z[ent]
        d = np.column_stack([self.xy[ent] - pose[:2], self.z[ent] - pose[2]])
        floor = max(self.min_position_std, 0.5 * self.spacing) ** 2
        spread = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
        speeds = (self.mass[near] / mass).sum(0)          # the place's speed distribution
        speed = float(speeds @ self.speeds)
        speed_var = float(speeds @ (self.speeds - speed) ** 2)
        cov = np.zeros((6, 6))
        cov[:3, :3] = self.config.spread_weight * spread + floor * np.eye(3)
        if not self.odometry_predicted:
            cov[:3, :3] += self._along_track(b, speed_var)
        cov[3, 3] = cov[4, 4] = self.roll_pitch_std ** 2
        cov[5, 5] = float(w @ _wrap(self.yaw[ent] - self.yaw[b]) ** 2) + self.min_yaw_std ** 2
        cov[:3, :3] /= max(mass, 0.05)
        cov = 0.5 * (cov + cov.T)
        return Place(pose=pose, covariance=cov, mass=mass, entries=ent, speed=speed, speed_std=math.sqrt(speed_var))

    def _along_track(self, entry: int, speed_variance: float) -> np.ndarray:
        """(3, 3) position variance along the entry's heading from the speed's uncertainty: without odometry the
        place moves by the estimated speed, so a speed off by its standard deviation puts the robot that times
        `speed_horizon` seconds ahead of or behind it. After a kidnap or a search the place is often found
        before its speed (the robot's speed is then relearned from weak evidence), and the published place
        falls behind or runs ahead while the belief's spread over entries stays a few metres
        (docs/TRACKING.md, "Third round")."""
        h = np.array([self.heading[entry, 0], self.heading[entry, 1], 0.0])
        return speed_variance * self.config.speed_horizon ** 2 * np.outer(h, h)


class ScoreNormaliser:
    """Each map entry's typical score against the current queries, learned online.

    Some map images look like every query in some conditions (at night in fog, a few stretches of a day map
    score high against most night queries): their high scores carry little evidence, and a filter sitting on
    them would rarely be contradicted. SeqSLAM normalises its difference matrix for the same reason. Every
    entry keeps an exponentially forgetting mean of its scores (`window` observations); `excess(entries)` is
    how much higher than all entries' mean an entry scores, shrunk towards 0 for entries seen only a few
    times (`prior` observations' weight). The tracker subtracts it before turning a score into a likelihood.
    Memory: two floats per map entry."""

    def __init__(self, num_entries: int, window: int, prior: float = 3.0):
        self.window = int(window)
        self.prior = float(prior)
        self.sum = np.zeros(num_entries)
        self.count = np.zeros(num_entries)
        self.mean = 0.0
        self.weight = 0.0

    def add(self, entries: np.ndarray, values: np.ndarray) -> None:
        if self.window <= 0 or not len(entries):
            return
        keep = 1.0 - 1.0 / self.window
        self.sum[entries] = self.sum[entries] * keep + values
        self.count[entries] = self.count[entries] * keep + 1.0
        forget = keep ** len(entries)
        self.mean = (self.mean * self.weight * forget + float(np.sum(values))) / (self.weight * forget + len(values))
        self.weight = self.weight * forget + len(values)

    def excess(self, entries: np.ndarray) -> np.ndarray:
        if self.window <= 0 or self.weight == 0:
            return np.zeros(len(entries))
        n = self.count[entries]
        return (self.sum[entries] + self.prior * self.mean) / (n + self.prior) - self.mean

    def known(self, entries: np.ndarray) -> np.ndarray:
        """How well each entry's typical score is known, in [0, 1): n / (n + prior) (1 when off)."""
        if self.window <= 0:
            return np.ones(len(entries))
        n = self.count[entries]
        return n / (n + self.prior)


@dataclass
class TrackedResult:
    """What the tracker publishes for one frame."""
    stamp: float
    pose: np.ndarray                 # (7,) map frame (NaN when there is no place yet)
    covariance: np.ndarray           # (6, 6) x y z roll pitch yaw
    confidence: float                # probability of the published place
    accepted: bool                   # published
    reason: str                      # why not ("" when accepted)
    state: str                       # global / tracking / lost
    support: int                     # map entries in the belief
    reranked: int                    # candidates reranked for this frame
    elsewhere: float                 # probability of "not on the map"
    speed: float                     # m/s along the heading (filter estimate)
    frame: LocalizationResult | None  # this frame's reranked candidates (matches, markers); None if skipped
    timings_ms: dict[str, float] = field(default_factory=dict)
    still: bool = False              # the view had not changed: nothing reranked, `frame` is the last used one's
    coasted: bool = False            # moved less than update_spacing since the last used frame: not used, the last
                                     # result republished (moved by the odometry since); `frame` the last used one's
    frozen_view_m: float = 0.0       # metres the odometry has moved while the view did not change (frozen camera?)


class Tracker:
    """Localization over time on top of a `Localizer`: the same code runs in the node and offline."""

    def __init__(self, localizer: Localizer, config: TrackingConfig = TrackingConfig(),
                 belief: MapBelief | None = None):
        """`belief`: another filter with MapBelief's interface (bench/tracking_filters.py compares one)."""
        self.localizer = localizer
        self.config = config.validate()
        pose_cfg = localizer.config.pose
        if belief is None:
            belief = MapBelief(localizer.map.poses, localizer.map.keyframe_spacing(), self.config,
                               min_position_std=pose_cfg.min_position_std, min_yaw_std_deg=pose_cfg.min_yaw_std_deg,
                               roll_pitch_std_deg=pose_cfg.roll_pitch_std_deg)
        self.belief = belief
        # what each entry scores against queries of the current conditions: kept across resets
        self._rerank_norm = ScoreNormaliser(len(localizer.map.poses), self.config.normalise_window)
        self._global_norm = ScoreNormaliser(len(localizer.map.poses), self.config.normalise_window)
        self._frame_level: float | None = None   # typical (normalised) score of the global top candidates
        self.reset()

    def reset(self) -> None:
        """Forget everything: global search from the next frame on."""
        self.belief.reset()
        self.state = "global"
        self.last_stamp: float | None = None    # the newest frame's stamp (order checks)
        self._clock: float | None = None        # the filter's time: the belief is predicted up to it
        self._last_odom: np.ndarray | None = None
        self._below = 0
        self._last: TrackedResult | None = None
        self._view: np.ndarray | None = None    # global descriptor of the last frame the filter used
        self._view_frame: LocalizationResult | None = None     # ... and its reranking
        self._view_stamp = 0.0                  # ... its stamp
        self._held = 0.0                        # seconds since then the speed has been held at the view's
        self._rest_view: np.ndarray | None = None     # first view of the current stretch of near-equal views
        self._frozen_m = 0.0                    # odometry distance driven with an unchanged view
        self._rest_since = 0.0                  # ... its stamp
        self._speed_high = math.inf             # m/s, the published place's speed + its std (coasting)

    def seed(self, pose: np.ndarray, covariance: np.ndarray) -> int:
        """Start from a known pose (7,) in the map frame, of the body the map poses describe, with its 6x6
        covariance (x y z roll pitch yaw): the belief goes to the map entries near it (at least the filter's
        own position and heading noise wide) and the next frame is tracked from there (a wrong seed is
        left like a kidnap). Returns the entries seeded; 0 (no map entry near the pose): global search."""
        self.reset()
        pose = np.asarray(pose, np.float64).reshape(7)
        cov = np.asarray(covariance, np.float64).reshape(6, 6)
        xy_var = float(np.linalg.eigvalsh(0.5 * (cov[:2, :2] + cov[:2, :2].T)).max()) if np.all(np.isfinite(cov)) \
            else 0.0
        yaw_var = float(cov[5, 5]) if math.isfinite(cov[5, 5]) else 0.0
        position_std = max(math.sqrt(max(xy_var, 0.0)), getattr(self.belief, "position_std", 0.0), 0.1)
        yaw_std = max(math.sqrt(max(yaw_var, 0.0)), math.radians(self.config.heading_std_deg))
        seeded = self.belief.seed(pose[:2], float(yaw_from_quat(pose[3:])), position_std, yaw_std)
        if seeded:
            self.state = "tracking"
        return seeded

    # ------------------------------------------------------------------ one frame
    def step(self, stamp: float, image: np.ndarray | None = None, *,
             features: tuple[np.ndarray, np.ndarray] | None = None, odom_pose: np.ndarray | None = None,
             decode_ms: float = 0.0, with_matches: bool = True) -> TrackedResult:
        """Process one frame: an RGB image, or its (global, local) features. `odom_pose` is the robot's
        odometry pose (7,) at `stamp` in its odom frame (the increment since the last frame is used), of
        the same body the map poses describe. Timings: decode, extract, search, rerank, filter, total."""
        t0 = time.perf_counter()
        stamp = float(stamp)
        skipped = self._check_stamp(stamp)
        if skipped is not None:
            return skipped
        timings = {"decode": float(decode_ms)}
        if features is None and image is None:
            raise ValueError("Tracker.step needs an image or its features")
        cfg = self.config
        t = time.perf_counter()
        dt = None if self._clock is None else stamp - self._clock
        if dt is not None and dt > cfg.max_gap:
            log.info("tracking: %.1f s since the last frame (max_gap %.1f s): global search", dt, cfg.max_gap)
            self.belief.reset()
            self.state, self._below, dt = "global", 0, None
            self._view = self._view_frame = None
        odometry = None
        if odom_pose is not None:
            odom_pose = np.asarray(odom_pose, np.float64).reshape(-1)
            if odom_pose.shape != (7,) or not np.all(np.isfinite(odom_pose)):
                log.debug("tracking: odometry pose %r unusable: predicting without odometry", odom_pose)
                odom_pose = None
        # planar motion since the last used frame (None without odometry): one increment for every test below
        increment = None if odom_pose is None or self._last_odom is None else planar_increment(self._last_odom,
                                                                                                odom_pose)
        if self._odometry_coasts(stamp, increment):
            # the odometry alone says the robot drives (so it does not stand, whatever the view) and is still
            # nearer than update_spacing to the last used frame: coasted without running the network
            self._rest_view = None
            return self._coast(stamp, increment, t0, t, timings)
        if features is None:
            assert image is not None                                        # (checked above)
            features = self.localizer.extract(image)
            timings["extract"] = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
        q_global, q_local = features
        change = None if self._view is None else self.localizer.view_change(self._view, q_global)
        self._track_rest(stamp, q_global)
        if self._still(stamp, change, increment):
            return self._hold(stamp, t0, t, timings)
        if self._too_near(stamp, change, increment):
            return self._coast(stamp, increment, t0, t, timings)
        if dt is not None:
            odometry = increment
        self._count_frozen(change, odometry)
        self._last_odom = odom_pose
        if dt is not None:
            self.belief.predict(dt, odometry)
        filter_ms = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        top, top_scores = self.localizer.retrieve(q_global)
        timings["search"] = (time.perf_counter() - t) * 1000
        candidates = self._candidates(top)
        t = time.perf_counter()
        frame = self.localizer.localize_features(q_global, q_local, retrieved=candidates, with_matches=with_matches)
        timings["rerank"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        self._observe(q_global, frame, top, top_scores)
        result = self._publish(stamp, frame, len(candidates))
        result.frozen_view_m = self._frozen_m
        timings["filter"] = filter_ms + (time.perf_counter() - t) * 1000
        self.last_stamp = self._clock = stamp
        self._view, self._view_stamp, self._held = np.array(q_global, np.float32, copy=True), stamp, 0.0
        self._view_frame = frame
        timings["total"] = (time.perf_counter() - t0) * 1000 + float(decode_ms)
        result.timings_ms = timings
        self._last = result
        return result

    def _view_unit(self) -> float:
        """The view change below which a frame shows nothing new: `still_view_change` x the map's scale."""
        return self.config.still_view_change * self.localizer.view_scale()

    def _still(self, stamp: float, change: float | None, increment: np.ndarray | None) -> bool:
        """The robot stands: the view (`change` since the last frame the filter used; and the odometry, when
        there is one) has not changed (`still_view_change`). In every state: a repeated view is not a new
        observation, also while searching (counted again and again it locks the belief onto whatever that one
        view scores best against: measured, docs/TRACKING.md "Standing still")."""
        if self.config.still_view_change <= 0 or change is None or self._view_frame is None:
            return False
        # known to stand: the view has stayed within the standing tolerance for _STILL_TIME, or (below) the
        # odometry stands. (Not the filter's speed: its zero state spans +-1.25 m/s by default, a ground
        # robot's whole speed range; taking that for standing held a robot driving 1.5 m/s: measured.)
        standing = self._held > 0 or (self._rest_view is not None and stamp - self._rest_since >= _STILL_TIME)
        if increment is not None:
            dx, dy, dyaw = increment
            if math.hypot(dx, dy) >= _STILL_ODOM_M or abs(dyaw) >= _STILL_TURN:
                return False
            standing = True              # the odometry stands
        # a robot known to stand (odometry, or an unchanged view for a while) sees its view change with sensor
        # noise and passing traffic (by night in fog as much as with half a metre of driving): only a larger
        # change is news
        return change < self._view_unit() * (_STANDING_TOLERANCE if standing else 1.0)

    def _coast_distance(self, stamp: float) -> float | None:
        """Metres below which a moving robot's frame is coasted (`update_spacing` x the map's keyframe spacing),
        or None when no frame may be: coasting off, no used frame yet, or `max_update_interval` passed."""
        cfg = self.config
        if cfg.update_spacing <= 0 or self._view_frame is None or stamp - self._view_stamp >= cfg.max_update_interval:
            return None
        return cfg.update_spacing * float(getattr(self.belief, "spacing", 1.0))

    def _odometry_coasts(self, stamp: float, increment: np.ndarray | None) -> bool:
        """A frame coasted on the odometry alone: it moved at least the 5 cm of a standing robot and less than
        `update_spacing` (turning less than 0.2 rad), within `max_update_interval` of the last used frame. The
        view cannot change that outcome (`_still` holds no frame whose odometry moved), so the frame's features
        are not needed. Odometry under 5 cm is standing: `_still` decides by the view whether the frame is held,
        and a frame it does not hold is used (a robot carried away shows no odometry)."""
        near = self._coast_distance(stamp)
        if near is None or increment is None:
            return False
        return _STILL_ODOM_M <= math.hypot(increment[0], increment[1]) < near and abs(increment[2]) < _STILL_TURN

    def _too_near(self, stamp: float, change: float | None, increment: np.ndarray | None) -> bool:
        """Without odometry: the robot has moved less than `update_spacing` map keyframe spacings since the last
        frame the filter used (by the view's change against the map's neighbour change, and the place's speed),
        for less than `max_update_interval`: its frame is coasted (with odometry: `_odometry_coasts`). Frames
        closer than a keyframe spacing are not independent observations of the map; counted one by one, a slow
        robot's belief becomes over-confident on whatever its first frames at a place favoured
        (docs/TRACKING.md "Ground-robot speeds")."""
        near = self._coast_distance(stamp)
        if near is None or increment is not None:
            # with odometry `_odometry_coasts` has decided: a robot that drove less than update_spacing was
            # coasted there, and one whose odometry stands (under 5 cm) reaches this point only with a view
            # that changed more than a standing robot's may (`_still`): it was carried, or its wheels slip or
            # stall (a kidnap: the odometry shows no motion across it); that frame is news, not a near one
            return False
        # without odometry only while tracking: while searching there is no speed to tell a slow robot from a
        # fast one on a stretch that looks alike (by day a keyframe spacing changes the view by less than 0.75
        # of the map's median for a third of the frames), and the search needs every frame
        if change is None or self.state != "tracking":
            return False
        if change >= self.config.update_spacing * self.localizer.view_scale():
            return False
        # the view has changed little: but the place's speed plus its standard deviation may say the robot has
        # moved on (by night a fast robot's view can change less than the map's neighbour change from one frame
        # to the next): coasted only when the robot is surely near
        return self._speed_high * (stamp - self._view_stamp) < near

    def _coast(self, stamp: float, increment: np.ndarray | None, t0: float, t: float,
               timings: dict[str, float]) -> TrackedResult:
        """A frame too near the last used one (`_too_near`): no observation, nothing reranked, the filter
        unchanged (the next used frame predicts over the whole time, the odometry's increments add up); the
        last result is republished, moved by the odometry since the last used frame when there is one."""
        assert self._view_frame is not None                                 # (`_too_near` checked it)
        self.last_stamp = stamp
        result = self._publish(stamp, self._view_frame, 0, count=False)
        if increment is not None and np.all(np.isfinite(result.pose)):
            result.pose, result.covariance = _dead_reckon(result.pose, result.covariance, increment,
                                                          self.config.odom_noise)
        result.coasted = True
        return self._unused(result, t0, t, timings)

    def _count_frozen(self, change: float | None, odometry: np.ndarray | None) -> None:
        """Distance the odometry has driven while the view (`change` since the last used frame) stayed within
        `still_view_change`: a robot that drives sees its view change within a metre or so, a frozen camera (a
        driver that repeats its last image) does not. The node warns on it (`tracking_frozen_view_m`)."""
        unit = self._view_unit()
        if unit <= 0 or change is None:
            return
        if change >= unit:
            self._frozen_m = 0.0
        elif odometry is not None:
            self._frozen_m += math.hypot(float(odometry[0]), float(odometry[1]))

    def _track_rest(self, stamp: float, q_global: np.ndarray) -> None:
        """The stretch of frames whose views all lie within the standing tolerance of its first: a robot that
        stands sees one such stretch, a moving one leaves it within a metre or so."""
        limit = self._view_unit() * _STANDING_TOLERANCE
        if limit <= 0:
            return
        if self._rest_view is None or self.localizer.view_change(self._rest_view, q_global) >= limit:
            self._rest_view, self._rest_since = np.array(q_global, np.float32, copy=True), stamp

    def _hold(self, stamp: float, t0: float, t: float, timings: dict[str, float]) -> TrackedResult:
        """A frame with the view of the last used one (`_still`): no observation, nothing reranked, the last
        result repeated. For the first `_STILL_TIME` seconds nothing else changes (a slow robot, or an
        uninformative view: the next used frame predicts over the whole time); from then on the robot stands:
        the speed goes towards zero (`MapBelief.hold`) and the filter's clock follows the frames, so the time
        spent standing is not taken for motion later. The odometry reference stays at the last used frame
        (its increments add up)."""
        assert self._view_frame is not None                                 # (`_still` checked it)
        self.last_stamp = stamp
        since = stamp - self._view_stamp
        if since >= _STILL_TIME:
            self.belief.hold(self._held, since)
            self._held = since
            self._clock = stamp
        result = self._publish(stamp, self._view_frame, 0, count=False)
        result.still = True
        return self._unused(result, t0, t, timings)

    def _unused(self, result: TrackedResult, t0: float, t: float, timings: dict[str, float]) -> TrackedResult:
        """The end of a frame the filter held or coasted: the frozen-camera distance, timings, the last result."""
        result.frozen_view_m = self._frozen_m
        timings["filter"] = (time.perf_counter() - t) * 1000
        timings["total"] = (time.perf_counter() - t0) * 1000 + timings.get("decode", 0.0)
        result.timings_ms = timings
        self._last = result
        return result

    def _check_stamp(self, stamp: float) -> TrackedResult | None:
        """A result for a frame the filter does not use (duplicate or out of order), else None."""
        if self.last_stamp is None or stamp > self.last_stamp:
            return None
        back = self.last_stamp - stamp
        if back > self.config.reset_jump:
            log.warning("tracking: stamp %.3f is %.1f s before the last frame (reset_jump %.1f s): filter reset",
                        stamp, back, self.config.reset_jump)
            self.reset()
            return None
        why = "duplicate stamp" if back == 0 else f"out of order ({back:.3f} s before the last frame)"
        return self._skipped(stamp, f"{why}: frame not used")

    def _skipped(self, stamp: float, reason: str) -> TrackedResult:
        place = self.belief.place()
        pose = place.pose if place else np.full(7, np.nan)
        cov = place.covariance if place else np.eye(6) * 1e6
        return TrackedResult(stamp=stamp, pose=pose, covariance=cov, confidence=place.mass if place else 0.0,
                             accepted=False, reason=reason, state=self.state, support=len(self.belief), reranked=0,
                             elsewhere=self.belief.elsewhere, speed=place.speed if place else 0.0, frame=None,
                             timings_ms={"total": 0.0})

    def _candidates(self, top: np.ndarray) -> np.ndarray:
        """What to rerank: while tracking the belief's most probable entries and a few global top candidates
        (never more than top_k: the kidnap candidates get at most half of it); otherwise (global search,
        lost) the best `global_candidates` of the global top (0: all of top_k). Global search takes the
        retrieval's order, not the belief's: the belief is not yet to be trusted, and reranking its own
        hypotheses first confirms whichever look-alike got ahead (measured: docs/TRACKING.md)."""
        if self.state != "tracking":
            n = self.config.global_candidates
            return top[:n] if n > 0 else top
        budget = self.localizer.config.top_k
        kidnap = min(self.config.kidnap_candidates, budget // 2)
        own = self.belief.most_probable(min(self.config.track_candidates, budget - kidnap))
        taken = set(own.tolist())
        extra = [int(i) for i in top if int(i) not in taken][:budget - len(own)][:kidnap]
        return np.concatenate([own, np.asarray(extra, np.int64)])

    def _observe(self, q_global: np.ndarray, frame: LocalizationResult, top: np.ndarray,
                 top_scores: np.ndarray) -> None:
        cfg = self.config
        mode = self.localizer.config.rerank
        reranked = np.array([c.index for c in frame.candidates], np.int64)
        s01 = normalised_scores(mode, np.array([c.rerank_score for c in frame.candidates]))
        s01 = np.clip(s01, 1e-4, 1 - 1e-4)
        logit = np.log(s01 / (1 - s01))
        entries = np.union1d(np.union1d(self.belief.entries, top), reranked)
        cos = self.localizer.global_scores(q_global, entries)
        log_lr = cfg.global_gain * (cos - self._global_norm.excess(entries)) + cfg.global_bias
        norm = logit - self._rerank_norm.excess(reranked)
        # Frames differ as a whole (a foggier image scores lower everywhere): compare this frame's global top
        # candidates (reranked in every state, not chosen by the belief), except those at the predicted place,
        # with their typical level.
        place = self.belief.place()
        ref = np.isin(reranked, top[:cfg.kidnap_candidates])
        if place is not None:
            ref &= ~np.isin(reranked, place.entries)
        if ref.sum() >= 3:
            level = float(np.median(norm[ref]))
            self._frame_level = level if self._frame_level is None else 0.95 * self._frame_level + 0.05 * level
            norm = norm - (level - self._frame_level)
        at = np.searchsorted(entries, reranked)
        # a score is evidence only as far as the entry's typical score is known (a look-alike stretch is
        # recognised as such only after it has been seen a few times): early on, the motion model leads
        log_lr[at] = (cfg.score_gain * norm + cfg.score_bias) * self._rerank_norm.known(reranked)
        rest = cfg.global_gain * float(np.min(top_scores)) + cfg.global_bias if len(top_scores) else 0.0
        bound = cfg.max_log_lr
        log_lr = np.clip(log_lr, -bound, bound)
        self.belief.update(entries, log_lr, float(np.clip(rest, -bound, bound)))
        # learn each entry's typical score; while the robot is held for standing, not from its place's entries
        # (they would come to look typical)
        if place is not None and self._held > 0:
            self._global_norm.add(*self._outside(place, entries, cos))
            self._rerank_norm.add(*self._outside(place, reranked, logit))
        else:
            self._global_norm.add(entries, cos)
            self._rerank_norm.add(reranked, logit)

    @staticmethod
    def _outside(place: Place, entries: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = ~np.isin(entries, place.entries)
        return entries[keep], values[keep]

    def _publish(self, stamp: float, frame: LocalizationResult, reranked: int, count: bool = True) -> TrackedResult:
        """The result of this frame from the belief; `count` False (a held frame): the state stays."""
        cfg = self.config
        place = self.belief.place()
        mass = place.mass if place else 0.0
        if count and mass >= cfg.track_mass:
            self.state, self._below = "tracking", 0
        elif count:
            self._below += 1
            if self.state == "tracking" and self._below >= cfg.lost_frames:
                log.info("tracking lost: the most probable place held < %.2f for %d frames: global search",
                         cfg.track_mass, self._below)
                self.state = "lost"
        if mass >= cfg.min_mass:
            reason = ""
        elif self.belief.elsewhere >= mass:
            reason = (f"not on the map: 'elsewhere' holds {self.belief.elsewhere:.2f}, the most probable "
                      f"place {mass:.2f}")
        else:
            reason = f"belief split: the most probable place holds {mass:.2f} < min_mass {cfg.min_mass:.2f}"
        pose = place.pose if place else np.full(7, np.nan)
        cov = place.covariance if place else np.eye(6) * 1e6
        self._speed_high = abs(place.speed) + place.speed_std if place else math.inf
        return TrackedResult(stamp=stamp, pose=pose, covariance=cov, confidence=mass, accepted=not reason,
                             reason=reason, state=self.state, support=len(self.belief), reranked=reranked,
                             elsewhere=self.belief.elsewhere, speed=place.speed if place else 0.0, frame=frame)


__all__ = ["MapBelief", "Place", "STATES", "ScoreNormaliser", "TrackedResult", "Tracker", "planar_increment"]
