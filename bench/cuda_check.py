#!/usr/bin/env python3
"""The one command a GPU owner runs to see that the CUDA path works on their machine (issue 13).

Checks, on --device (default cuda), and prints a table + writes JSON:
  1. fp32 parity: against the official outputs of --official-ref when that folder exists (the 1e-4
     check of `r2former check-parity`), else our fast path against the literal reference
     (test/reference_r2former.py) on random weights; on CUDA in fp32, TF32 off;
  2. CPU vs CUDA in fp32, and fp16 vs fp32 on CUDA: global-descriptor cosine, top-1 agreement of the
     global retrieval and of the reranking, largest match-probability difference (DeiT-S 480x640,
     random official-layout weights, random scenes);
  3. times as the localizer pays them (copies to and from the GPU included): extraction ms/image,
     reranking ms/query (K=100), faiss search ms on a random map of --map-size descriptors (on the
     GPU when faiss has GPU support), and the pipeline rate in Hz.
Without a GPU it says so, runs the CPU-side checks (parity in fp32, times on the CPU) and exits 0.

    .venv/bin/python bench/cuda_check.py [--device cuda:0] [--official-ref ../shared/official_ref]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import machine_info, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "test"))


def parity(device: str, official: Path | None) -> list[dict]:
    """fp32 parity rows: official outputs when available, else the literal reference on random weights."""
    if official is not None and (official / "checkpoint_official_layout.pth").is_file():
        from r2former_core.model.parity import check_parity
        return [{"check": f"official {r.output}", "max_abs_diff": r.max_abs_diff, "ok": r.ok}
                for r in check_parity(official, device=device, precision="fp32")]
    from precision_equivalence import randomized_deits, scenes
    from reference_r2former import reference_extract, reference_rerank
    model = randomized_deits(0).to(device)
    model.set_precision("fp32")
    images, _ = scenes(3, 1, 0)
    feats = model.extract(images)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with torch.no_grad():
        g, local, index, score = reference_extract(sd, model.cfg, images)
        out = model.rerank(feats.global_desc[0], feats.local[0], feats.global_desc, feats.local)
        _, prob, _ = reference_rerank(sd, model.cfg, feats.global_desc[:1].expand(3, -1),
                                      feats.local[:1].expand(3, -1, -1), feats.global_desc, feats.local)
    rows = [("reference global_desc", (feats.global_desc - g).abs().max()),
            ("reference attention", (feats.attention - score).abs().max()),
            ("reference match_prob", (out.match_prob - prob).abs().max())]
    same = all(set(a.tolist()) == set(b.tolist()) for a, b in zip(feats.token_index, index))
    result = [{"check": name, "max_abs_diff": float(v), "ok": bool(v <= 1e-4)} for name, v in rows]
    result.append({"check": "reference local token set", "max_abs_diff": 0.0 if same else float("inf"), "ok": same})
    return result


def agreement(device: str, n_db: int, n_q: int) -> list[dict]:
    """CPU fp32 vs device fp32, and device fp16 vs device fp32 (and bf16 where the device has it)."""
    from precision_equivalence import randomized_deits, scenes
    db_img, q_img = scenes(n_db, n_q, 1)

    def run(dev: str, mode: str) -> dict:
        model = randomized_deits(0).to(dev)
        model.set_precision(mode)
        db = [model.extract(db_img[i:i + 1]) for i in range(n_db)]
        q = [model.extract(q_img[i:i + 1]) for i in range(n_q)]
        dg, dl = torch.cat([f.global_desc for f in db]), torch.cat([f.local for f in db])
        prob = np.stack([model.rerank(f.global_desc[0], f.local[0], dg, dl).match_prob.numpy() for f in q])
        glob = torch.cat([f.global_desc for f in q]).numpy()
        return {"global": glob, "top1": (glob @ dg.numpy().T).argmax(1), "prob": prob}

    runs = {"cpu fp32": run("cpu", "fp32")}
    pairs = []
    if torch.device(device).type == "cuda":
        runs[f"{device} fp32"] = run(device, "fp32")
        runs[f"{device} fp16"] = run(device, "fp16")
        pairs = [(f"{device} fp32", "cpu fp32"), (f"{device} fp16", f"{device} fp32")]
        if torch.cuda.is_bf16_supported():
            runs[f"{device} bf16"] = run(device, "bf16")
            pairs.append((f"{device} bf16", f"{device} fp32"))
    rows = []
    for a, b in pairs:
        ra, rb = runs[a], runs[b]
        rows.append({"compare": f"{a} vs {b}", "min_global_cosine": float(np.sum(ra["global"] * rb["global"], 1).min()),
                     "global_top1_agreement": float(np.mean(ra["top1"] == rb["top1"])),
                     "rerank_top1_agreement": float(np.mean(ra["prob"].argmax(1) == rb["prob"].argmax(1))),
                     "max_prob_diff": float(np.abs(ra["prob"] - rb["prob"]).max())})
    return rows


def timings(device: str, precision: str, k: int, map_size: int, repeats: int) -> dict:
    import faiss

    from r2former_core.mapdb import _faiss_gpu_available
    from r2former_core.model import ModelConfig, build_model
    model = build_model(ModelConfig(), device=device, seed=0, precision=precision)
    dev = model.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def median_ms(fn) -> float:
        fn()
        sync()
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t) * 1000)
        return float(np.median(out))

    image = torch.randn(1, 3, *model.cfg.image_size)
    extract_ms = median_ms(lambda: model.extract(image).local.numpy())
    rng = np.random.default_rng(0)
    g = rng.standard_normal((k + 1, model.cfg.global_dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    loc = rng.random((k, model.cfg.local_tokens, model.cfg.local_values)).astype(np.float16)
    rerank_ms = median_ms(lambda: model.rerank(g[0], loc[0].astype(np.float32), g[1:], loc))
    base = rng.standard_normal((map_size, model.cfg.global_dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(model.cfg.global_dim)
    index.add(base)
    where = "cpu"
    if dev.type == "cuda" and _faiss_gpu_available():
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, dev.index or 0, index)
        where = f"cuda:{dev.index or 0}"
    search_ms = median_ms(lambda: index.search(g[:1], k))
    return {"device": str(dev), "precision": model.precision, "rerank_precision": model.rerank_precision,
            "extract_ms": extract_ms, "rerank_ms": rerank_ms, "search_ms": search_ms, "search_on": where,
            "map_size": map_size, "k": k, "pipeline_hz": 1000.0 / (extract_ms + search_ms + rerank_ms)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    p.add_argument("--official-ref", default=str(ROOT.parent / "shared" / "official_ref"),
                   help="official reference folder for the parity check (default ../shared/official_ref; "
                        "random-weight reference check when it does not exist)")
    p.add_argument("--k", type=int, default=100, help="candidates reranked per query (default 100)")
    p.add_argument("--map-size", type=int, default=100_000, help="descriptors in the search test (default 100000)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (default 5)")
    p.add_argument("--agree-db", type=int, default=12, help="database images of the agreement check (default 12)")
    p.add_argument("--agree-queries", type=int, default=6, help="queries of the agreement check (default 6)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cuda_check.json"), help="JSON report path")
    args = p.parse_args()
    import faiss

    from r2former_core.device import resolve_device
    from r2former_core.errors import DeviceError
    from r2former_core.mapdb import _faiss_gpu_available
    report: dict = {"machine": machine_info(torch.get_num_threads()), "torch": torch.__version__,
                    "cuda_available": torch.cuda.is_available(),
                    "faiss": faiss.__version__, "faiss_gpu": _faiss_gpu_available()}
    try:
        device = str(resolve_device(args.device))
        report["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except DeviceError as e:
        print(f"NO GPU: {e}")
        print("Running the CPU-side checks only (parity in fp32, times on the CPU); nothing here checks CUDA.")
        device = "cpu"
        report["gpu"] = None
    official = Path(args.official_ref)
    print(f"\n== 1. fp32 parity on {device}" + (f" against {official}" if official.is_dir() else
                                                 " against the literal reference (random weights)"))
    report["parity"] = parity(device, official if official.is_dir() else None)
    for r in report["parity"]:
        print(f"  {r['check']:<32} {r['max_abs_diff']:>11.3e}  {'ok' if r['ok'] else 'FAIL'}")
    print(f"\n== 2. precision agreement ({args.agree_queries} queries x {args.agree_db} images, DeiT-S random weights)")
    report["agreement"] = agreement(device, args.agree_db, args.agree_queries) if device != "cpu" else []
    if not report["agreement"]:
        print("  skipped: needs a GPU (CPU vs CUDA fp32, fp16 vs fp32 on CUDA)")
    for r in report["agreement"]:
        print(f"  {r['compare']:<28} cos>={r['min_global_cosine']:.5f}  "
              f"global top-1 {100 * r['global_top1_agreement']:.0f}%  "
              f"rerank top-1 {100 * r['rerank_top1_agreement']:.0f}%  max dprob {r['max_prob_diff']:.2e}")
    print(f"\n== 3. times (what the localizer pays; K={args.k}, map of {args.map_size})")
    modes = ["fp32", "fp16"] if device != "cpu" else ["fp32", "auto"]
    report["timings"] = [timings(device, m, args.k, args.map_size, args.repeats) for m in modes]
    print(f"  {'device':<8} {'precision':<10} {'extract ms':>10} {'search ms':>10} {'rerank ms':>10} {'Hz':>6}")
    for r in report["timings"]:
        print(f"  {r['device']:<8} {r['precision'] + '/' + r['rerank_precision']:<10} {r['extract_ms']:>10.1f} "
              f"{r['search_ms']:>7.2f} {r['search_on'][:3]:<3}{r['rerank_ms']:>9.1f} {r['pipeline_hz']:>6.2f}")
    ok = all(r["ok"] for r in report["parity"])
    report["ok"] = ok
    out = write_report(args.out, report)
    print(f"\n{'PASS' if ok else 'FAIL'}: fp32 parity {'holds' if ok else 'does not hold'} on {device}"
          + ("" if report["gpu"] else " (no GPU on this machine: the CUDA path was not checked)"))
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
