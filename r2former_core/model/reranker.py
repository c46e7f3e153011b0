"""The R2Former reranking transformer, computed without the official memory blow-ups.

For each (query, reference) pair with N local tokens per side:
  C = cosine(query tokens, reference tokens)                                  (N x N)
  each query token i takes its P best references j, each reference token j its P best
  query tokens i; a pair becomes v = [xq, yq, aq, xr, yr, ar, C_ij] (7 values), embedded by
  pair_head (7 -> d) plus a sin-cos embedding of the reference token's (x, y);
  block-1 (`blocks_2`) reduces each token's P pair embeddings to one token (a class token);
  the token's query-side (x, y) of its best pair is embedded and added; block-2 (`blocks`)
  aggregates the 2N tokens with another class token; `decoder_pred` gives 2 logits.

Efficient form: pair_head is linear, so v @ W splits into a query-token term, a reference-token
term and a correlation term. Those are computed once per token and gathered by the top-P
indices: no N x N x 7 tensor, no argsort, no int64 index tensors broadcast to 7 channels.
The query side is shared by all K candidates. Block stacks use fused attention, and the last
block of each stack only computes its class-token output. In CPU float32 inference the top-P selections,
block 1's input, the attention and the layer norms run on the compiled kernels of `native`.

Precision: the correlations, their top-P selection and the pair embeddings are always float32 (a
bfloat16 correlation would tie many of the top-P candidates); the two block stacks run in the
mode's dtype (bf16: a bfloat16 copy of their weights, so no cast per operation; fp16: autocast on
CUDA); logits are cast to float32 before the softmax/sigmoid (a float16 sigmoid rounds every logit
above ~8.3 to exactly 1.0, and ties would fall back to the global order).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .config import ModelConfig
from .layers import LAYER_NORM_EPS, Block, init_linear_layers, layer_norm, linear, sincos_embed_2d, trunc_normal_
from .pairs import pair_embeddings


@dataclass
class RerankOutput:
    """Scores of K (query, candidate) pairs."""
    logits: torch.Tensor        # (K, classes)
    match_prob: torch.Tensor    # (K,) probability of "same place"
    global_score: torch.Tensor  # (K,) cosine of the global descriptors
    final_score: torch.Tensor   # (K,) r * global + (1 - r) * match_prob, r = clamp(ratio, .1, .9)


class Reranker(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.rerank_dim
        self.dim = d
        self.partners = cfg.rerank_partners
        self.num_classes = cfg.rerank_classes
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_token_2 = nn.Parameter(torch.zeros(1, 1, d))
        # Present in the official state dict, never used in its forward.
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 2 * cfg.num_local + 1, d), requires_grad=False)
        self.ratio = nn.Parameter(torch.full((1,), 0.5))
        self.blocks = nn.ModuleList(Block(d, cfg.rerank_heads, onednn=True) for _ in range(cfg.rerank_depth))
        self.blocks_2 = nn.ModuleList(Block(d, cfg.rerank_heads, onednn=True) for _ in range(cfg.rerank_pair_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.pair_head = nn.Linear(7, d)
        self.pair_head_2 = nn.Linear(d, d)
        self.decoder_pred = nn.Linear(d, cfg.rerank_classes)
        self.pair_batch = 4096   # block-1 sequences per slice (speed only; results do not depend on it)
        self._casts: dict = {}   # bfloat16 copies of the block stacks (not sub-modules: not in the state dict)

    def reset_parameters(self) -> None:
        init_linear_layers(self)
        trunc_normal_(self.cls_token)
        trunc_normal_(self.cls_token_2)
        nn.init.constant_(self.ratio, 0.5)

    @staticmethod
    def _stack(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """Run a block stack and return the class-token (row 0) output."""
        for block in blocks[:-1]:
            x = block(x)
        last: Any = blocks[-1]
        return last.forward_rows(x, rows=1)[0][:, 0]

    def _query_terms(self, xl: torch.Tensor):
        coords = xl[..., :3].clamp(0, 1)
        w = self.pair_head.weight
        a_q = coords @ w[:, :3].T                                    # (Bq, N, d)
        pe_q = sincos_embed_2d(coords[..., 0], coords[..., 1], self.dim)  # (Bq, N, d)
        return F.normalize(xl[..., 3:], dim=-1), a_q, pe_q

    def _stacks(self, dtype: torch.dtype) -> Reranker:
        """The module whose block stacks, norms and heads run in `dtype`: self for float32, else a cached
        copy cast to `dtype` (rebuilt when the weights change)."""
        if dtype == torch.float32:
            return self
        key = (dtype, self.cls_token.device, tuple(p._version for p in self.parameters()))
        if key not in self._casts:
            twin = copy.copy(self)            # shallow: share config, then replace the modules that run
            twin._modules = dict(self._modules)
            twin._parameters = dict(self._parameters)
            twin._casts = {}
            for name in ("blocks", "blocks_2", "decoder_norm", "pair_head_2", "decoder_pred"):
                twin._modules[name] = copy.deepcopy(getattr(self, name)).to(dtype)
            for name in ("cls_token", "cls_token_2"):
                twin._parameters[name] = nn.Parameter(getattr(self, name).detach().to(dtype), requires_grad=False)
            self._casts = {key: twin}
        return self._casts[key]

    def logits(self, xl: torch.Tensor, yl: torch.Tensor, query_terms=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Logits (B, classes) float32 for B pairs. `xl` may have batch 1 (shared query) or B. `dtype`:
        what the block stacks compute in (float32 = exact; inference only otherwise)."""
        b, n, _ = yl.shape
        p = self.partners
        xf, a_q, pe_q = query_terms if query_terms is not None else self._query_terms(xl)
        xf, pe_q = (t.expand(b, -1, -1) for t in (xf, pe_q))   # views when shared (a_q: pair_embeddings expands it)
        w = self.pair_head.weight
        y_coords = yl[..., :3].clamp(0, 1)
        yf = F.normalize(yl[..., 3:], dim=-1)
        b_r = y_coords @ w[:, 3:6].T + sincos_embed_2d(y_coords[..., 0], y_coords[..., 1], self.dim)
        w_c, bias = w[:, 6], self.pair_head.bias

        corr = torch.matmul(xf, yf.transpose(1, 2))                   # (B, N, N)
        if native.topk_applies(corr, p):                              # both selections in one pass
            val_q, idx_q, val_r, idx_r = native.mutual_topk(corr, p)
        else:
            val_q, idx_q = corr.topk(p, dim=2)                        # per query token: best refs
            val_r, idx_r = corr.topk(p, dim=1)                        # per ref token: best queries
            val_r, idx_r = val_r.transpose(1, 2), idx_r.transpose(1, 2)   # (B, N, P)

        bi = torch.arange(b, device=yl.device)[:, None, None]
        # Token position: the query-side (x, y) of each token's best pair.
        pe_tokens = torch.cat([pe_q, pe_q[bi[..., 0], idx_r[..., 0]]], dim=1)

        net = self._stacks(dtype)
        cast = yl.device.type == "cuda" and dtype != torch.float32
        with torch.autocast("cuda", dtype=dtype) if cast else contextlib.nullcontext():
            if cast:
                net = self   # CUDA: autocast does the casting, weights stay float32
            else:
                pe_tokens = pe_tokens.to(dtype)
            # Block-1 runs on many tiny sequences (a class token and P pair embeddings each); slices that fit in
            # cache are much faster.
            if dtype == torch.float32 and native.pairs_apply(b_r):      # the sequences assembled in one pass
                seq = native.pair_tokens(a_q, b_r, val_q, idx_q, val_r, idx_r, w_c, bias, net.cls_token_2)
                parts: Any = seq.reshape(b * 2 * n, p + 1, self.dim).split(self.pair_batch)
            else:
                emb = pair_embeddings(a_q, b_r, val_q, idx_q, val_r, idx_r, w_c, bias)
                emb = emb if cast else emb.to(dtype)
                cls2 = net.cls_token_2
                parts = (torch.cat([cls2.expand(len(part), -1, -1), part], 1)
                         for part in emb.reshape(b * 2 * n, p, self.dim).split(self.pair_batch))
            tokens = torch.cat([self._stack(net.blocks_2, part) for part in parts], dim=0)
            tokens = linear(layer_norm(tokens, net.decoder_norm), net.pair_head_2).reshape(b, 2 * n, self.dim)
            x = torch.cat([net.cls_token.expand(b, -1, -1), tokens + pe_tokens], dim=1)
            out = linear(layer_norm(self._stack(net.blocks, x), net.decoder_norm), net.decoder_pred)
        return out.float()

    def scores(self, logits: torch.Tensor, global_score: torch.Tensor) -> RerankOutput:
        """Match probability and final score from the logits, in float32 whatever the logits' dtype."""
        logits = logits.float()
        global_score = global_score.float()
        if self.num_classes == 1:
            prob = torch.sigmoid(logits[:, 0])
        else:
            prob = torch.softmax(logits, dim=-1)[:, 1]
        r = self.ratio.clamp(0.1, 0.9)
        return RerankOutput(logits=logits, match_prob=prob, global_score=global_score,
                            final_score=r * global_score + (1 - r) * prob)

    def forward(self, xg: torch.Tensor, xl: torch.Tensor, yg: torch.Tensor, yl: torch.Tensor) -> RerankOutput:
        """B pairs (xg[i], xl[i]) vs (yg[i], yl[i]); differentiable (used by training)."""
        global_score = F.cosine_similarity(xg, yg, dim=-1, eps=1e-8)
        return self.scores(self.logits(xl, yl), global_score)

    def rerank_query(self, q_global: torch.Tensor, q_local: torch.Tensor, c_global: torch.Tensor,
                     c_local: torch.Tensor, chunk: int = 25, precision: str = "fp32") -> RerankOutput:
        """One query (G,), (N, L) against K candidates (K, G), (K, N, L), inference only.

        The query-side terms are computed once; candidates go through in chunks of `chunk` pairs
        to bound peak memory (the result does not depend on the chunk size). `precision`: a concrete
        mode of `precision.resolve_precision` (int8 quantizes only the backbone: fp32 here).
        """
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        query_terms = self._query_terms(q_local[None])
        logits = torch.cat([self.logits(q_local[None], c_local[s:s + chunk], query_terms, dtype=dtype)
                            for s in range(0, c_local.shape[0], chunk)], dim=0)
        global_score = F.cosine_similarity(q_global[None], c_global, dim=-1, eps=1e-8)
        return self.scores(logits, global_score)
