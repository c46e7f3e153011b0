"""The first pass over a bag, in steps: read stamps and poses (no image decoded), name the frames
of the poses, give each image a pose, drop repeated stamps. `RosbagSource` chains them; each step is
a function of its inputs.

1. `read_bag`: one pass over the image topic and the pose topic (pose messages, or TF plus
   `/tf_static` into a `TransformTree`), counting what could not be read;
2. `scan_frames`: the frame pair of the poses: the messages' frame ids, or the TF frames;
3. `assign_poses`: the pose of every image stamp, interpolated from the pose messages or looked up
   in the TF tree, with a validity mask;
4. `unique_records`: the records to keep: posed (unless poses are optional), one per stamp.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError
from ...frames import DEFAULT_PARENT, PoseFrames, clean_frame_id, frames_from_messages
from ..poses import interpolate_poses, nan_poses
from .bag import (
    IMAGE_MSG_TYPES,
    MESSAGE_ERRORS,
    POSE_MSG_TYPES,
    TF_MSG_TYPE,
    TF_STATIC_TOPIC,
    TF_TOPIC,
    connections,
    header_stamp,
    open_bag,
    pose_of,
)
from .tf import TransformTree, frame_list

log = logging.getLogger(__name__)

MessageKey = tuple[int, int, int]  # (connection id, bag time ns, index among equal times): finds a message again


@dataclass(frozen=True)
class ScanRequest:
    """What to read from which bag, and the interpolation rules (see `interpolate_poses`)."""
    bag: Path
    image_topic: str
    pose_topic: str | None = None
    tf_frames: tuple[str, str] | None = None
    tolerance: float = 0.05
    max_gap: float = 1.0


@dataclass
class ScanCounts:
    images: int = 0
    undecodable: int = 0
    duplicate_stamps: int = 0
    no_pose: int = 0
    bad_poses: int = 0
    pose_msgs: int = 0


@dataclass
class BagScan:
    """What `read_bag` found: image message keys and stamps, pose samples or a TF tree, counts."""
    image_type: str = ""
    pose_type: str = ""
    image_keys: list[MessageKey] = field(default_factory=list)
    image_stamps: list[float] = field(default_factory=list)
    pose_stamps: list[float] = field(default_factory=list)
    pose_rows: list[np.ndarray] = field(default_factory=list)
    tf_topics: list[str] = field(default_factory=list)  # non-empty when the poses come from TF
    tf_tree: TransformTree | None = None
    message_frames: Counter[tuple[str, str]] = field(default_factory=Counter)  # (header frame, child frame)
    counts: ScanCounts = field(default_factory=ScanCounts)

    @property
    def stamps(self) -> np.ndarray:
        return np.asarray(self.image_stamps, dtype=np.float64)


@dataclass
class BagRecord:
    key: MessageKey
    stamp: float
    pose: np.ndarray


class MessageCounter:
    """Numbers messages of equal (connection, bag time) in reading order, so a key finds one message."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], int] = {}

    def key(self, conn_id: int, t_ns: int) -> MessageKey:
        index = self._seen.get((conn_id, t_ns), 0)
        self._seen[(conn_id, t_ns)] = index + 1
        return conn_id, t_ns, index


# -------------------------------------------------------------------------------------------- 1. reading

def tf_topics_of(req: ScanRequest, pose_conns: list[Any], pose_type: str) -> list[str]:
    """[pose topic] when it carries TF (then `tf_frames` is needed), else [] (`tf_frames` not allowed)."""
    is_tf = [c.msgtype == TF_MSG_TYPE for c in pose_conns]
    if any(is_tf) and not all(is_tf):
        raise DataError(f"pose topic {req.pose_topic!r} in bag {req.bag} mixes TF and pose messages "
                        f"({pose_type}); use a topic of one type")
    if any(is_tf):
        return [str(req.pose_topic)]
    if req.tf_frames is not None:
        raise DataError(f"TF frames {req.tf_frames[0]}:{req.tf_frames[1]} were given, but pose topic "
                        f"{req.pose_topic!r} in bag {req.bag} is {pose_type}, not TF "
                        f"({TF_MSG_TYPE}); use --pose-topic {TF_TOPIC}, or leave out the TF frames")
    return []


