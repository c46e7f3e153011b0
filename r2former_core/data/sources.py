"""Sources of posed images for map building and localization.

Every source yields `PosedImage` records one by one, loading each image only when it is reached
(maps are built from thousands of images), and can list all stamps and poses without loading any
image (`poses()`), so callers can select keyframes or check coverage first.

* `ImageFolderSource`: a folder of PNG/JPEG files plus an optional TUM or CSV pose file;
* `VGFolderSource`: a folder of the VG benchmark layout (poses encoded in the file names);
* `RosbagSource`: a rosbag2 (sqlite3 or mcap) with an image topic and an optional pose topic (a
  pose message topic, or TF: `/tf` + `/tf_static` looked up between two frames, see `TransformTree`);
* `open_source(...)`: picks one of them from command-line style arguments.

A pose of NaNs means "unknown" (localization queries without ground truth).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from ..errors import DataError, ImageDecodeError
from .image_codec import decode_compressed, decode_raw
from .image_limits import check_image_file
from .poses import (compose_poses, interpolate_poses, invert_poses, nan_poses, quat_from_yaw, read_pose_csv,
                    read_tum)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
TUM_SUFFIXES = (".txt", ".tum")
CSV_SUFFIXES = (".csv",)

IMAGE_MSG_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
POSE_MSG_TYPES = ("nav_msgs/msg/Odometry", "geometry_msgs/msg/PoseStamped",
                  "geometry_msgs/msg/PoseWithCovarianceStamped")
TF_MSG_TYPE = "tf2_msgs/msg/TFMessage"
TF_TOPIC = "/tf"
TF_STATIC_TOPIC = "/tf_static"  # read along with a TF pose topic whenever the bag has it
_FRAMES_LISTED = 20  # how many frame names a TF error lists

# A file stem that is a timestamp: seconds with an optional fraction ("1700000000.100000"), or an
# integer of 16+ digits, read as nanoseconds ("1403636579763555584", EuRoC style).
_STAMP_STEM = re.compile(r"^\d+(?:\.\d+)?$")
_NANOSECOND_DIGITS = 16
_EXAMPLES = 3  # how many example names a log message or error lists


@dataclass
class PosedImage:
    """One image with its pose; `image` is HxWx3 uint8 RGB, None until loaded."""
    name: str
    stamp: float
    pose: np.ndarray  # (7,) x y z qx qy qz qw; NaN when unknown
    image: np.ndarray | None = None

    @property
    def has_pose(self) -> bool:
        return bool(np.all(np.isfinite(self.pose)))


@runtime_checkable
class Source(Protocol):
    """What map building and localization read from."""
    description: str

    def __len__(self) -> int:
        """Number of records (a source that skips undecodable images may yield fewer)."""
        ...

    def __iter__(self) -> Iterator[PosedImage]:
        """Records in source order, each image loaded when its record is reached."""
        ...

    def poses(self) -> tuple[np.ndarray, np.ndarray]:
        """(stamps (N,), poses (N, 7)) of all records, in iteration order, without loading images."""
        ...


# --------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------

def list_image_files(folder: str | Path) -> list[Path]:
    """PNG/JPEG files directly inside `folder` (extension case-insensitive), sorted by name."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.name)


