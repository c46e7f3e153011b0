"""Training losses (the paper's defaults), and the loss terms the stages are made of.

The functions compute a loss from descriptors. A *loss term* computes one from the model and a batch
(`r2former_core.train.batches`): `term(model, batch, features) -> (loss, parts)`, where `features()`
is the batch's `forward_features` (computed once per step, shared by the terms that use it) and
`parts` names the values logged in metrics.csv. A stage's loss is the sum of its terms
(`r2former_core.train.stages`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from ..model import Features, R2FormerModel
from .batches import Batch, GroupBatch, PairBatch

TRIPLET_MARGIN = 0.1


def triplet_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                 margin: float = TRIPLET_MARGIN) -> torch.Tensor:
    """Triplet margin loss (p = 2) on L2-normalised descriptors, mean over all (query, negative).

    query, positive: (B, G); negatives: (B, K, G). The official code sums over the B*K triplets and
    divides by B*K, i.e. the mean.
    """
    b, k, _ = negatives.shape
    q = query[:, None].expand(-1, k, -1).reshape(b * k, -1)
    p = positive[:, None].expand(-1, k, -1).reshape(b * k, -1)
    return F.triplet_margin_loss(q, p, negatives.reshape(b * k, -1), margin=margin, p=2, reduction="mean")


def rerank_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the reranker's 2-class logits: label 1 = same place, 0 = different place."""
    return F.cross_entropy(logits.float(), labels.long())


INFONCE_TEMPERATURE = 0.07


def infonce_loss(query: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor,
                 valid: torch.Tensor | None = None, temperature: float = INFONCE_TEMPERATURE) -> torch.Tensor:
    """InfoNCE on L2-normalised descriptors: each query must pick its positive among all candidates.

    query: (B, G); candidates: (M, G) (every positive and negative of the batch); target: (B,) index of
    each query's positive in `candidates`; valid: (B, M) bool, False for candidates that must not act as
    negatives (e.g. another query's image of the same place). Not the paper's global loss: an option
    for training from scratch, where the triplet loss tends to collapse all descriptors to one point
    (every distance is ~0 at initialisation, and d(q,p) = d(q,n) = 0 gives the loss its margin with
    no useful gradient), while the softmax over many negatives keeps pushing them apart.
    """
    logits = query @ candidates.T / temperature
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.nn.functional.cross_entropy(logits.float(), target)


DENSE_TEMPERATURE = 0.1


def dense_correspondence_loss(feat_a: torch.Tensor, feat_b: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                              temperature: float = DENSE_TEMPERATURE) -> torch.Tensor:
    """Token-level InfoNCE between two views of the same pose: token `src[k]` of A must pick token `dst[k]`
    of B among all of B's corresponding tokens, and vice versa (symmetric).

    feat_a, feat_b: (P, T, L) L2-normalised token features of P pairs; src, dst: (V,) token indices that
    show the same scene point in A and B. Not in the paper: a from-scratch aid that gives every token a
    cross-condition target (see docs/TRAINING.md, stage `dense`).
    """
    logits = torch.einsum("pvd,pwd->pvw", feat_a[:, src], feat_b[:, dst]).float() / temperature
    p, v, _ = logits.shape
    target = torch.arange(v, device=logits.device).repeat(p)
    return 0.5 * (F.cross_entropy(logits.reshape(p * v, v), target)
                  + F.cross_entropy(logits.transpose(1, 2).reshape(p * v, v), target))


# ------------------------------------------------------------------------------- loss terms
LossParts = tuple[torch.Tensor, dict[str, torch.Tensor]]


class LossTerm(Protocol):
    def __call__(self, model: R2FormerModel, batch: Batch, features: Callable[[], Features]) -> LossParts: ...


def _groups(batch: Batch) -> GroupBatch:
    if not isinstance(batch, GroupBatch):
        raise TypeError(f"this loss term needs query groups (GroupBatch), not {type(batch).__name__}")
    return batch


class TripletTerm:
    """global/finetune: triplet margin loss on each group's global descriptors (the paper)."""

    def __call__(self, model: R2FormerModel, batch: Batch, features: Callable[[], Features]) -> LossParts:
        b = _groups(batch)
        g = features().global_desc.float().view(b.queries, b.group, -1)
        loss = triplet_loss(g[:, 0], g[:, 1], g[:, 2:])
        return loss, {"triplet_loss": loss}


class InfoNCETerm:
    """global/finetune (`--global-loss infonce`): each query must find its positive among every database
    image of the batch that `batch.valid` allows."""

    def __call__(self, model: R2FormerModel, batch: Batch, features: Callable[[], Features]) -> LossParts:
        b = _groups(batch)
        g = features().global_desc.float().view(b.queries, b.group, -1)
        k = b.group - 1
        target = torch.arange(b.queries, device=g.device) * k
        loss = infonce_loss(g[:, 0], g[:, 1:].reshape(b.queries * k, -1), target, b.valid)
        return loss, {"infonce_loss": loss}


class RerankTerm:
    """rerank/finetune: the reranker's cross-entropy on (query, positive) = 1 and (query, negative) = 0."""

    def __call__(self, model: R2FormerModel, batch: Batch, features: Callable[[], Features]) -> LossParts:
        b = _groups(batch)
        feats = features()
        n, k = b.queries, b.group - 1
        g = feats.global_desc.view(n, b.group, -1)
        loc = feats.local.view(n, b.group, *feats.local.shape[1:])
        xg = g[:, :1].expand(-1, k, -1).reshape(n * k, -1)
        xl = loc[:, :1].expand(-1, k, -1, -1).reshape(n * k, *loc.shape[2:])
        yg = g[:, 1:].reshape(n * k, -1)
        yl = loc[:, 1:].reshape(n * k, *loc.shape[2:])
        labels = torch.zeros(n, k, dtype=torch.long, device=g.device)
        labels[:, 0] = 1
        loss = rerank_loss(model.reranker(xg, xl, yg, yl).logits, labels.reshape(-1))
        return loss, {"rerank_loss": loss}


class DenseTerm:
    """dense: token InfoNCE between the two views of every pair (every patch token, not only the selected
    ones) plus `global_weight` x the pairs' symmetric global InfoNCE."""

    def __init__(self, global_weight: float = 1.0):
        self.global_weight = global_weight

    def __call__(self, model: R2FormerModel, batch: Batch, features: Callable[[], Features]) -> LossParts:
        if not isinstance(batch, PairBatch):
            raise TypeError(f"the dense loss needs aligned pairs (PairBatch), not {type(batch).__name__}")
        images = batch.images
        p = images.shape[0] // 2
        out = model.backbone(images)
        gh, gw = out.grid
        tokens = F.normalize(model.local_head(out.tokens[:, 2:]).float(), dim=-1)
        dy, dx = batch.shift
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        keep = ((rows + dy >= 0) & (rows + dy < gh) & (cols + dx >= 0) & (cols + dx < gw)).reshape(-1)
        src = torch.arange(gh * gw)[keep].to(images.device)
        dst = ((rows + dy) * gw + (cols + dx)).reshape(-1)[keep].to(images.device)
        dense = dense_correspondence_loss(tokens[:p], tokens[p:], src, dst)
        g = model.global_descriptor(out.global_tokens).float()
        target = torch.arange(p, device=images.device)
        pairs = 0.5 * (infonce_loss(g[:p], g[p:], target) + infonce_loss(g[p:], g[:p], target))
        return dense + self.global_weight * pairs, {"dense_loss": dense, "infonce_loss": pairs}
