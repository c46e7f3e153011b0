"""Transformer building blocks shared by the backbone and the reranker.

Parameter names follow timm's `Block` (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2),
so checkpoints load by name. Attention uses the fused `scaled_dot_product_attention`; blocks
also offer a *rows* forward that computes the output of only the first few tokens (everything
else only provides keys and values), which is all the last block of each stack is needed for.

Blocks built with `onednn=True` (the reranker's) run their linear layers through oneDNN in CPU
inference (`linear`): with the bias and the GELU fused it is about twice as fast as MKL's addmm
for the narrow layers of the reranker (width 32, tens of thousands of tokens) and identical in
float32 there. The backbone keeps MKL: its wide layers gain nothing and oneDNN's summation order
moves the selection attention by ~1e-4 after 12 layers. The same blocks compute attention of
8-dimensional heads (the reranker's blocks 1 and 2) and their layer norms with the compiled kernels of
`native` where they are available.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native

LAYER_NORM_EPS = 1e-6
# Below this many keys, explicit attention beats the fused kernel's per-call overhead (CPU).
SMALL_SEQUENCE = 16
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_BF16_KERNELS: bool | None = None


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN linear applies: CPU inference (no autograd, no autocast) with weights of x's dtype, float32
    or (where the CPU has bfloat16 instructions) bfloat16."""
    if not (_ONEDNN_LINEAR and x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.dtype == weight.dtype and not torch.is_autocast_enabled("cpu")):
        return False
    if x.dtype == torch.float32:
        return True
    if x.dtype == torch.bfloat16:
        global _BF16_KERNELS
        if _BF16_KERNELS is None:
            from .precision import bf16_accelerated
            _BF16_KERNELS = bf16_accelerated(torch.device("cpu"))
        return _BF16_KERNELS
    return False


def linear_wb(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, optionally followed by the exact (erf) GELU or plus `residual`; through oneDNN
    where `_onednn_ok` (the residual add fused into the layer: the same floats, one pass less)."""
    if _onednn_ok(x, weight):
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        if residual is not None and residual.dtype == x.dtype:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    else:
        y = F.linear(x, weight, bias)
        if gelu:
            y = F.gelu(y)
    return y if residual is None else residual + y


def linear(x: torch.Tensor, layer: nn.Module, gelu: bool = False, onednn: bool = True,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x) (+ GELU, or + `residual`); plain nn.Linear layers go through `linear_wb` when `onednn`, others
    (quantized layers) are called."""
    if gelu and residual is not None:
        raise ValueError("linear takes gelu or residual, not both")
    if onednn and type(layer) is nn.Linear:
        return linear_wb(x, layer.weight, layer.bias, gelu, residual)
    y = layer(x)
    y = F.gelu(y) if gelu else y
    return y if residual is None else residual + y


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """norm(x), on the compiled kernel of `native` where it applies (the reranker's width-32 tokens)."""
    return native.layer_norm(x, norm) if native.norm_applies(x, norm) else norm(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, onednn: bool = False):
        super().__init__()
        self.onednn = onednn
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N, P*C) projections -> (P, B, heads, N, head_dim)."""
        b, n, _ = y.shape
        return y.reshape(b, n, -1, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of x's tokens (+ `residual`, added by the output projection)."""
        b, n, c = x.shape
        qkv = linear(x, self.qkv, onednn=self.onednn)
        if self.onednn and native.applies(qkv, self.num_heads, 3):      # the reranker's 8-dimensional heads
            out = native.attention(qkv, self.num_heads)
        else:
            q, k, v = self._heads(qkv).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return linear(out, self.proj, onednn=self.onednn, residual=residual)

    def forward_rows(self, x: torch.Tensor, rows: int, return_probs: bool = False,
                     residual: torch.Tensor | None = None):
        """Attention output for the first `rows` tokens only (all tokens serve as keys/values), + `residual`.

        With `return_probs` also returns the softmax attention of those rows, (B, heads, rows, N).
        """
        b, n, c = x.shape
        if isinstance(self.qkv, nn.Linear):
            w, bias = self.qkv.weight, self.qkv.bias
            project = linear_wb if self.onednn else F.linear
            q_rows, kv = project(x[:, :rows], w[:c], bias[:c]), project(x, w[c:], bias[c:])
            if (self.onednn and not return_probs and n <= native.MAX_SHORT
                    and native.applies(kv, self.num_heads, 2) and native.applies(q_rows, self.num_heads, 1)):
                out = native.attention_rows(q_rows, kv, self.num_heads)
                return linear(out, self.proj, onednn=self.onednn, residual=residual), None
            q = self._heads(q_rows)[0]
            k, v = self._heads(kv).unbind(0)
        else:   # a quantized linear layer (precision int8) has no weight slices: project every row
            q, k, v = self._heads(self.qkv(x)).unbind(0)
            q = q[:, :, :rows]
        if return_probs or n <= SMALL_SEQUENCE:
            probs = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = linear(out.transpose(1, 2).reshape(b, rows, c), self.proj, onednn=self.onednn, residual=residual)
        return out, (probs if return_probs else None)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, onednn: bool = False):
        super().__init__()
        self.onednn = onednn
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return linear(linear(x, self.fc1, gelu=True, onednn=self.onednn), self.fc2, onednn=self.onednn,
                      residual=residual)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, onednn: bool = False):
        super().__init__()
        self.onednn = onednn      # the reranker's blocks: oneDNN linear layers and the compiled kernels
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, onednn)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self._norm(self.norm1, x), residual=x)
        return self.mlp(self._norm(self.norm2, x), residual=x)

    def _norm(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, norm) if self.onednn else norm(x)

    def forward_rows(self, x: torch.Tensor, rows: int, return_probs: bool = False):
        """Block output for the first `rows` tokens; the others only contribute keys/values."""
        y, probs = self.attn.forward_rows(self._norm(self.norm1, x), rows, return_probs, residual=x[:, :rows])
        return self.mlp(self._norm(self.norm2, y), residual=y), probs


def sincos_embed_2d(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sine-cosine embedding of normalised coordinates, as the R2Former reranker uses it.

    Each coordinate u gets [sin(u w_k), cos(u w_k)], w_k = 10000^(-k / (dim/4)), k < dim/4;
    the result is [e(x), e(y)] with `dim` values.
    """
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32, device=x.device) / quarter))
    omega = omega.to(x.dtype)
    ax = x.unsqueeze(-1) * omega
    ay = y.unsqueeze(-1) * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=-1)


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def init_linear_layers(module: nn.Module) -> None:
    """timm-style initialisation: truncated normal weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
