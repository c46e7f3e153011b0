"""Training curves from `metrics.csv`: loss and validation recall per epoch (matplotlib, Agg)."""
from __future__ import annotations

import csv
from pathlib import Path


def _column(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if r.get(key) not in (None, ""):
            xs.append(float(r["epoch"]))
            ys.append(float(r[key]))
    return xs, ys


def plot_curves(metrics_csv: Path, out_png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "triplet_loss", "infonce_loss", "rerank_loss"):
        xs, ys = _column(rows, key)
        if xs:
            ax_loss.plot(xs, ys, marker=".", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss")
    ax_loss.legend(loc="best")
    for key in ("val_R@1", "val_R@5", "val_R@10", "val_rerank_R@1", "val_rerank_R@5"):
        xs, ys = _column(rows, key)
        if xs:
            ax_rec.plot(xs, ys, marker=".", label=key.replace("val_", ""), linestyle="--" if "rerank" in key else "-")
    ax_rec.set_xlabel("epoch")
    ax_rec.set_ylim(0, 1.02)
    ax_rec.set_title("validation recall")
    if ax_rec.lines:
        ax_rec.legend(loc="best")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png.with_suffix(".tmp.png"), dpi=80)
    plt.close(fig)
    out_png.with_suffix(".tmp.png").replace(out_png)
    return out_png
