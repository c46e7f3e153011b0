"""Building a map: select keyframes of a source, extract features in batches, write atomically."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import ConfigError, DataError
from .frames import PoseFrames, warn_if_odometry_frame
from .data.keyframes import select_keyframes
from .data.sources import PosedImage, Source
from .features import extract_arrays
from .mapdb import MapDatabase
from .model import R2FormerModel

log = logging.getLogger(__name__)


def keyframe_names(source: Source, min_distance: float, min_angle: float) -> set[str]:
    """Names of the source's records kept by keyframe selection (poses only, no images read)."""
    stamps, poses = source.poses()
    names = list(source.names)
    keep = select_keyframes(poses, min_distance=min_distance, min_angle_deg=min_angle)
    return {names[i] for i in keep}


def default_batch_size(model: R2FormerModel) -> int:
    """Images per extraction batch when none is given. On CUDA 16. On a CPU, batching pays only while a
    batch's tokens stay cache-sized: measured on 2 cores (docs/BENCHMARKS.md section 1) the released DeiT-S
    at 480x640 (1202 tokens per image) is fastest one image at a time, the 128x160 demo model (82 tokens)
    at 8 images per batch (2x faster than 1)."""
    if model.device.type == "cuda":
        return 16
    gh, gw = model.cfg.grid
    return max(1, min(8, 1024 // (gh * gw + 2)))


def build_map(source: Source, model: R2FormerModel, out: str | Path, *, min_distance: float = 0.0,
              min_angle: float = 0.0, batch_size: int | None = None, frame_id: str | None = None,
              child_frame: str | None = None, index: str = "flat", overwrite: bool = False,
              progress: bool = True) -> MapDatabase:
    """Build the map `out` from `source`: keyframes only, features of `model`, atomic write.

    The map records the frames of the poses, `source.frames` (`frame_id` / `child_frame` override them);
    poses in an odometry frame log a warning (the map would drift with the odometry).
    `batch_size` None: `default_batch_size(model)`."""
    frame_id = frame_id or source.frames.parent
    child_frame = source.frames.child if child_frame is None else child_frame
    if batch_size is None:
        batch_size = default_batch_size(model)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    keep = keyframe_names(source, min_distance, min_angle)
    if not keep:
        raise DataError(f"{source.description}: no posed images to build a map from")
    log.info("map poses: the pose of %s", PoseFrames(frame_id, child_frame, source.frames.optical))
    warn_if_odometry_frame(frame_id, log)
    cfg = model.cfg
    est = MapDatabase.estimate_size(len(keep), cfg.global_dim, cfg.local_tokens, cfg.local_values)
    log.info("building map %s from %d of %d images (%s): about %.1f MB on disk (%.0f kB/image), %.1f MB RAM when "
             "loaded", out, len(keep), len(source), source.description, est["disk_bytes"] / 1e6,
             est["disk_bytes_per_image"] / 1e3, est["ram_bytes"] / 1e6)
    writer = MapDatabase.create(out, fingerprint=model.fingerprint, model_config=json.loads(cfg.to_json()),
                                image_size=cfg.image_size, global_dim=cfg.global_dim, num_local=cfg.local_tokens,
                                local_values=cfg.local_values, frame_id=frame_id, child_frame=child_frame,
                                source=source.description, index=index, overwrite=overwrite,
                                expected_count=len(keep))
    with writer:
        batch: list[PosedImage] = []

        def flush() -> None:
            images = [r.image for r in batch if r.image is not None]
            f = extract_arrays(model, images)
            assert f.local is not None and len(images) == len(batch)
            writer.add_batch(f.global_desc, f.local, np.stack([r.pose for r in batch]), [r.stamp for r in batch],
                             [r.name for r in batch], thumbnails=images)
            batch.clear()

        for record in tqdm(source, total=len(source), desc="map images", unit="img",
                           disable=None if progress else True):
            if record.name not in keep:
                continue
            batch.append(record)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if writer.count == 0:
            raise DataError(f"{source.description}: none of the selected images could be read")
        mapdb = writer.commit()
    log.info("map %s: %d images", out, len(mapdb))
    return mapdb
