"""Images -> R2Former features as numpy arrays.

The one extraction path of map building, localization, training and validation: decoded RGB
uint8 images are normalised and resized exactly as the official test pipeline does
(`model.preprocess`), run through `R2FormerModel.extract` in batches, and returned as float32
global descriptors (B, G) and local features (B, N, 3 + L) (float16 on request, as maps store them).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .model import R2FormerModel
from .model.preprocess import check_rgb, preprocess_batch


@dataclass
class FeatureArrays:
    global_desc: np.ndarray        # (B, G) float32, L2-normalised
    local: np.ndarray | None       # (B, N, 3 + L): x, y, attention, feature; None when not asked for

    def __len__(self) -> int:
        return len(self.global_desc)


def images_to_tensor(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) network input of B HxWx3 uint8 RGB images (sizes may differ; each is resized)."""
    arrays = [check_rgb(im) for im in images]
    if len({im.shape for im in arrays}) == 1:
        return preprocess_batch(np.stack(arrays), size)
    return torch.cat([preprocess_batch(im[None], size) for im in arrays])


def extract_arrays(model: R2FormerModel, images: Sequence[np.ndarray], local: bool = True,
                   local_dtype: type = np.float32) -> FeatureArrays:
    """Features of one batch of images."""
    height, width = model.cfg.image_size
    feats = model.extract(images_to_tensor(images, (int(height), int(width))))
    return FeatureArrays(global_desc=feats.global_desc.numpy().astype(np.float32, copy=False),
                         local=feats.local.numpy().astype(local_dtype, copy=False) if local else None)


def extract_image(model: R2FormerModel, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G,) global descriptor and (N, 3 + L) local features of one image."""
    f = extract_arrays(model, [image])
    assert f.local is not None
    return f.global_desc[0], f.local[0]


def extract_all(model: R2FormerModel, images: Iterable[np.ndarray], batch_size: int, *, count: int | None = None,
                local: bool = True, local_dtype: type = np.float32, progress: bool = False,
                desc: str = "features") -> FeatureArrays:
    """Features of every image of `images` (any iterable; `count` sizes the progress bar), `batch_size`
    at a time, in eval mode (the model's training flag is restored afterwards)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model.cfg
    was_training = model.training
    model.eval()
    glob: list[np.ndarray] = []
    loc: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        f = extract_arrays(model, batch, local=local, local_dtype=local_dtype)
        glob.append(f.global_desc)
        if f.local is not None:
            loc.append(f.local)
        batch.clear()

    items: Iterable[np.ndarray] = images
    if progress:
        from tqdm import tqdm
        items = tqdm(images, total=count, desc=desc, unit="img", leave=False, disable=None)
    try:
        for image in items:
            batch.append(image)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    g = np.concatenate(glob) if glob else np.zeros((0, cfg.global_dim), np.float32)
    if not local:
        return FeatureArrays(g, None)
    lo = np.concatenate(loc) if loc else np.zeros((0, cfg.local_tokens, cfg.local_values), local_dtype)
    return FeatureArrays(g, lo)


__all__ = ["FeatureArrays", "extract_all", "extract_arrays", "extract_image", "images_to_tensor"]
