"""Device selection: `auto` picks CUDA when available, else CPU."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import DeviceError
from .options import DEVICE_CHOICES

if TYPE_CHECKING:  # torch is imported on first use, so `--help` and argument errors stay fast
    import torch



def resolve_device(device: "str | torch.device" = "auto") -> "torch.device":
    import torch
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine; "
                               "use device 'cpu' or 'auto'")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
