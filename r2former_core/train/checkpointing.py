"""Training state for `--resume` without pickle: optimizer tensors in safetensors, scalars in JSON.

Files in the run directory (beside `last.safetensors`, the model):
  * `train_state.safetensors`: every optimizer state tensor, named `<param name>/<key>`;
  * `train_state.json`: epoch, step, best score, ... (`scalars`), the optimizer's param groups
    (hyper-parameters) and the fp16 gradient scaler's state (`grad_scaler`: scale, growth tracker; empty
    when the run did not scale gradients), so a resumed CUDA run continues at the scale it had reached
    instead of starting over at the initial scale.
Parameters are identified by name, so a resumed run must train the same parameter set (same stage).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_training_state(run_dir: Path, optimizer: torch.optim.Optimizer, param_names: list[str],
                        scalars: dict[str, Any], scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the optimizer's state, `scalars` and the gradient scaler's state into `run_dir`."""
    from safetensors.torch import save_file
    run_dir = Path(run_dir)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    non_tensor: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        name = param_names[idx]
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                non_tensor.setdefault(name, {})[key] = value
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_TENSORS}.", dir=run_dir)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, run_dir / STATE_TENSORS)
    finally:
        Path(tmp).unlink(missing_ok=True)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [param_names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    payload = {"scalars": scalars, "param_groups": groups, "non_tensor_state": non_tensor,
               "grad_scaler": scaler.state_dict() if scaler is not None else {}}
    _atomic_write_text(run_dir / STATE_JSON, json.dumps(payload, indent=2, default=_json_default))


def _json_default(obj):
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in the training state")


def read_training_scalars(run_dir: Path) -> dict[str, Any]:
    """The scalars of a saved training state (stage, epoch, step, ...) without restoring anything."""
    return _read_payload(Path(run_dir))["scalars"]


def _read_payload(run_dir: Path) -> dict[str, Any]:
    json_path, tensor_path = run_dir / STATE_JSON, run_dir / STATE_TENSORS
    if not json_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(f"--resume: {run_dir} lacks {STATE_JSON} / {STATE_TENSORS}; it holds no resumable run")
    try:
        payload = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"--resume: {json_path} is not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or not {"scalars", "param_groups"} <= payload.keys():
        raise CheckpointError(f"--resume: {json_path} is not a training state (no scalars / param_groups)")
    return payload


def load_training_state(run_dir: Path, optimizer: torch.optim.Optimizer, param_names: list[str],
                        scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Restore the optimizer (and the gradient scaler, see `restore_grad_scaler`) in place; return the scalars.
    CheckpointError when the saved state trains other parameters."""
    from safetensors.torch import load_file
    run_dir = Path(run_dir)
    payload = _read_payload(run_dir)
    tensors = load_file(str(run_dir / STATE_TENSORS))
    index = {n: i for i, n in enumerate(param_names)}
    saved_names = [n for g in payload["param_groups"] for n in g["params"]]
    if sorted(saved_names) != sorted(param_names):
        missing = sorted(set(param_names) - set(saved_names))[:5]
        extra = sorted(set(saved_names) - set(param_names))[:5]
        raise CheckpointError(f"--resume: the saved optimizer trains other parameters (missing {missing}, extra "
                              f"{extra}); resume with the same stage and options")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, sub = key.rpartition("/")
        state.setdefault(index[name], {})[sub] = value
    for name, values in payload.get("non_tensor_state", {}).items():
        state.setdefault(index[name], {}).update(values)
    groups = []
    for g in payload["param_groups"]:
        g = dict(g)
        g["params"] = [index[n] for n in g["params"]]
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scaler is not None:
        restore_grad_scaler(scaler, payload.get("grad_scaler", {}))
    return payload["scalars"]


def restore_grad_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> bool:
    """Load a saved scaler state into an enabled scaler; returns whether it did. Nothing to restore when
    the saved run did not scale (CPU, --no-amp: empty state) or this one does not (the scaler keeps its
    initial scale, or stays disabled)."""
    if not state or not scaler.is_enabled():
        if state or scaler.is_enabled():
            log.info("gradient scaler state not restored: the saved run %s scale gradients, this one %s",
                     "did" if state else "did not", "does" if scaler.is_enabled() else "does not")
        return False
    scaler.load_state_dict(state)
    return True
