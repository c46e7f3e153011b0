"""Pose utilities: TUM / CSV pose files, quaternion helpers and pose interpolation.

Conventions used by the whole data layer:

* a pose array is `(N, 7)` float64: `x y z qx qy qz qw` (position in metres, unit quaternion in
  Hamilton `x y z w` order, the orientation of the camera/robot in the map frame);
* stamps are `(N,)` float64 seconds (e.g. ROS time);
* a pose of NaNs means "unknown" (e.g. a localization query without ground truth).

All quaternion helpers are vectorized over leading dimensions (`(..., 4)` arrays).
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

POSE_FIELDS = ("x", "y", "z", "qx", "qy", "qz", "qw")
TUM_HEADER = "# timestamp tx ty tz qx qy qz qw"
CSV_FULL_COLUMNS = ("name", "x", "y", "z", "qx", "qy", "qz", "qw")
CSV_PLANAR_COLUMNS = ("name", "x", "y", "yaw")

# Below this half-angle (radians) slerp falls back to normalized linear interpolation: sin(theta)
# would be ~0, and the nlerp error (~theta^3) is far below float precision anyway.
_SLERP_LINEAR_ANGLE = 1e-6


# --------------------------------------------------------------------------------------------
# Quaternions
# --------------------------------------------------------------------------------------------

def normalize_quat(q: np.ndarray) -> np.ndarray:
    """Unit quaternion(s) `(..., 4)`; raises ValueError for a zero or non-finite quaternion."""
    q = np.asarray(q, dtype=np.float64)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norm)) or np.any(norm < 1e-12):
        raise ValueError("cannot normalize a zero or non-finite quaternion")
    return q / norm


def quat_from_yaw(yaw: float | np.ndarray) -> np.ndarray:
    """Rotation of `yaw` radians about +z -> quaternion `(..., 4)` (x y z w)."""
    yaw = np.asarray(yaw, dtype=np.float64)
    half = 0.5 * yaw
    zeros = np.zeros_like(half)
    return np.stack([zeros, zeros, np.sin(half), np.cos(half)], axis=-1)


def rpy_from_quat(q: np.ndarray) -> np.ndarray:
    """Quaternion(s) -> `(..., 3)` roll, pitch, yaw in radians (ZYX / fixed-axes XYZ, as in ROS tf)."""
    x, y, z, w = np.moveaxis(normalize_quat(q), -1, 0)
    roll = np.arctan2(2.0 * (w * x + y * z), 1.0 - 2.0 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2.0 * (w * y - z * x), -1.0, 1.0))
    yaw = np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return np.stack([roll, pitch, yaw], axis=-1)


def yaw_from_quat(q: np.ndarray) -> np.ndarray | float:
    """Heading (rotation about +z) of quaternion(s), radians in (-pi, pi]."""
    yaw = rpy_from_quat(q)[..., 2]
    return float(yaw) if np.ndim(yaw) == 0 else yaw


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Quaternion(s) `(..., 4)` -> rotation matrices `(..., 3, 3)`."""
    x, y, z, w = np.moveaxis(normalize_quat(q), -1, 0)
    m = np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], axis=-1)
    return m.reshape(m.shape[:-1] + (3, 3))


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product `a * b` (apply b, then a) of `(..., 4)` quaternions."""
    ax, ay, az, aw = np.moveaxis(np.asarray(a, dtype=np.float64), -1, 0)
    bx, by, bz, bw = np.moveaxis(np.asarray(b, dtype=np.float64), -1, 0)
    return np.stack([
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
        aw * bw - ax * bx - ay * by - az * bz,
    ], axis=-1)


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    """Conjugate (= inverse for unit quaternions)."""
    q = np.asarray(q, dtype=np.float64)
    return q * np.array([-1.0, -1.0, -1.0, 1.0])


def angle_between_quats(q0: np.ndarray, q1: np.ndarray) -> np.ndarray | float:
    """Angle (radians, in [0, pi]) of the rotation taking q0 to q1.

    Computed as `2 atan2(|v|, |w|)` of the relative quaternion: unlike `2 acos(|dot|)` it stays
    accurate for tiny angles, and it treats q and -q as the same rotation.
    """
    rel = quat_multiply(quat_conjugate(normalize_quat(q0)), normalize_quat(q1))
    angle = 2.0 * np.arctan2(np.linalg.norm(rel[..., :3], axis=-1), np.abs(rel[..., 3]))
    return float(angle) if np.ndim(angle) == 0 else angle


def slerp(q0: np.ndarray, q1: np.ndarray, t: float | np.ndarray) -> np.ndarray:
    """Spherical linear interpolation along the shortest arc; t=0 -> q0, t=1 -> q1 (up to sign).

    Broadcasts: q0, q1 `(..., 4)` and t scalar or `(...)`.
    """
    q0 = normalize_quat(q0)
    q1 = normalize_quat(q1)
    t = np.asarray(t, dtype=np.float64)[..., None]
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0.0, -q1, q1)  # shortest path: q and -q are the same rotation
    # half-angle between q0 and q1, accurate also when they are nearly equal (unlike arccos(dot))
    theta = 2.0 * np.arctan2(np.linalg.norm(q1 - q0, axis=-1, keepdims=True),
                             np.linalg.norm(q1 + q0, axis=-1, keepdims=True))
    sin_theta = np.sin(theta)
    linear = theta < _SLERP_LINEAR_ANGLE
    safe_sin = np.where(linear, 1.0, sin_theta)
    w0 = np.where(linear, 1.0 - t, np.sin((1.0 - t) * theta) / safe_sin)
    w1 = np.where(linear, t, np.sin(t * theta) / safe_sin)
    return normalize_quat(w0 * q0 + w1 * q1)


# --------------------------------------------------------------------------------------------
# Pose arrays
# --------------------------------------------------------------------------------------------

def check_poses(poses: np.ndarray, what: str = "poses") -> np.ndarray:
    """Return `poses` as a float64 `(N, 7)` array or raise ValueError."""
    arr = np.asarray(poses, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 7), dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 7:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 7:
        raise ValueError(f"{what} must have shape (N, 7) = x y z qx qy qz qw, got {arr.shape}")
    return arr


def nan_poses(n: int) -> np.ndarray:
    """`(n, 7)` array of unknown poses."""
    return np.full((n, 7), np.nan, dtype=np.float64)


def compose_poses(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a * b` for pose arrays `(..., 7)`: with a = pose of frame B in frame A and b = pose of frame C
    in frame B, the pose of C in A (position `t_a + R_a t_b`, orientation `q_a q_b`). Broadcasts."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    rot = quat_to_matrix(a[..., 3:])
    position = a[..., :3] + np.einsum("...ij,...j->...i", rot, b[..., :3])
    orientation = normalize_quat(quat_multiply(a[..., 3:], b[..., 3:]))
    return np.concatenate([position, orientation], axis=-1)


def invert_poses(a: np.ndarray) -> np.ndarray:
    """Inverse pose(s) `(..., 7)`: the pose of frame A in frame B for a = pose of B in A."""
    a = np.asarray(a, dtype=np.float64)
    q_inv = quat_conjugate(normalize_quat(a[..., 3:]))
    position = -np.einsum("...ij,...j->...i", quat_to_matrix(q_inv), a[..., :3])
    return np.concatenate([position, q_inv], axis=-1)


def interpolate_poses(stamps: np.ndarray, poses: np.ndarray, query_stamps: np.ndarray,
                      tolerance: float = 0.05, max_gap: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Poses at `query_stamps`: linear position and slerp orientation between bracketing samples.

    Rules for a query stamp q (all in seconds):
    * before the first / after the last sample: valid only within `tolerance` of that end sample,
      whose pose is used (no extrapolation);
    * between two samples whose gap is <= `max_gap`: valid, interpolated;
    * between two samples further apart than `max_gap` (a dropout of the pose source): valid only
      within `tolerance` of one of them, whose pose is used - interpolating across a dropout would
      invent a trajectory.

    Samples need not be sorted; duplicate stamps keep the first sample (logged). Samples with a
    non-finite stamp or pose are ignored. Returns `(poses (Q, 7), valid (Q,) bool)`; invalid rows
    are NaN.
    """
    if tolerance < 0 or max_gap < 0:
        raise ValueError(f"tolerance ({tolerance}) and max_gap ({max_gap}) must be >= 0")
    stamps = np.asarray(stamps, dtype=np.float64).reshape(-1)
    poses = check_poses(poses)
    if len(stamps) != len(poses):
        raise ValueError(f"{len(stamps)} stamps but {len(poses)} poses")
    query = np.asarray(query_stamps, dtype=np.float64).reshape(-1)
    out = nan_poses(len(query))
    valid = np.zeros(len(query), dtype=bool)

    finite = np.isfinite(stamps) & np.all(np.isfinite(poses), axis=1)
    stamps, poses = stamps[finite], poses[finite]
    if len(stamps) == 0 or len(query) == 0:
        return out, valid
    order = np.argsort(stamps, kind="stable")
    stamps, poses = stamps[order], poses[order]
    stamps, first = np.unique(stamps, return_index=True)
    if len(first) != len(order):
        log.info("pose samples: %d duplicate stamps ignored (kept the first sample of each)",
                 len(order) - len(first))
    poses = poses[first].copy()
    poses[:, 3:] = normalize_quat(poses[:, 3:])

    n = len(stamps)
    q_finite = np.isfinite(query)
    qs = np.where(q_finite, query, 0.0)
    hi = np.searchsorted(stamps, qs, side="right")  # first sample strictly after q
    lo = hi - 1

    before = q_finite & (hi == 0)
    after = q_finite & (hi == n)  # includes q == last stamp
    inside = q_finite & ~before & ~after

    sel = before & (stamps[0] - qs <= tolerance)
    out[sel], valid[sel] = poses[0], True
    sel = after & (qs - stamps[-1] <= tolerance)
    out[sel], valid[sel] = poses[-1], True

    idx = np.nonzero(inside)[0]
    if len(idx):
        i0, i1 = lo[idx], hi[idx]
        t0, t1 = stamps[i0], stamps[i1]
        gap = t1 - t0
        near_end = np.where(qs[idx] - t0 <= t1 - qs[idx], i0, i1)
        near_dist = np.minimum(qs[idx] - t0, t1 - qs[idx])

        interp = gap <= max_gap
        k = idx[interp]
        if len(k):
            a = ((qs[k] - t0[interp]) / gap[interp])
            p0, p1 = poses[i0[interp]], poses[i1[interp]]
            out[k, :3] = p0[:, :3] + a[:, None] * (p1[:, :3] - p0[:, :3])
            out[k, 3:] = slerp(p0[:, 3:], p1[:, 3:], a)
            valid[k] = True
        snap = ~interp & (near_dist <= tolerance)
        k = idx[snap]
        out[k], valid[k] = poses[near_end[snap]], True
    return out, valid


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def read_tum(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a TUM trajectory: lines `timestamp tx ty tz qx qy qz qw` -> `(stamps (N,), poses (N, 7))`.

    `#` starts a comment, blank lines are skipped, fields may be separated by spaces, tabs or
    commas. Quaternions are normalized. Rows are returned in file order. A timestamp repeated with
    another pose is refused with both line numbers (which pose would be meant?); an exactly repeated
    line is dropped; timestamps out of order (two trajectories concatenated, a clock jump) are
    accepted, since users of the rows sort them by time, but said in one warning with the first place.
    """
    path = Path(path)
    stamps: list[float] = []
    rows: list[list[float]] = []
    seen: dict[float, int] = {}          # stamp -> index in rows
    lines: list[int] = []
    repeated = 0
    backwards: list[tuple[int, float, float, int]] = []   # (line, stamp, previous stamp, its line)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"cannot read pose file {path}: {exc}") from exc
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 8:
            raise DataError(f"{path}:{lineno}: expected 8 values 'timestamp tx ty tz qx qy qz qw', "
                            f"got {len(fields)}: {raw.strip()!r}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataError(f"{path}:{lineno}: non-numeric value in {raw.strip()!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{path}:{lineno}: non-finite value in {raw.strip()!r}")
        if math.sqrt(sum(v * v for v in values[4:])) < 1e-12:
            raise DataError(f"{path}:{lineno}: zero quaternion (qx qy qz qw all 0); "
                            "use 0 0 0 1 for the identity orientation")
        first = seen.get(values[0])
        if first is not None:
            if rows[first] == values[1:]:
                repeated += 1
                continue
            raise DataError(f"{path}:{lineno}: timestamp {values[0]!r} repeats line {lines[first]} with another pose; "
                            "each timestamp may have one pose (remove one of the lines)")
        if stamps and values[0] < stamps[-1]:
            backwards.append((lineno, values[0], stamps[-1], lines[-1]))
        seen[values[0]] = len(rows)
        stamps.append(values[0])
        rows.append(values[1:])
        lines.append(lineno)
    if not rows:
        raise DataError(f"pose file {path} contains no poses (expected TUM lines "
                        "'timestamp tx ty tz qx qy qz qw')")
    if repeated:
        log.warning("pose file %s: %d repeated line(s) (same timestamp and pose) ignored", path, repeated)
    if backwards:
        first_line, stamp, previous, previous_line = backwards[0]
        log.warning("pose file %s: timestamps go back in time %d time(s), first on line %d (%r after %r on line %d); "
                    "the poses are used in time order; if two trajectories were concatenated, split them",
                    path, len(backwards), first_line, stamp, previous, previous_line)
    poses = np.asarray(rows, dtype=np.float64)
    poses[:, 3:] = normalize_quat(poses[:, 3:])
    return np.asarray(stamps, dtype=np.float64), poses


def write_tum(path: str | Path, stamps: np.ndarray, poses: np.ndarray) -> None:
    """Write a TUM trajectory (full float precision; creates parent folders)."""
    stamps = np.asarray(stamps, dtype=np.float64).reshape(-1)
    poses = check_poses(poses)
    if len(stamps) != len(poses):
        raise ValueError(f"{len(stamps)} stamps but {len(poses)} poses")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [TUM_HEADER]
    for stamp, pose in zip(stamps, poses):
        lines.append(" ".join([f"{stamp:.9f}"] + [repr(float(v)) for v in pose]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_pose_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a CSV of named poses -> `(names, poses (N, 7))`.

    The header selects the columns (case-insensitive, any order, extra columns ignored):
    `name,x,y,z,qx,qy,qz,qw` (full 3D pose) or `name,x,y,yaw` (planar: yaw in radians about +z,
    z = 0). When both sets are present the full pose wins. Names must be unique.
    """
    path = Path(path)
    accepted = f"'{','.join(CSV_FULL_COLUMNS)}' or '{','.join(CSV_PLANAR_COLUMNS)}'"
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read pose file {path}: {exc}") from exc
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        while header is not None and not any(h.strip() for h in header):
            header = next(reader, None)
        if header is None:
            raise DataError(f"pose file {path} is empty; expected a header {accepted}")
        columns = {h.strip().lower(): i for i, h in enumerate(header)}
        wanted: tuple[str, ...]
        if all(c in columns for c in CSV_FULL_COLUMNS):
            wanted, planar = CSV_FULL_COLUMNS, False
        elif all(c in columns for c in CSV_PLANAR_COLUMNS):
            wanted, planar = CSV_PLANAR_COLUMNS, True
        else:
            raise DataError(f"pose file {path}: header {','.join(h.strip() for h in header)!r} lacks the "
                            f"needed columns; accepted headers: {accepted} (extra columns are ignored)")
        index = [columns[c] for c in wanted]
        names: list[str] = []
        rows: list[list[float]] = []
        seen: dict[str, int] = {}
        for row in reader:
            lineno = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(index):
                raise DataError(f"{path}:{lineno}: expected at least {max(index) + 1} columns, "
                                f"got {len(row)}: {','.join(row)!r}")
            name = row[index[0]].strip()
            if not name:
                raise DataError(f"{path}:{lineno}: empty name")
            if name in seen:
                raise DataError(f"{path}:{lineno}: name {name!r} already used on line {seen[name]}; "
                                "names must be unique")
            try:
                values = [float(row[i]) for i in index[1:]]
            except ValueError:
                raise DataError(f"{path}:{lineno}: non-numeric pose value in {','.join(row)!r}") from None
            if not all(math.isfinite(v) for v in values):
                raise DataError(f"{path}:{lineno}: non-finite pose value in {','.join(row)!r}")
            if planar:
                x, y, yaw = values
                values = [x, y, 0.0, *quat_from_yaw(yaw).tolist()]
            elif math.sqrt(sum(v * v for v in values[3:])) < 1e-12:
                raise DataError(f"{path}:{lineno}: zero quaternion; use qx=qy=qz=0, qw=1 for identity")
            seen[name] = lineno
            names.append(name)
            rows.append(values)
    if not rows:
        raise DataError(f"pose file {path} has a header but no poses")
    poses = np.asarray(rows, dtype=np.float64)
    poses[:, 3:] = normalize_quat(poses[:, 3:])
    return names, poses


def write_pose_csv(path: str | Path, names: list[str], poses: np.ndarray) -> None:
    """Write `name,x,y,z,qx,qy,qz,qw` (the inverse of `read_pose_csv`)."""
    poses = check_poses(poses)
    if len(names) != len(poses):
        raise ValueError(f"{len(names)} names but {len(poses)} poses")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FULL_COLUMNS)
        for name, pose in zip(names, poses):
            writer.writerow([name] + [repr(float(v)) for v in pose])
