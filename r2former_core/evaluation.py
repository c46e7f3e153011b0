"""Place-recognition evaluation: recall@N per reranking mode on the same features (paper Table 4),
and how trustworthy the published pose is.

A query counts as recalled at N when one of its first N ranked map images lies within
`threshold_m` (horizontal distance) of the query's ground-truth position. All modes share the
query features, the global search and the candidates' local features, so their differences
are the reranking alone; ms/query includes extraction, search, reading and the pose estimate.

For the pose the localizer would publish (its position, confidence and covariance) the report also
gives: the fraction within `pose_threshold_m` of the ground truth, the fraction whose horizontal
error lies inside the covariance's 95 % ellipse (a calibrated covariance gives about 95 %), and a
confidence table: for each `min_confidence`, how many results would be accepted and how many of
those are correct. That is the data to choose `min_confidence` from.

Sequences (`evaluate_sequence`): the queries played as one time-ordered sequence, each frame localized
on its own and with the tracker, scored over all frames (see the section below).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .data.poses import interpolate_poses, yaw_from_quat
from .data.sources import Source
from .errors import ConfigError, DataError
from .localizer import Localizer
from .metrics import RECALL_VALUES, first_positive_rank, recall_from_ranks
from .options import TrackingConfig
from .rerank import check_mode
from .tracking import Tracker

log = logging.getLogger(__name__)
CONFIDENCE_STEPS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CHI2_2D_95 = 5.991   # 95 % quantile of the chi-square distribution with 2 degrees of freedom


@dataclass
class ModeResult:
    ranks: list[int] = field(default_factory=list)        # rank of the first positive (1-based; 0 = none)
    ms: list[float] = field(default_factory=list)         # per query
    errors_m: list[float] = field(default_factory=list)   # top-1 position error
    pose_threshold_m: float = 5.0                          # a published pose within this is "correct"
    pose_errors_m: list[float] = field(default_factory=list)   # horizontal error of the estimated pose
    confidences: list[float] = field(default_factory=list)
    mahalanobis2: list[float] = field(default_factory=list)    # xy error^T Sigma_xy^-1 xy error

    def recall(self, n: int) -> float:
        return recall_from_ranks(self.ranks, n)

    def extend(self, other: ModeResult) -> None:
        """Append another query set's per-query records (pooling several sets into one)."""
        for name in ("ranks", "ms", "errors_m", "pose_errors_m", "confidences", "mahalanobis2"):
            getattr(self, name).extend(getattr(other, name))

    def add_pose(self, estimate: np.ndarray, covariance: np.ndarray, confidence: float, truth: np.ndarray) -> None:
        e = np.asarray(estimate[:2], np.float64) - np.asarray(truth[:2], np.float64)
        cov = np.asarray(covariance, np.float64)[:2, :2]
        self.pose_errors_m.append(float(np.linalg.norm(e)))
        self.confidences.append(float(confidence))
        self.mahalanobis2.append(float(e @ np.linalg.solve(cov, e)))

    def confidence_table(self, steps=CONFIDENCE_STEPS) -> list[dict]:
        """Per `min_confidence`: fraction of queries accepted, fraction of the accepted within
        `pose_threshold_m` (precision) and fraction of all queries accepted and correct."""
        conf = np.asarray(self.confidences)
        ok = np.asarray(self.pose_errors_m) <= self.pose_threshold_m
        rows = []
        for c in steps:
            acc = conf >= c
            n = int(acc.sum())
            rows.append({"min_confidence": float(c), "accepted": float(acc.mean()) if len(conf) else 0.0,
                         "correct_of_accepted": float(ok[acc].mean()) if n else None,   # None: none accepted
                         "correct_of_all": float((ok & acc).mean()) if len(conf) else 0.0})
        return rows

    def summary(self, recall_values=RECALL_VALUES) -> dict:
        out: dict[str, Any] = {f"recall@{n}": self.recall(n) for n in recall_values}
        out["ms_per_query"] = float(np.mean(self.ms)) if self.ms else 0.0
        out["median_error_m"] = float(np.median(self.errors_m)) if self.errors_m else float("nan")
        out["queries"] = len(self.ranks)
        if self.pose_errors_m:
            out["pose_threshold_m"] = self.pose_threshold_m
            out["pose_median_error_m"] = float(np.median(self.pose_errors_m))
            out["pose_correct"] = float(np.mean(np.asarray(self.pose_errors_m) <= self.pose_threshold_m))
            out["inside_95_ellipse"] = float(np.mean(np.asarray(self.mahalanobis2) <= CHI2_2D_95))
            out["confidence_table"] = self.confidence_table()
        return out


