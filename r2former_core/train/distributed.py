"""Process group set-up for `torchrun` (DDP: gloo on CPU, NCCL on CUDA); a no-op for one process.

`torchrun --nproc_per_node=N -m r2former_core.cli.main train ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; without them the training runs as a single process with the same code path.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DeviceError
from ..options import DEVICE_PATTERN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def select_device(requested: str, local_rank: int, world_size: int, gpu_count: int) -> torch.device:
    """The device of one process: `requested` is auto, cpu, cuda or cuda:N; `gpu_count` the visible GPUs.

    One process: cuda means cuda:0, cuda:N must exist. Under torchrun (world_size > 1) on CUDA every rank
    uses cuda:LOCAL_RANK (NCCL needs one GPU per rank), so LOCAL_RANK must be below the GPU count.
    DeviceError, saying what to do, when the device does not exist here.
    """
    name = requested.strip().lower()
    if not DEVICE_PATTERN.fullmatch(name):
        raise DeviceError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if gpu_count > 0 else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if gpu_count == 0:
        raise DeviceError(f"device {requested!r} requested but this machine has no CUDA GPU; use --device cpu")
    index = int(name.partition(":")[2] or 0)
    if world_size > 1:
        if ":" in name:
            raise DeviceError(f"--device {requested}: under torchrun every rank uses cuda:LOCAL_RANK; pass --device "
                              "cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= gpu_count:
            raise DeviceError(f"torchrun rank with LOCAL_RANK {local_rank} needs GPU {local_rank}, but this machine "
                              f"has {gpu_count} visible GPU(s): start torchrun with --nproc_per_node <= {gpu_count}, "
                              "or train on the CPU with --device cpu")
        return torch.device("cuda", local_rank)
    if index >= gpu_count:
        raise DeviceError(f"device {requested!r} does not exist: this machine has {gpu_count} visible GPU(s) "
                          f"(cuda:0 .. cuda:{gpu_count - 1})")
    return torch.device("cuda", index)


def init_distributed(device: str = "auto", timeout_min: float = 60.0) -> DistInfo:
    """Join the process group when started by torchrun; return rank, world size and this process's device
    (`select_device`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if device != "cpu" else 0
    chosen = select_device(device, local_rank, world, gpus)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_min))
        log.info("distributed: rank %d of %d (%s backend), device %s", rank, world, backend, chosen)
    return DistInfo(rank, world, local_rank, chosen)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, obj):
    """rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(info: DistInfo, value: float) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def gather_rows(info: DistInfo, rows: np.ndarray, total: int) -> np.ndarray:
    """Reassemble an (n_r, D) float32 array computed for items r, r + W, r + 2W, ... on each rank r
    into the (total, D) array in item order, on every rank."""
    if not info.enabled:
        return rows
    w = info.world_size
    per = (total + w - 1) // w
    pad = np.zeros((per, rows.shape[1]), np.float32)
    pad[:len(rows)] = rows
    tensors = [torch.zeros(per, rows.shape[1], device=info.device) for _ in range(w)]
    dist.all_gather(tensors, torch.from_numpy(pad).to(info.device))
    out = np.zeros((total, rows.shape[1]), np.float32)
    for r, t in enumerate(tensors):
        n = len(range(r, total, w))
        out[r::w] = t.cpu().numpy()[:n]
    return out
