"""Localizer: image -> features -> top-K map images -> rerank -> pose with covariance.

Reranking budget: a candidate's rerank score does not depend on the other candidates, so reranking
only the best-global-first part of the top-K is exact for that part. `rerank_margin` keeps the
candidates whose global cosine is within the margin of the best (a confident retrieval has a clear
best and needs fewer); `rerank_budget_ms` reranks the first `rerank_min` candidates, then as many more
as fit in the budget at the cost per candidate measured so far (a moving average over frames, so it
follows the machine's load). Candidates left out follow the reranked ones in global order, with
rerank score 0.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .errors import MapError
from .features import extract_image
from .mapdb import MapDatabase
from .model import R2FormerModel, load_model
from .options import LocalizerConfig
from .pose import estimate_pose, normalised_scores
from .rerank import RerankScores, check_mode, mutual_nearest_matches, rerank_candidates
from .results import Candidate, LocalizationResult, TokenMatches

log = logging.getLogger(__name__)


def check_compatible(model: R2FormerModel, mapdb: MapDatabase) -> None:
    info = mapdb.info
    cfg = model.cfg
    if (info.num_local, info.local_values, info.global_dim) != (cfg.local_tokens, cfg.local_values, cfg.global_dim):
        raise MapError(f"map {info.path} holds features of shape global {info.global_dim}, local "
                       f"{info.num_local}x{info.local_values}, the model makes global {cfg.global_dim}, local "
                       f"{cfg.local_tokens}x{cfg.local_values}: rebuild the map with this model")


def map_view_scale(mapdb: MapDatabase, max_pairs: int = 5000) -> float:
    """Median 1 - cosine of the global descriptors of neighbouring map entries (consecutive entries of one
    session at most 3 keyframe spacings apart; up to `max_pairs` of them, evenly spread): how much the model's
    view changes from one map image to the next. The scale of the tracker's `still_view_change`, so that one
    setting fits any model (a random-weight model's descriptors differ by ~0.01, the demo model's by ~0.15)."""
    n = len(mapdb)
    if n < 2:
        return 1.0
    idx = np.arange(n - 1)
    if len(idx) > max_pairs:
        idx = idx[np.linspace(0, len(idx) - 1, max_pairs).astype(np.int64)]
    poses = np.asarray(mapdb.poses, np.float64)
    near = np.linalg.norm(poses[idx + 1, :3] - poses[idx, :3], axis=1) <= 3.0 * max(mapdb.keyframe_spacing(), 1e-6)
    sessions = np.asarray(mapdb.sessions)
    near &= sessions[idx] == sessions[idx + 1]
    if near.any():
        idx = idx[near]
    a = np.asarray(mapdb.global_desc[idx], np.float32)
    b = np.asarray(mapdb.global_desc[idx + 1], np.float32)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(max(np.median(1.0 - cos), 1e-6))


class Localizer:
    def __init__(self, model: R2FormerModel, mapdb: MapDatabase, config: LocalizerConfig = LocalizerConfig()):
        """The model runs at `config.precision` from here on (set on the model itself)."""
        self.config = config.validate()
        self.model = model
        self.map = mapdb
        check_compatible(model, mapdb)
        model.set_precision(self.config.precision)
        self.rerank_ms_per_candidate: dict[str, float] = {}   # moving average per rerank mode
        self.last_reranked = 0                                  # candidates reranked in the last frame
        log.info("localizer: %s; map search on %s", model.describe_precision(), mapdb.search_device)

    @classmethod
    def from_files(cls, model_path, map_path, config: LocalizerConfig = LocalizerConfig()) -> Localizer:
        """Model and map from files; both on `config.device` (the map's faiss index on the GPU when faiss
        can, see `MapDatabase.load`)."""
        model = load_model(model_path, device=config.device, precision=config.precision)
        mapdb = MapDatabase.load(map_path, expected_fingerprint=model.fingerprint, device=config.device)
        return cls(model, mapdb, config)

    @property
    def precision(self) -> str:
        """The precision extraction runs in (fp32, bf16, fp16, int8); `model.rerank_precision` for reranking."""
        return self.model.precision

    @property
    def device(self) -> torch.device:
        return self.model.device

    def extract(self, image_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(G,) global descriptor and (N, C) local features of one RGB uint8 image."""
        return extract_image(self.model, image_rgb)

    def localize(self, image_rgb: np.ndarray, rerank: str | None = None, decode_ms: float = 0.0) -> LocalizationResult:
        """Localize one decoded RGB image. `decode_ms`: time the caller spent reading/decoding it, recorded
        as the "decode" stage (timings: decode, extract, search, rerank, pose, total; milliseconds)."""
        t0 = time.perf_counter()
        q_global, q_local = self.extract(image_rgb)
        result = self.localize_features(q_global, q_local, rerank)
        result.timings_ms["extract"] = (time.perf_counter() - t0) * 1000 - sum(result.timings_ms.values())
        result.timings_ms["decode"] = float(decode_ms)
        result.timings_ms["total"] = (time.perf_counter() - t0) * 1000 + float(decode_ms)
        return result

    def retrieve(self, q_global: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-K map indices and their global scores."""
        scores, idx = self.map.search(q_global[None], self.config.top_k)
        return idx[0], scores[0]

    def global_scores(self, q_global: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Cosine of the query's global descriptor with the given map entries' (the tracker scores the entries
        of its belief that it does not rerank with it)."""
        idx = np.asarray(indices, dtype=np.int64)
        c = np.asarray(self.map.global_desc[idx], dtype=np.float32)
        q = np.asarray(q_global, dtype=np.float32)
        norms = np.maximum(np.linalg.norm(c, axis=1) * np.linalg.norm(q), 1e-12)
        return (c @ q) / norms

    def view_scale(self) -> float:
        """`map_view_scale` of this localizer's map (computed once)."""
        scale = getattr(self, "_view_scale", None)
        if scale is None:
            scale = self._view_scale = map_view_scale(self.map)
        return scale

    @staticmethod
    def view_change(a: np.ndarray, b: np.ndarray) -> float:
        """1 - cosine of two global descriptors: 0 for the same view (the tracker's test for a standing
        robot, `TrackingConfig.still_view_change`)."""
        a = np.asarray(a, np.float64).ravel()
        b = np.asarray(b, np.float64).ravel()
        return float(1.0 - (a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))

    def localize_features(self, q_global: np.ndarray, q_local: np.ndarray, rerank: str | None = None,
                          retrieved: np.ndarray | None = None, c_local: np.ndarray | None = None,
                          with_matches: bool = True) -> LocalizationResult:
        """Localize from precomputed query features (the evaluation reuses them across modes).
        `with_matches=False` skips the token matches that only the diagnostic image draws."""
        mode = check_mode(rerank or self.config.rerank)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        idx = retrieved if retrieved is not None else self.retrieve(q_global)[0]
        timings["search"] = (time.perf_counter() - t) * 1000
        if len(idx) == 0:
            raise MapError(f"map {self.map.info.path} is empty: build it from at least one image")
        t = time.perf_counter()
        scores, c_local = self._rerank_within_budget(mode, q_global, q_local, idx, c_local)
        order = np.argsort(-scores.score, kind="stable")
        timings["rerank"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        ranked = idx[order]
        s01 = normalised_scores(mode, scores.rerank_score[order])
        est = estimate_pose(self.map.poses[ranked], s01, self.map.keyframe_spacing(), self.config.pose,
                            sessions=self.map.sessions[ranked])
        candidates = [Candidate(index=int(i), name=self.map.names[int(i)], pose=self.map.poses[int(i)].copy(),
                                global_score=float(scores.global_score[o]), rerank_score=float(scores.rerank_score[o]),
                                score=float(scores.score[o])) for i, o in zip(ranked, order)]
        if with_matches:
            best_local = c_local[order[0]] if c_local is not None else self.map.local([ranked[0]])[0]
            matches = self._matches(q_local, best_local)
        else:
            matches = TokenMatches()
        timings["pose"] = (time.perf_counter() - t) * 1000
        result = LocalizationResult(pose=est.pose, covariance=est.covariance, confidence=est.confidence,
                                    accepted=False, reason="", best_index=int(ranked[0]), candidates=candidates,
                                    matches=matches, timings_ms=timings, agreement=est.agreement)
        return result.judge(self.config.min_confidence)

    def rerank_count(self, global_scores: np.ndarray) -> int:
        """Candidates the margin rule keeps (all when `rerank_margin` is 0), at least `rerank_min`."""
        k = len(global_scores)
        margin = self.config.rerank_margin
        if margin <= 0 or k == 0:
            return k
        keep = int(np.count_nonzero(global_scores >= global_scores.max() - margin))
        return min(k, max(keep, self.config.rerank_min))

    def _rerank_within_budget(self, mode: str, q_global: np.ndarray, q_local: np.ndarray, idx: np.ndarray,
                              c_local: np.ndarray | None) -> tuple[RerankScores, np.ndarray | None]:
        """Scores of all candidates `idx` (global order): the first ones reranked as the margin and the time
        budget allow, the rest with rerank score 0 below them. Returns the scores and the local features read."""
        c_global = self.map.global_desc[idx]
        if mode == "none":
            return rerank_candidates(self.model, mode, q_global, q_local, c_global, None,
                                     r2former_score=self.config.r2former_score), c_local
        q = np.asarray(q_global, np.float32)
        c = np.asarray(c_global, np.float32)
        global_score = (c @ q) / np.maximum(np.linalg.norm(c, axis=1) * np.linalg.norm(q), 1e-12)
        n_target = self.rerank_count(global_score)
        budget = self.config.rerank_budget_ms
        first = n_target if budget <= 0 else min(n_target, self.config.rerank_min)
        t0 = time.perf_counter()
        parts = [self._rerank_part(mode, q_global, q_local, idx, c_local, 0, first)]
        if budget > 0:
            spent = (time.perf_counter() - t0) * 1000
            self._learn_cost(mode, spent / max(first, 1))
            more = int((budget - spent) // self.rerank_ms_per_candidate[mode]) if spent < budget else 0
            more = max(0, min(more, n_target - first))
            if more:
                t1 = time.perf_counter()
                parts.append(self._rerank_part(mode, q_global, q_local, idx, c_local, first, first + more))
                self._learn_cost(mode, (time.perf_counter() - t1) * 1000 / more)
        n = sum(len(p[0].score) for p in parts)
        self.last_reranked = n
        score = np.zeros(len(idx), np.float32)
        rerank_score = np.zeros(len(idx), np.float32)
        score[:n] = np.concatenate([p[0].score for p in parts])
        rerank_score[:n] = np.concatenate([p[0].rerank_score for p in parts])
        if n < len(idx):   # not reranked: below every reranked candidate, in global order
            score[n:] = min(float(score[:n].min()), 0.0) - 1.0 - np.arange(len(idx) - n, dtype=np.float32) * 1e-6
        read = np.concatenate([p[1] for p in parts]) if c_local is None and n == len(idx) else c_local
        return RerankScores(score, rerank_score, global_score.astype(np.float32)), read

    def _rerank_part(self, mode: str, q_global: np.ndarray, q_local: np.ndarray, idx: np.ndarray,
                     c_local: np.ndarray | None, start: int, stop: int) -> tuple[RerankScores, np.ndarray]:
        local = c_local[start:stop] if c_local is not None else self.map.local(idx[start:stop])
        scores = rerank_candidates(self.model, mode, q_global, q_local, self.map.global_desc[idx[start:stop]], local,
                                   r2former_score=self.config.r2former_score)
        return scores, local

    def _learn_cost(self, mode: str, ms_per_candidate: float, alpha: float = 0.3) -> None:
        old = self.rerank_ms_per_candidate.get(mode)
        value = ms_per_candidate if old is None else (1 - alpha) * old + alpha * ms_per_candidate
        self.rerank_ms_per_candidate[mode] = max(value, 1e-3)

    def _matches(self, q_local: np.ndarray, c_local: np.ndarray) -> TokenMatches:
        qi, ci, sim = mutual_nearest_matches(np.asarray(q_local, np.float32), np.asarray(c_local, np.float32))
        keep = slice(0, self.config.num_matches)
        return TokenMatches(query_xy=np.asarray(q_local[qi[keep], :2], np.float32),
                            map_xy=np.asarray(c_local[ci[keep], :2], np.float32),
                            similarity=sim[keep].astype(np.float32))


__all__ = ["Localizer", "LocalizerConfig", "check_compatible"]
