"""Building a map: select keyframes of a source, extract features in batches, write atomically."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data.keyframes import select_keyframes
from .data.sources import PosedImage, Source
from .errors import ConfigError, DataError, MapError
from .features import extract_arrays
from .frames import PoseFrames, warn_if_odometry_frame
from .mapdb import MapDatabase, MapWriter
from .mapops import open_append
from .mapshards import all_ok, receive_into, same_on_all_ranks, send_map, shard_range
from .model import R2FormerModel
from .train.distributed import DistInfo

log = logging.getLogger(__name__)


def default_batch_size(model: R2FormerModel) -> int:
    """Images per extraction batch when none is given. On CUDA 16. On a CPU, batching pays only while a
    batch's tokens stay cache-sized: measured on 2 cores (docs/BENCHMARKS.md section 1) the released DeiT-S
    at 480x640 (1202 tokens per image) is fastest one image at a time, the 128x160 demo model (82 tokens)
    at 8 images per batch (2x faster than 1)."""
    if model.device.type == "cuda":
        return 16
    gh, gw = model.cfg.grid
    return max(1, min(8, 1024 // (gh * gw + 2)))


def build_map(source: Source, model: R2FormerModel, out: str | Path | None, *, min_distance: float = 0.0,
              min_angle: float = 0.0, batch_size: int | None = None, frame_id: str | None = None,
              child_frame: str | None = None, index: str | None = "flat", overwrite: bool = False,
              progress: bool = True, append: str | Path | None = None, session_name: str = "",
              conditions: Sequence[str] = (), dist: DistInfo | None = None,
              shard_dir: str | Path | None = None) -> MapDatabase | None:
    """Build the map `out` from `source`: keyframes only, features of `model`, atomic write.

    The map records the frames of the poses, `source.frames` (`frame_id` / `child_frame` override them);
    poses in an odometry frame log a warning (the map would drift with the odometry). The drive becomes
    one session (`session_name`, `conditions`, e.g. ("night", "rain"), recorded in the map).
    `batch_size` None: `default_batch_size(model)`.

    append: an existing map (same model and frames) that the drive is added to as a new session; the
    result goes to `out`, or replaces `append` atomically when `out` is None or the same path.
    index: the index type of the map written (None: "flat", or with `append` the appended map's).
    dist: under torchrun (`r2former_core.train.distributed.init_distributed`), each rank extracts a
    contiguous shard of the keyframes and rank 0 writes the map, identical to a one-process build (the
    same extraction batches, bytes copied as written; see `r2former_core.mapshards`). Returns the map
    on rank 0 and None on the other ranks. `shard_dir`: where ranks > 0 spool their shard (default: the
    system's temporary directory).
    """
    dist = dist or DistInfo()
    frame_id = frame_id or source.frames.parent
    child_frame = source.frames.child if child_frame is None else child_frame
    if batch_size is None:
        batch_size = default_batch_size(model)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if out is None and append is None:
        raise ConfigError("give the output map (out) or a map to append to")
    keyframes = keyframe_list(source, min_distance, min_angle)
    if not keyframes:
        raise DataError(f"{source.description}: no posed images to build a map from")
    if not all_ok(dist, same_on_all_ranks(dist, keyframes)):
        raise DataError(f"{source.description}: the ranks selected different keyframes; every machine of a "
                        "distributed build must read the same source")
    start, stop = shard_range(len(keyframes), batch_size, dist.rank, dist.world_size)
    if dist.is_main:
        log.info("map poses: the pose of %s", PoseFrames(frame_id, child_frame, source.frames.optical))
        warn_if_odometry_frame(frame_id, log)
        cfg = model.cfg
        est = MapDatabase.estimate_size(len(keyframes), cfg.global_dim, cfg.local_tokens, cfg.local_values)
        log.info("building map %s from %d of %d images (%s): about %.1f MB on disk (%.0f kB/image), %.1f MB RAM "
                 "when loaded", out or append, len(keyframes), len(source), source.description,
                 est["disk_bytes"] / 1e6, est["disk_bytes_per_image"] / 1e3, est["ram_bytes"] / 1e6)
    if dist.enabled:
        log.info("rank %d of %d extracts keyframes %d..%d of %d", dist.rank, dist.world_size, start, stop - 1,
                 len(keyframes))

    writer: MapWriter | None = None
    spool_dir: str | None = None
    failure: BaseException | None = None
    try:
        if dist.is_main:
            writer = _open_writer(model, out, append, source, frame_id, child_frame, index, overwrite,
                                  len(keyframes), session_name, conditions, progress)
        else:
            spool_dir = tempfile.mkdtemp(prefix=f"r2former-shard{dist.rank}-", dir=shard_dir)
            writer = MapDatabase.create(Path(spool_dir) / "shard", fingerprint=model.fingerprint,
                                        model_config=json.loads(model.cfg.to_json()), image_size=model.cfg.image_size,
                                        global_dim=model.cfg.global_dim, num_local=model.cfg.local_tokens,
                                        local_values=model.cfg.local_values, frame_id=frame_id,
                                        child_frame=child_frame, source=f"shard {dist.rank}")
    except BaseException as e:     # noqa: BLE001 - re-raised below, after the other ranks learned of it
        failure = e
    if not all_ok(dist, failure is None):
        _abort(writer, spool_dir)
        raise failure or MapError(f"map {out or append}: another rank failed to start (see its log)")
    assert writer is not None       # every rank opened its writer (a failed start raised above)

    try:
        added = _extract_shard(source, model, writer, keyframes[start:stop], start, batch_size,
                               progress and dist.is_main)
        if dist.enabled and not dist.is_main:
            if added:
                spool = writer.commit()
            else:
                writer.abort()
                spool = None
    except BaseException as e:     # noqa: BLE001 - re-raised below, after the other ranks learned of it
        failure = e
    if not all_ok(dist, failure is None):
        _abort(writer, spool_dir)
        raise failure or MapError(f"map {out or append}: another rank failed while extracting (see its log)")

    try:
        if dist.enabled:
            if dist.is_main:
                for src in range(1, dist.world_size):
                    receive_into(dist, writer, src)
            else:
                send_map(dist, spool)
                if spool is not None:
                    spool.close()
        mapdb = None
        if dist.is_main:
            if writer.session_count == 0:
                raise DataError(f"{source.description}: none of the selected images could be read")
            mapdb = writer.commit()
            log.info("map %s: %d images (%d new)", mapdb.path, len(mapdb), writer.session_count)
    except BaseException:
        _abort(writer if dist.is_main else None, spool_dir)
        raise
    _abort(None, spool_dir)
    return mapdb


def _abort(writer: MapWriter | None, spool_dir: str | None) -> None:
    if writer is not None:
        writer.abort()
    if spool_dir is not None:
        shutil.rmtree(spool_dir, ignore_errors=True)


def keyframe_list(source: Source, min_distance: float, min_angle: float) -> list[str]:
    """Names of the source's keyframes in source order (poses only, no images read)."""
    _, poses = source.poses()
    names = list(source.names)
    return [names[i] for i in select_keyframes(poses, min_distance=min_distance, min_angle_deg=min_angle)]


def _open_writer(model: R2FormerModel, out: str | Path | None, append: str | Path | None, source: Source,
                 frame_id: str, child_frame: str, index: str | None, overwrite: bool, count: int, session_name: str,
                 conditions: Sequence[str], progress: bool) -> MapWriter:
    """The output's writer with the new drive's session begun (after a copy of `append`'s entries)."""
    if append is not None:
        return open_append(append, fingerprint=model.fingerprint, frame_id=frame_id, child_frame=child_frame,
                           source=source.description, session_name=session_name, conditions=conditions, out=out,
                           index=index, overwrite=overwrite, expected_new=count, progress=progress)
    if out is None:
        raise ConfigError("give the map to create or the map to add the drive to")
    cfg = model.cfg
    writer = MapDatabase.create(out, fingerprint=model.fingerprint, model_config=json.loads(cfg.to_json()),
                                image_size=cfg.image_size, global_dim=cfg.global_dim, num_local=cfg.local_tokens,
                                local_values=cfg.local_values, frame_id=frame_id, child_frame=child_frame,
                                source=source.description, index=index or "flat", overwrite=overwrite,
                                expected_count=count)
    writer.begin_session(session_name, source.description, conditions)
    return writer


def _extract_shard(source: Source, model: R2FormerModel, writer: MapWriter, names: list[str], first: int,
                   batch_size: int, progress: bool) -> int:
    """Extract the keyframes `names` (positions first, first + 1, ... of the whole list) into `writer`.

    Batches are whole multiples of `batch_size` positions of the whole keyframe list, whichever rank
    extracts them: an image that cannot be read leaves its batch one short, in every build alike.
    Returns how many entries were added.
    """
    position = {name: first + i for i, name in enumerate(names)}
    batch: list[PosedImage] = []
    added = 0

    def flush() -> None:
        nonlocal added
        images = [r.image for r in batch if r.image is not None]
        f = extract_arrays(model, images)
        assert f.local is not None and len(images) == len(batch)
        writer.add_batch(f.global_desc, f.local, np.stack([r.pose for r in batch]), [r.stamp for r in batch],
                         [r.name for r in batch], thumbnails=images)
        added += len(batch)
        batch.clear()

    remaining = len(names)
    bar = tqdm(total=len(names), desc="map images", unit="img", disable=None if progress else True)
    for record in source:
        pos = position.get(record.name)
        if pos is None:
            continue
        if batch and pos // batch_size != position[batch[0].name] // batch_size:
            flush()
        batch.append(record)
        bar.update(1)
        remaining -= 1
        if remaining == 0:
            break
    if batch:
        flush()
    bar.close()
    return added
