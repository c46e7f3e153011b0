"""Place-recognition evaluation: recall@N per reranking mode on the same features (paper Table 4).

A query counts as recalled at N when one of its first N ranked map images lies within
`threshold_m` (horizontal distance) of the query's ground-truth position. All modes share the
query features, the global search and the candidates' local features, so their differences
are the reranking alone; ms/query includes extraction, search and reading.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data.sources import Source
from .localizer import Localizer
from .rerank import RERANK_MODES, rerank_candidates

log = logging.getLogger(__name__)
RECALL_VALUES = (1, 5, 10)


@dataclass
class ModeResult:
    ranks: list[int] = field(default_factory=list)        # rank of the first positive (1-based; 0 = none)
    ms: list[float] = field(default_factory=list)         # per query
    errors_m: list[float] = field(default_factory=list)   # top-1 position error

    def recall(self, n: int) -> float:
        r = np.asarray(self.ranks)
        return float(np.mean((r > 0) & (r <= n))) if len(r) else 0.0

    def summary(self, recall_values=RECALL_VALUES) -> dict:
        out = {f"recall@{n}": self.recall(n) for n in recall_values}
        out["ms_per_query"] = float(np.mean(self.ms)) if self.ms else 0.0
        out["median_error_m"] = float(np.median(self.errors_m)) if self.errors_m else float("nan")
        out["queries"] = len(self.ranks)
        return out


def first_positive_rank(ranked: np.ndarray, map_xy: np.ndarray, query_xy: np.ndarray, threshold_m: float) -> int:
    d = np.linalg.norm(map_xy[ranked] - query_xy, axis=1)
    hits = np.nonzero(d <= threshold_m)[0]
    return int(hits[0]) + 1 if len(hits) else 0


def evaluate(localizer: Localizer, queries: Source, modes=("none", "ransac", "r2former"), threshold_m: float = 25.0,
             progress: bool = True) -> dict[str, ModeResult]:
    for m in modes:
        if m not in RERANK_MODES:
            raise ValueError(f"unknown rerank mode {m!r}; choose from {RERANK_MODES}")
    mapdb, model = localizer.map, localizer.model
    map_xy = mapdb.poses[:, :2]
    results = {m: ModeResult() for m in modes}
    skipped = 0
    for rec in tqdm(queries, total=len(queries), desc="queries", unit="img", disable=not progress):
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
            scores = rerank_candidates(model, m, q_global, q_local, mapdb.global_desc[idx], c_local,
                                       r2former_score=localizer.config.r2former_score)
            ranked = idx[np.argsort(-scores.score, kind="stable")]
            res = results[m]
            res.ms.append(shared_ms + (time.perf_counter() - t) * 1000)
            res.ranks.append(first_positive_rank(ranked, map_xy, rec.pose[:2], threshold_m))
            res.errors_m.append(float(np.linalg.norm(map_xy[ranked[0]] - rec.pose[:2])))
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
    return out, plot


def format_table(results: dict[str, ModeResult]) -> str:
    lines = [f"{'rerank':<10} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'ms/query':>10} {'median err m':>13}"]
    for m, r in results.items():
        s = r.summary()
        lines.append(f"{m:<10} {100 * s['recall@1']:>6.1f}% {100 * s['recall@5']:>6.1f}% {100 * s['recall@10']:>6.1f}% "
                     f"{s['ms_per_query']:>10.1f} {s['median_error_m']:>13.2f}")
    return "\n".join(lines)