def read_image_file(path: str | Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB; ImageDecodeError names the file on failure."""
    path = Path(path)
    check_image_file(path)   # image_limits: regular file, size and PNG/JPEG header within max_image_pixels
    try:
        # np.fromfile + imdecode instead of imread: works for any path encoding.
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image file {path}: {exc}") from exc
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if image is None or image.size == 0:
        raise ImageDecodeError(f"image file {path} ({buf.size} bytes) could not be decoded; "
                               "it is corrupt, truncated or not a PNG/JPEG")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def parse_stamp_stem(stem: str) -> float | None:
    """Seconds encoded in a file stem, or None when the stem is not a timestamp (see _STAMP_STEM)."""
    if not _STAMP_STEM.match(stem):
        return None
    if "." not in stem and len(stem) >= _NANOSECOND_DIGITS:
        seconds, nanos = divmod(int(stem), 1_000_000_000)
        return seconds + nanos * 1e-9
    return float(stem)


def _examples(items: Sequence[Any]) -> str:
    shown = ", ".join(str(x) for x in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


@dataclass
class _FileRecord:
    path: Path
    name: str
    stamp: float
    pose: np.ndarray


class _FileListSource:
    """Shared iteration over a list of image files with known stamps and poses."""

    description: str = ""

    def __init__(self, records: list[_FileRecord], skip_unreadable: bool) -> None:
        self._records = records
        self.skip_unreadable = skip_unreadable
        self.skipped_unreadable = 0  # images skipped during the last iteration

    def __len__(self) -> int:
        return len(self._records)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._records]

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self._records]

    def poses(self) -> tuple[np.ndarray, np.ndarray]:
        stamps = np.asarray([r.stamp for r in self._records], dtype=np.float64)
        poses = np.stack([r.pose for r in self._records]) if self._records else nan_poses(0)
        return stamps, poses

    def __iter__(self) -> Iterator[PosedImage]:
        self.skipped_unreadable = 0
        for record in self._records:
            try:
                image = read_image_file(record.path)
            except ImageDecodeError as exc:
                if not self.skip_unreadable:
                    raise DataError(f"{exc}; remove or replace it, or skip unreadable images "
                                    "(--skip-unreadable; skip_unreadable=True in Python)") from exc
                self.skipped_unreadable += 1
                log.warning("skipping unreadable image: %s", exc)
                continue
            yield PosedImage(record.name, record.stamp, record.pose.copy(), image)
        if self.skipped_unreadable:
            log.warning("%s: skipped %d unreadable image(s)", self.description, self.skipped_unreadable)


def _check_folder(folder: str | Path, what: str) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what} {folder} is not a folder")
    return folder


def _image_files_or_error(folder: Path) -> list[Path]:
    files = list_image_files(folder)
    if files:
        return files
    sub = sorted(p.name + "/" for p in folder.iterdir() if p.is_dir() and list_image_files(p))
    hint = (f"; images are only looked up directly in the folder, not in sub-folders "
            f"(found images in {_examples(sub)} - pass one of those)") if sub else ""
    raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {folder}{hint}")


# --------------------------------------------------------------------------------------------
# Image folder + TUM / CSV poses
# --------------------------------------------------------------------------------------------

class ImageFolderSource(_FileListSource):
    """A folder of PNG/JPEG images, with poses from a TUM or CSV file.

    Matching of images to poses:
    * TUM file (`.txt`/`.tum`): image file stems are timestamps (`1700000000.100000.png`, or integer
      nanoseconds); each image gets the pose interpolated at its stamp (`interpolate_poses` with
      `tolerance`/`max_gap`). If the stems are not timestamps but there are as many images as poses,
      images sorted by name are paired with poses sorted by time (logged).
    * CSV file: the `name` column is the image file name, with or without extension.
    * No file and `require_poses=False`: poses are NaN (localization queries without ground truth).

    Images without a matching pose are skipped with a warning when `require_poses` is True, else
    kept with a NaN pose; no match at all is an error. Images are ordered by stamp when all stems
    are timestamps, else by file name. An unreadable image raises DataError during iteration
    unless `skip_unreadable` is set (then it is logged and counted in `skipped_unreadable`).
    """

    def __init__(self, images_dir: str | Path, poses_file: str | Path | None = None, tolerance: float = 0.05,
                 require_poses: bool = True, skip_unreadable: bool = False, max_gap: float = 1.0) -> None:
        self.images_dir = _check_folder(images_dir, "image folder")
        self.poses_file = Path(poses_file) if poses_file is not None else None
        self.tolerance = tolerance
        self.max_gap = max_gap
        self.require_poses = require_poses
        files = _image_files_or_error(self.images_dir)
        stem_stamps = [parse_stamp_stem(p.stem) for p in files]
        stamped = all(s is not None for s in stem_stamps)
        if stamped:
            order = sorted(range(len(files)), key=lambda i: (stem_stamps[i], files[i].name))
            files = [files[i] for i in order]
            stem_stamps = [stem_stamps[i] for i in order]

        if self.poses_file is None:
            if require_poses:
                raise DataError(f"image folder {self.images_dir} has no poses: pass a pose file (TUM "
                                "'timestamp tx ty tz qx qy qz qw' or CSV 'name,x,y,z,qx,qy,qz,qw' / "
                                "'name,x,y,yaw'); poses can be omitted only for localization queries")
            stamps = [s if stamped else float(i) for i, s in enumerate(stem_stamps)]
            poses, how = nan_poses(len(files)), "no poses"
        else:
            suffix = self.poses_file.suffix.lower()
            if not self.poses_file.is_file():
                raise DataError(f"pose file {self.poses_file} does not exist")
            if suffix in TUM_SUFFIXES:
                stamps, poses, how = self._match_tum(files, stem_stamps, stamped)
            elif suffix in CSV_SUFFIXES:
                stamps, poses, how = self._match_csv(files, stem_stamps, stamped)
            else:
                raise DataError(f"pose file {self.poses_file}: unknown format {suffix!r}; use a TUM file "
                                f"({'/'.join(TUM_SUFFIXES)}) or a CSV file (.csv)")

        records = [_FileRecord(p, p.name, float(s), pose) for p, s, pose in zip(files, stamps, poses)]
        if self.poses_file is not None:
            records = self._drop_unposed(records)
        super().__init__(records, skip_unreadable)
        self.description = f"image folder {self.images_dir} ({len(self)} images, {how})"
        log.info("opened %s", self.description)

    def _match_tum(self, files: list[Path], stem_stamps: list[float | None],
                   stamped: bool) -> tuple[list[float], np.ndarray, str]:
        tum_stamps, tum_poses = read_tum(self.poses_file)
        if stamped:
            query = np.asarray(stem_stamps, dtype=np.float64)
            poses, valid = interpolate_poses(tum_stamps, tum_poses, query, self.tolerance, self.max_gap)
            if not valid.any():
                raise DataError(
                    f"no image in {self.images_dir} matches a pose of {self.poses_file}: image stamps "
                    f"{query.min():.6f}..{query.max():.6f} s (from file names), poses "
                    f"{tum_stamps.min():.6f}..{tum_stamps.max():.6f} s (tolerance {self.tolerance} s); "
                    "file names must be stamps in seconds (or integer nanoseconds) on the clock of the poses")
            return list(query), poses, f"poses interpolated from {self.poses_file.name} by timestamp"
        if len(files) == len(tum_stamps):
            order = np.argsort(tum_stamps, kind="stable")
            log.info("image names in %s are not timestamps (e.g. %s); pairing the %d images sorted by name "
                     "with the %d poses of %s sorted by time", self.images_dir, files[0].name, len(files),
                     len(tum_stamps), self.poses_file)
            return list(tum_stamps[order]), tum_poses[order], f"poses from {self.poses_file.name} by order"
        bad = [p.name for p, s in zip(files, stem_stamps) if s is None]
        raise DataError(
            f"cannot match the {len(files)} images of {self.images_dir} to the {len(tum_stamps)} poses of "
            f"{self.poses_file}: image names are not timestamps (e.g. {_examples(bad)}) and the counts differ. "
            "Name each image by its stamp in seconds (e.g. 1700000000.100000.png), or provide exactly one "
            "pose per image, or use a CSV pose file with a 'name' column")

    def _match_csv(self, files: list[Path], stem_stamps: list[float | None],
                   stamped: bool) -> tuple[list[float], np.ndarray, str]:
        names, csv_poses = read_pose_csv(self.poses_file)
        lookup: dict[str, int] = {}
        for i, name in enumerate(names):
            lookup[name] = i
        for i, name in enumerate(names):  # extension-less keys, unless they collide with a full name
            stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
            lookup.setdefault(stem, i)
        poses = nan_poses(len(files))
        used: set[int] = set()
        for k, path in enumerate(files):
            i = lookup.get(path.name, lookup.get(path.stem))
            if i is not None:
                poses[k] = csv_poses[i]
                used.add(i)
        if not used:
            raise DataError(
                f"no image in {self.images_dir} (e.g. {_examples([p.name for p in files])}) is named in the "
                f"'name' column of {self.poses_file} (e.g. {_examples(names)}); names must be the image file "
                "names, with or without extension")
        if len(used) < len(names):
            unused = [n for i, n in enumerate(names) if i not in used]
            log.warning("%d pose(s) of %s have no image in %s (e.g. %s)", len(unused), self.poses_file,
                        self.images_dir, _examples(unused))
        stamps = [s if stamped else float(i) for i, s in enumerate(stem_stamps)]
        return stamps, poses, f"poses from {self.poses_file.name} by name"

    def _drop_unposed(self, records: list[_FileRecord]) -> list[_FileRecord]:
        unposed = [r.name for r in records if not np.all(np.isfinite(r.pose))]
        if not unposed:
            return records
        if self.require_poses:
            log.warning("skipping %d of %d images of %s without a pose in %s (e.g. %s)", len(unposed),
                        len(records), self.images_dir, self.poses_file, _examples(unposed))
            return [r for r in records if np.all(np.isfinite(r.pose))]
        log.info("%d of %d images of %s have no pose in %s (kept with unknown pose)", len(unposed),
                 len(records), self.images_dir, self.poses_file)
        return records


# --------------------------------------------------------------------------------------------
# VG benchmark folders
# --------------------------------------------------------------------------------------------

# Field positions in "@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@latitude@longitude@pano_id
# @tile_num@heading@pitch@roll@height@timestamp@note@.jpg"
_VG_EAST, _VG_NORTH, _VG_HEADING, _VG_HEIGHT, _VG_TIMESTAMP = 0, 1, 8, 11, 12


def _float_or_none(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_vg_name(file_name: str) -> tuple[np.ndarray, float | None]:
    """VG benchmark file name -> (pose (7,), timestamp or None).

    x = UTM east, y = UTM north, z = height (0 when empty); yaw from the heading (degrees clockwise
    from north, so yaw = radians(90 - heading)), identity orientation when the heading is empty.
    Pitch and roll are ignored. Raises DataError when east/north are not numbers.
    """
    stem = Path(file_name).stem
    if not stem.startswith("@"):
        raise DataError(f"{file_name!r} is not a VG benchmark name ('@UTM_east@UTM_north@...@.jpg')")
    fields = stem[1:].split("@")

    def get(k: int) -> str:  # names may have fewer fields than the full layout
        return fields[k].strip() if k < len(fields) else ""

    east, north = _float_or_none(get(_VG_EAST)), _float_or_none(get(_VG_NORTH))
    if east is None or north is None:
        raise DataError(f"{file_name!r}: UTM east/north ({get(_VG_EAST)!r}, {get(_VG_NORTH)!r}) are not numbers; "
                        "expected '@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@latitude@longitude"
                        "@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg'")
    height = _float_or_none(get(_VG_HEIGHT))
    heading = _float_or_none(get(_VG_HEADING))
    quat = quat_from_yaw(math.radians(90.0 - heading)) if heading is not None else np.array([0.0, 0.0, 0.0, 1.0])
    pose = np.array([east, north, height if height is not None else 0.0, *quat], dtype=np.float64)
    return pose, _float_or_none(get(_VG_TIMESTAMP))


def is_vg_folder(path: str | Path, sample: int = 20) -> bool:
    """True when `path` is a folder whose (first `sample`) images have VG benchmark names."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = list_image_files(path)[:sample]
    if not files:
        return False
    try:
        for p in files:
            parse_vg_name(p.name)
    except DataError:
        return False
    return True


class VGFolderSource(_FileListSource):
    """A VG-benchmark image folder (e.g. `images/test/database`): poses parsed from the file names.

    Stamps are the names' timestamp fields when all are numeric, else the image index.
    """

    def __init__(self, folder: str | Path, skip_unreadable: bool = False) -> None:
        self.folder = _check_folder(folder, "VG folder")
        files = list_image_files(self.folder)
        if not files:
            sub = sorted(str(p.relative_to(self.folder)) for p in self.folder.glob("images/*/*") if p.is_dir())
            hint = f"; this looks like a VG dataset root, pass one of: {', '.join(sub)}" if sub else ""
            raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in VG folder {self.folder}{hint}")
        parsed = [parse_vg_name(p.name) for p in files]
        times = [t for _, t in parsed]
        stamped = all(t is not None for t in times)
        records = [_FileRecord(p, p.name, float(t) if stamped else float(i), pose)
                   for i, (p, (pose, t)) in enumerate(zip(files, parsed))]
        super().__init__(records, skip_unreadable)
        self.description = f"VG folder {self.folder} ({len(self)} images)"
        log.info("opened %s", self.description)


# --------------------------------------------------------------------------------------------
# rosbag2
# --------------------------------------------------------------------------------------------

_TYPESTORE = None


def _typestore() -> Any:
    """The message types used for bags without embedded definitions (created once)."""
    global _TYPESTORE
    if _TYPESTORE is None:
        from rosbags.typesys import Stores, get_typestore
        _TYPESTORE = get_typestore(Stores.ROS2_KILTED)
    return _TYPESTORE


def _bag_location(bag_path: str | Path) -> Path:
    """The path AnyReader wants: a rosbag2 folder (also accepted: a file inside it) or a ROS 1 .bag."""
    path = Path(bag_path)
    if not path.exists():
        raise DataError(f"bag {path} does not exist")
    if path.is_file():
        if path.suffix == ".bag":
            return path
        if (path.parent / "metadata.yaml").is_file():
            return path.parent
        raise DataError(f"{path} is not a rosbag2 folder: pass the bag folder (with metadata.yaml); for a "
                        "lone .mcap/.db3 file, put it in its own folder and run `ros2 bag reindex <folder>`")
    if not (path / "metadata.yaml").is_file():
        raise DataError(f"{path} is not a rosbag2 folder (no metadata.yaml); if it holds a recording whose "
                        "metadata was lost, run `ros2 bag reindex <folder>`")
    return path


@contextmanager
def _open_bag(bag_path: str | Path) -> Iterator[Any]:
    """An open AnyReader (rosbag2 sqlite3/mcap, or ROS 1); failures to open become DataError."""
    import sqlite3

    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.rosbag2 import ReaderError

    location = _bag_location(bag_path)
    try:
        reader = AnyReader([location], default_typestore=_typestore())
        reader.open()
    except (AnyReaderError, ReaderError, OSError, KeyError, ValueError, sqlite3.DatabaseError) as exc:
        raise DataError(f"cannot read bag {location}: {exc}") from exc
    try:
        yield reader
    except _bag_read_errors() as exc:   # reliability: a bag damaged past its index fails while messages are read
        raise DataError(f"cannot read bag {location}: {type(exc).__name__}: {exc}; the bag is truncated or damaged "
                        "(a recording cut short can often be repaired with `ros2 bag reindex`)") from exc
    finally:
        reader.close()


def _bag_read_errors() -> tuple[type[BaseException], ...]:
    """What the bag readers raise for damaged files: rosbags' errors, sqlite3 / apsw (rosbags' SQLite) errors."""
    import sqlite3

    from rosbags.highlevel import AnyReaderError
    from rosbags.rosbag2 import ReaderError
    errors: tuple[type[BaseException], ...] = (AnyReaderError, ReaderError, sqlite3.DatabaseError)
    try:
        import apsw
    except ImportError:
        return errors
    return errors + (apsw.Error,)


def list_topics(bag_path: str | Path) -> dict[str, str]:
    """Topic name -> message type of the bag (e.g. {'/odom': 'nav_msgs/msg/Odometry'})."""
    with _open_bag(bag_path) as reader:
        return {name: (info.msgtype or "(mixed types)") for name, info in reader.topics.items()}


def _format_topics(topics: dict[str, str]) -> str:
    if not topics:
        return "the bag has no topics"
    return "topics in the bag: " + ", ".join(f"{name} ({msgtype})" for name, msgtype in sorted(topics.items()))


def _connections(reader: Any, topic: str, supported: tuple[str, ...], role: str, bag: Path) -> list[Any]:
    topics = {name: (info.msgtype or "(mixed types)") for name, info in reader.topics.items()}
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        raise DataError(f"{role} topic {topic!r} is not in bag {bag}; {_format_topics(topics)}")
    bad = sorted({c.msgtype for c in conns if c.msgtype not in supported})
    if bad:
        raise DataError(f"{role} topic {topic!r} in bag {bag} has type {', '.join(bad)}; supported "
                        f"{role} types: {', '.join(supported)}")
    return conns


def _header_stamp(msg: Any, bag_time_ns: int) -> float:
    """Header stamp in seconds, or the bag (receive) time when the header stamp is zero (unset)."""
    stamp = msg.header.stamp
    if stamp.sec == 0 and stamp.nanosec == 0:
        return bag_time_ns * 1e-9
    return stamp.sec + stamp.nanosec * 1e-9


def _pose_of(msg: Any, msgtype: str) -> np.ndarray:
    pose = msg.pose if msgtype == "geometry_msgs/msg/PoseStamped" else msg.pose.pose
    p, q = pose.position, pose.orientation
    return np.array([p.x, p.y, p.z, q.x, q.y, q.z, q.w], dtype=np.float64)


def _decode_image_msg(msg: Any, msgtype: str) -> np.ndarray:
    if msgtype == "sensor_msgs/msg/CompressedImage":
        return decode_compressed(msg.format, msg.data)
    return decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.data, bool(msg.is_bigendian))


