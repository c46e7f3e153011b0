"""Operations on whole maps: merge several maps, append a drive as a new session, prune near-duplicates.

Every operation writes a new map through `MapWriter` (a temporary sibling directory renamed into
place once complete, see docs/MAP_FORMAT.md section 7): a process killed at any point leaves the
old map, if any, loadable under its name and no half map under the output's name. An operation
that replaces its input (`build-map --append MAP`, `map merge A B --out A --overwrite`) reads the
old map while the new one is written beside it and swaps them in one atomic rename.

Entries are copied exactly as stored (global descriptors, float16 local features, poses, stamps,
names, JPEG thumbnails: bit for bit, local features CRC-checked on the way) and keep their session:
a merged map is the concatenation of its inputs' sessions, in input order, each session's entries
in map order, renumbered 0..S-1.
"""
from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data.poses import angle_between_quats
from .errors import ConfigError, MapError
from .mapdb import MapDatabase, MapInfo, MapWriter

log = logging.getLogger(__name__)

COPY_CHUNK = 256    # entries copied per read/write (256 x 131 kB = 34 MB of local features at most)


def _frames(info: MapInfo) -> str:
    return f"the pose of {info.child_frame or '(child frame not recorded)'} in {info.frame_id}"


def check_compatible(base: MapInfo, other: MapInfo, what: str = "merge") -> None:
    """MapError unless `other`'s entries can join `base`'s map: same model, feature layout and frames."""
    def refuse(reason: str, fix: str) -> MapError:
        return MapError(f"cannot {what} {other.path} with {base.path}: {reason}; {fix}")

    if other.fingerprint != base.fingerprint:
        raise refuse(f"built with model {other.fingerprint}, the other with {base.fingerprint} (features of "
                     "different models are not comparable)", "rebuild one of them with the other's model")
    layout = ("image_size", "global_dim", "num_local", "local_values", "global_dtype")
    for key in layout:
        if getattr(other, key) != getattr(base, key):
            raise refuse(f"{key} {getattr(other, key)!r} differs from {getattr(base, key)!r}",
                         "rebuild one of them with the same model and options")
    if (other.frame_id, other.child_frame) != (base.frame_id, base.child_frame):
        raise refuse(f"its poses are {_frames(other)}, the other's {_frames(base)}",
                     "maps can only be combined when their poses describe the same frame in the same parent "
                     "(rebuild with --pose-frames / --tf-frames naming the same pair)")


def create_like(info: MapInfo, out: str | os.PathLike, *, source: str, index: str | None = None,
                overwrite: bool = False, expected_count: int | None = None) -> MapWriter:
    """A writer for a map with `info`'s model, feature layout and frames (index: `info.index` unless given)."""
    return MapDatabase.create(out, fingerprint=info.fingerprint, model_config=info.model_config,
                              image_size=info.image_size, global_dim=info.global_dim, num_local=info.num_local,
                              local_values=info.local_values, frame_id=info.frame_id, child_frame=info.child_frame,
                              source=source, index=index or info.index, overwrite=overwrite,
                              global_dtype=info.global_dtype, expected_count=expected_count)


def copy_entries(writer: MapWriter, db: MapDatabase, indices: Sequence[int] | np.ndarray | None = None, *,
                 keep_sessions: bool = True, progress: bool = False) -> int:
    """Copy entries of `db` (all, or `indices` in ascending order) into `writer` bit for bit.

    keep_sessions: each of `db`'s sessions becomes a new session of the writer (name, source,
    conditions, creation time and host kept), in session order; False: the entries go into the
    writer's current session. Returns the number of entries copied.
    """
    idx = np.arange(len(db)) if indices is None else np.unique(np.asarray(indices, dtype=np.int64))
    groups = ([(s, idx[db.sessions[idx] == s.id]) for s in db.info.sessions] if keep_sessions
              else [(None, idx)])
    bar = tqdm(total=len(idx), desc=f"copy {Path(db.path).name}", unit="entry", disable=None if progress else True)
    for session, rows in groups:
        if len(rows) == 0:
            continue
        if session is not None:
            writer.begin_session(session.name, session.source, session.conditions, session.created, session.host)
        for start in range(0, len(rows), COPY_CHUNK):
            part = rows[start:start + COPY_CHUNK]
            writer.add_encoded(db.global_desc[part], db.local(part), db.poses[part], db.stamps[part],
                               [db.names[i] for i in part], [db.thumbnail_jpeg(i) for i in part])
            bar.update(len(part))
    bar.close()
    return len(idx)