def read_bag(req: ScanRequest) -> BagScan:
    """One pass over the bag: image stamps and keys, pose samples (or the TF tree), counts.

    DataError when a topic is missing or of the wrong type, or no image message is readable;
    unreadable messages are counted and logged.
    """
    scan = BagScan()
    with open_bag(req.bag) as reader:
        image_conns = connections(reader, req.image_topic, IMAGE_MSG_TYPES, "image", req.bag)
        pose_conns = (connections(reader, req.pose_topic, POSE_MSG_TYPES + (TF_MSG_TYPE,), "pose", req.bag)
                      if req.pose_topic else [])
        scan.image_type = ", ".join(sorted({c.msgtype for c in image_conns}))
        scan.pose_type = ", ".join(sorted({c.msgtype for c in pose_conns}))
        scan.tf_topics = tf_topics_of(req, pose_conns, scan.pose_type)
        if scan.tf_topics:
            static_conns = [c for c in reader.connections if c.topic == TF_STATIC_TOPIC
                            and c.msgtype == TF_MSG_TYPE and c.topic != req.pose_topic]
            pose_conns = pose_conns + static_conns
            scan.tf_topics += [TF_STATIC_TOPIC] if static_conns else []
            scan.tf_tree = TransformTree(f"the TF of bag {req.bag} ({', '.join(scan.tf_topics)})")
        image_ids = {c.id for c in image_conns}
        numbering = MessageCounter()
        for conn, t_ns, raw in reader.messages(connections=image_conns + pose_conns):
            if conn.id in image_ids:
                _read_image(scan, reader, conn, t_ns, raw, numbering.key(conn.id, t_ns))
            elif scan.tf_tree is not None:
                _read_tf(scan, reader, conn, t_ns, raw)
            else:
                _read_pose(scan, reader, conn, t_ns, raw)
    _report_reading(scan, req)
    return scan


def _read_image(scan: BagScan, reader: Any, conn: Any, t_ns: int, raw: bytes, key: MessageKey) -> None:
    scan.counts.images += 1
    try:
        stamp = header_stamp(reader.deserialize(raw, conn.msgtype), t_ns)
    except MESSAGE_ERRORS as exc:
        scan.counts.undecodable += 1
        log.debug("unreadable %s message at bag time %d: %s", conn.topic, t_ns, exc)
        return
    scan.image_keys.append(key)
    scan.image_stamps.append(stamp)


def _read_tf(scan: BagScan, reader: Any, conn: Any, t_ns: int, raw: bytes) -> None:
    assert scan.tf_tree is not None
    scan.counts.pose_msgs += 1
    try:
        scan.tf_tree.add_message(reader.deserialize(raw, conn.msgtype), t_ns, static=conn.topic == TF_STATIC_TOPIC)
    except MESSAGE_ERRORS as exc:
        scan.counts.bad_poses += 1
        log.debug("unreadable %s message at bag time %d: %s", conn.topic, t_ns, exc)


def _read_pose(scan: BagScan, reader: Any, conn: Any, t_ns: int, raw: bytes) -> None:
    try:
        msg = reader.deserialize(raw, conn.msgtype)
        stamp = header_stamp(msg, t_ns)
        pose = pose_of(msg, conn.msgtype)
        frames = clean_frame_id(msg.header.frame_id), clean_frame_id(getattr(msg, "child_frame_id", ""))
    except MESSAGE_ERRORS as exc:
        scan.counts.bad_poses += 1
        log.debug("unreadable %s message at bag time %d: %s", conn.topic, t_ns, exc)
        return
    scan.counts.pose_msgs += 1
    if not np.all(np.isfinite(pose)) or np.linalg.norm(pose[3:]) < 1e-12:
        scan.counts.bad_poses += 1
        return
    scan.pose_stamps.append(stamp)
    scan.pose_rows.append(pose)
    scan.message_frames[frames] += 1


def _report_reading(scan: BagScan, req: ScanRequest) -> None:
    counts = scan.counts
    if not scan.image_stamps:
        raise DataError(f"image topic {req.image_topic!r} of bag {req.bag} has no readable messages "
                        f"({counts.images} messages, {counts.undecodable} unreadable)")
    if counts.undecodable:
        log.warning("%s: %d unreadable image message(s) skipped", req.image_topic, counts.undecodable)
    if counts.bad_poses:
        log.warning("%s: %d pose message(s) with an invalid pose (non-finite or zero quaternion) ignored",
                    req.pose_topic, counts.bad_poses)


# -------------------------------------------------------------------------------------------- 2. frames

def scan_frames(scan: BagScan, req: ScanRequest, given: tuple[str, str]) -> PoseFrames:
    """The frames of the poses: the TF frames looked up, or those the pose messages name, completed by
    `given` ((parent, child), "" = not given; see `frames_from_messages`). Without a pose topic: `given`
    or the default parent. DataError when `given` contradicts what the input names."""
    if scan.tf_tree is not None and req.tf_frames is not None:
        for what, named, said in zip(("parent", "child"), req.tf_frames, given):
            if said and said != named:
                raise DataError(f"pose frames say the {what} frame is {said!r}, but the TF frames are "
                                f"{req.tf_frames[0]}:{req.tf_frames[1]}; with TF, --tf-frames names the frames "
                                "(leave out --pose-frames / --frame-id)")
        return PoseFrames(*req.tf_frames)
    if req.pose_topic:
        parent, child, warnings = frames_from_messages(scan.message_frames, given, f"pose topic {req.pose_topic!r}")
        for warning in warnings:
            log.warning(warning)
        return PoseFrames(parent, child)
    return PoseFrames(given[0] or DEFAULT_PARENT, given[1])


# -------------------------------------------------------------------------------------------- 3. poses

