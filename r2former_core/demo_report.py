"""The demo's numbers and pictures, without ROS: pose errors against ground truth, latency pairing,
the summary dictionary, the printed table and the trajectory plot.

The demo evaluator node (`r2former_ros/demo_evaluator.py`) records what arrives on the topics
(images, poses, ground-truth odometry, diagnostics) and hands it to `summarize`; everything here
is plain numpy/matplotlib so that it can be tested without a ROS graph.

Definitions (also written into summary.json under "definitions"):

* position error: Euclidean distance (x, y, z) between the published pose and the ground-truth
  pose at the same stamp (ground truth interpolated at the image stamp);
* yaw error: |wrapped difference of the headings| in degrees (the demo's camera only turns about z);
* a frame is "within" when position error <= `max_position_m` and yaw error <= `max_yaw_deg`;
* a gross error is a published pose more than 25 m off (GROSS_M);
* tracking (live): the localizer's diagnostics: whether the tracker ran and the mean number of candidates
  it reranked per frame (`tracking_reranked_mean`); without the tracker every frame reranks top_k;
* comparison (optional, added by the demo): single frames against tracking on the same query frames,
  offline (`r2former_core.demo_compare`): fractions of ALL compared frames;
* latency: for each pose, (time the pose arrived at the evaluator) - (time the image with the same
  header stamp arrived at the evaluator), both on the evaluator's monotonic clock. The image reaches
  the localizer and the evaluator over the same transport at about the same time, so this measures
  image publication -> pose arrival, i.e. the localizer's queueing + processing + two transports.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data.poses import interpolate_poses, yaw_from_quat

MAX_POSITION_M = 5.0
MAX_YAW_DEG = 20.0
GROSS_M = 25.0          # a published pose further off than this is a gross error (as r2former eval --sequence)
LATENCY_METHOD = ("evaluator clock: arrival of ~/pose minus arrival of the image with the same header stamp "
                  "(both received by the evaluator over the same transport as the localizer)")


@dataclass
class PoseRecord:
    """One published pose as the evaluator received it."""
    stamp_ns: int
    pose: np.ndarray            # (7,) x y z qx qy qz qw
    covariance: np.ndarray      # (6, 6) over x y z roll pitch yaw
    arrival: float              # evaluator monotonic clock, seconds


def wrap_angle(angle: np.ndarray | float) -> np.ndarray | float:
    """Angle(s) wrapped to (-pi, pi]."""
    wrapped = np.mod(np.asarray(angle, dtype=np.float64) + np.pi, 2 * np.pi) - np.pi
    wrapped = np.where(wrapped == -np.pi, np.pi, wrapped)
    return float(wrapped) if np.ndim(wrapped) == 0 else wrapped


def pose_errors(estimates: np.ndarray, truths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 7) estimates and ground truths -> (position error in metres, |yaw error| in degrees), each (N,)."""
    est = np.asarray(estimates, dtype=np.float64).reshape(-1, 7)
    gt = np.asarray(truths, dtype=np.float64).reshape(-1, 7)
    if len(est) != len(gt):
        raise ValueError(f"{len(est)} estimates but {len(gt)} ground-truth poses")
    pos = np.linalg.norm(est[:, :3] - gt[:, :3], axis=1)
    yaw = np.abs(np.degrees(wrap_angle(np.asarray(yaw_from_quat(est[:, 3:])) - np.asarray(yaw_from_quat(gt[:, 3:])))))
    return pos, np.asarray(yaw, dtype=np.float64).reshape(-1)


def within(position_err: np.ndarray, yaw_err_deg: np.ndarray, max_position_m: float = MAX_POSITION_M,
           max_yaw_deg: float = MAX_YAW_DEG) -> np.ndarray:
    """Boolean mask of errors within both thresholds (NaN counts as outside)."""
    p, y = np.asarray(position_err, dtype=np.float64), np.asarray(yaw_err_deg, dtype=np.float64)
    return (p <= max_position_m) & (y <= max_yaw_deg)


def pair_latencies(image_arrivals: Mapping[int, float], poses: Sequence[tuple[int, float]]) -> tuple[np.ndarray, int]:
    """Latency in seconds of each (stamp_ns, pose arrival) whose image stamp was seen; and how many had none.

    `image_arrivals` maps header stamp (ns) -> arrival time of that image (the first one, if repeated).
    """
    out, unpaired = [], 0
    for stamp, arrival in poses:
        t = image_arrivals.get(int(stamp))
        if t is None:
            unpaired += 1
        else:
            out.append(float(arrival) - float(t))
    return np.asarray(out, dtype=np.float64), unpaired


