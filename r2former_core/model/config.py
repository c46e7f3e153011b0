"""Model configuration: one dataclass, named presets, JSON round trip.

The default (`ModelConfig()`) is the released R2Former configuration (DeiT-S distilled at
480x640, 256-d global, 500 local tokens, reranker 2+6 layers of width 32). Other presets are
variants we train ourselves; a preset is data, not code.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    # Backbone (DeiT distilled: class token + distillation token + patch tokens)
    image_size: tuple[int, int] = (480, 640)  # (H, W) the position embedding was trained for
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    # Heads
    global_dim: int = 256
    local_dim: int = 128
    num_local: int = 500
    # Reranker
    rerank_dim: int = 32
    rerank_heads: int = 4
    rerank_depth: int = 6
    rerank_pair_depth: int = 2
    rerank_partners: int = 5
    rerank_classes: int = 2
    # The official code gathers the local feature of patch p at sequence position p (which is
    # patch p-2, or the CLS/DIST token) while the coordinates describe patch p. The official
    # checkpoint was trained with it, so it is on by default; our own models may turn it off.
    offset_quirk: bool = True
    # Our own additions for models trained from scratch (the official checkpoint uses the defaults):
    # `stem="conv"` replaces the single patch_size x patch_size patch convolution by a stack of
    # 3x3 stride-2 convolutions ending in a 1x1 projection (same token grid; "early convolutions"
    # make small ViTs train much faster from scratch); `input_norm="instance"` standardises every
    # image channel by its own mean and standard deviation before the backbone, so a global change of
    # brightness, gain or contrast (dusk, fog, night) does not reach the network.
    stem: str = "patch"                 # patch | conv
    input_norm: str = "none"            # none | instance

    def __post_init__(self) -> None:
        if self.stem not in ("patch", "conv"):
            raise ConfigError(f"stem must be 'patch' or 'conv', not {self.stem!r}")
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise ConfigError(f"stem 'conv' needs a power-of-two patch_size, not {self.patch_size}")
        if self.input_norm not in ("none", "instance"):
            raise ConfigError(f"input_norm must be 'none' or 'instance', not {self.input_norm!r}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def local_tokens(self) -> int:
        """Local tokens per image at the configured input size (num_local, or fewer patches)."""
        return min(self.num_local, self.grid[0] * self.grid[1])

    @property
    def local_values(self) -> int:
        """Values per local token: x, y, attention, then the projected feature."""
        return 3 + self.local_dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}; known: {sorted(names)}")
        data = dict(data)
        if "image_size" in data:
            data["image_size"] = tuple(int(v) for v in data["image_size"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


PRESETS: dict[str, ModelConfig] = {
    # The paper's released configuration (CVPR23_DeitS_Rerank.pth).
    "r2former_deits": ModelConfig(),
    # Small variant for CPU training and demos (DeiT-Tiny width, lower resolution).
    "r2former_tiny": ModelConfig(image_size=(240, 320), embed_dim=192, depth=12, num_heads=3,
                                 num_local=200, offset_quirk=False),
    # The packaged demo model (models/r2former_tiny_demo.safetensors, docs/TRAINING.md): DeiT-Tiny width,
    # 6 blocks at 128x160 (8x10 patches), 48 local tokens, conv stem and per-image normalisation so it
    # trains from scratch on a CPU.
    "r2former_demo": ModelConfig(image_size=(128, 160), embed_dim=192, depth=6, num_heads=3, num_local=48,
                                 offset_quirk=False, stem="conv", input_norm="instance"),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