def _check_distinct(paths: Sequence[str | os.PathLike]) -> None:
    seen: dict[Path, str] = {}
    for p in paths:
        real = Path(p).resolve()
        if real in seen:
            raise MapError(f"map {p} is given twice (also as {seen[real]}): each map can be merged once")
        seen[real] = str(p)


def merge_maps(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, index: str | None = None,
               overwrite: bool = False, verify: str = "auto", progress: bool = True) -> MapDatabase:
    """Merge maps of the same model and frames into `out`: every input's sessions, in input order.

    The inputs' map.json files are checked against each other before anything is written; then one
    input at a time is loaded (verified as `verify` says) and copied, so memory holds one map's global
    descriptors at most. `out` may be one of the inputs with `overwrite=True` (it is replaced
    atomically once the merged map is complete). index: the merged map's index type (default: the
    first input's).
    """
    if not inputs:
        raise ConfigError("give at least one map to merge")
    _check_distinct(inputs)
    infos = [MapDatabase.read_info(p) for p in inputs]
    for info in infos[1:]:
        check_compatible(infos[0], info)
    total = sum(i.count for i in infos)
    source = "merge of " + ", ".join(f"{i.path.name} ({len(i.sessions)} session{'s' if len(i.sessions) != 1 else ''})"
                                     for i in infos)
    log.info("merging %d maps (%d entries, %d sessions) into %s", len(infos), total,
             sum(len(i.sessions) for i in infos), out)
    with create_like(infos[0], out, source=source, index=index, overwrite=overwrite, expected_count=total) as writer:
        for path in inputs:
            with MapDatabase.load(path, expected_fingerprint=infos[0].fingerprint, verify=verify) as db:
                check_compatible(infos[0], db.info)     # the same files as read above (not replaced since)
                copy_entries(writer, db, progress=progress)
        return writer.commit()


def open_append(path: str | os.PathLike, *, fingerprint: str, frame_id: str, child_frame: str, source: str,
                session_name: str = "", conditions: Sequence[str] = (), out: str | os.PathLike | None = None,
                index: str | None = None, overwrite: bool = False, expected_new: int | None = None,
                verify: str = "auto", progress: bool = True) -> MapWriter:
    """A writer holding a copy of map `path` and a new, empty session: add the new drive's entries, commit.

    out: where the result goes (default: `path` itself, replaced atomically at commit; the old map
    stays loadable until then). The new drive must come from the map's model and frames.
    """
    base = MapDatabase.load(path, verify=verify)
    try:
        info = base.info
        if fingerprint != info.fingerprint:
            raise MapError(f"cannot append to map {info.path}: it was built with model {info.fingerprint}, this "
                           f"model is {fingerprint}; append with the map's model (r2former map-info shows it)")
        if (frame_id, child_frame) != (info.frame_id, info.child_frame):
            raise MapError(f"cannot append to map {info.path}: its poses are {_frames(info)}, the new drive's are "
                           f"the pose of {child_frame or '(child frame not recorded)'} in {frame_id}; give the map's "
                           "frames (--pose-frames PARENT:CHILD or --tf-frames) or build a separate map")
        target = Path(path) if out is None else Path(out)
        replace = target.resolve() == Path(path).resolve()
        # The map-level source stays that of the map's first build; each session records its own.
        writer = create_like(info, target, source=info.source, index=index, overwrite=overwrite or replace,
                             expected_count=len(base) + (expected_new or 0))
        try:
            copy_entries(writer, base, progress=progress)
            writer.begin_session(session_name, source, conditions)
        except BaseException:
            writer.abort()
            raise
    finally:
        base.close()
    log.info("appending a new session (%s) to map %s (%d entries in %d sessions)", source, path, len(base),
             len(info.sessions))
    return writer