def ground_truth_at(gt_stamps_ns: np.ndarray, gt_poses: np.ndarray, stamps_ns: np.ndarray,
                    tolerance: float = 0.02, max_gap: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth poses at `stamps_ns`: exact stamp matches, otherwise interpolated (no extrapolation
    beyond `tolerance` s, never across a gap longer than `max_gap` s). Returns (poses (N, 7), valid (N,))."""
    stamps_ns = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
    gt_stamps_ns = np.asarray(gt_stamps_ns, dtype=np.int64).reshape(-1)
    out = np.full((len(stamps_ns), 7), np.nan)
    valid = np.zeros(len(stamps_ns), dtype=bool)
    if len(gt_stamps_ns) == 0 or len(stamps_ns) == 0:
        return out, valid
    gt_poses = np.asarray(gt_poses, dtype=np.float64).reshape(-1, 7)
    index = {int(s): i for i, s in enumerate(gt_stamps_ns)}
    exact = np.array([index.get(int(s), -1) for s in stamps_ns])
    out[exact >= 0] = gt_poses[exact[exact >= 0]]
    valid[exact >= 0] = True
    rest = exact < 0
    if rest.any():
        base = int(gt_stamps_ns.min())     # seconds relative to the first sample: float64 keeps ns precision
        poses, ok = interpolate_poses((gt_stamps_ns - base) / 1e9, gt_poses, (stamps_ns[rest] - base) / 1e9,
                                      tolerance=tolerance, max_gap=max_gap)
        out[rest], valid[rest] = poses, ok
    return out, valid


def is_spd(covariance: np.ndarray) -> bool:
    """Symmetric and positive definite (the smallest eigenvalue > 0)."""
    c = np.asarray(covariance, dtype=np.float64)
    if c.shape[0] != c.shape[1] or not np.all(np.isfinite(c)) or not np.allclose(c, c.T, rtol=1e-6, atol=1e-9):
        return False
    return bool(np.linalg.eigvalsh((c + c.T) / 2).min() > 0)


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def summarize(poses: Sequence[PoseRecord], image_arrivals: Mapping[int, float], gt_stamps_ns: np.ndarray,
              gt_poses: np.ndarray, frames_published: int | None = None,
              diagnostics: Mapping[str, str] | None = None, max_position_m: float = MAX_POSITION_M,
              max_yaw_deg: float = MAX_YAW_DEG) -> dict[str, Any]:
    """The demo's summary (JSON-ready): accuracy, latency, frame counts, per-pose rows."""
    diagnostics = dict(diagnostics or {})
    n = len(poses)
    stamps = np.array([p.stamp_ns for p in poses], dtype=np.int64)
    est = np.array([p.pose for p in poses], dtype=np.float64).reshape(-1, 7)
    gt, has_gt = ground_truth_at(gt_stamps_ns, gt_poses, stamps)
    pos_err = np.full(n, np.nan)
    yaw_err = np.full(n, np.nan)
    if has_gt.any():
        pos_err[has_gt], yaw_err[has_gt] = pose_errors(est[has_gt], gt[has_gt])
    ok = within(pos_err, yaw_err, max_position_m, max_yaw_deg) & has_gt
    with np.errstate(invalid="ignore"):
        gross = has_gt & (pos_err > GROSS_M)
    latencies, unpaired = pair_latencies(image_arrivals, [(p.stamp_ns, p.arrival) for p in poses])
    spd = [is_spd(p.covariance) for p in poses]

    def count(key: str) -> int | None:
        try:
            return int(diagnostics[key])
        except (KeyError, ValueError):
            return None

    processed, dropped, received = count("processed"), count("dropped"), count("received")
    seen = len(image_arrivals)
    published = frames_published if frames_published is not None else seen
    evaluated = int(has_gt.sum())
    rows = [dict(stamp_ns=int(s), x=float(e[0]), y=float(e[1]), yaw_deg=float(math.degrees(yaw_from_quat(e[3:]))),
                 gt_x=float(g[0]) if v else None, gt_y=float(g[1]) if v else None,
                 gt_yaw_deg=float(math.degrees(yaw_from_quat(g[3:]))) if v else None,
                 position_error_m=float(pe) if v else None, yaw_error_deg=float(ye) if v else None,
                 within=bool(w), covariance_xy=[[float(c[0, 0]), float(c[0, 1])], [float(c[1, 0]), float(c[1, 1])]],
                 covariance_spd=bool(sp))
            for s, e, g, v, pe, ye, w, c, sp in zip(stamps, est, gt, has_gt, pos_err, yaw_err, ok,
                                                      (p.covariance for p in poses), spd)]
    return {
        "thresholds": {"position_m": max_position_m, "yaw_deg": max_yaw_deg},
        "frames": {
            "published": published,                     # query images the bag player sent
            "seen_by_evaluator": seen,
            "received_by_localizer": received,
            "processed": processed,
            "dropped": dropped,                         # overwritten in the localizer's newest-frame slot
            "poses": n,                                 # accepted results published on ~/pose
            "rejected": count("rejected"),              # processed, confidence below min_confidence
            "poses_with_ground_truth": evaluated,
        },
        "accuracy": {
            "within": int(ok.sum()),
            "fraction_of_poses": float(ok.sum() / evaluated) if evaluated else None,
            "fraction_of_processed": float(ok.sum() / processed) if processed else None,
            "fraction_of_published": float(ok.sum() / published) if published else None,
            "median_position_error_m": _median(pos_err[has_gt]),
            "median_yaw_error_deg": _median(yaw_err[has_gt]),
            "p90_position_error_m": _pct(pos_err[has_gt], 90),
            "gross_errors": int(gross.sum()),
            "gross_fraction_of_published": float(gross.sum() / published) if published else None,
        },
        "tracking": {
            "enabled": diagnostics.get("tracking") == "on",
            "reranked_per_frame": _float(diagnostics.get("tracking_reranked_mean", diagnostics.get("reranked"))),
            "frames": count("tracking_frames"),
            "state": diagnostics.get("tracking_state"),
        },
        "latency": {
            "method": LATENCY_METHOD,
            "p50_ms": None if not len(latencies) else float(np.percentile(latencies, 50) * 1e3),
            "p95_ms": None if not len(latencies) else float(np.percentile(latencies, 95) * 1e3),
            "max_ms": None if not len(latencies) else float(latencies.max() * 1e3),
            "paired": int(len(latencies)),
            "unpaired": unpaired,
            "localizer_stage_ms": {k[len("latency_"):-len("_ms")]: _float(v) for k, v in diagnostics.items()
                                   if k.startswith("latency_") and k.endswith("_ms")},
        },
        "covariance": {"all_spd": bool(all(spd)), "not_spd": int(len(spd) - sum(spd))},
        "diagnostics": diagnostics,
        "poses": rows,
    }


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def format_table(summary: Mapping[str, Any]) -> str:
    """The numbers of a summary as a small aligned table (what the demo prints)."""
    f, a, lat, th = summary["frames"], summary["accuracy"], summary["latency"], summary["thresholds"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    rows = [
        (f"within {th['position_m']:g} m and {th['yaw_deg']:g} deg",
         f"{a['within']} of {f['poses_with_ground_truth']} poses = {pct(a['fraction_of_poses'])}  "
         f"({pct(a['fraction_of_processed'])} of processed, {pct(a['fraction_of_published'])} of published frames)"),
        ("median position error", _fmt(a["median_position_error_m"], ".2f", " m")
         + f"   (p90 {_fmt(a['p90_position_error_m'], '.2f', ' m')})"),
        ("median yaw error", _fmt(a["median_yaw_error_deg"], ".1f", " deg")),
        ("latency p50 / p95", f"{_fmt(lat['p50_ms'], '.0f', ' ms')} / {_fmt(lat['p95_ms'], '.0f', ' ms')}"
         f"   (image arrival -> pose arrival, {lat['paired']} poses)"),
        ("frames published", str(f["published"])),
        ("received / processed / dropped", f"{_fmt(f['received_by_localizer'], 'd')} / {_fmt(f['processed'], 'd')}"
         f" / {_fmt(f['dropped'], 'd')}   (localizer /diagnostics)"),
        ("poses published / rejected", f"{f['poses']} / {_fmt(f['rejected'], 'd')}"),
        ("covariance SPD", "all" if summary["covariance"]["all_spd"]
         else f"{summary['covariance']['not_spd']} not positive definite"),
    ]
    t = summary.get("tracking")
    if t is not None:
        rows.insert(1, (f"gross errors (> {GROSS_M:g} m)", f"{_fmt(a.get('gross_errors'), 'd')}   "
                        f"({pct(a.get('gross_fraction_of_published'))} of published frames)"))
        rows.append(("tracking (live)", ("on" if t["enabled"] else "off") + "   "
                     f"{_fmt(t['reranked_per_frame'], '.1f')} candidates reranked per frame"))
    c = summary.get("comparison")
    if c:
        for mode in ("single", "tracking"):
            m = c[mode]
            rows.append((f"{mode} (offline, {c['frames']} frames)",
                         f"{pct(m['within_5m'])} within 5 m, {pct(m['gross_error_rate'])} > "
                         f"{GROSS_M:g} m, {m['reranked_per_frame']:.1f} reranked/frame, "
                         f"{m['ms_per_frame']:.0f} ms/frame"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def covariance_ellipse(cov_xy: np.ndarray, sigma: float = 2.0, points: int = 48) -> np.ndarray:
    """(points, 2) outline of the `sigma`-sigma ellipse of a 2x2 covariance, centred at the origin."""
    c = np.asarray(cov_xy, dtype=np.float64).reshape(2, 2)
    vals, vecs = np.linalg.eigh((c + c.T) / 2)
    vals = np.clip(vals, 0.0, None)
    t = np.linspace(0, 2 * np.pi, points)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    return sigma * (circle * np.sqrt(vals)) @ vecs.T


def plot_trajectory(summary: Mapping[str, Any], gt_poses: np.ndarray, path: str | Path,
                    map_poses: np.ndarray | None = None, title: str = "", sigma: float = 2.0) -> Path:
    """trajectory.png: ground truth (line), estimates (dots, green within thresholds, red outside),
    `sigma`-sigma covariance ellipses of x/y, error segments, and the map's poses in grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    path = Path(path)
    gt = np.asarray(gt_poses, dtype=np.float64).reshape(-1, 7)
    rows = summary["poses"]
    fig, ax = plt.subplots(figsize=(9, 9), dpi=110)
    if map_poses is not None and len(map_poses):
        m = np.asarray(map_poses).reshape(-1, 7)
        ax.plot(m[:, 0], m[:, 1], ".", color="0.75", ms=3, label=f"map images ({len(m)})", zorder=1)
    if len(gt):
        ax.plot(gt[:, 0], gt[:, 1], "-", color="black", lw=1.2, label="ground truth (query drive)", zorder=2)
    est = np.array([[r["x"], r["y"]] for r in rows]).reshape(-1, 2)
    good = np.array([r["within"] for r in rows], dtype=bool)
    ellipses = [covariance_ellipse(np.array(r["covariance_xy"]), sigma) + [r["x"], r["y"]] for r in rows]
    if ellipses:
        colors = ["tab:green" if g else "tab:red" for g in good]
        ax.add_collection(LineCollection(ellipses, colors=colors, linewidths=0.6, alpha=0.45, zorder=3))
    segments = [[(r["x"], r["y"]), (r["gt_x"], r["gt_y"])] for r in rows if r["gt_x"] is not None]
    if segments:
        ax.add_collection(LineCollection(segments, colors="tab:blue", linewidths=0.5, alpha=0.4, zorder=3))
    if good.any():
        ax.plot(est[good, 0], est[good, 1], "o", color="tab:green", ms=3.5, zorder=5,
                label=f"estimate within thresholds ({int(good.sum())})")
    if (~good).any():
        ax.plot(est[~good, 0], est[~good, 1], "o", color="tab:red", ms=3.5, zorder=4,
                label=f"estimate outside ({int((~good).sum())})")
    ax.plot([], [], "-", color="0.4", lw=0.6, label=f"{sigma:g}-sigma x/y covariance ellipse")
    # Frame the drive (and the map), not huge ellipses of lost frames.
    ref = [gt[:, :2]] + ([np.asarray(map_poses).reshape(-1, 7)[:, :2]] if map_poses is not None and len(map_poses)
                         else []) + ([est] if len(est) else [])
    ref_xy = np.concatenate([r for r in ref if len(r)]) if any(len(r) for r in ref) else np.zeros((1, 2))
    lo, hi = ref_xy.min(0), ref_xy.max(0)
    pad = 0.08 * max(float((hi - lo).max()), 10.0)
    ax.set_xlim(lo[0] - pad, hi[0] + pad)
    ax.set_ylim(lo[1] - pad, hi[1] + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
