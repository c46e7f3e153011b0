"""Positives and negatives by position, and triplet selection by descriptor distance.

Rules (the paper's): a database image within `pos_radius` (10 m) of a query is a *hard positive*
(candidate for the best positive); one within `soft_radius` (25 m) is a *soft positive* and is
never used as a negative. Partial mining picks, per query, the hard positive nearest in descriptor
space and the negatives nearest in descriptor space among a random database subset, soft
positives removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .config import POS_RADIUS_M, SOFT_RADIUS_M


def neighbours_within(db_xy: np.ndarray, q_xy: np.ndarray, radius: float) -> list[np.ndarray]:
    """For each query, the database indices within `radius` metres (sorted by distance)."""
    import faiss
    db = np.ascontiguousarray(db_xy, np.float64)
    q = np.ascontiguousarray(q_xy, np.float64)
    # Positions may be large UTM numbers: centre them before going to float32.
    centre = db.mean(axis=0) if len(db) else np.zeros(2)
    index = faiss.IndexFlatL2(2)
    index.add((db - centre).astype(np.float32))
    lims, dist, ids = index.range_search((q - centre).astype(np.float32), float(radius) ** 2)
    out = []
    for i in range(len(q)):
        d, j = dist[lims[i]:lims[i + 1]], ids[lims[i]:lims[i + 1]]
        out.append(j[np.argsort(d, kind="stable")].astype(np.int64))
    return out


@dataclass(frozen=True)
class Positives:
    """Per query: `hard` database indices within `pos_radius` (candidates for the best positive), `soft`
    ones within `soft_radius` (never negatives); `trainable` the queries with at least one hard positive."""
    hard: list[np.ndarray]
    soft: list[np.ndarray]
    trainable: np.ndarray

    @classmethod
    def around(cls, db_xy: np.ndarray, q_xy: np.ndarray, pos_radius: float = POS_RADIUS_M,
               soft_radius: float = SOFT_RADIUS_M, name: str = "dataset") -> Positives:
        """DataError when no query has a database image within `pos_radius`."""
        hard = neighbours_within(db_xy, q_xy, pos_radius)
        soft = neighbours_within(db_xy, q_xy, soft_radius)
        trainable = np.array([i for i, h in enumerate(hard) if len(h)], np.int64)
        if len(trainable) == 0:
            raise DataError(f"{name}: no query has a database image within {pos_radius:g} m (--pos-radius); "
                            "check the positions of the data")
        return cls(hard, soft, trainable)


def choose_groups(groups: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct random groups (worlds) among the labels `groups`."""
    labels = np.unique(groups)
    return rng.choice(labels, min(count, len(labels)), replace=False)


@dataclass
class Triplet:
    query: int           # query index
    positive: int        # database index
    negatives: list[int]  # database indices


def select_triplets(query_ids: np.ndarray, q_desc: np.ndarray, hard_positives: list[np.ndarray],
                    soft_positives: list[np.ndarray], db_desc: dict[int, np.ndarray] | np.ndarray,
                    candidate_ids: np.ndarray, negs: int, neg_pool: int = 0,
                    rng: np.random.Generator | None = None) -> list[Triplet]:
    """Partial mining for the queries `query_ids` (descriptors `q_desc`, row-aligned).

    `db_desc` maps database index -> descriptor (or is a full (Nd, G) array); it must hold every
    hard positive and every candidate. Negatives: the `negs` candidates nearest to the query in
    descriptor space that are not soft positives. Queries without a hard positive or without
    enough negatives are skipped. `neg_pool` > negs: the negatives are drawn at random among the
    `neg_pool` nearest instead (softer negatives; helps a model trained from scratch not to collapse).
    """
    lookup = (lambda j: db_desc[j]) if isinstance(db_desc, dict) else (lambda j: db_desc[int(j)])
    cand = np.asarray(candidate_ids, np.int64)
    cand_desc = np.stack([lookup(j) for j in cand]) if len(cand) else np.zeros((0, q_desc.shape[1]), np.float32)
    triplets: list[Triplet] = []
    for row, qi in enumerate(query_ids):
        hard = hard_positives[row]
        if len(hard) == 0:
            continue
        qd = q_desc[row]
        pos_desc = np.stack([lookup(j) for j in hard])
        best = int(hard[int(np.argmin(((pos_desc - qd) ** 2).sum(1)))])
        allowed = ~np.isin(cand, soft_positives[row])
        if allowed.sum() < negs:
            continue
        ids = cand[allowed]
        d = ((cand_desc[allowed] - qd) ** 2).sum(1)
        order = np.argsort(d, kind="stable")[:max(negs, neg_pool)]
        if len(order) > negs:
            order = np.sort((rng or np.random.default_rng(0)).choice(order, negs, replace=False))
            order = order[np.argsort(d[order], kind="stable")]
        triplets.append(Triplet(int(qi), best, [int(ids[k]) for k in order]))
    return triplets


def hardest_negatives(q_desc: np.ndarray, db_desc: np.ndarray, soft_positives: list[np.ndarray], top: int = 100
                      ) -> np.ndarray:
    """(Nq, top) database indices most similar to each query, soft positives removed (-1 padded).

    The reranker stage draws its negatives from these lists (the paper's "global" mining).
    """
    import faiss
    index = faiss.IndexFlatIP(db_desc.shape[1])
    index.add(np.ascontiguousarray(db_desc, np.float32))
    extra = max(len(s) for s in soft_positives) if soft_positives else 0
    k = min(len(db_desc), top + extra)
    _, ids = index.search(np.ascontiguousarray(q_desc, np.float32), k)
    out = np.full((len(q_desc), top), -1, np.int64)
    for i, row in enumerate(ids):
        keep = row[(row >= 0) & ~np.isin(row, soft_positives[i])][:top]
        out[i, :len(keep)] = keep
    return out
