"""Photometric augmentation of training images (`--augment photometric`).

Geometry is never touched, so the positions that define positives and negatives stay valid.
"""
from __future__ import annotations

import torch

from ..model.preprocess import IMAGENET_MEAN, IMAGENET_STD


def photometric_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random lighting changes of ImageNet-normalised images (B, 3, H, W), one draw per image.

    In [0, 1] RGB: brightness x0.3-1.3, per-channel gain x0.8-1.2, gamma e^U(-0.5, 0.5), grey with p 0.2,
    a fog-like blend towards a grey level with p 0.3 (weight <= 0.6), Gaussian noise (sigma <= 0.05).
    Teaches the global descriptor that a place seen at another time of day or weather is the same place.
    The random numbers are drawn on the CPU from `generator`, so a seeded run draws the same changes on
    any device.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    n = x.shape[0]

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(x.device) * (hi - lo) + lo

    y = (x * std + mean).clamp(0, 1)
    y = (y * uniform(n, 1, 1, 1, lo=0.3, hi=1.3) * uniform(n, 3, 1, 1, lo=0.8, hi=1.2)).clamp(0, 1)
    y = y.clamp_min(1e-6) ** torch.exp(uniform(n, 1, 1, 1, lo=-0.5, hi=0.5))
    grey = (uniform(n, 1, 1, 1) < 0.2).to(y.dtype)
    y = grey * y.mean(1, keepdim=True).expand_as(y) + (1 - grey) * y
    fog = uniform(n, 1, 1, 1, hi=0.6) * (uniform(n, 1, 1, 1) < 0.3).to(y.dtype)
    y = y * (1 - fog) + fog * uniform(n, 1, 1, 1, lo=0.5, hi=0.9)
    noise = torch.randn(y.shape, generator=generator).to(x.device) * uniform(n, 1, 1, 1, hi=0.05)
    y = (y + noise).clamp(0, 1)
    return (y - mean) / std