# --------------------------------------------------------------------------------------------
# TF (tf2_msgs/msg/TFMessage) as a pose source
# --------------------------------------------------------------------------------------------

_IDENTITY_POSE = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])


def clean_frame_id(frame: str) -> str:
    """A TF frame id without surrounding blanks and leading '/' (ROS 1 style '/map' == 'map')."""
    return str(frame).strip().lstrip("/")


def parse_tf_frames(spec: str | Sequence[str]) -> tuple[str, str]:
    """'PARENT:CHILD' (or a (parent, child) pair) -> (parent, child) frame ids; DataError when malformed."""
    parts = [str(p) for p in spec] if isinstance(spec, (tuple, list)) else str(spec).split(":")
    frames = [clean_frame_id(p) for p in parts]
    if len(frames) != 2 or not all(frames):
        raise DataError(f"TF frames {spec!r}: expected PARENT:CHILD, e.g. map:base_link (the pose of CHILD "
                        "in PARENT)")
    if frames[0] == frames[1]:
        raise DataError(f"TF frames {spec!r}: PARENT and CHILD are the same frame; give two different frames")
    return frames[0], frames[1]


def _frame_list(frames: Sequence[str]) -> str:
    shown = ", ".join(frames[:_FRAMES_LISTED])
    return (shown + f", ... ({len(frames)} frames)") if len(frames) > _FRAMES_LISTED else (shown or "none")


