"""Sharded map building under `torchrun`: how the ranks agree, and how shards travel to rank 0.

`r2former_core.mapping.build_map` splits the keyframes into contiguous shards of whole extraction
batches, one per rank. Rank 0 writes its shard straight into the output map; every other rank
writes its shard into a spool map in a local temporary directory (no shared filesystem needed) and,
once every rank is done, sends it to rank 0 over the process group, in rank order and in chunks of
`CHUNK` entries (bounded memory), as raw bytes: rank 0 appends them with `MapWriter.add_encoded`,
so the result holds exactly the bytes a single process would have written.

Transfers use tensors of bytes only (no pickled objects): gloo on CPU, NCCL on CUDA (tensors on the
rank's GPU).
"""
from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .mapdb import MapDatabase, MapWriter
from .train.distributed import DistInfo

log = logging.getLogger(__name__)

CHUNK = 128          # entries per transfer (128 x 131 kB = 17 MB of local features for DeiT-S)
_HEADER = 8          # int64 values describing one chunk


def shard_range(num_items: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of `num_items`, cut at multiples of `batch_size` so every
    extraction batch is the same as in a single-process build (batch composition changes the float
    results), as even as whole batches allow."""
    batches = -(-num_items // batch_size)
    first, last = rank * batches // world, (rank + 1) * batches // world
    return min(num_items, first * batch_size), min(num_items, last * batch_size)


def all_ok(info: DistInfo, ok: bool) -> bool:
    """True when `ok` holds on every rank (a collective: every rank must call it at the same point)."""
    if not info.enabled:
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def same_on_all_ranks(info: DistInfo, names: Sequence[str]) -> bool:
    """Whether every rank selected the same keyframes (count and CRC32 of their names)."""
    if not info.enabled:
        return True
    crc = zlib.crc32("\n".join(names).encode("utf-8"))
    t = torch.tensor([len(names), crc, -len(names), -crc], dtype=torch.int64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == len(names) == -int(t[2]) and int(t[1]) == crc == -int(t[3])


def _send(info: DistInfo, data: np.ndarray, dst: int) -> None:
    dist.send(torch.from_numpy(np.ascontiguousarray(data)).to(info.device), dst)


def _recv(info: DistInfo, shape: int, dtype: torch.dtype, src: int) -> np.ndarray:
    t = torch.empty(shape, dtype=dtype, device=info.device)
    dist.recv(t, src)
    return t.cpu().numpy()


def send_map(info: DistInfo, db: MapDatabase | None, dst: int = 0) -> None:
    """Send every entry of `db` (None: no entries) to rank `dst`, which runs `receive_into` for this rank.
    Global descriptors travel as float32 (the spool's dtype), rank 0 stores them in its map's."""
    _send(info, np.array([0 if db is None else len(db)], np.int64), dst)
    if db is None:
        return
    for start in range(0, len(db), CHUNK):
        rows = np.arange(start, min(len(db), start + CHUNK))
        jpegs = [db.thumbnail_jpeg(int(i)) for i in rows]
        parts = [np.ascontiguousarray(db.global_desc[rows], dtype=np.float32).view(np.uint8).reshape(-1),
                 np.ascontiguousarray(db.local(rows)).view(np.uint8).reshape(-1),
                 np.ascontiguousarray(db.poses[rows]).view(np.uint8).reshape(-1),
                 np.ascontiguousarray(db.stamps[rows]).view(np.uint8).reshape(-1),
                 np.array([len(j) for j in jpegs], np.int64).view(np.uint8),
                 np.frombuffer(b"".join(jpegs), np.uint8),
                 np.frombuffer(json.dumps([db.names[i] for i in rows]).encode("utf-8"), np.uint8)]
        header = np.array([len(rows)] + [len(p) for p in parts], np.int64)
        assert len(header) == _HEADER
        _send(info, header, dst)
        _send(info, np.concatenate(parts), dst)


def receive_into(info: DistInfo, writer: MapWriter, src: int) -> int:
    """Append the entries rank `src` sends with `send_map` to `writer` (its current session); returns how many.

    The float32 global descriptors are converted to the map's dtype as `MapWriter.add_batch` would."""
    G, N, C = writer.dims
    total = int(_recv(info, 1, torch.int64, src)[0])
    received = 0
    while received < total:
        header = _recv(info, _HEADER, torch.int64, src)
        b, sizes = int(header[0]), [int(v) for v in header[1:]]
        payload = _recv(info, sum(sizes), torch.uint8, src)
        bounds = np.cumsum([0] + sizes)
        g, loc, poses, stamps, lengths, jpeg_bytes, names = (payload[bounds[i]:bounds[i + 1]] for i in range(7))
        lengths = lengths.view(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        rows = g.view(np.float32).reshape(b, G).astype(writer.global_dtype)
        writer.add_encoded(rows, loc.view(np.float16).reshape(b, N, C),
                           poses.view(np.float64).reshape(b, 7), stamps.view(np.float64),
                           json.loads(names.tobytes().decode("utf-8")),
                           [jpeg_bytes[offsets[i]:offsets[i + 1]].tobytes() for i in range(b)])
        received += b
    log.info("received %d map entries from rank %d", total, src)
    return total