def assign_poses(scan: BagScan, req: ScanRequest, require_poses: bool) -> tuple[np.ndarray, np.ndarray]:
    """(poses (N, 7), valid (N,)) at the image stamps: from TF, from the pose messages, or NaN without
    a pose topic (all valid). Counts and logs the images left without a pose."""
    stamps = scan.stamps
    if scan.tf_tree is not None:
        poses, valid = tf_poses(scan, req, stamps)
    elif req.pose_topic:
        poses, valid = interpolated_poses(scan, req, stamps)
    else:
        return nan_poses(len(stamps)), np.ones(len(stamps), dtype=bool)
    scan.counts.no_pose = int((~valid).sum())
    if scan.counts.no_pose:
        action = "skipped" if require_poses else "kept with unknown pose"
        log.warning("%s: %d of %d images have no pose from %s within tolerance %s s / max gap %s s "
                    "(%s)", req.image_topic, scan.counts.no_pose, len(stamps), req.pose_topic,
                    req.tolerance, req.max_gap, action)
    return poses, valid


def interpolated_poses(scan: BagScan, req: ScanRequest, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Poses of the pose messages interpolated at `stamps`; DataError when no image gets one."""
    if not scan.pose_rows:
        raise DataError(f"pose topic {req.pose_topic!r} of bag {req.bag} has no valid pose "
                        f"({scan.counts.pose_msgs} messages)")
    p_stamps = np.asarray(scan.pose_stamps, dtype=np.float64)
    poses, valid = interpolate_poses(p_stamps, np.stack(scan.pose_rows), stamps, req.tolerance, req.max_gap)
    if not valid.any():
        raise DataError(
            f"no image of {req.image_topic!r} has a pose from {req.pose_topic!r} in bag {req.bag}: "
            f"image stamps {stamps.min():.6f}..{stamps.max():.6f} s, pose stamps "
            f"{p_stamps.min():.6f}..{p_stamps.max():.6f} s (tolerance {req.tolerance} s, max gap "
            f"{req.max_gap} s); check that both topics use the same clock")
    return poses, valid


def tf_poses(scan: BagScan, req: ScanRequest, stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Poses of the TF child frame in the parent frame at `stamps`; DataError when no image gets one."""
    tree = scan.tf_tree
    assert tree is not None
    topics = ", ".join(scan.tf_topics)
    if tree.rejected:
        log.warning("%s: %d transform(s) with an invalid pose or frame id ignored", topics, tree.rejected)
    if tree.transforms == 0:
        raise DataError(f"no TF message in bag {req.bag}: {topics} hold no usable transform "
                        f"({scan.counts.pose_msgs} messages, {scan.counts.bad_poses} unreadable, "
                        f"{tree.rejected} invalid transforms)")
    if req.tf_frames is None:
        raise DataError(f"pose topic {req.pose_topic!r} of bag {req.bag} is TF: give the frames as "
                        f"--tf-frames PARENT:CHILD (the pose of CHILD in PARENT, e.g. map:base_link); "
                        f"frames seen: {frame_list(tree.frames)}")
    parent, child = req.tf_frames
    poses, valid = tree.lookup(parent, child, stamps, req.tolerance, req.max_gap)
    if not valid.any():
        raise DataError(
            f"no image of {req.image_topic!r} has a pose from {topics} ({parent} -> {child}) in bag "
            f"{req.bag}: image stamps {stamps.min():.6f}..{stamps.max():.6f} s, {_tf_range(tree, parent, child)} "
            f"(tolerance {req.tolerance} s, max gap {req.max_gap} s); check that both topics use the "
            "same clock")
    return poses, valid


def _tf_range(tree: TransformTree, parent: str, child: str) -> str:
    """The stamps covered by every dynamic edge between the frames, for an error message."""
    to_parent, to_child = tree.path(parent, child)
    ranges = [(edge, tree.time_range(edge)) for edge in to_parent + to_child]
    known = [(edge, r) for edge, r in ranges if r is not None]
    start, end = max(r[0] for _, r in known), min(r[1] for _, r in known)
    if start <= end:
        return f"TF stamps {start:.6f}..{end:.6f} s"
    return "TF stamps of the path do not overlap (" + ", ".join(
        f"{p}->{c} {r[0]:.6f}..{r[1]:.6f} s" for (p, c), r in known) + ")"


# -------------------------------------------------------------------------------------------- 4. records

def unique_records(keys: list[MessageKey], stamps: np.ndarray, poses: np.ndarray, valid: np.ndarray,
                   require_poses: bool) -> tuple[list[BagRecord], int]:
    """The records to keep, in bag order, and how many were dropped for a repeated stamp.

    Images without a pose are dropped when `require_poses`; of several images whose stamps print
    the same (`f"{stamp:.6f}"`, the record name) the first is kept, so names are unique.
    """
    records: list[BagRecord] = []
    seen: set[str] = set()
    duplicates = 0
    for key, stamp, pose, ok in zip(keys, stamps, poses, valid):
        if not ok and require_poses:
            continue
        name = f"{stamp:.6f}"
        if name in seen:
            duplicates += 1
            continue
        seen.add(name)
        records.append(BagRecord(key, float(stamp), pose))
    return records, duplicates