def evaluate(localizer: Localizer, queries: Source, modes=("none", "ransac", "r2former"), threshold_m: float = 25.0,
             progress: bool = True, pose_threshold_m: float = 5.0) -> dict[str, ModeResult]:
    for m in modes:
        check_mode(m)
    mapdb = localizer.map
    map_xy = mapdb.poses[:, :2]
    results = {m: ModeResult(pose_threshold_m=pose_threshold_m) for m in modes}
    skipped = 0
    for rec in tqdm(queries, total=len(queries), desc="queries", unit="img", disable=None if progress else True):
        if not rec.has_pose:
            skipped += 1
            continue
        t0 = time.perf_counter()
        q_global, q_local = localizer.extract(rec.image)
        idx, _ = localizer.retrieve(q_global)
        c_local = mapdb.local(idx) if any(m != "none" for m in modes) else None
        shared_ms = (time.perf_counter() - t0) * 1000
        for m in modes:
            t = time.perf_counter()
            out = localizer.localize_features(q_global, q_local, rerank=m, retrieved=idx, c_local=c_local,
                                              with_matches=False)
            ranked = np.array([c.index for c in out.candidates])
            res = results[m]
            res.ms.append(shared_ms + (time.perf_counter() - t) * 1000)
            res.ranks.append(first_positive_rank(ranked, map_xy, rec.pose[:2], threshold_m))
            res.errors_m.append(float(np.linalg.norm(map_xy[ranked[0]] - rec.pose[:2])))
            res.add_pose(out.pose, out.covariance, out.confidence, rec.pose)
    if skipped:
        log.warning("skipped %d queries without a ground-truth pose", skipped)
    return results


def write_report(results: dict[str, ModeResult], out: Path, meta: dict | None = None) -> tuple[Path, Path]:
    """JSON `{"none": {"recall@1": ..}, ...}` and a recall@N plot beside it (same stem, .png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {m: r.summary() for m, r in results.items()}
    if meta:
        data["_meta"] = meta
    out.write_text(json.dumps(data, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max((max(r.ranks, default=0) for r in results.values()), default=1)
    ns = np.arange(1, max(20, min(top, 100)) + 1)
    for m, r in results.items():
        ax.plot(ns, [100 * r.recall(int(n)) for n in ns], marker=".", label=m)
    ax.set_xlabel("N (candidates)")
    ax.set_ylabel("recall@N (%)")
    ax.set_title("recall@N by reranking mode")
    ax.grid(alpha=0.3)
    ax.legend()
    plot = out.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    if any(r.confidences for r in results.values()):
        plot_confidence(results, out.with_name(out.stem + "_confidence.png"))
    return out, plot


def plot_confidence(results: dict[str, ModeResult], path: Path) -> Path:
    """Precision (correct of accepted) and coverage (accepted) against min_confidence, per mode."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.linspace(0, 0.95, 39)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for m, r in results.items():
        if not r.confidences:
            continue
        rows = r.confidence_table(steps)
        c = [row["min_confidence"] for row in rows]
        precision = [np.nan if row["correct_of_accepted"] is None else 100 * row["correct_of_accepted"] for row in rows]
        line, = ax1.plot(c, precision, label=m)
        ax1.plot(c, [100 * row["accepted"] for row in rows], ls="--", color=line.get_color())
        ax2.scatter(r.confidences, np.maximum(r.pose_errors_m, 0.05), s=8, alpha=0.5, color=line.get_color(), label=m)
    thr = next(iter(results.values())).pose_threshold_m
    ax1.set_xlabel("min_confidence")
    ax1.set_ylabel("%")
    ax1.set_title(f"solid: accepted poses within {thr:g} m; dashed: accepted")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.axhline(thr, color="grey", lw=0.8)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))   # no mathtext fonts
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("pose error (m)")
    ax2.set_title("pose error against confidence")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(results: dict[str, ModeResult]) -> str:
    thr = next(iter(results.values())).pose_threshold_m if results else 5.0
    lines = [f"{'rerank':<10} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'ms/query':>10} {'median err m':>13} "
             f"{f'pose <{thr:g} m':>11} {'in 95% ell.':>12}"]
    for m, r in results.items():
        s = r.summary()
        pose = (f"{100 * s['pose_correct']:>10.1f}% {100 * s['inside_95_ellipse']:>11.1f}%" if "pose_correct" in s
                else f"{'-':>11} {'-':>12}")
        lines.append(f"{m:<10} {100 * s['recall@1']:>6.1f}% {100 * s['recall@5']:>6.1f}% {100 * s['recall@10']:>6.1f}% "
                     f"{s['ms_per_query']:>10.1f} {s['median_error_m']:>13.2f} {pose}")
    return "\n".join(lines)


