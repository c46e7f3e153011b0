#!/usr/bin/env python3
"""Model speed per precision, as ratios measured in one run: extraction ms/image at 480x640 (batch 1
and 8), reranking ms/query (K=100), the literal reference (test/reference_r2former.py), peak memory.

Every (task, precision) runs in a fresh subprocess, so its peak resident memory (VmHWM) is its own.
Medians over --repeats runs after --warmup runs, of wall-clock time and of process CPU time (user +
system of all threads: on a shared machine CPU time moves much less with other processes' load than
wall-clock time). The 1-minute load average at the start and end of each measurement is recorded.
Each row is compared with the literal reference (reranking) and with fp32 of the same task, both
measured in this run; the CPU model, its flags (AVX2 / AVX-512 / AVX512-BF16 / AMX) and torch's
capability are printed and saved, because the same code differs ~2x between CPU classes.

What is timed is what the localizer pays: images start on the CPU (CUDA runs include the copies to
and from the GPU), reranking takes float16 numpy map features and returns CPU tensors.
Random weights of the released configuration (DeiT-S distilled, 480x640) unless --model is given.

    python bench/model_speed.py --precisions fp32,bf16,int8 --tasks extract_b1,rerank,rerank_reference \\
        [--device auto] [--threads 2] [--repeats 5] [--out bench/results/model_speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import cpu_model, write_report

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


ISA_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "R2FORMER_NATIVE_MARCH",
                 "R2FORMER_NATIVE")


def machine_meta(threads: int) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    from r2former_core.model.precision import cpu_flags, cpu_flags_text
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_flags": cpu_flags_text(), "cpu_flag_values": cpu_flags(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(), "threads": threads,
            "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": os.getloadavg()[0]}
    # Variables that make this machine run as a smaller CPU class (e.g. AVX2 only: torch, oneDNN, MKL and the
    # compiled kernel all limited), recorded so that such a run is never mistaken for the real machine class.
    meta["isa_overrides"] = {k: os.environ[k] for k in ISA_OVERRIDES if k in os.environ}
    # How idle OpenMP threads wait (spinning or sleeping) moves two-thread times a lot: the nodes, `r2former` and
    # this script default to PASSIVE (r2former_core/openmp.py); OMP_WAIT_POLICY=ACTIVE measures spinning.
    meta["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset (spin, then sleep)")
    return meta


def worker(args) -> dict:
    import numpy as np
    import torch
    sys.path.insert(0, str(ROOT))
    from r2former_core.model import ModelConfig, build_model, load_model
    torch.set_num_threads(args.threads)
    precision = "fp32" if args.task == "rerank_reference" else args.precision
    if args.model:
        model = load_model(args.model, device=args.device, precision=precision)
    else:
        model = build_model(ModelConfig(), device=args.device, seed=0, precision=precision)
    dev = model.device
    h, w = model.cfg.image_size
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times, cpu_times = [], []
    base_rss = _peak_rss_mib()
    load_start = os.getloadavg()[0]
    if args.task.startswith("extract"):
        batch = int(args.task.split("_b")[1])
        images = torch.randn(batch, 3, h, w)            # on the CPU, like the localizer's input

        def run():
            feats = model.extract(images)                # copies to and from the device included
            return feats.global_desc.numpy(), feats.local.numpy()
        per = batch
    else:
        k = args.k
        g = torch.nn.functional.normalize(torch.randn(k + 1, model.cfg.global_dim, generator=torch.Generator()
                                                      .manual_seed(0)), dim=-1)
        loc = torch.rand(k + 1, model.cfg.local_tokens, model.cfg.local_values, generator=torch.Generator()
                         .manual_seed(1))
        if args.task == "rerank_reference":
            sys.path.insert(0, str(ROOT / "test"))
            from reference_r2former import reference_rerank
            sd = {kk: v.detach().cpu() for kk, v in model.state_dict().items()}

            def run():
                with torch.no_grad():
                    reference_rerank(sd, model.cfg, g[:1].expand(k, -1), loc[:1].expand(k, -1, -1), g[1:], loc[1:])
        else:
            import contextlib

            from r2former_core.model import native
            c_global, c_local = g[1:].numpy(), loc[1:].numpy().astype(np.float16)   # as the map stores them
            torch_only = args.task == "rerank_torch"

            def run():
                with native.disabled() if torch_only else contextlib.nullcontext():
                    return model.rerank(g[0], loc[0], c_global, c_local)
        per = 1
    for _ in range(args.warmup):
        run()
        sync()
    for _ in range(args.repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        sync()
        times.append((time.perf_counter() - t0) * 1000 / per)
        cpu_times.append((time.process_time() - c0) * 1000 / per)
    from r2former_core.model import native
    kernels = ("torch" if args.task == "rerank_torch" or not native.status().available else "native")
    return {"task": args.task, "precision": model.precision, "kernels": kernels,
            "rerank_precision": model.rerank_precision if args.task.startswith("rerank") else None,
            "requested": precision, "device": str(dev), "threads": args.threads,
            "ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
            "cpu_ms_median": statistics.median(cpu_times), "runs": len(times), "peak_rss_mib": _peak_rss_mib(),
            "rss_before_mib": base_rss, "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0],
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}


def add_ratios(rows: list[dict]) -> None:
    """Speed-up of every row over the literal reference (reranking) and over fp32 of the same task."""
    ref = next((r for r in rows if r["task"] == "rerank_reference"), None)
    fp32 = {r["task"]: r for r in rows if r["requested"] == "fp32" and r["task"] != "rerank_reference"}
    for r in rows:
        base = fp32.get(r["task"])
        for key, suffix in (("ms_median", ""), ("cpu_ms_median", "_cpu")):
            r["x_vs_reference" + suffix] = (ref[key] / r[key] if ref and r["task"].startswith("rerank")
                                            and r["task"] != "rerank_reference" else None)
            r["x_vs_fp32" + suffix] = base[key] / r[key] if base and r["task"] != "rerank_reference" else None


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"CPU: {meta['cpu']} ({meta['cpu_flags']}; torch capability {meta['cpu_capability']}), "
          f"{meta['threads']} threads, torch {meta['torch']}, OMP_WAIT_POLICY {meta['omp_wait_policy']}"
          + (f", GPU {meta['cuda']}" if meta["cuda"] else ""))
    if meta.get("isa_overrides"):
        print("instruction sets limited by: " + " ".join(f"{k}={v}" for k, v in meta["isa_overrides"].items()))

    def x(v):
        return f"{v:.2f}x" if v else "-"
    print(f"{'task':<22} {'precision':<11} {'device':<7} {'ms (median)':>12} {'cpu ms':>9} {'vs reference':>13} "
          f"{'(cpu)':>7} {'vs fp32':>8} {'(cpu)':>7} {'peak MiB':>9} {'load':>5}")
    for r in rows:
        unit = "/img" if r["task"].startswith("extract") else "/q"
        prec = r["precision"] + (f"/{r['rerank_precision']}" if r.get("rerank_precision") not in (None, r["precision"])
                                 else "")
        print(f"{r['task']:<22} {prec:<11} {r['device']:<7} {r['ms_median']:>8.1f}{unit:<4} {r['cpu_ms_median']:>9.1f} "
              f"{x(r['x_vs_reference']):>13} {x(r['x_vs_reference_cpu']):>7} {x(r['x_vs_fp32']):>8} "
              f"{x(r['x_vs_fp32_cpu']):>7} {r['peak_rss_mib']:>9.0f} {r['loadavg_1min_end']:>5.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precisions", default="fp32,auto",
                   help="comma-separated precisions (fp32, bf16, fp16, int8, auto); fp32 is always measured, as "
                        "the base of the ratios (default fp32,auto)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--reference-repeats", type=int, default=1,
                   help="timed runs of the literal reference (~8 GB and 10-40 s per query; default 1)")
    p.add_argument("--k", type=int, default=100, help="candidates per query for reranking (default 100)")
    p.add_argument("--model", default=None, help="weights file (default: random weights, released configuration)")
    p.add_argument("--tasks", default="extract_b1,extract_b8,rerank,rerank_reference",
                   help="comma-separated: extract_bN (batch N), rerank, rerank_torch (the same on torch alone, "
                        "without the compiled kernels of r2former_core/model/native), rerank_reference (the "
                        "literal test reference, official-style, fp32 only) (default "
                        "extract_b1,extract_b8,rerank,rerank_reference)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "model_speed.json"), help="JSON output path")
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "unset"], default=None,
                   help="how torch's idle OpenMP threads wait: passive (sleep), active (spin), unset (OpenMP's "
                        "default: spin, then sleep); default: OMP_WAIT_POLICY from the environment, else passive "
                        "as the nodes and `r2former` run (r2former_core/openmp.py)")
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.task:
        print(json.dumps(worker(args)))
        return 0
    if args.omp_wait_policy == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    elif args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    else:
        sys.path.insert(0, str(ROOT))
        from r2former_core.openmp import prefer_sleeping_waiters
        prefer_sleeping_waiters()      # as the nodes and `r2former` run (the workers inherit it)
    asked = dict.fromkeys(s.strip() for s in args.precisions.split(","))
    precisions = ["fp32"] + [q for q in asked if q and q != "fp32"]
    meta = machine_meta(args.threads)
    rows = []
    renamed = {"rerank_torch_attention": "rerank_torch"}     # its name before the kernels were more than attention
    for task in [renamed.get(t.strip(), t.strip()) for t in args.tasks.split(",") if t.strip()]:
        for prec in (["fp32"] if task == "rerank_reference" else precisions):
            reference = task == "rerank_reference"
            cmd = [sys.executable, __file__, "--task", task, "--precision", prec, "--device", args.device,
                   "--threads", str(args.threads),
                   "--repeats", str(args.reference_repeats if reference else args.repeats),
                   "--warmup", str(0 if reference else args.warmup), "--k", str(args.k)]
            if args.model:
                cmd += ["--model", args.model]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    add_ratios(rows)
    meta["loadavg_end"] = os.getloadavg()[0]
    meta["k"] = args.k
    meta["command"] = " ".join([Path(sys.executable).name, "bench/model_speed.py", *sys.argv[1:]])
    print_table(rows, meta)
    for r in rows:
        base = next((t for t in rows if t["task"] == "rerank_torch" and t["requested"] == r["requested"]),
                    None)
        if r["task"] == "rerank" and base:
            r["x_vs_torch"] = base["ms_median"] / r["ms_median"]
            r["x_vs_torch_cpu"] = base["cpu_ms_median"] / r["cpu_ms_median"]
            print(f"rerank {r['requested']}: kernels {r['kernels']}, "
                  f"{r['x_vs_torch']:.2f}x (cpu {r['x_vs_torch_cpu']:.2f}x) the same reranking on torch alone")
    write_report(args.out, {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
