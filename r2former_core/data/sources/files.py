"""Image files on disk: listing, decoding, stamps in file names, and iteration over a list of files."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ...errors import DataError, ImageDecodeError
from ...frames import (
    DEFAULT_FOLDER_CHILD,
    DEFAULT_PARENT,
    PoseFrames,
    check_convention,
    given_frames,
    to_body_convention,
)
from ..image_limits import read_checked_file
from ..poses import nan_poses
from .base import PosedImage, examples

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# A file stem that is a timestamp: seconds with an optional fraction ("1700000000.100000"), or an
# integer of 16+ digits, read as nanoseconds ("1403636579763555584", EuRoC style).
_STAMP_STEM = re.compile(r"^\d+(?:\.\d+)?$")
_NANOSECOND_DIGITS = 16


def list_image_files(folder: str | Path) -> list[Path]:
    """PNG/JPEG files directly inside `folder` (extension case-insensitive), sorted by name."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.name)


def read_image_file(path: str | Path) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB; ImageDecodeError names the file on failure."""
    path = Path(path)
    # image_limits: a regular file, its size and its PNG/JPEG header within max_image_pixels, checked before
    # it is read and again on the bytes read (imdecode instead of imread: any path encoding works)
    buf = np.frombuffer(read_checked_file(path), dtype=np.uint8)
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


def check_folder(folder: str | Path, what: str) -> Path:
    """`folder` as a Path; DataError when it does not exist or is not a folder."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what} {folder} is not a folder")
    return folder


def image_files_or_error(folder: Path) -> list[Path]:
    """The images of `folder`; DataError when there are none (naming sub-folders that have some)."""
    files = list_image_files(folder)
    if files:
        return files
    sub = sorted(p.name + "/" for p in folder.iterdir() if p.is_dir() and list_image_files(p))
    hint = (f"; images are only looked up directly in the folder, not in sub-folders "
            f"(found images in {examples(sub)} - pass one of those)") if sub else ""
    raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {folder}{hint}")


@dataclass
class FileRecord:
    path: Path
    name: str
    stamp: float
    pose: np.ndarray


class FileListSource:
    """Shared iteration over a list of image files with known stamps and poses.

    Files name no frame: `pose_frames` ("PARENT:CHILD", or a pair with None for a frame not given)
    says which, default map:camera; optical-convention camera poses are turned into the body
    convention (`camera_convention`, see `r2former_core.frames`).
    """

    description: str = ""

    def __init__(self, records: list[FileRecord], skip_unreadable: bool,
                 pose_frames: str | Sequence[str | None] | None = None, camera_convention: str = "auto") -> None:
        parent, child = given_frames(pose_frames)
        parent, child = parent or DEFAULT_PARENT, child or DEFAULT_FOLDER_CHILD
        check_convention(camera_convention)
        optical = False
        if records:
            poses, optical = to_body_convention(np.stack([r.pose for r in records]), child, camera_convention)
            records = [FileRecord(r.path, r.name, r.stamp, pose) for r, pose in zip(records, poses)]
        self.frames = PoseFrames(parent, child, optical)
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