def format_confidence_table(results: dict[str, ModeResult], steps=(0.1, 0.2, 0.3, 0.5, 0.7, 0.9)) -> str:
    """One row per min_confidence: accepted % and correct-of-accepted % for every mode."""
    modes = [m for m, r in results.items() if r.confidences]
    if not modes:
        return ""
    thr = results[modes[0]].pose_threshold_m
    head = f"{'min_conf':>8} " + " ".join(f"{m + ' acc':>13} {m + ' ok':>12}" for m in modes)
    lines = [f"accepted results, and how many of them lie within {thr:g} m, per min_confidence:", head]
    tables = {m: results[m].confidence_table(steps) for m in modes}
    for i, c in enumerate(steps):
        cells = []
        for m in modes:
            row = tables[m][i]
            ok = "-" if row["correct_of_accepted"] is None else f"{100 * row['correct_of_accepted']:.1f}%"
            cells.append(f"{100 * row['accepted']:>12.1f}% {ok:>12}")
        lines.append(f"{c:>8.1f} " + " ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ sequences
# A query set played as one time-ordered sequence, localized frame by frame on its own ("single") and
# with the tracker ("tracking", `r2former_core.tracking`), scored over ALL frames: a frame without a
# published pose is a miss.

SEQUENCE_MODES = ("single", "tracking")
WITHIN_M = 5.0           # a published pose within this distance ...
WITHIN_DEG = 20.0        # ... and this yaw error is correct
GROSS_M = 25.0           # a published pose further off than this is a gross error


@dataclass
class SequenceFrame:
    """One frame of a sequence: its stamp, ground truth and image or features, and optionally the robot's
    odometry pose at that stamp (odom frame)."""
    name: str
    stamp: float
    truth: np.ndarray                                  # (7,) ground-truth pose in the map frame
    image: np.ndarray | None = None
    features: tuple[np.ndarray, np.ndarray] | None = None
    extract_ms: float = 0.0                            # time spent extracting `features` (when given)
    odom_pose: np.ndarray | None = None


@dataclass
class SequenceResult:
    """Per-frame record of one way of localizing a sequence."""
    names: list[str] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
    errors_m: list[float] = field(default_factory=list)       # horizontal error of the published pose; NaN = none
    yaw_errors_deg: list[float] = field(default_factory=list)
    published: list[bool] = field(default_factory=list)
    mahalanobis2: list[float] = field(default_factory=list)   # of the published pose's xy covariance; NaN = none
    ms: list[float] = field(default_factory=list)
    reranked: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)

    def add(self, frame: SequenceFrame, pose: np.ndarray, covariance: np.ndarray, published: bool, ms: float,
            reranked: int, state: str) -> None:
        self.names.append(frame.name)
        self.stamps.append(float(frame.stamp))
        self.published.append(bool(published))
        self.ms.append(float(ms))
        self.reranked.append(int(reranked))
        self.states.append(state)
        if not published or not np.all(np.isfinite(pose)):
            self.errors_m.append(float("nan"))
            self.yaw_errors_deg.append(float("nan"))
            self.mahalanobis2.append(float("nan"))
            return
        e = np.asarray(pose[:2], np.float64) - np.asarray(frame.truth[:2], np.float64)
        dyaw = float(yaw_from_quat(np.asarray(pose[3:], np.float64)) - yaw_from_quat(np.asarray(frame.truth[3:])))
        self.errors_m.append(float(np.linalg.norm(e)))
        self.yaw_errors_deg.append(abs(math.degrees(math.remainder(dyaw, 2 * math.pi))))
        self.mahalanobis2.append(float(e @ np.linalg.solve(np.asarray(covariance, np.float64)[:2, :2], e)))

    def correct(self) -> np.ndarray:
        err = np.asarray(self.errors_m, np.float64)
        yaw = np.asarray(self.yaw_errors_deg, np.float64)
        with np.errstate(invalid="ignore"):
            return np.asarray(self.published) & (err <= WITHIN_M) & (yaw <= WITHIN_DEG)

    def summary(self) -> dict:
        """within_5m and gross_error_rate are fractions of ALL frames (no published pose = a miss);
        calibration = fraction of the published poses whose error lies inside their covariance's 95 % ellipse."""
        n = len(self.published)
        pub = np.asarray(self.published, bool)
        err = np.asarray(self.errors_m, np.float64)
        m2 = np.asarray(self.mahalanobis2, np.float64)
        with np.errstate(invalid="ignore"):
            gross = pub & (err > GROSS_M)
            inside = m2[pub] <= CHI2_2D_95
        return {
            "frames": n,
            "within_5m": float(self.correct().mean()) if n else 0.0,
            "gross_error_rate": float(gross.mean()) if n else 0.0,
            "ms_per_frame": float(np.mean(self.ms)) if n else 0.0,
            "reranked_per_frame": float(np.mean(self.reranked)) if n else 0.0,
            "calibration": float(inside.mean()) if pub.any() else None,
            "published": float(pub.mean()) if n else 0.0,
            "median_error_m": float(np.median(err[pub])) if pub.any() else None,
            "states": {s: self.states.count(s) for s in sorted(set(self.states))},
        }


