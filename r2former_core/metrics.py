"""Place-recognition metrics: recall@N with a distance threshold (the paper's definition).

A query is recalled at N when one of its first N ranked database images lies within the
threshold (25 m in the paper) of the query's position. Used by `r2former eval` (per map) and by
training's validation (straight from a dataset).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_VALUES = (1, 5, 10)


def first_positive_rank(ranked: np.ndarray, map_xy: np.ndarray, query_xy: np.ndarray, threshold_m: float) -> int:
    """1-based rank of the first of `ranked` (map indices) within `threshold_m` of `query_xy`; 0 = none."""
    d = np.linalg.norm(np.asarray(map_xy)[np.asarray(ranked, np.int64)] - np.asarray(query_xy), axis=1)
    hits = np.nonzero(d <= threshold_m)[0]
    return int(hits[0]) + 1 if len(hits) else 0


def recall_from_ranks(ranks: Sequence[int] | np.ndarray, n: int) -> float:
    """Fraction of queries whose first positive rank is in 1..n (rank 0 = no positive retrieved)."""
    r = np.asarray(ranks)
    return float(np.mean((r > 0) & (r <= n))) if len(r) else 0.0


def positive_ranks(ranked: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """First positive rank of every row of `ranked` (Q, K) given each query's positive database indices."""
    ranks = np.zeros(len(positives), np.int64)
    for q, (row, pos) in enumerate(zip(ranked, positives)):
        hits = np.flatnonzero(np.isin(row, pos))
        ranks[q] = hits[0] + 1 if len(hits) else 0
    return ranks


def recall_at(ranked: np.ndarray, positives: Sequence[np.ndarray],
              values: Sequence[int] = RECALL_VALUES) -> dict[int, float]:
    """{N: recall@N} of ranked lists (Q, K) against each query's positive database indices."""
    ranks = positive_ranks(ranked, positives)
    return {n: recall_from_ranks(ranks, n) for n in values}


__all__ = ["RECALL_VALUES", "first_positive_rank", "positive_ranks", "recall_at", "recall_from_ranks"]
