"""Loading and saving model weights, strictly and without pickle.

Formats `load_model` accepts (detected from the file's content, not its name):
  * the project's own safetensors file: weights + the model config in the metadata;
  * the official R2Former checkpoint (`CVPR23_DeitS_Rerank.pth` layout): a torch.save dict whose
    `model_state_dict` holds `module.backbone.*`, `module.local_head.*`, `module.Reranker.*`;
  * DeiT distilled ImageNet weights (the facebookresearch `.pth` with a `model` entry, a plain
    state dict, or timm's safetensors): backbone only; the position-embedding grid is resampled
    to the model's input size, the 1000-class heads are cut to the global dimension, and the
    local head and the reranker are freshly initialised;
  * a global-retrieval checkpoint of the official `train_deit.py` (`module.<deit key>`).

Every key of the target model is consumed and every key of the file is used; anything else
raises `CheckpointError` naming the missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..device import resolve_device
from ..errors import CheckpointError
from .backbone import resize_pos_embed_grid
from .config import ModelConfig
from .r2former import R2FormerModel, build_model

log = logging.getLogger(__name__)

FORMAT_NAME = "r2former_ros.model"
FORMAT_VERSION = "1"
# Where users who have internet get the ImageNet-pretrained backbone (timm's hub name).
TIMM_DEIT_S_DISTILLED = "deit_small_distilled_patch16_224.fb_in1k"


# ----------------------------------------------------------------------------- key naming
def to_official_key(key: str) -> str:
    return "Reranker." + key[len("reranker."):] if key.startswith("reranker.") else key


def from_official_key(key: str) -> str:
    return "reranker." + key[len("Reranker."):] if key.startswith("Reranker.") else key


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError unless `state` has exactly the keys and shapes of `expected`."""
    missing = sorted(to_official_key(k) for k in set(expected) - set(state))
    unexpected = sorted(to_official_key(k) for k in set(state) - set(expected))
    misshaped = sorted(f"{to_official_key(k)} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                       for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short_list(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys: {_short_list(misshaped)}")
        raise CheckpointError(f"{source} does not match the model configuration: " + "; ".join(parts)
                              + ". Check that the file is an R2Former checkpoint of this configuration "
                                "(pass the matching config/preset) and that it is complete.")


