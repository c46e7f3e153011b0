"""An image folder with poses from a TUM or CSV file (or without poses, for localization queries)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..poses import interpolate_poses, nan_poses, read_pose_csv, read_tum
from .base import examples
from .files import IMAGE_EXTENSIONS, FileListSource, FileRecord, check_folder, image_files_or_error, parse_stamp_stem

log = logging.getLogger(__name__)

TUM_SUFFIXES = (".txt", ".tum")
CSV_SUFFIXES = (".csv",)


class ImageFolderSource(FileListSource):
    """A folder of PNG/JPEG images, with poses from a TUM or CSV file.

    Matching of images to poses:
    * TUM file (`.txt`/`.tum`): image file stems are timestamps (`1700000000.100000.png`, or integer
      nanoseconds); each image gets the pose interpolated at its stamp (`interpolate_poses` with
      `tolerance`/`max_gap`). If the stems are not timestamps but there are as many images as poses,
      images sorted by name are paired with poses sorted by time (logged).
    * CSV file: the `name` column is the image file name, with or without extension.
    * No file and `require_poses=False`: poses are NaN (localization queries without ground truth).

    Images without a matching pose are skipped with a warning when `require_poses` is True, else
    kept with a NaN pose; no match at all is an error. The poses' frames are `pose_frames`
    (default map:camera, see `FileListSource`). Images are ordered by stamp when all stems
    are timestamps, else by file name. An unreadable image raises DataError during iteration
    unless `skip_unreadable` is set (then it is logged and counted in `skipped_unreadable`).
    """

    def __init__(self, images_dir: str | Path, poses_file: str | Path | None = None, tolerance: float = 0.05,
                 require_poses: bool = True, skip_unreadable: bool = False, max_gap: float = 1.0,
                 pose_frames: str | Sequence[str | None] | None = None, camera_convention: str = "auto") -> None:
        self.images_dir = check_folder(images_dir, "image folder")
        self.poses_file = Path(poses_file) if poses_file is not None else None
        self.tolerance = tolerance
        self.max_gap = max_gap
        self.require_poses = require_poses
        files = image_files_or_error(self.images_dir)
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
            stamps = _stamps_or_index(stem_stamps)
            poses, how = nan_poses(len(files)), "no poses"
        else:
            suffix = self.poses_file.suffix.lower()
            if not self.poses_file.is_file():
                raise DataError(f"pose file {self.poses_file} does not exist")
            if suffix in TUM_SUFFIXES:
                stamps, poses, how = self._match_tum(self.poses_file, files, stem_stamps, stamped)
            elif suffix in CSV_SUFFIXES:
                stamps, poses, how = self._match_csv(self.poses_file, files, stem_stamps)
            else:
                raise DataError(f"pose file {self.poses_file}: unknown format {suffix!r}; use a TUM file "
                                f"({'/'.join(TUM_SUFFIXES)}) or a CSV file (.csv)")

        records = [FileRecord(p, p.name, float(s), pose) for p, s, pose in zip(files, stamps, poses)]
        if self.poses_file is not None:
            records = self._drop_unposed(records)
        super().__init__(records, skip_unreadable, pose_frames, camera_convention)
        self.description = f"image folder {self.images_dir} ({len(self)} images, {how})"
        log.info("opened %s", self.description)

    def _match_tum(self, poses_file: Path, files: list[Path], stem_stamps: list[float | None],
                   stamped: bool) -> tuple[list[float], np.ndarray, str]:
        tum_stamps, tum_poses = read_tum(poses_file)
        if stamped:
            query = np.asarray(stem_stamps, dtype=np.float64)
            poses, valid = interpolate_poses(tum_stamps, tum_poses, query, self.tolerance, self.max_gap)
            if not valid.any():
                raise DataError(
                    f"no image in {self.images_dir} matches a pose of {poses_file}: image stamps "
                    f"{query.min():.6f}..{query.max():.6f} s (from file names), poses "
                    f"{tum_stamps.min():.6f}..{tum_stamps.max():.6f} s (tolerance {self.tolerance} s); "
                    "file names must be stamps in seconds (or integer nanoseconds) on the clock of the poses")
            return list(query), poses, f"poses interpolated from {poses_file.name} by timestamp"
        if len(files) == len(tum_stamps):
            order = np.argsort(tum_stamps, kind="stable")
            log.info("image names in %s are not timestamps (e.g. %s); pairing the %d images sorted by name "
                     "with the %d poses of %s sorted by time", self.images_dir, files[0].name, len(files),
                     len(tum_stamps), poses_file)
            return list(tum_stamps[order]), tum_poses[order], f"poses from {poses_file.name} by order"
        bad = [p.name for p, s in zip(files, stem_stamps) if s is None]
        raise DataError(
            f"cannot match the {len(files)} images of {self.images_dir} to the {len(tum_stamps)} poses of "
            f"{poses_file}: image names are not timestamps (e.g. {examples(bad)}) and the counts differ. "
            "Name each image by its stamp in seconds (e.g. 1700000000.100000.png), or provide exactly one "
            "pose per image, or use a CSV pose file with a 'name' column")

    def _match_csv(self, poses_file: Path, files: list[Path],
                   stem_stamps: list[float | None]) -> tuple[list[float], np.ndarray, str]:
        names, csv_poses = read_pose_csv(poses_file)
        lookup: dict[str, int] = {}
        for i, name in enumerate(names):
            lookup[name] = i
        for i, name in enumerate(names):  # extension-less keys, unless they collide with a full name
            stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
            lookup.setdefault(stem, i)
        poses = nan_poses(len(files))
        used: set[int] = set()
        for k, path in enumerate(files):
            row = lookup.get(path.name, lookup.get(path.stem))
            if row is not None:
                poses[k] = csv_poses[row]
                used.add(row)
        if not used:
            raise DataError(
                f"no image in {self.images_dir} (e.g. {examples([p.name for p in files])}) is named in the "
                f"'name' column of {poses_file} (e.g. {examples(names)}); names must be the image file "
                "names, with or without extension")
        if len(used) < len(names):
            unused = [n for i, n in enumerate(names) if i not in used]
            log.warning("%d pose(s) of %s have no image in %s (e.g. %s)", len(unused), poses_file,
                        self.images_dir, examples(unused))
        return _stamps_or_index(stem_stamps), poses, f"poses from {poses_file.name} by name"

    def _drop_unposed(self, records: list[FileRecord]) -> list[FileRecord]:
        unposed = [r.name for r in records if not np.all(np.isfinite(r.pose))]
        if not unposed:
            return records
        if self.require_poses:
            log.warning("skipping %d of %d images of %s without a pose in %s (e.g. %s)", len(unposed),
                        len(records), self.images_dir, self.poses_file, examples(unposed))
            return [r for r in records if np.all(np.isfinite(r.pose))]
        log.info("%d of %d images of %s have no pose in %s (kept with unknown pose)", len(unposed),
                 len(records), self.images_dir, self.poses_file)
        return records


def _stamps_or_index(stem_stamps: list[float | None]) -> list[float]:
    """The stamps from the file names when all are stamps, else the file indices."""
    if all(s is not None for s in stem_stamps):
        return [float(s) for s in stem_stamps if s is not None]
    return [float(i) for i in range(len(stem_stamps))]
