"""R2FormerModel: feature extraction (global + attention-selected local tokens) and reranking."""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from . import native
from .backbone import DeiTDistilled
from .config import ModelConfig
from .layers import trunc_normal_
from .precision import autocast, describe, rerank_precision, resolve_precision
from .reranker import Reranker, RerankOutput

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Features of B images."""
    global_desc: torch.Tensor   # (B, G) L2-normalised
    local: torch.Tensor         # (B, N, 3+L): x, y, attention, feature (official order)
    token_index: torch.Tensor   # (B, N) patch index (row * grid_w + col) of each local row
    attention: torch.Tensor     # (B, P) selection score over all patches

    def to(self, *args, **kwargs) -> Features:
        return Features(*(t.to(*args, **kwargs) for t in
                          (self.global_desc, self.local, self.token_index, self.attention)))


class R2FormerModel(nn.Module):
    """DeiT distilled backbone + local head + reranker, named as in the official state dict
    (`backbone.*`, `local_head.*`, `Reranker.*` <-> our `reranker.*`)."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.backbone = DeiTDistilled(self.cfg)
        self.local_head = nn.Linear(self.cfg.embed_dim, self.cfg.local_dim)
        self.reranker = Reranker(self.cfg)
        self.detach_local = True   # official `finetune=0`: no reranker gradient into the backbone
        self._fingerprint: tuple | None = None
        self.precision_setting = "fp32"   # what was asked for (options.PRECISIONS); `precision` is the mode used
        # Derived copies for reduced precisions (int8 backbone), keyed by (mode, device, weight versions);
        # a plain dict, so they are not sub-modules: the state dict and the fingerprint stay those of the weights.
        self._derived: dict = {}

    # ----------------------------------------------------------------------------- set-up
    def reset_parameters(self) -> None:
        from .layers import init_linear_layers
        init_linear_layers(self)
        self.backbone.reset_parameters()
        self.reranker.reset_parameters()
        trunc_normal_(self.local_head.weight)

    @property
    def device(self) -> torch.device:
        return self.backbone.cls_token.device

    # ------------------------------------------------------------------------- precision
    def set_precision(self, precision: str) -> str:
        """Choose the numeric precision of `extract` and `rerank` (options.PRECISIONS; the default is fp32,
        exact). Returns the mode it resolves to on the model's device (`auto` -> bf16/fp16/fp32); ConfigError
        when the device cannot run it. The setting follows the model to another device (`model.to`)."""
        resolved = resolve_precision(precision, self.device)
        self.precision_setting = precision
        self._resolved = (precision, self.device, resolved)
        self._derived.clear()
        return resolved

    @property
    def precision(self) -> str:
        """The mode `extract` runs in (fp32, bf16, fp16 or int8) on the current device."""
        setting, device, resolved = getattr(self, "_resolved", (None, None, None))
        if setting != self.precision_setting or device != self.device:
            resolved = resolve_precision(self.precision_setting, self.device)
            self._resolved = (self.precision_setting, self.device, resolved)
        return str(resolved)

    @property
    def rerank_precision(self) -> str:
        """The mode `rerank` runs in (see `precision.rerank_precision`)."""
        return rerank_precision(self.precision, self.device)

    def describe_precision(self) -> str:
        """One line for start-up logs and diagnostics (with the reranker's kernels on a CPU)."""
        text = describe(self.precision_setting, self.precision, self.device)
        if self.device.type == "cpu" and self.cfg.rerank_dim // self.cfg.rerank_heads == native.HEAD_DIM:
            text += "; " + native.describe()
        return text

    def autocast(self):
        """The context of this model's precision (for callers that run `forward_features` or the reranker
        themselves, e.g. training's mining and validation passes). fp32 disables TF32 on CUDA."""
        return autocast(self.precision, self.device)

    def _inference_backbone(self, precision: str) -> nn.Module:
        """The backbone `extract` runs: the weights themselves, or for int8 a dynamically quantized copy
        of its linear layers (rebuilt when the weights change)."""
        if precision != "int8":
            return self.backbone
        versions = tuple(p._version for p in self.backbone.parameters())
        key = ("int8", versions)
        if key not in self._derived:
            import warnings
            with warnings.catch_warnings():   # torch.ao.quantization warns that it moves to torchao
                warnings.simplefilter("ignore")
                quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(self.backbone).cpu(),
                                                                   {nn.Linear}, dtype=torch.qint8)
            self._derived = {key: quantized}
        return self._derived[key]

    @property
    def fingerprint(self) -> str:
        """Stable hash of config and weights (hex, 16 chars). Maps record it."""
        versions = tuple(p._version for p in self.state_dict().values())
        if self._fingerprint is None or self._fingerprint[0] != versions:
            h = hashlib.sha256(self.cfg.to_json().encode())
            for name, t in sorted(self.state_dict().items()):
                arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
                h.update(name.encode())
                h.update(np.asarray(arr.shape, np.int64).tobytes())
                h.update(arr.tobytes())
            self._fingerprint = (versions, h.hexdigest()[:16])
        return self._fingerprint[1]

    # ------------------------------------------------------------------------ extraction
    def global_descriptor(self, global_tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised mean of the class-token and distillation-token heads, (B, 2, D) -> (B, G)."""
        return F.normalize((self.backbone.head(global_tokens[:, 0]) + self.backbone.head_dist(global_tokens[:, 1])) / 2,
                           dim=-1)

    def forward_features(self, images: torch.Tensor, backbone: nn.Module | None = None) -> Features:
        """Differentiable extraction; `extract` is the inference entry point."""
        cfg = self.cfg
        b, _, h, w = images.shape
        out = (backbone or self.backbone)(images)
        global_desc = self.global_descriptor(out.global_tokens)
        n_patches = out.attention.shape[1]
        values, index = out.attention.topk(min(cfg.num_local, n_patches), dim=1)
        seq_pos = index if cfg.offset_quirk else index + 2
        tokens = out.tokens.gather(1, seq_pos[..., None].expand(-1, -1, out.tokens.shape[-1]))
        if self.detach_local:
            tokens = tokens.detach()
        feats = self.local_head(tokens)
        p = cfg.patch_size
        gw = out.grid[1]
        scale = float(max(h, w))
        x = (p * (index % gw) + p / 2).to(feats.dtype) / scale
        y = (p * torch.div(index, gw, rounding_mode="floor") + p / 2).to(feats.dtype) / scale
        a = (values / values[:, :1]).to(feats.dtype)
        local = torch.cat([x[..., None], y[..., None], a[..., None], feats], dim=-1)
        return Features(global_desc=global_desc, local=local, token_index=index, attention=out.attention)

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> Features:
        """(B, 3, H, W) RGB ImageNet-normalised float images -> Features (float32, on CPU if the
        input was on CPU, else on the model's device)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        src = images.device
        precision = self.precision
        with autocast(precision, self.device):
            feats = self.forward_features(images.to(self.device, non_blocking=True),
                                          self._inference_backbone(precision))
        return Features(global_desc=feats.global_desc.float().to(src), local=feats.local.float().to(src),
                        token_index=feats.token_index.to(src), attention=feats.attention.float().to(src))

    # ------------------------------------------------------------------------- reranking
    @torch.inference_mode()
    def rerank(self, q_global: torch.Tensor, q_local: torch.Tensor, c_global: torch.Tensor,
               c_local: torch.Tensor, chunk: int = 25) -> RerankOutput:
        """Score one query (G,), (N, 3+L) against K candidates (K, G), (K, N, 3+L) in one call.

        Accepts torch tensors or numpy arrays (float16 map features included); results are
        float32 tensors on CPU.
        """
        args = [torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t)
                for t in (q_global, q_local, c_global, c_local)]
        q_global, q_local, c_global, c_local = args
        if q_local.ndim != 2 or c_local.ndim != 3 or c_global.ndim != 2 or q_global.ndim != 1:
            raise ValueError("rerank expects q_global (G,), q_local (N, C), c_global (K, G), c_local (K, N, C); "
                             f"got {tuple(q_global.shape)}, {tuple(q_local.shape)}, {tuple(c_global.shape)}, "
                             f"{tuple(c_local.shape)}")
        dtype = torch.float32
        dev = self.device
        q_global, q_local, c_global, c_local = (t.to(dev, dtype) for t in (q_global, q_local, c_global, c_local))
        if c_local.shape[0] == 0:
            empty = torch.zeros(0)
            return RerankOutput(torch.zeros(0, self.cfg.rerank_classes), empty, empty, empty)
        out = self.reranker.rerank_query(q_global, q_local, c_global, c_local, chunk=chunk,
                                         precision=self.rerank_precision)
        return RerankOutput(*(t.float().cpu() for t in (out.logits, out.match_prob, out.global_score,
                                                         out.final_score)))

    # ----------------------------------------------------------------------- convenience
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        from .preprocess import preprocess
        return preprocess(image, size=self.cfg.image_size)


def build_model(cfg: ModelConfig | None = None, device: str = "cpu", seed: int | None = None,
                precision: str = "fp32") -> R2FormerModel:
    """A freshly initialised model (random weights), in eval mode, on `device`, at `precision`."""
    if seed is not None:
        torch.manual_seed(seed)
    model = R2FormerModel(cfg)
    model.reset_parameters()
    model = model.to(resolve_device(device)).eval()
    model.set_precision(precision)
    return model
