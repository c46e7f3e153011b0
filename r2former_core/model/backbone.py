"""DeiT distilled backbone at any input size, with the attention R2Former selects tokens by.

Sequence = [CLS, DIST, patches (row-major)] + position embedding. Blocks 0..depth-2 run in
full; the last block only has to produce the CLS and DIST outputs (the global descriptor) and
the softmax attention of those two rows (the token selection), so it runs as a *rows* block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import LAYER_NORM_EPS, Block, trunc_normal_


class PatchEmbed(nn.Module):
    """16x16 stride-16 convolution without an input-size assertion."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvStem(nn.Module):
    """log2(patch_size) 3x3 stride-2 convolutions (GroupNorm + GELU), then a 1x1 projection to the
    embedding: the same token grid as `PatchEmbed`, with the locality prior of a CNN."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        steps = patch_size.bit_length() - 1
        widths = [3] + [max(16, embed_dim >> (steps - i)) for i in range(1, steps + 1)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(8 if c_out % 8 == 0 else 1, c_out), nn.GELU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(widths[-1], embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


def instance_normalize(images: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Every image channel standardised by its own mean and standard deviation (B, 3, H, W)."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (images - mean) / (std + eps)


def _centre_crop(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Centre window of a (1, D, H, W) grid."""
    _, _, h, w = grid.shape
    top, left = (h - rows) // 2, (w - cols) // 2
    return grid[:, :, top:top + rows, left:left + cols]


def adapt_patch_pos_embed(pos: torch.Tensor, trained_grid: tuple[int, int],
                          grid: tuple[int, int]) -> torch.Tensor:
    """Position embedding of the patch tokens for an input whose patch grid differs from training.

    Follows the official behaviour: with S = max(grid), take the centre SxS window of the trained
    grid if it fits; otherwise upsample the grid bicubically to SxS and rescale it about its
    centre element so that the squared distance between the top-middle and the centre embedding
    is that of the trained grid. Then keep the centre rows/cols of the shorter side.
    `pos` is (1, gh0*gw0, D); returns (1, gh*gw, D).
    """
    gh0, gw0 = trained_grid
    gh, gw = grid
    if (gh, gw) == (gh0, gw0):
        return pos
    dim = pos.shape[-1]
    g = pos.reshape(1, gh0, gw0, dim).permute(0, 3, 1, 2)
    s = max(gh, gw)
    if s <= gh0 and s <= gw0:
        g = _centre_crop(g, s, s)
    else:
        ref = (g[0, :, 0, gw0 // 2] - g[0, :, gh0 // 2, gw0 // 2]).pow(2).sum()
        g = F.interpolate(g, size=(s, s), mode="bicubic", align_corners=False)
        centre = g[:, :, s // 2, s // 2][:, :, None, None]
        cur = (g[0, :, 0, s // 2] - g[0, :, s // 2, s // 2]).pow(2).sum()
        g = centre + (g - centre) * torch.sqrt(ref / cur.clamp_min(1e-12))
    g = _centre_crop(g, gh, gw)
    return g.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)


def resize_pos_embed_grid(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          num_prefix: int = 2) -> torch.Tensor:
    """Resample a trained position embedding to a new grid (bilinear), keeping prefix tokens.

    Used to adapt ImageNet DeiT weights (14x14 grid) to the training resolution, as the official
    training code does.
    """
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    dim = pos.shape[-1]
    g = patches.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new_grid, mode="bilinear", align_corners=False)
    return torch.cat([prefix, g.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


@dataclass
class BackboneOutput:
    tokens: torch.Tensor       # (B, 2+P, D) input of the last block (no final norm)
    attention: torch.Tensor    # (B, P) CLS+DIST attention towards each patch, summed over heads
    global_tokens: torch.Tensor  # (B, 2, D) final-normed CLS and DIST outputs
    grid: tuple[int, int]


class DeiTDistilled(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        gh, gw = cfg.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + gh * gw, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embed = ConvStem(cfg.patch_size, d) if cfg.stem == "conv" else PatchEmbed(cfg.patch_size, d)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(d, cfg.global_dim)
        self.head_dist = nn.Linear(d, cfg.global_dim)
        self._pos_cache: dict = {}

    def reset_parameters(self) -> None:
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            trunc_normal_(p)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 2+gh*gw, D) position embedding for a patch grid; cached in inference."""
        if grid == self.cfg.grid:
            return self.pos_embed
        key = (grid, self.pos_embed._version, self.pos_embed.data_ptr(), self.pos_embed.dtype)
        if torch.is_grad_enabled() or key not in self._pos_cache:
            patches = adapt_patch_pos_embed(self.pos_embed[:, 2:], self.cfg.grid, grid)
            pos = torch.cat([self.pos_embed[:, :2], patches], dim=1)
            if torch.is_grad_enabled():
                return pos
            self._pos_cache = {key: pos}
        return self._pos_cache[key]

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        b, _, h, w = images.shape
        p = self.cfg.patch_size
        grid = (h // p, w // p)
        if self.cfg.input_norm == "instance":
            images = instance_normalize(images)
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x], dim=1)
        x = x + self.position_embedding(grid).to(x.dtype)
        for block in self.blocks[:-1]:
            x = block(x)
        last: Any = self.blocks[-1]
        out, probs = last.forward_rows(x, rows=2, return_probs=True)
        attention = probs[..., 2:].sum(dim=(1, 2))
        return BackboneOutput(tokens=x, attention=attention, global_tokens=self.norm(out), grid=grid)