# ------------------------------------------------------------------------------- reading
def _numpy_safe_globals() -> list:
    """The numpy reconstruction types the official checkpoint pickles (`recalls`, `best_r5`)."""
    core = getattr(np, "_core", None) or np.core
    objs = [(core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
            (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
            (core.multiarray.scalar, "numpy._core.multiarray.scalar"),
            np.ndarray, np.dtype]
    objs += [type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4", "u1", "b1")]
    return objs


def _read_torch_file(path: Path):
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            # a plain pickle (not torch.save's format) makes torch warn about its protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():     # torch's restricted unpickler refused a global
            found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global| Please|\n|$)", str(exc))
            detail = re.sub(r"\x1b\[[0-9;]*m", "", found.group(1) if found else "a non-tensor object").strip()
            raise CheckpointError(f"{path} is refused: it holds pickled Python objects that are not weights ({detail}) "
                                  "or is damaged; "
                                  "unpickling them could run code, so weights are only read with weights_only=True and "
                                  "this file was not executed. Use the official checkpoint, DeiT weights or a "
                                  ".safetensors model") from None
        raise CheckpointError(f"cannot read {path} as a torch checkpoint (UnpicklingError: {str(exc)[:200]}). The file "
                              "is truncated, corrupted or not a weights file; download or copy it again.") from None
    except Exception as exc:  # noqa: BLE001 - torch raises several unrelated types for damaged files
        raise CheckpointError(f"cannot read {path} as a torch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}). The file is truncated, corrupted "
                              "or not a weights file; download or copy it again.") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own and Rust panic types for damaged files
        raise CheckpointError(f"cannot read {path} as safetensors ({type(exc).__name__}: {exc}). "
                              "The file is truncated or corrupted; copy it again.") from None


def _is_safetensors(path: Path) -> bool:
    """safetensors starts with an 8-byte little-endian header length followed by '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


# ------------------------------------------------------------------- format conversions
def _adapt_imagenet_deit(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """ImageNet DeiT distilled weights -> our backbone's state dict (keys without prefix)."""
    state = dict(state)
    n_old = state["pos_embed"].shape[1] - 2
    side = int(round(n_old ** 0.5))
    if side * side != n_old:
        raise CheckpointError(f"ImageNet DeiT position embedding has {n_old} patch positions, not a square grid")
    if (side, side) != cfg.grid:
        state["pos_embed"] = resize_pos_embed_grid(state["pos_embed"], (side, side), cfg.grid)
    for head in ("head", "head_dist"):
        for part in ("weight", "bias"):
            key = f"{head}.{part}"
            if key in state and state[key].shape[0] > cfg.global_dim:
                state[key] = state[key][:cfg.global_dim].clone()
    return state


def _classify(state: dict[str, torch.Tensor]) -> str:
    keys = set(state)
    if any(k.startswith("backbone.") for k in keys):
        return "r2former"
    if "cls_token" in keys and "dist_token" in keys and "blocks.0.attn.qkv.weight" in keys:
        return "deit"
    return "unknown"


def _load_into(model: R2FormerModel, state: dict[str, torch.Tensor], source: str, prefix: str = "") -> None:
    """Strictly load `state` (keys relative to `prefix`) into the model."""
    expected = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    state = {from_official_key(k): v for k, v in state.items()}
    check_state_dict(state, expected, source)
    full = {prefix + k: v.to(expected[k].dtype) for k, v in state.items()}
    current = model.state_dict()
    current.update(full)
    model.load_state_dict(current, strict=True)


def load_model(path: str | os.PathLike, device: str = "cpu", config: ModelConfig | None = None,
               precision: str = "fp32") -> R2FormerModel:
    """Load any supported weights file into an R2FormerModel in eval mode on `device`, running at
    `precision` (options.PRECISIONS; fp32 = exact; see `R2FormerModel.set_precision`).

    `config` overrides the configuration for files that do not carry one (official checkpoint,
    ImageNet weights; the default is the released DeiT-S configuration).
    """
    model = _load_weights(Path(path), resolve_device(device), config)
    model.set_precision(precision)
    return model


def _load_weights(path: Path, dev: torch.device, config: ModelConfig | None) -> R2FormerModel:
    if path.is_dir():
        raise CheckpointError(f"model path {path} is a directory; pass the weights file itself (.pth or .safetensors)")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise CheckpointError(f"model file {path} {what} (pass --model with a checkpoint path)")
    if _is_safetensors(path):
        state, meta = _read_safetensors(path)
        if meta.get("format") == FORMAT_NAME:
            if meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(f"{path} has model format version {meta.get('format_version')}, this "
                                      f"package reads version {FORMAT_VERSION}; upgrade r2former_ros")
            cfg = ModelConfig.from_json(meta["config"])
            model = R2FormerModel(cfg)
            _load_into(model, state, str(path))
            return model.to(dev).eval()
        kind = _classify(state)
    else:
        obj = _read_torch_file(path)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
        if "model_state_dict" in obj:
            state = obj["model_state_dict"]
        elif "model" in obj and isinstance(obj["model"], dict):
            state = obj["model"]
        elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
            state = obj["state_dict"]
        else:
            state = obj
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: the state dict holds non-tensor entries; not a weights file")
        state = _strip_prefix(state, "module.")
        kind = _classify(state)
    cfg = config or ModelConfig()
    if kind == "r2former":
        model = R2FormerModel(cfg)
        _load_into(model, state, str(path))
        return model.to(dev).eval()
    if kind == "deit":
        model = build_model(cfg)
        if state["head.weight"].shape[0] == cfg.global_dim:
            log.info("%s: global-retrieval checkpoint (backbone only); local head and reranker initialised", path)
        else:
            log.info("%s: ImageNet DeiT weights; local head and reranker initialised", path)
            state = _adapt_imagenet_deit(state, cfg)
        _load_into(model, state, str(path), prefix="backbone.")
        return model.to(dev).eval()
    raise CheckpointError(f"{path} is not a recognised R2Former or DeiT checkpoint (first keys: "
                          f"{_short_list(sorted(state)[:5])}). Expected the official R2Former checkpoint, "
                          "DeiT distilled ImageNet weights, or a model saved by r2former_ros.")


def imagenet_backbone_from_timm(cfg: ModelConfig | None = None, name: str = TIMM_DEIT_S_DISTILLED) -> R2FormerModel:
    """Model whose backbone starts from timm's ImageNet DeiT distilled weights (downloads them;
    needs internet). Local head and reranker are freshly initialised."""
    import timm
    cfg = cfg or ModelConfig()
    state = timm.create_model(name, pretrained=True).state_dict()
    model = build_model(cfg)
    _load_into(model, _adapt_imagenet_deit(state, cfg), f"timm:{name}", prefix="backbone.")
    return model


# ------------------------------------------------------------------------------- writing
def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def official_state_dict(model: R2FormerModel) -> dict[str, torch.Tensor]:
    """State dict named as the official checkpoint (without the `module.` prefix)."""
    return {to_official_key(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(model: R2FormerModel, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """Save weights + config as safetensors (atomic)."""
    from safetensors.torch import save_file
    path = Path(path)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.cfg.to_json(),
            "fingerprint": model.fingerprint}
    meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (extra or {}).items()})
    tmp = _atomic_target(path)
    try:
        save_file(official_state_dict(model), str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_official_checkpoint(model: R2FormerModel, path: str | os.PathLike, epoch: int = 0) -> Path:
    """Save in the official training-script layout (for interchange with the official code)."""
    path = Path(path)
    ckpt = {"epoch_num": epoch,
            "model_state_dict": {"module." + k: v for k, v in official_state_dict(model).items()},
            "optimizer_state_dict": {"state": {}, "param_groups": []},
            "recalls": np.zeros(5, dtype=np.float64), "best_r5": np.float64(0.0), "not_improved_num": 0}
    tmp = _atomic_target(path)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