def evaluate_sequence(localizer: Localizer, frames: Iterable[SequenceFrame], modes: Sequence[str] = SEQUENCE_MODES,
                      tracking: TrackingConfig | None = None, progress: bool = True,
                      total: int | None = None) -> dict[str, SequenceResult]:
    """Localize time-ordered frames on their own ("single": `Localizer.localize_features`, published when
    accepted) and/or with the tracker ("tracking": `Tracker.step`, the code the node runs). Every frame's
    features are extracted once and shared; each mode's ms include that extraction."""
    for m in modes:
        if m not in SEQUENCE_MODES:
            raise ConfigError(f"unknown sequence mode {m!r}; choose from {', '.join(SEQUENCE_MODES)}")
    results = {m: SequenceResult() for m in modes}
    tracker = Tracker(localizer, tracking or TrackingConfig()) if "tracking" in modes else None
    rerank_none = localizer.config.rerank == "none"
    for fr in tqdm(frames, total=total, desc="sequence", unit="frame", disable=None if progress else True):
        extract_ms = fr.extract_ms
        features = fr.features
        if features is None:
            if fr.image is None:
                raise DataError(f"sequence frame {fr.name} has neither an image nor features")
            t = time.perf_counter()
            features = localizer.extract(fr.image)
            extract_ms = (time.perf_counter() - t) * 1000
        if "single" in results:
            t = time.perf_counter()
            out = localizer.localize_features(features[0], features[1], with_matches=False)
            ms = extract_ms + (time.perf_counter() - t) * 1000
            results["single"].add(fr, out.pose, out.covariance, out.accepted, ms,
                                  0 if rerank_none else len(out.candidates), "single")
        if tracker is not None:
            t = time.perf_counter()
            tr = tracker.step(fr.stamp, features=features, odom_pose=fr.odom_pose, with_matches=False)
            ms = extract_ms + (time.perf_counter() - t) * 1000
            results["tracking"].add(fr, tr.pose, tr.covariance, tr.accepted, ms, 0 if rerank_none else tr.reranked,
                                    tr.state)
    return results


def odometry_at(stamps: np.ndarray, odometry: tuple[np.ndarray, np.ndarray] | None,
                tolerance: float = 0.05, max_gap: float = 1.0) -> list[np.ndarray | None]:
    """The odometry pose at each stamp (interpolated; None where the odometry has no sample near enough)."""
    if odometry is None:
        return [None] * len(stamps)
    poses, valid = interpolate_poses(odometry[0], odometry[1], np.asarray(stamps, np.float64), tolerance, max_gap)
    if not valid.all():
        log.warning("odometry: no pose for %d of %d frames (they are predicted without odometry)",
                    int((~valid).sum()), len(valid))
    return [p if ok else None for p, ok in zip(poses, valid)]