class TransformTree:
    """Transforms between TF frames, looked up at arbitrary stamps (what `tf2` does, for recorded TF).

    Each edge parent -> child holds the pose of child in parent (`geometry_msgs/TransformStamped`
    with `header.frame_id` = parent, `child_frame_id` = child). Dynamic edges (from `/tf`) are
    sampled over time and interpolated at the query stamps with `interpolate_poses` (linear
    position, slerp orientation; `tolerance` / `max_gap` rules); static edges (from `/tf_static`)
    are time-invariant, the last one received wins. When an edge has dynamic samples, static ones
    for the same edge are ignored. Frames must form a tree: a frame on a looked-up path may have
    only one parent. Frame ids are compared without a leading '/'.

    `source` names where the transforms came from, for error messages.
    """

    def __init__(self, source: str = "TF") -> None:
        self.source = source
        self._dynamic: dict[tuple[str, str], tuple[list[float], list[np.ndarray]]] = {}
        self._static: dict[tuple[str, str], np.ndarray] = {}
        self._parents: dict[str, list[str]] = {}  # child -> its parents, in order of appearance
        self._frames: set[str] = set()
        self.transforms = 0  # accepted transforms (dynamic samples + static)
        self.rejected = 0  # transforms with a bad pose or frame ids, ignored

    # -- filling ---------------------------------------------------------------------------

    def add(self, parent: str, child: str, pose: np.ndarray, stamp: float = 0.0, static: bool = False) -> bool:
        """Add the pose (7,) of `child` in `parent` at `stamp`; False (and counted) when it is unusable."""
        parent, child = clean_frame_id(parent), clean_frame_id(child)
        pose = np.asarray(pose, dtype=np.float64)
        if (not parent or not child or parent == child or pose.shape != (7,) or not np.all(np.isfinite(pose))
                or np.linalg.norm(pose[3:]) < 1e-12 or (not static and not math.isfinite(stamp))):
            self.rejected += 1
            return False
        parents = self._parents.setdefault(child, [])
        if parent not in parents:
            parents.append(parent)
        self._frames.update((parent, child))
        if static:
            self._static[(parent, child)] = pose
        else:
            stamps, poses = self._dynamic.setdefault((parent, child), ([], []))
            stamps.append(float(stamp))
            poses.append(pose)
        self.transforms += 1
        return True

    def add_message(self, msg: Any, bag_time_ns: int, static: bool) -> None:
        """Add every transform of a deserialized tf2_msgs/msg/TFMessage (zero header stamps -> bag time)."""
        for tf in msg.transforms:
            t, r = tf.transform.translation, tf.transform.rotation
            pose = np.array([t.x, t.y, t.z, r.x, r.y, r.z, r.w], dtype=np.float64)
            self.add(tf.header.frame_id, tf.child_frame_id, pose, _header_stamp(tf, bag_time_ns), static)

    # -- structure ---------------------------------------------------------------------------

    @property
    def frames(self) -> list[str]:
        return sorted(self._frames)

    def roots(self) -> list[str]:
        """Frames without a parent (one per tree of the forest)."""
        return sorted(f for f in self._frames if f not in self._parents)

    def _ancestors(self, frame: str) -> list[str]:
        """[frame, its parent, ..., its root]; DataError for a frame with several parents or a cycle."""
        chain = [frame]
        while chain[-1] in self._parents:
            parents = self._parents[chain[-1]]
            if len(parents) > 1:
                raise DataError(f"frame {chain[-1]!r} has several parents ({', '.join(parents)}) in {self.source}; "
                                "TF frames must form a tree (each child frame has one parent)")
            if parents[0] in chain:
                raise DataError(f"the TF of {self.source} has a cycle: {' -> '.join(reversed(chain + parents))}")
            chain.append(parents[0])
        return chain

    def path(self, parent: str, child: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Edges (p, c) from the common ancestor down to `parent`, and from it down to `child`.

        DataError when a frame is unknown (lists the frames seen) or the frames are in different
        trees (lists the roots).
        """
        parent, child = clean_frame_id(parent), clean_frame_id(child)
        unknown = [f for f in (parent, child) if f not in self._frames]
        if unknown:
            what = "frame " + " and ".join(repr(f) for f in unknown)
            raise DataError(f"{what} not in {self.source}; frames seen: {_frame_list(self.frames)}")
        up_parent, up_child = self._ancestors(parent), self._ancestors(child)
        common = set(up_parent)
        lca = next((f for f in up_child if f in common), None)
        if lca is None:
            raise DataError(f"no TF path between {parent!r} and {child!r} in {self.source}: they are in different "
                            f"trees (tree roots: {_frame_list(self.roots())}; {parent!r} is under "
                            f"{up_parent[-1]!r}, {child!r} under {up_child[-1]!r})")

        def down(chain: list[str]) -> list[tuple[str, str]]:
            below = chain[:chain.index(lca) + 1]  # frame ... lca
            return [(below[i + 1], below[i]) for i in reversed(range(len(below) - 1))]

        return down(up_parent), down(up_child)

    def is_static(self, edge: tuple[str, str]) -> bool:
        return edge not in self._dynamic

    def time_range(self, edge: tuple[str, str]) -> tuple[float, float] | None:
        """(first, last) sample stamp of a dynamic edge; None for a static edge."""
        if edge not in self._dynamic:
            return None
        stamps = self._dynamic[edge][0]
        return min(stamps), max(stamps)

    # -- lookup --------------------------------------------------------------------------------

    def _edge_poses(self, edge: tuple[str, str], stamps: np.ndarray, tolerance: float,
                    max_gap: float) -> tuple[np.ndarray, np.ndarray]:
        if edge in self._dynamic:
            samples, poses = self._dynamic[edge]
            return interpolate_poses(np.asarray(samples), np.stack(poses), stamps, tolerance, max_gap)
        pose = self._static[edge].copy()
        pose[3:] /= np.linalg.norm(pose[3:])
        return np.tile(pose, (len(stamps), 1)), np.ones(len(stamps), dtype=bool)

    def _chain_poses(self, edges: list[tuple[str, str]], stamps: np.ndarray, tolerance: float,
                     max_gap: float) -> tuple[np.ndarray, np.ndarray]:
        out = np.tile(_IDENTITY_POSE, (len(stamps), 1))
        valid = np.ones(len(stamps), dtype=bool)
        for edge in edges:
            poses, ok = self._edge_poses(edge, stamps, tolerance, max_gap)
            poses[~ok] = _IDENTITY_POSE  # keeps the math finite; the row is invalid anyway
            out = compose_poses(out, poses)
            valid &= ok
        return out, valid

    def lookup(self, parent: str, child: str, stamps: np.ndarray, tolerance: float = 0.05,
               max_gap: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Pose of `child` in `parent` at each stamp -> `(poses (N, 7), valid (N,))`.

        A stamp is valid when every dynamic edge on the path has a pose there (`interpolate_poses`
        rules); invalid rows are NaN. Raises DataError as `path` does.
        """
        stamps = np.asarray(stamps, dtype=np.float64).reshape(-1)
        to_parent, to_child = self.path(parent, child)
        base_parent, ok_parent = self._chain_poses(to_parent, stamps, tolerance, max_gap)
        base_child, ok_child = self._chain_poses(to_child, stamps, tolerance, max_gap)
        poses = compose_poses(invert_poses(base_parent), base_child)
        valid = ok_parent & ok_child
        poses[~valid] = np.nan
        return poses, valid


@dataclass
class _BagRecord:
    key: tuple[int, int, int]  # (connection id, bag time ns, index among equal times): finds the message again
    stamp: float
    pose: np.ndarray


@dataclass
class _ScanCounts:
    images: int = 0
    undecodable: int = 0
    duplicate_stamps: int = 0
    no_pose: int = 0
    bad_poses: int = 0
    pose_msgs: int = 0


class RosbagSource:
    """Images of `image_topic` in a rosbag2 (sqlite3 or mcap), posed from `pose_topic`.

    * image types: sensor_msgs/msg/Image (any encoding `decode_raw` supports) and
      sensor_msgs/msg/CompressedImage (JPEG/PNG);
    * pose types: nav_msgs/msg/Odometry, geometry_msgs/msg/PoseStamped,
      geometry_msgs/msg/PoseWithCovarianceStamped; the pose is used as is (no camera extrinsics);
    * or TF: a `tf2_msgs/msg/TFMessage` pose topic (normally `/tf`, the default when `tf_frames`
      is given without a pose topic) plus `/tf_static` when the bag has it, and
      `tf_frames` = "PARENT:CHILD" (or a pair): the pose of CHILD in PARENT, chained over the frame
      tree (`TransformTree`), each dynamic transform interpolated at the image stamp;
    * stamps are header stamps, or the bag time when a header stamp is zero;
    * the pose of an image is interpolated at its stamp (`interpolate_poses` with `tolerance` and
      `max_gap`); images without a pose are skipped and counted (kept with a NaN pose when
      `require_poses` is False); no posed image at all is an error;
    * without `pose_topic` every image has a NaN pose (localization queries);
    * images with a repeated stamp are skipped (counted), so record names `f"{stamp:.6f}"` are unique.

    Construction reads the bag once without decoding images (stamps and poses); iteration reads it
    again and decodes the images one by one. Undecodable image messages are logged and skipped
    (`skipped_undecodable` counts those of the last iteration), so an iteration can yield fewer
    than `len()` records.
    """

    def __init__(self, bag_path: str | Path, image_topic: str, pose_topic: str | None = None,
                 tolerance: float = 0.05, max_gap: float = 1.0, require_poses: bool = True,
                 tf_frames: str | Sequence[str] | None = None) -> None:
        self.bag_path = Path(bag_path)
        self.image_topic = image_topic
        self.tf_frames = parse_tf_frames(tf_frames) if tf_frames is not None else None
        if self.tf_frames is not None and pose_topic is None:
            pose_topic = TF_TOPIC
        self.pose_topic = pose_topic
        self.tf_tree: TransformTree | None = None  # filled when the poses come from TF
        self.tolerance = tolerance
        self.max_gap = max_gap
        self.require_poses = require_poses
        self.skipped_undecodable = 0
        self._records: list[_BagRecord] = []
        self.counts = _ScanCounts()
        self._scan()
        pose_part = f" posed by {pose_topic} ({self._pose_type})" if pose_topic else " (no poses)"
        if self.tf_tree is not None:
            pose_part += f" {self.tf_frames[0]} -> {self.tf_frames[1]}"
        self.description = (f"rosbag {self.bag_path}: {image_topic} ({self._image_type}){pose_part}, "
                            f"{len(self)} images")
        log.info("opened %s", self.description)

    # -- first pass: stamps and poses --------------------------------------------------------

    def _scan(self) -> None:
        from rosbags.highlevel import AnyReaderError

        counts = self.counts
        with _open_bag(self.bag_path) as reader:
            image_conns = _connections(reader, self.image_topic, IMAGE_MSG_TYPES, "image", self.bag_path)
            pose_conns = (_connections(reader, self.pose_topic, POSE_MSG_TYPES + (TF_MSG_TYPE,), "pose",
                                       self.bag_path) if self.pose_topic else [])
            self._image_type = ", ".join(sorted({c.msgtype for c in image_conns}))
            self._pose_type = ", ".join(sorted({c.msgtype for c in pose_conns}))
            tf_topics = self._check_tf(pose_conns)
            if tf_topics:
                static_conns = [c for c in reader.connections if c.topic == TF_STATIC_TOPIC
                                and c.msgtype == TF_MSG_TYPE and c.topic != self.pose_topic]
                pose_conns = pose_conns + static_conns
                tf_topics += [TF_STATIC_TOPIC] if static_conns else []
                tree = TransformTree(f"the TF of bag {self.bag_path} ({', '.join(tf_topics)})")
            image_ids = {c.id for c in image_conns}
            keys: list[tuple[int, int, int]] = []
            image_stamps: list[float] = []
            pose_stamps: list[float] = []
            pose_rows: list[np.ndarray] = []
            seen_times: dict[tuple[int, int], int] = {}
            for conn, t_ns, raw in reader.messages(connections=image_conns + pose_conns):
                is_image = conn.id in image_ids
                if is_image:
                    counts.images += 1
                    dup = seen_times.get((conn.id, t_ns), 0)
                    seen_times[(conn.id, t_ns)] = dup + 1
                if tf_topics and not is_image:
                    counts.pose_msgs += 1
                    try:
                        tree.add_message(reader.deserialize(raw, conn.msgtype), t_ns,
                                         static=conn.topic == TF_STATIC_TOPIC)
                    except (AnyReaderError, AttributeError, ValueError) as exc:
                        counts.bad_poses += 1
                        log.debug("unreadable %s message at bag time %d: %s", conn.topic, t_ns, exc)
                    continue
                try:
                    msg = reader.deserialize(raw, conn.msgtype)
                    stamp = _header_stamp(msg, t_ns)
                    pose = None if is_image else _pose_of(msg, conn.msgtype)
                except (AnyReaderError, AttributeError, ValueError) as exc:
                    if is_image:
                        counts.undecodable += 1
                    else:
                        counts.bad_poses += 1
                    log.debug("unreadable %s message at bag time %d: %s", conn.topic, t_ns, exc)
                    continue
                if is_image:
                    keys.append((conn.id, t_ns, dup))
                    image_stamps.append(stamp)
                else:
                    counts.pose_msgs += 1
                    if not np.all(np.isfinite(pose)) or np.linalg.norm(pose[3:]) < 1e-12:
                        counts.bad_poses += 1
                        continue
                    pose_stamps.append(stamp)
                    pose_rows.append(pose)

        if not image_stamps:
            raise DataError(f"image topic {self.image_topic!r} of bag {self.bag_path} has no readable messages "
                            f"({counts.images} messages, {counts.undecodable} unreadable)")
        if counts.undecodable:
            log.warning("%s: %d unreadable image message(s) skipped", self.image_topic, counts.undecodable)
        if counts.bad_poses:
            log.warning("%s: %d pose message(s) with an invalid pose (non-finite or zero quaternion) ignored",
                        self.pose_topic, counts.bad_poses)

        stamps = np.asarray(image_stamps, dtype=np.float64)
        if tf_topics:
            self.tf_tree = tree
            poses, valid = self._tf_poses(tree, tf_topics, stamps)
        elif self.pose_topic:
            if not pose_rows:
                raise DataError(f"pose topic {self.pose_topic!r} of bag {self.bag_path} has no valid pose "
                                f"({counts.pose_msgs} messages)")
            p_stamps = np.asarray(pose_stamps, dtype=np.float64)
            poses, valid = interpolate_poses(p_stamps, np.stack(pose_rows), stamps, self.tolerance,
                                             self.max_gap)
            if not valid.any():
                raise DataError(
                    f"no image of {self.image_topic!r} has a pose from {self.pose_topic!r} in bag {self.bag_path}: "
                    f"image stamps {stamps.min():.6f}..{stamps.max():.6f} s, pose stamps "
                    f"{p_stamps.min():.6f}..{p_stamps.max():.6f} s (tolerance {self.tolerance} s, max gap "
                    f"{self.max_gap} s); check that both topics use the same clock")
        else:
            poses, valid = nan_poses(len(stamps)), np.ones(len(stamps), dtype=bool)
        if self.pose_topic:
            counts.no_pose = int((~valid).sum())
            if counts.no_pose:
                action = "skipped" if self.require_poses else "kept with unknown pose"
                log.warning("%s: %d of %d images have no pose from %s within tolerance %s s / max gap %s s "
                            "(%s)", self.image_topic, counts.no_pose, len(stamps), self.pose_topic,
                            self.tolerance, self.max_gap, action)

        seen_stamps: set[str] = set()
        for key, stamp, pose, ok in zip(keys, stamps, poses, valid):
            if not ok and self.require_poses:
                continue
            name = f"{stamp:.6f}"
            if name in seen_stamps:
                counts.duplicate_stamps += 1
                continue
            seen_stamps.add(name)
            self._records.append(_BagRecord(key, float(stamp), pose))
        if counts.duplicate_stamps:
            log.warning("%s: %d image(s) with an already seen stamp skipped", self.image_topic,
                        counts.duplicate_stamps)

    def _check_tf(self, pose_conns: list[Any]) -> list[str]:
        """[pose topic] when it carries TF (then `tf_frames` is needed), else [] (`tf_frames` not allowed)."""
        is_tf = [c.msgtype == TF_MSG_TYPE for c in pose_conns]
        if any(is_tf) and not all(is_tf):
            raise DataError(f"pose topic {self.pose_topic!r} in bag {self.bag_path} mixes TF and pose messages "
                            f"({self._pose_type}); use a topic of one type")
        if any(is_tf):
            return [self.pose_topic]
        if self.tf_frames is not None:
            raise DataError(f"TF frames {self.tf_frames[0]}:{self.tf_frames[1]} were given, but pose topic "
                            f"{self.pose_topic!r} in bag {self.bag_path} is {self._pose_type}, not TF "
                            f"({TF_MSG_TYPE}); use --pose-topic {TF_TOPIC}, or leave out the TF frames")
        return []

    def _tf_poses(self, tree: TransformTree, tf_topics: list[str],
                  stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Poses of the TF child frame in the parent frame at the image stamps."""
        topics = ", ".join(tf_topics)
        if tree.rejected:
            log.warning("%s: %d transform(s) with an invalid pose or frame id ignored", topics, tree.rejected)
        if tree.transforms == 0:
            raise DataError(f"no TF message in bag {self.bag_path}: {topics} hold no usable transform "
                            f"({self.counts.pose_msgs} messages, {self.counts.bad_poses} unreadable, "
                            f"{tree.rejected} invalid transforms)")
        if self.tf_frames is None:
            raise DataError(f"pose topic {self.pose_topic!r} of bag {self.bag_path} is TF: give the frames as "
                            f"--tf-frames PARENT:CHILD (the pose of CHILD in PARENT, e.g. map:base_link); "
                            f"frames seen: {_frame_list(tree.frames)}")
        parent, child = self.tf_frames
        poses, valid = tree.lookup(parent, child, stamps, self.tolerance, self.max_gap)
        if not valid.any():
            to_parent, to_child = tree.path(parent, child)
            ranges = [(edge, tree.time_range(edge)) for edge in to_parent + to_child]
            ranges = [(edge, r) for edge, r in ranges if r is not None]
            start, end = max(r[0] for _, r in ranges), min(r[1] for _, r in ranges)
            if start <= end:
                tf_range = f"TF stamps {start:.6f}..{end:.6f} s"
            else:
                tf_range = "TF stamps of the path do not overlap (" + ", ".join(
                    f"{p}->{c} {r[0]:.6f}..{r[1]:.6f} s" for (p, c), r in ranges) + ")"
            raise DataError(
                f"no image of {self.image_topic!r} has a pose from {topics} ({parent} -> {child}) in bag "
                f"{self.bag_path}: image stamps {stamps.min():.6f}..{stamps.max():.6f} s, {tf_range} "
                f"(tolerance {self.tolerance} s, max gap {self.max_gap} s); check that both topics use the "
                "same clock")
        return poses, valid

    # -- Source interface --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    @property
    def names(self) -> list[str]:
        return [f"{r.stamp:.6f}" for r in self._records]

    def poses(self) -> tuple[np.ndarray, np.ndarray]:
        stamps = np.asarray([r.stamp for r in self._records], dtype=np.float64)
        poses = np.stack([r.pose for r in self._records]) if self._records else nan_poses(0)
        return stamps, poses

    def __iter__(self) -> Iterator[PosedImage]:
        from rosbags.highlevel import AnyReaderError

        self.skipped_undecodable = 0
        wanted = {r.key: r for r in self._records}
        remaining = len(wanted)
        seen_times: dict[tuple[int, int], int] = {}
        with _open_bag(self.bag_path) as reader:
            conns = _connections(reader, self.image_topic, IMAGE_MSG_TYPES, "image", self.bag_path)
            for conn, t_ns, raw in reader.messages(connections=conns):
                if remaining == 0:
                    break
                dup = seen_times.get((conn.id, t_ns), 0)
                seen_times[(conn.id, t_ns)] = dup + 1
                record = wanted.get((conn.id, t_ns, dup))
                if record is None:
                    continue
                remaining -= 1
                name = f"{record.stamp:.6f}"
                try:
                    image = _decode_image_msg(reader.deserialize(raw, conn.msgtype), conn.msgtype)
                except (ImageDecodeError, AnyReaderError, AttributeError, ValueError) as exc:
                    self.skipped_undecodable += 1
                    log.warning("%s: skipping undecodable image %s: %s", self.image_topic, name, exc)
                    continue
                yield PosedImage(name, record.stamp, record.pose.copy(), image)
        if self.skipped_undecodable:
            log.warning("%s: skipped %d undecodable image(s) of %d", self.image_topic,
                        self.skipped_undecodable, len(self))


# --------------------------------------------------------------------------------------------
# Choosing a source
# --------------------------------------------------------------------------------------------

def _only_topic_of(bag: str | Path, types: tuple[str, ...], role: str, option: str) -> str:
    topics = list_topics(bag)
    candidates = sorted(name for name, msgtype in topics.items() if msgtype in types)
    if len(candidates) == 1:
        log.info("using %s topic %s (the only one in the bag)", role, candidates[0])
        return candidates[0]
    found = f"{len(candidates)} candidates ({', '.join(candidates)})" if candidates else "none"
    tf_hint = ""
    if role == "pose" and not candidates and TF_MSG_TYPE in topics.values():
        tf_hint = f"; for poses from TF give --pose-topic {TF_TOPIC} --tf-frames PARENT:CHILD"
    raise DataError(f"pass {option}: bag {bag} has {found} of type {' / '.join(types)}; "
                    f"{_format_topics(topics)}{tf_hint}")


def open_source(images: str | Path | None = None, poses: str | Path | None = None, bag: str | Path | None = None,
                image_topic: str | None = None, pose_topic: str | None = None, tolerance: float = 0.05,
                max_gap: float = 1.0, require_poses: bool = True, skip_unreadable: bool = False,
                tf_frames: str | Sequence[str] | None = None) -> Source:
    """The source described by command-line style arguments.

    * `images` (+ optional `poses`): a VG-benchmark folder when the names say so and no pose file is
      given, else an `ImageFolderSource`;
    * `bag` (+ `image_topic`, `pose_topic`): a `RosbagSource`. When a topic is omitted and the bag has
      exactly one topic of a suitable type, that one is used; the pose topic is looked up only
      when `require_poses` is True (without poses, queries get NaN poses). With `tf_frames`
      ("PARENT:CHILD") the poses come from TF (pose topic default `/tf`, plus `/tf_static`).
    """
    if images is not None and bag is not None:
        raise DataError("give either an image folder or a bag, not both")
    if images is None and bag is None:
        raise DataError("give an image folder (with a pose file) or a bag (with an image topic)")
    if bag is not None:
        if poses is not None:
            raise DataError("a pose file goes with an image folder; for a bag, give the pose topic instead")
        if image_topic is None:
            image_topic = _only_topic_of(bag, IMAGE_MSG_TYPES, "image", "the image topic")
        if tf_frames is not None and pose_topic is None:
            pose_topic = TF_TOPIC
        if pose_topic is None and require_poses:
            pose_topic = _only_topic_of(bag, POSE_MSG_TYPES, "pose", "the pose topic")
        return RosbagSource(bag, image_topic, pose_topic, tolerance=tolerance, max_gap=max_gap,
                            require_poses=require_poses, tf_frames=tf_frames)
    if tf_frames is not None:
        raise DataError("TF frames go with a bag (poses from its /tf); for an image folder, give a pose file")
    if image_topic is not None or pose_topic is not None:
        raise DataError("image and pose topics go with a bag; for an image folder, give a pose file instead")
    if poses is None and is_vg_folder(images):
        return VGFolderSource(images, skip_unreadable=skip_unreadable)
    return ImageFolderSource(images, poses, tolerance=tolerance, require_poses=require_poses,
                             skip_unreadable=skip_unreadable, max_gap=max_gap)
