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
