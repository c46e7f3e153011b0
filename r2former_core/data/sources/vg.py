"""VG-benchmark image folders: poses (UTM) encoded in the file names."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..poses import quat_from_yaw
from .files import IMAGE_EXTENSIONS, FileListSource, FileRecord, check_folder, list_image_files

log = logging.getLogger(__name__)


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


class VGFolderSource(FileListSource):
    """A VG-benchmark image folder (e.g. `images/test/database`): poses parsed from the file names.

    Stamps are the names' timestamp fields when all are numeric, else the image index.
    """

    def __init__(self, folder: str | Path, skip_unreadable: bool = False,
                 pose_frames: str | Sequence[str | None] | None = None, camera_convention: str = "auto") -> None:
        self.folder = check_folder(folder, "VG folder")
        files = list_image_files(self.folder)
        if not files:
            sub = sorted(str(p.relative_to(self.folder)) for p in self.folder.glob("images/*/*") if p.is_dir())
            hint = f"; this looks like a VG dataset root, pass one of: {', '.join(sub)}" if sub else ""
            raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in VG folder {self.folder}{hint}")
        parsed = [parse_vg_name(p.name) for p in files]
        times = [t for _, t in parsed]
        stamped = all(t is not None for t in times)
        records = [FileRecord(p, p.name, float(t) if stamped and t is not None else float(i), pose)
                   for i, (p, (pose, t)) in enumerate(zip(files, parsed))]
        super().__init__(records, skip_unreadable, pose_frames, camera_convention)
        self.description = f"VG folder {self.folder} ({len(self)} images)"
        log.info("opened %s", self.description)
