#!/usr/bin/env python3
"""The largest fp16 gradient-scaler scale without overflow in a first training step, per model and loss.

Why: `torch.amp.GradScaler` starts at 2**16 by default; when the scaled gradients of the first backward pass
overflow fp16, the optimizer step is skipped. The trainer's initial scale
(`r2former_core.train.trainer.initial_grad_scale`) is chosen below the worst case measured here
(docs/TRAINING.md section 6.1).

For each model and loss term: one batch of --batch queries from a synthetic world (global/InfoNCE:
[q, p, n, n]; rerank: [q, p, n]; dense: pairs of two map drives), fp16 autocast on the CPU (no GPU needed;
the overflow is a property of the fp16 range), and a binary search over the exponent e for the largest
2**e whose scaled backward pass gives only finite parameter gradients. Prints a table and writes JSON.

    python bench/grad_scale.py [--models tiny fresh_demo packaged_demo] [--out bench/results/grad_scale.json]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from benchlib import machine_info, write_report

from r2former_core.features import images_to_tensor
from r2former_core.model import ModelConfig, R2FormerModel, build_model, load_model, preset
from r2former_core.train.batches import Batch, GroupBatch, PairBatch
from r2former_core.train.datasets import SyntheticSpec, synthetic_dataset
from r2former_core.train.losses import DenseTerm, InfoNCETerm, LossTerm, RerankTerm, TripletTerm
from r2former_core.train.stages import StageNet

ROOT = Path(__file__).resolve().parents[1]
# The test suite's tiny model (test/conftest.py `tiny_config`).
TINY = ModelConfig(image_size=(96, 128), embed_dim=48, depth=3, num_heads=3, global_dim=32, local_dim=16,
                   num_local=24, rerank_dim=16, rerank_heads=4, rerank_depth=2, rerank_pair_depth=2)


DEMO_MODEL = ROOT / "models" / "r2former_tiny_demo.safetensors"


def _model(name: str) -> R2FormerModel:
    if name == "tiny":
        return build_model(TINY, seed=0)
    if name == "fresh_demo":
        return build_model(preset("r2former_demo"), seed=0)
    return load_model(DEMO_MODEL)


def _overflows(model: R2FormerModel, net: StageNet, batch: Batch, scale: float) -> bool:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _ = net(batch)
    (loss.float() * scale).backward()
    return any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def largest_safe_exponent(model: R2FormerModel, terms: list[LossTerm], batch: Batch, hi: int = 24) -> int:
    """The largest e in [0, hi) with a finite scaled backward pass at 2**e (assumes 2**0 is finite)."""
    net = StageNet(model, terms)
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _overflows(model, net, batch, 2.0 ** mid):
            hi = mid
        else:
            lo = mid
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "fresh_demo", "packaged_demo"],
                    choices=["tiny", "fresh_demo", "packaged_demo"])
    ap.add_argument("--batch", type=int, default=16, help="queries (dense: pairs) per batch (default 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None, help="synthetic render cache (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "grad_scale.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = args.batch
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_dataset(SyntheticSpec((11,), ("day", "night", "fog"), (128, 160), 6.0, 2, 1),
                                 args.cache_dir or tmp)
        rng = np.random.default_rng(0)
        rows = []
        for name in args.models:
            model = _model(name).train()
            for p in model.parameters():
                p.requires_grad_(True)
            size = model.cfg.image_size
            ids = rng.choice(len(data.database), b * 4)
            groups = images_to_tensor([data.database.image(int(i)) for i in ids], size)
            pairs = rng.choice(len(data.aligned), b)
            aligned = images_to_tensor([data.database.image(int(data.aligned[r, k])) for k in (0, 1) for r in pairs],
                                       size)
            cases: list[tuple[str, list[LossTerm], Batch]] = [
                ("triplet", [TripletTerm()], GroupBatch(groups, 4)),
                ("infonce", [InfoNCETerm()], GroupBatch(groups, 4)),
                ("rerank", [RerankTerm()], GroupBatch(groups[:3 * b], 3)),
                ("dense", [DenseTerm(1.0)], PairBatch(aligned, (0, 1))),
            ]
            for loss, terms, batch in cases:
                e = largest_safe_exponent(model, terms, batch)
                rows.append({"model": name, "loss": loss, "largest_safe_exponent": e})
                print(f"{name:14s} {loss:8s} 2^{e}", flush=True)
    table = {(r["model"], r["loss"]): r["largest_safe_exponent"] for r in rows}
    losses = ["triplet", "infonce", "rerank", "dense"]
    print("\n| model | " + " | ".join(losses) + " |\n|---|" + "---|" * len(losses))
    for name in args.models:
        print(f"| {name} | " + " | ".join(f"2^{table[(name, loss)]}" for loss in losses) + " |")
    worst = min(r["largest_safe_exponent"] for r in rows)
    print(f"\nworst case 2^{worst}; torch's default initial scale 2^16 overflows in "
          f"{sum(r['largest_safe_exponent'] < 16 for r in rows)} of {len(rows)} cases")
    write_report(args.out, {"batch": b, "threads": args.threads, "torch": torch.__version__,
                               "machine": machine_info(args.threads), "results": rows,
                               "worst_exponent": worst})


if __name__ == "__main__":
    main()
