"""Device selection: `auto` picks CUDA when available, else CPU; every device is checked to exist."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import DeviceError
from .options import DEVICE_CHOICES, DEVICE_PATTERN

if TYPE_CHECKING:  # torch is imported on first use, so `--help` and argument errors stay fast
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for `device` (auto, cpu, cuda, cuda:N or a torch.device).

    Raises DeviceError for names that are not devices (`cudafoo`), for CUDA on a machine without
    it and for `cuda:N` with N not below the number of GPUs: a clear error at start-up instead of
    a raw "invalid device ordinal" at the first tensor moved there.
    """
    import torch
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if not DEVICE_PATTERN.fullmatch(name):
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine; "
                          "use device 'cpu' or 'auto'")
    if ":" in name:
        index = int(name.split(":", 1)[1])
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"device {device!r} does not exist: this machine has {count} CUDA device(s) "
                              f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
    return torch.device(name)
