"""The reranker's pair embeddings in torch: the form `reranker` falls back to and `native.pair_tokens` is checked
against (its own module: both import it, and the reranker imports `native`)."""
from __future__ import annotations

import torch


def pair_embeddings(a_q: torch.Tensor, b_r: torch.Tensor, val_q: torch.Tensor, idx_q: torch.Tensor,
                    val_r: torch.Tensor, idx_r: torch.Tensor, w_c: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The pair head's output for every token's P pairs, from its three linear terms: a_q (1 or B, N, d) the query
    tokens' terms, b_r (B, M, d) the reference tokens', partners by idx_q (B, N, P) into b_r and idx_r (B, M, P)
    into a_q, correlations val_q / val_r times w_c (d,), plus bias -> (B, N + M, P, d): query tokens first.
    (`native.pair_tokens` computes the same with the class token in front, in one pass.)"""
    b = b_r.shape[0]
    a_q = a_q.expand(b, -1, -1)
    bi = torch.arange(b, device=b_r.device)[:, None, None]
    q_side = a_q[:, :, None, :] + b_r[bi, idx_q] + val_q[..., None] * w_c    # (B, N, P, d)
    r_side = a_q[bi, idx_r] + b_r[:, :, None, :] + val_r[..., None] * w_c    # (B, M, P, d)
    return torch.cat([q_side, r_side], dim=1) + bias
