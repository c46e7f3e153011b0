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


def init_distributed(device: torch.device, timeout_min: float = 60.0) -> DistInfo:
    """Join the process group when started by torchrun; return rank, world size and the device to use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_min))
        log.info("distributed: rank %d of %d (%s backend), device %s", rank, world, backend, device)
    return DistInfo(rank, world, local_rank, device)


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