# ------------------------------------------------------------------------------------------ prune


def prune_indices(poses: np.ndarray, sessions: np.ndarray, min_distance: float,
                  min_angle_deg: float = 0.0) -> np.ndarray:
    """Entries kept by pruning (ascending): greedy in map order, an entry is dropped when a kept entry
    of the SAME session lies closer than `min_distance` metres and (when `min_angle_deg` > 0) faces
    within `min_angle_deg` of it. Entries of different sessions never drop each other: a place seen
    in two conditions keeps both.
    """
    if not min_distance > 0:
        raise ConfigError(f"min_distance must be > 0 metres, got {min_distance}")
    if min_angle_deg < 0:
        raise ConfigError(f"min_angle must be >= 0 degrees, got {min_angle_deg}")
    poses = np.asarray(poses, np.float64)
    cell = np.floor(poses[:, :3] / min_distance).astype(np.int64)
    max_angle = math.radians(min_angle_deg)
    grid: dict[tuple[int, int, int, int], list[int]] = defaultdict(list)
    offsets = [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)]
    kept: list[int] = []
    for i in range(len(poses)):
        s = int(sessions[i])
        cx, cy, cz = (int(v) for v in cell[i])
        near = [j for dx, dy, dz in offsets for j in grid.get((s, cx + dx, cy + dy, cz + dz), ())]
        if near:
            near_a = np.asarray(near)
            close = np.linalg.norm(poses[near_a, :3] - poses[i, :3], axis=1) < min_distance
            if min_angle_deg > 0 and close.any():
                close[close] = angle_between_quats(poses[near_a[close], 3:], poses[i, 3:]) < max_angle
            if close.any():
                continue
        grid[(s, cx, cy, cz)].append(i)
        kept.append(i)
    return np.asarray(kept, dtype=np.int64)


def prune_map(path: str | os.PathLike, out: str | os.PathLike, *, min_distance: float = 1.0,
              min_angle: float = 15.0, index: str | None = None, overwrite: bool = False, verify: str = "auto",
              progress: bool = True) -> MapDatabase:
    """Write `out`: map `path` without near-duplicate entries within a session (`prune_indices`)."""
    db = MapDatabase.load(path, verify=verify)
    try:
        keep = prune_indices(db.poses, db.sessions, min_distance, min_angle)
        log.info("pruning %s: keeping %d of %d entries (min distance %.2f m, min angle %.1f deg, within each of "
                 "%d sessions)", path, len(keep), len(db), min_distance, min_angle, len(db.info.sessions))
        with create_like(db.info, out, source=f"{db.info.source} (pruned: {min_distance:g} m, {min_angle:g} deg)",
                         index=index, overwrite=overwrite, expected_count=len(keep)) as writer:
            copy_entries(writer, db, keep, progress=progress)
            pruned = writer.commit()
    finally:
        db.close()
    return pruned


# ------------------------------------------------------------------------------------------ summaries


def session_summaries(db: MapDatabase) -> list[dict]:
    """Per session: id, name, source, conditions, count, xy extent, trajectory length, time span, created."""
    out = []
    for s in db.info.sessions:
        rows = np.flatnonzero(db.sessions == s.id)
        xy = db.poses[rows, :2]
        steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        stamps = db.stamps[rows]
        out.append({"id": s.id, "name": s.name, "source": s.source, "conditions": list(s.conditions),
                    "count": int(len(rows)), "created": s.created, "host": s.host,
                    "extent_m": {"x": [float(xy[:, 0].min()), float(xy[:, 0].max())],
                                 "y": [float(xy[:, 1].min()), float(xy[:, 1].max())]},
                    "trajectory_length_m": float(steps.sum()),
                    "time_span_s": float(stamps.max() - stamps.min())})
    return out
