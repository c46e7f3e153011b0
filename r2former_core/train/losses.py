"""Training losses (the paper's defaults)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
