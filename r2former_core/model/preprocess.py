"""Image -> network input, exactly as the official test pipeline (`hard_resize`).

uint8 RGB -> /255 -> ImageNet mean/std -> bilinear resize of the *normalised* tensor to the
model's input size without antialiasing (torchvision 0.13 resized tensors without it).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_rgb(image: np.ndarray) -> np.ndarray:
    """`image` as an array; DataError unless it is an HxWx3 uint8 RGB image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return image


def preprocess(image: np.ndarray, size: tuple[int, int] = (480, 640)) -> torch.Tensor:
    """HxWx3 uint8 RGB array -> (1, 3, size[0], size[1]) float32 tensor."""
    return preprocess_batch(check_rgb(image)[None], size)


def preprocess_batch(images: np.ndarray, size: tuple[int, int] = (480, 640)) -> torch.Tensor:
    """BxHxWx3 uint8 RGB -> (B, 3, size[0], size[1]) float32."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:      # e.g. a view of a ROS message buffer; torch wants writable memory
        images = images.copy()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
    return x
