"""Reranking modes: R2Former's transformer, the RANSAC baseline of the paper, or none.

All modes take one query's features and K candidates' features and return one score per
candidate (higher is better). `r2former` ranks by the reranker's match probability, as the
official evaluation does (`final_score`, the mix with the global cosine, is optional);
`ransac` counts homography inliers among mutual nearest-neighbour token matches (OpenCV);
`none` keeps the global cosine.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .errors import ConfigError
from .model import R2FormerModel
from .options import R2FORMER_SCORES, RERANK_MODES


@dataclass
class RerankScores:
    score: np.ndarray          # (K,) what candidates are ranked by
    rerank_score: np.ndarray   # (K,) match probability / inlier fraction / global cosine
    global_score: np.ndarray   # (K,)


def check_mode(mode: str) -> str:
    if mode not in RERANK_MODES:
        raise ConfigError(f"unknown rerank mode {mode!r}; choose one of {', '.join(RERANK_MODES)}")
    return mode


def _unit(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def mutual_nearest_matches(q_local: np.ndarray, c_local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual nearest neighbours between two images' local tokens by cosine of the feature part.

    Returns (query rows, candidate rows, cosine) sorted by cosine descending.
    """
    sim = _unit(q_local[:, 3:]) @ _unit(c_local[:, 3:]).T
    best_c = sim.argmax(axis=1)
    best_q = sim.argmax(axis=0)
    qi = np.nonzero(best_q[best_c] == np.arange(len(best_c)))[0]
    ci = best_c[qi]
    s = sim[qi, ci]
    order = np.argsort(-s, kind="stable")
    return qi[order], ci[order], s[order]


def ransac_inliers(q_local: np.ndarray, c_local: np.ndarray, scale: float, threshold_px: float = 24.0,
                   min_matches: int = 8) -> tuple[int, int]:
    """(inliers, matches) of a RANSAC homography on mutual NN token matches.

    Token coordinates are normalised by max(H, W); `scale` converts them back to pixels.
    """
    qi, ci, _ = mutual_nearest_matches(q_local, c_local)
    if len(qi) < min_matches:
        return 0, len(qi)
    src = (np.asarray(q_local[qi, :2], np.float32) * scale).reshape(-1, 1, 2)
    dst = (np.asarray(c_local[ci, :2], np.float32) * scale).reshape(-1, 1, 2)
    _, mask = cv2.findHomography(src, dst, cv2.RANSAC, threshold_px, maxIters=2000, confidence=0.995)
    return (int(mask.sum()) if mask is not None else 0), len(qi)


def rerank_candidates(model: R2FormerModel, mode: str, q_global, q_local, c_global, c_local,
                      r2former_score: str = "match_prob") -> RerankScores:
    """Scores of K candidates for one query under the given mode."""
    check_mode(mode)
    c_global = np.asarray(c_global, dtype=np.float32)
    q_global = np.asarray(q_global, dtype=np.float32)
    global_score = (_unit(c_global) @ _unit(q_global[None])[0]).astype(np.float32)
    if mode == "none" or len(c_global) == 0:
        return RerankScores(global_score.copy(), global_score.copy(), global_score)
    if mode == "ransac":
        scale = float(max(model.cfg.image_size))
        q = np.asarray(q_local, dtype=np.float32)
        inliers = np.array([ransac_inliers(q, np.asarray(c, dtype=np.float32), scale)[0] for c in c_local],
                           dtype=np.float32)
        # Ties in the inlier count keep the global order (tiny global-score tie breaker).
        return RerankScores(inliers + 1e-3 * global_score, inliers / max(len(q), 1), global_score)
    if r2former_score not in R2FORMER_SCORES:
        raise ConfigError(f"unknown r2former score {r2former_score!r}; choose one of {', '.join(R2FORMER_SCORES)}")
    out = model.rerank(torch.as_tensor(q_global), torch.as_tensor(np.asarray(q_local)),
                       torch.as_tensor(c_global), torch.as_tensor(np.asarray(c_local)))
    prob = out.match_prob.numpy()
    score = prob if r2former_score == "match_prob" else out.final_score.numpy()
    return RerankScores(score.astype(np.float32), prob.astype(np.float32), global_score)