def sequence_frames(localizer: Localizer, source: Source, odometry: tuple[np.ndarray, np.ndarray] | None = None,
                    progress: bool = True) -> Iterator[SequenceFrame]:
    """The source's records as one sequence ordered by their stamps. A source already in time order is
    streamed (images decoded one at a time); otherwise every frame's features are extracted first and then
    played in stamp order (memory: one frame's features per record)."""
    stamps, _ = source.poses()
    odom = odometry_at(stamps, odometry)
    in_order = bool(np.all(np.diff(stamps) >= 0))
    if in_order:
        for rec, odom_pose in zip(source, odom):
            yield SequenceFrame(rec.name, rec.stamp, rec.pose, image=rec.image, odom_pose=odom_pose)
        return
    log.info("%s is not in time order: extracting every frame first, then playing them by stamp",
             source.description)
    frames = []
    for rec, odom_pose in tqdm(zip(source, odom), total=len(source), desc="features", unit="img",
                               disable=None if progress else True):
        t = time.perf_counter()
        features = localizer.extract(rec.image)
        frames.append(SequenceFrame(rec.name, rec.stamp, rec.pose, features=features,
                                    extract_ms=(time.perf_counter() - t) * 1000, odom_pose=odom_pose))
    frames.sort(key=lambda f: f.stamp)
    yield from frames


def write_sequence_report(results: dict[str, SequenceResult], out: Path, meta: dict | None = None) -> tuple[Path, Path]:
    """JSON `{"single": {...}, "tracking": {...}}` (plus "_meta"), the error over the frames as a plot
    (<stem>.png) and one row per frame and mode (<stem>_frames.csv) beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data: dict = {m: r.summary() for m, r in results.items()}
    if meta:
        data["_meta"] = meta
    out.write_text(json.dumps(data, indent=1))
    with open(out.with_name(out.stem + "_frames.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "frame", "name", "stamp", "published", "error_m", "yaw_error_deg", "mahalanobis2",
                    "reranked", "ms", "state"])
        for m, r in results.items():
            for i in range(len(r.names)):
                w.writerow([m, i, r.names[i], f"{r.stamps[i]:.6f}", int(r.published[i]), f"{r.errors_m[i]:.3f}",
                            f"{r.yaw_errors_deg[i]:.2f}", f"{r.mahalanobis2[i]:.3f}", r.reranked[i],
                            f"{r.ms[i]:.1f}", r.states[i]])
    plot = plot_sequence(results, out.with_suffix(".png"))
    return out, plot


def plot_sequence(results: dict[str, SequenceResult], path: Path, title: str = "") -> Path:
    """Error of the published pose over the frames (a frame without a published pose is marked below the
    axis), and the candidates reranked per frame, for every mode."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colours = {"single": "tab:orange", "tracking": "tab:blue"}
    floor = 0.1
    for k, (m, r) in enumerate(results.items()):
        x = np.arange(len(r.errors_m))
        err = np.asarray(r.errors_m, np.float64)
        c = colours.get(m, None)
        s = r.summary()
        ax1.plot(x, np.maximum(err, floor), ".-", ms=3, lw=0.6, color=c,
                 label=f"{m}: {100 * s['within_5m']:.0f}% within {WITHIN_M:g} m, "
                       f"{100 * s['gross_error_rate']:.0f}% > {GROSS_M:g} m")
        missing = x[~np.asarray(r.published, bool)]
        ax1.plot(missing, np.full(len(missing), floor * (0.75 - 0.15 * k)), "|", color=c, ms=6)
        ax2.plot(x, r.reranked, lw=0.8, color=c, label=f"{m}: {s['reranked_per_frame']:.0f} per frame")
    for y in (WITHIN_M, GROSS_M):
        ax1.axhline(y, color="grey", lw=0.7, ls="--")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.set_ylim(floor * 0.5, None)
    ax1.set_ylabel("error of the published pose (m)")
    ax1.set_title(title or "error over the sequence (ticks at the bottom: no pose published)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("frame (time order)")
    ax2.set_ylabel("reranked")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_sequence_table(results: dict[str, SequenceResult]) -> str:
    lines = [f"{'mode':<10} {'within 5 m':>10} {'> 25 m':>8} {'published':>10} {'in 95% ell.':>12} "
             f"{'reranked':>9} {'ms/frame':>9}"]
    for m, r in results.items():
        s = r.summary()
        cal = "-" if s["calibration"] is None else f"{100 * s['calibration']:.1f}%"
        lines.append(f"{m:<10} {100 * s['within_5m']:>9.1f}% {100 * s['gross_error_rate']:>7.1f}% "
                     f"{100 * s['published']:>9.1f}% {cal:>12} {s['reranked_per_frame']:>9.1f} "
                     f"{s['ms_per_frame']:>9.1f}")
    return "\n".join(lines)
