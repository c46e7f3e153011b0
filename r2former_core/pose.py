"""From reranked candidates to a pose with a covariance and a confidence.

* Scores are mapped to [0, 1] per rerank mode (match probability, inlier count, cosine).
* Weights: softmax of the normalised scores of the top candidates (temperature `temperature`).
* Agreement: the weight of the candidates within `agree_radius` of the best one. A place seen
  by several neighbouring map images agrees; a best match whose runners-up are elsewhere does not.
* Confidence = normalised best score x agreement.
* Pose: the best candidate's, or (mode `weighted`) the weighted mean position of the agreeing
  candidates with the best candidate's orientation.
* Covariance (x y z roll pitch yaw): the weighted spatial and yaw spread of the *agreeing* top
  candidates around the estimate, plus a floor from the map's keyframe spacing, inflated by
  1/agreement^2 (the weight of the candidates elsewhere) and by (0.5/confidence)^2 when the confidence
  is below 0.5. Symmetric positive definite by construction.

  Why only the agreeing candidates: a place-recognition result is a mixture (the chosen place and,
  with some weight, look-alike places far away). A filter or AMCL takes one Gaussian, and the second
  moment of the whole mixture is dominated by the far look-alikes (a 5 % weight 130 m away alone is a
  29 m standard deviation) even when the chosen place is right to a metre. So the covariance describes
  the chosen mode, ambiguity widens it in a bounded way, and strong ambiguity shows as low confidence,
  which `min_confidence` rejects.

Maps of several sessions (drives of the same streets, e.g. by day and by night, merged with
`r2former map merge`) hold several entries of one place. Two rules keep the estimate right:

* Each session contributes its own `top` candidates (instead of `top` overall): another session's
  entries of the chosen place are weighted as agreement like neighbouring keyframes are, and they
  cannot crowd the look-alikes elsewhere out of the estimate. A map merged with a copy of itself
  therefore gives exactly the estimate of the single map (a duplicate is no new evidence), while a
  second session that matches the chosen place and not the look-alike raises the agreement (and the
  confidence) and shrinks the covariance: agreeing sessions strengthen the estimate.
* Whether a candidate agrees is decided by its position alone, whatever its session: sessions share
  the map frame, so entries of other sessions at the chosen place are agreement, never look-alikes.
  `sessions_agreeing` counts the sessions among the agreeing candidates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data.poses import yaw_from_quat
from .errors import ConfigError
from .options import POSE_MODES, PoseConfig


@dataclass
class PoseEstimate:
    pose: np.ndarray          # (7,)
    covariance: np.ndarray    # (6, 6)
    confidence: float
    agreement: float
    sessions_agreeing: int = 1    # map sessions with a candidate at the chosen place (weight > 1 % of the best)


def normalised_scores(mode: str, rerank_scores: np.ndarray) -> np.ndarray:
    """Map each mode's score to [0, 1]."""
    s = np.asarray(rerank_scores, dtype=np.float64)
    if mode == "ransac":
        return np.clip(s, 0, 1) ** 0.5            # inlier fraction; 25% inliers is already strong
    return np.clip(s, 0.0, 1.0)


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def top_per_session(sessions: np.ndarray, top: int) -> np.ndarray:
    """Positions (ascending) of the candidates ranked among the first `top` of their own session."""
    sessions = np.asarray(sessions).reshape(-1)
    rank_in_session = np.zeros(len(sessions), np.int64)
    seen: dict[int, int] = {}
    for i, sid in enumerate(sessions.tolist()):
        rank_in_session[i] = seen.get(sid, 0)
        seen[sid] = rank_in_session[i] + 1
    return np.flatnonzero(rank_in_session < top)


def estimate_pose(poses: np.ndarray, scores01: np.ndarray, keyframe_spacing: float,
                  cfg: PoseConfig = PoseConfig(), sessions: np.ndarray | None = None) -> PoseEstimate:
    """`poses` (K,7) and `scores01` (K,) of the reranked candidates, best first; `sessions` (K,) the
    map session of each candidate (None: all of one session). See the module doc for sessions."""
    if len(poses) == 0:
        raise ValueError("no candidates to estimate a pose from")
    if sessions is None:
        used = np.arange(min(cfg.top, len(poses)))
        sess = np.zeros(len(used), np.int64)
    else:
        if len(sessions) != len(poses):
            raise ValueError(f"{len(sessions)} session ids for {len(poses)} candidates")
        used = top_per_session(sessions, cfg.top)
        sess = np.asarray(sessions)[used]
    p = np.asarray(poses, dtype=np.float64)[used]
    s = np.asarray(scores01, dtype=np.float64)[used]
    w = np.exp((s - s.max()) / cfg.temperature)
    w /= w.sum()
    radius = cfg.agree_radius or max(5.0, 3.0 * keyframe_spacing)
    dist = np.linalg.norm(p[:, :2] - p[0, :2], axis=1)
    agree = dist <= radius
    agreement = float(w[agree].sum())
    confidence = float(np.clip(s[0] * agreement, 0.0, 1.0))

    wa = w * agree / agreement          # weights of the chosen mode (the best candidate always agrees)
    pose = p[0].copy()
    if cfg.mode == "weighted":
        pose[:3] = (wa[:, None] * p[:, :3]).sum(0)
    elif cfg.mode != "best":
        raise ConfigError(f"unknown pose mode {cfg.mode!r}; choose one of {', '.join(POSE_MODES)}")

    d = p[:, :3] - pose[:3]
    spread = (wa[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
    yaws = np.asarray(yaw_from_quat(p[:, 3:]))
    yaw_spread = float((wa * _wrap(yaws - yaws[0]) ** 2).sum())
    floor = max(cfg.min_position_std, 0.5 * keyframe_spacing) ** 2
    cov = np.zeros((6, 6))
    cov[:3, :3] = spread + floor * np.eye(3)
    cov[3, 3] = cov[4, 4] = np.deg2rad(cfg.roll_pitch_std_deg) ** 2
    cov[5, 5] = yaw_spread + np.deg2rad(cfg.min_yaw_std_deg) ** 2
    cov *= 1.0 / agreement ** 2         # ambiguity: part of the weight lies at other places
    if confidence < 0.5:   # continuous inflation: x1 at 0.5, x100 at 0.05 and below
        cov *= (0.5 / max(confidence, 0.05)) ** 2
    cov = 0.5 * (cov + cov.T)
    supporting = agree & (w >= 0.01 * w[0])
    return PoseEstimate(pose=pose, covariance=cov, confidence=confidence, agreement=agreement,
                        sessions_agreeing=len(np.unique(sess[supporting])))
