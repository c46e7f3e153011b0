"""Localizer: image -> features -> top-K map images -> rerank -> pose with covariance."""
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
from .rerank import check_mode, mutual_nearest_matches, rerank_candidates
from .results import Candidate, LocalizationResult, TokenMatches

log = logging.getLogger(__name__)


def check_compatible(model: R2FormerModel, mapdb: MapDatabase) -> None:
    info = mapdb.info
    cfg = model.cfg
    if (info.num_local, info.local_values, info.global_dim) != (cfg.local_tokens, cfg.local_values, cfg.global_dim):
        raise MapError(f"map {info.path} holds features of shape global {info.global_dim}, local "
                       f"{info.num_local}x{info.local_values}, the model makes global {cfg.global_dim}, local "
                       f"{cfg.local_tokens}x{cfg.local_values}: rebuild the map with this model")


class Localizer:
    def __init__(self, model: R2FormerModel, mapdb: MapDatabase, config: LocalizerConfig = LocalizerConfig()):
        self.config = config.validate()
        self.model = model
        self.map = mapdb
        check_compatible(model, mapdb)

    @classmethod
    def from_files(cls, model_path, map_path, config: LocalizerConfig = LocalizerConfig()) -> "Localizer":
        model = load_model(model_path, device=config.device)
        mapdb = MapDatabase.load(map_path, expected_fingerprint=model.fingerprint)
        return cls(model, mapdb, config)

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
        if c_local is None and mode != "none":
            c_local = self.map.local(idx)
        c_global = self.map.global_desc[idx]
        scores = rerank_candidates(self.model, mode, q_global, q_local, c_global, c_local,
                                   r2former_score=self.config.r2former_score)
        order = np.argsort(-scores.score, kind="stable")
        timings["rerank"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        ranked = idx[order]
        s01 = normalised_scores(mode, scores.rerank_score[order])
        est = estimate_pose(self.map.poses[ranked], s01, self.map.keyframe_spacing(), self.config.pose)
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

    def _matches(self, q_local: np.ndarray, c_local: np.ndarray) -> TokenMatches:
        qi, ci, sim = mutual_nearest_matches(np.asarray(q_local, np.float32), np.asarray(c_local, np.float32))
        keep = slice(0, self.config.num_matches)
        return TokenMatches(query_xy=np.asarray(q_local[qi[keep], :2], np.float32),
                            map_xy=np.asarray(c_local[ci[keep], :2], np.float32),
                            similarity=sim[keep].astype(np.float32))


__all__ = ["Localizer", "LocalizerConfig", "check_compatible"]
