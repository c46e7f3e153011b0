"""Lean validation for model selection: global recall@N and reranked recall@N (25 m, as the paper).

Same definition as `r2former_core.evaluation` (with one map per synthetic world: queries are
searched in their own world's database) (a query is recalled at N when one of its first N
database images lies within the threshold) but straight from the dataset, without building a map.
Reranking sorts the global top `rerank_top` by the reranker's match probability (the official
test-time ranking).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..metrics import RECALL_VALUES, recall_at
from ..model import R2FormerModel
from .datasets import PlaceDataset, extract_descriptors
from .mining import neighbours_within

log = logging.getLogger(__name__)


@dataclass
class ValResult:
    global_recall: dict[int, float]
    rerank_recall: dict[int, float] | None
    queries: int

    @property
    def selection(self) -> float:
        """The model-selection score: recall@5 of the reranked lists when there are any, else global."""
        return (self.rerank_recall or self.global_recall)[5]


def validate(model: R2FormerModel, data: PlaceDataset, rerank: bool, threshold_m: float = 25.0,
             rerank_top: int = 20, max_queries: int = 300, batch: int = 32, progress: bool = False) -> ValResult:
    import faiss
    nq = len(data.queries)
    q_ids = np.arange(nq) if nq <= max_queries else np.linspace(0, nq - 1, max_queries).round().astype(np.int64)
    db_ids = np.arange(len(data.database))
    positives = neighbours_within(data.database.xy, data.queries.xy[q_ids], threshold_m)
    if rerank:
        db_g, db_l = extract_descriptors(model, data.database, db_ids, batch, local=True, progress=progress,
                                         desc="validation: database")
        q_g, q_l = extract_descriptors(model, data.queries, q_ids, batch, local=True, progress=progress,
                                       desc="validation: queries")
    else:
        db_g = extract_descriptors(model, data.database, db_ids, batch, progress=progress, desc="validation: database")
        q_g = extract_descriptors(model, data.queries, q_ids, batch, progress=progress, desc="validation: queries")
    k = min(len(db_ids), max(max(RECALL_VALUES), rerank_top))
    if data.db_groups is not None and data.q_groups is not None:
        # One map per group (world), as at test time: a query is searched in its own world's database only.
        ranked = np.full((len(q_ids), k), -1, np.int64)
        q_groups = data.q_groups[q_ids]
        for grp in np.unique(q_groups):
            members = np.flatnonzero(data.db_groups == grp)
            index = faiss.IndexFlatIP(db_g.shape[1])
            index.add(db_g[members])
            rows = np.flatnonzero(q_groups == grp)
            kk = min(k, len(members))
            _, found = index.search(q_g[rows], kk)
            ranked[rows, :kk] = members[found]
    else:
        index = faiss.IndexFlatIP(db_g.shape[1])
        index.add(db_g)
        _, ranked = index.search(q_g, k)
    g_rec = recall_at(ranked, positives)
    r_rec = None
    if rerank:
        top = min(rerank_top, k)
        reranked = ranked.copy()
        for i in range(len(q_ids)):
            cand = ranked[i, :top]
            cand = cand[cand >= 0]
            out = model.rerank(torch.from_numpy(q_g[i]), torch.from_numpy(q_l[i].astype(np.float32)),
                               torch.from_numpy(db_g[cand]), torch.from_numpy(db_l[cand].astype(np.float32)))
            order = torch.argsort(out.match_prob, descending=True, stable=True).numpy()
            reranked[i, :len(cand)] = cand[order]
        r_rec = recall_at(reranked, positives)
    sample = db_g[:: max(1, len(db_g) // 200)]
    mean_cos = float((sample @ sample.T).mean())   # close to 1: descriptors collapsed
    log.info("validation on %s (%d queries, mean database cosine %.3f): global R@1/5/10 %s%s", data.name, len(q_ids),
             mean_cos,
             "/".join(f"{g_rec[n]:.3f}" for n in RECALL_VALUES),
             "" if r_rec is None else "; reranked R@1/5/10 " + "/".join(f"{r_rec[n]:.3f}" for n in RECALL_VALUES))
    return ValResult(g_rec, r_rec, len(q_ids))
