"""`r2former check-parity FOLDER`: compare our model with the official implementation's outputs."""
from __future__ import annotations

import argparse

from ..options import PRECISIONS, device_type


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "check-parity", help="developer check: compare every output with official reference outputs",
        description="Load the official-layout checkpoint of FOLDER through load_model, run extraction on its "
                    "images and the reranker on its saved features, and compare every output with the official "
                    "implementation's arrays. Exit status 0 only when all differences are within the tolerance.")
    p.add_argument("folder", help="reference folder (checkpoint_official_layout.pth, img*.png, *.npy)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="maximum absolute difference allowed (default 1e-4)")
    p.add_argument("--device", type=device_type, default="cpu",
                   help="auto, cpu, cuda or cuda:N (default cpu); the check runs at --precision on it")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="numeric precision of the check (default fp32: the 1e-4 parity; reduced precisions are "
                        "reported against the same tolerance and are expected to exceed it)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..model.parity import check_parity
    rows = check_parity(args.folder, tolerance=args.tolerance, device=args.device, precision=args.precision)
    width = max(len(r.output) for r in rows)
    print(f"device {args.device}, precision {args.precision}, tolerance {args.tolerance:g}")
    print(f"{'output':<{width}}  {'max |diff|':>11}  result  note")
    for r in rows:
        print(f"{r.output:<{width}}  {r.max_abs_diff:>11.3e}  {'ok' if r.ok else 'FAIL':<6}  {r.note}")
    ok = all(r.ok for r in rows)
    print("parity: PASS" if ok else f"parity: FAIL (tolerance {args.tolerance:g})")
    return 0 if ok else 1
