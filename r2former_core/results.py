"""Result types of localization (shared by the localizer, the CLI and the ROS nodes)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Candidate:
    """One map image proposed for a query, after reranking."""
    index: int             # map entry
    name: str              # source name of the map image
    pose: np.ndarray       # (7,) x y z qx qy qz qw in the map frame
    global_score: float    # cosine of the global descriptors
    rerank_score: float    # reranker match probability, RANSAC inlier fraction, or global score
    score: float           # what candidates are ranked by


@dataclass
class TokenMatches:
    """Matched local tokens between the query and the best map image, for drawing.

    Coordinates are the tokens' normalised (x, y): pixel = value * max(H, W) of the image the
    features were extracted from.
    """
    query_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    map_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    similarity: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))

    def __len__(self) -> int:
        return len(self.similarity)


@dataclass
class LocalizationResult:
    pose: np.ndarray            # (7,) x y z qx qy qz qw in the map frame
    covariance: np.ndarray      # (6, 6) over x y z roll pitch yaw, symmetric positive definite
    confidence: float           # in [0, 1]
    accepted: bool              # confidence >= min_confidence
    reason: str                 # why not accepted ("" when accepted)
    best_index: int             # map entry of the best candidate (-1 when the map is empty)
    candidates: list[Candidate]
    matches: TokenMatches
    timings_ms: dict[str, float]  # decode, extract, search, rerank, pose, total (options.TIMING_STAGES)
    agreement: float = 1.0      # weight of the top candidates that agree with the best one

    def judge(self, min_confidence: float) -> LocalizationResult:
        """The acceptance rule: accepted when confidence >= min_confidence (sets `accepted` and `reason`)."""
        self.accepted = self.confidence >= min_confidence
        self.reason = "" if self.accepted else (f"confidence {self.confidence:.2f} below min_confidence "
                                                f"{min_confidence:.2f} (agreement {self.agreement:.2f})")
        return self

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None
