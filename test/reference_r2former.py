"""A plain, literal implementation of R2Former used only to check the fast path.

It follows the paper and the official code's formulas step by step (explicit softmax attention
everywhere, full argsorts, the materialised N x N x 7 pair tensor), reading the weights of an
`R2FormerModel`'s state dict. Slow and memory-hungry on purpose: no shared code with the model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)


def _lin(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def _attention_probs(x, sd, prefix, heads):
    b, n, c = x.shape
    qkv = _lin(x, sd, prefix + ".qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    probs = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(dim=-1)
    return probs, v


def _block(x, sd, prefix, heads):
    b, n, c = x.shape
    probs, v = _attention_probs(_ln(x, sd, prefix + ".norm1"), sd, prefix + ".attn", heads)
    x = x + _lin((probs @ v).transpose(1, 2).reshape(b, n, c), sd, prefix + ".attn.proj")
    h = _ln(x, sd, prefix + ".norm2")
    h = _lin(F.gelu(_lin(h, sd, prefix + ".mlp.fc1")), sd, prefix + ".mlp.fc2")
    return x + h


def _pos_embed(pos, trained_grid, grid):
    """Literal version of the official run-time position-embedding adaptation."""
    gh0, gw0 = trained_grid
    gh, gw = grid
    if (gh, gw) == (gh0, gw0):
        return pos
    d = pos.shape[-1]
    prefix, patch = pos[:, :2], pos[0, 2:].reshape(gh0, gw0, d)
    s = max(gh, gw)
    if s <= gh0 and s <= gw0:
        t0, l0 = (gh0 - s) // 2, (gw0 - s) // 2
        square = patch[t0:t0 + s, l0:l0 + s]
    else:
        original = ((patch[0, gw0 // 2] - patch[gh0 // 2, gw0 // 2]) ** 2).sum()
        up = F.interpolate(patch.permute(2, 0, 1)[None], size=(s, s), mode="bicubic", align_corners=False)[0]
        up = up.permute(1, 2, 0)
        centre = up[s // 2, s // 2]
        now = ((up[0, s // 2] - centre) ** 2).sum()
        square = centre + (up - centre) * math.sqrt(float(original / now))
    t1, l1 = (s - gh) // 2, (s - gw) // 2
    square = square[t1:t1 + gh, l1:l1 + gw]
    return torch.cat([prefix, square.reshape(1, gh * gw, d)], dim=1)


def reference_extract(sd, cfg, images):
    """Returns (global (B,G), local (B,n,3+L), index (B,n), score (B,P))."""
    b, _, h, w = images.shape
    p = cfg.patch_size
    gh, gw = h // p, w // p
    x = F.conv2d(images, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["backbone.cls_token"].expand(b, -1, -1), sd["backbone.dist_token"].expand(b, -1, -1), x], 1)
    x = x + _pos_embed(sd["backbone.pos_embed"], cfg.grid, (gh, gw))
    for i in range(cfg.depth - 1):
        x = _block(x, sd, f"backbone.blocks.{i}", cfg.num_heads)
    tokens = x
    last = f"backbone.blocks.{cfg.depth - 1}"
    probs, _ = _attention_probs(_ln(tokens, sd, last + ".norm1"), sd, last + ".attn", cfg.num_heads)
    score = probs[:, :, 0, 2:].sum(1) + probs[:, :, 1, 2:].sum(1)
    x = _block(tokens, sd, last, cfg.num_heads)
    y = _ln(x, sd, "backbone.norm")
    g = F.normalize((_lin(y[:, 0], sd, "backbone.head") + _lin(y[:, 1], sd, "backbone.head_dist")) / 2, dim=-1)
    order = torch.argsort(score, dim=1, descending=True)[:, :min(cfg.num_local, gh * gw)]
    rows = []
    for bi in range(b):
        local = []
        top = score[bi, order[bi, 0]]
        for pidx in order[bi].tolist():
            feat_pos = pidx if cfg.offset_quirk else pidx + 2
            f = _lin(tokens[bi, feat_pos], sd, "local_head")
            xx = (p * (pidx % gw) + p / 2) / max(h, w)
            yy = (p * (pidx // gw) + p / 2) / max(h, w)
            a = score[bi, pidx] / top
            local.append(torch.cat([torch.tensor([xx, yy]), a.reshape(1), f]))
        rows.append(torch.stack(local))
    return g, torch.stack(rows), order, score


def _sincos(u, v, dim):
    k = torch.arange(dim // 4, dtype=torch.float32)
    omega = 1.0 / 10000 ** (k / (dim // 4))
    return torch.cat([torch.sin(u[..., None] * omega), torch.cos(u[..., None] * omega),
                      torch.sin(v[..., None] * omega), torch.cos(v[..., None] * omega)], dim=-1)


def reference_rerank(sd, cfg, xg, xl, yg, yl):
    """B pairs -> (logits (B,C), prob (B,), final (B,)), literally as the official forward."""
    sd = {k[len("reranker."):]: v for k, v in sd.items() if k.startswith("reranker.")}
    d, heads, kk = cfg.rerank_dim, cfg.rerank_heads, cfg.rerank_partners
    b, n, _ = xl.shape
    global_score = F.cosine_similarity(xg, yg, dim=-1, eps=1e-8)
    xf, yf = F.normalize(xl[:, :, 3:], dim=-1), F.normalize(yl[:, :, 3:], dim=-1)
    xc, yc = xl[:, :, :3].clamp(0, 1), yl[:, :, :3].clamp(0, 1)
    corr = torch.einsum("bic,bjc->bij", xf, yf)
    # Materialised pair tensor v(i, j) = [xc_i, yc_j, corr_ij].
    pairs = torch.cat([xc[:, :, None, :].expand(b, n, n, 3), yc[:, None, :, :].expand(b, n, n, 3),
                       corr[..., None]], dim=-1)                                   # (B, N, N, 7)
    q_order = torch.argsort(corr, dim=2, descending=True)[:, :, :kk]             # (B, N, K)
    k_order = torch.argsort(corr, dim=1, descending=True)[:, :kk, :]             # (B, K, N)
    sq = torch.gather(pairs, 2, q_order[..., None].expand(b, n, kk, 7))
    sk = torch.gather(pairs, 1, k_order[..., None].expand(b, kk, n, 7)).permute(0, 2, 1, 3)
    s = torch.cat([sq, sk], dim=1)                                               # (B, 2N, K, 7)
    e = _lin(s, sd, "pair_head") + _sincos(s[..., 3], s[..., 4], d)
    e = e.reshape(b * 2 * n, kk, d)
    e = torch.cat([sd["cls_token_2"].expand(e.shape[0], -1, -1), e], dim=1)
    for i in range(cfg.rerank_pair_depth):
        e = _block(e, sd, f"blocks_2.{i}", heads)
    e = _lin(_ln(e, sd, "decoder_norm")[:, 0], sd, "pair_head_2").reshape(b, 2 * n, d)
    e = e + _sincos(s[:, :, 0, 0], s[:, :, 0, 1], d)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), e], dim=1)
    for i in range(cfg.rerank_depth):
        t = _block(t, sd, f"blocks.{i}", heads)
    logits = _lin(_ln(t, sd, "decoder_norm")[:, 0], sd, "decoder_pred")
    prob = logits.softmax(-1)[:, 1]
    r = sd["ratio"].clamp(0.1, 0.9)
    return logits, prob, r * global_score + (1 - r) * prob
