#!/usr/bin/env python3
"""Model speed: extraction ms/image at 480x640 (batch 1 and 8), reranking ms/query (K=100), peak memory.

Each measurement runs in a fresh subprocess so that its peak resident memory (VmHWM) is its own.
Medians over --repeats runs after --warmup runs; the 1-minute load average at the start and end of
each measurement is recorded (on a shared 2-core machine a load above ~0.5 means another process
competed for the cores). Random weights of the released configuration
(DeiT-S distilled, 480x640) unless --model is given. Prints a table and writes JSON.

    python bench/model_speed.py [--device auto] [--threads 2] [--repeats 5] [--out bench/results/model_speed.json]
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

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_model() -> str:
    """The CPU's model name (what makes numbers from different hosts comparable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def worker(args) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    from r2former_core.model import ModelConfig, build_model, load_model
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device) if args.model else build_model(ModelConfig(), device=args.device,
                                                                                       seed=0)
    dev = model.device
    h, w = model.cfg.image_size
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    base_rss = _peak_rss_mib()
    load_start = os.getloadavg()[0]
    if args.task.startswith("extract"):
        batch = int(args.task.split("_b")[1])
        images = torch.randn(batch, 3, h, w, device=dev)
        run = lambda: model.extract(images)  # noqa: E731
        per = batch
    else:
        k = args.k
        g = torch.nn.functional.normalize(torch.randn(k + 1, model.cfg.global_dim), dim=-1)
        loc = torch.rand(k + 1, model.cfg.num_local, model.cfg.local_values)
        if args.task == "rerank_reference":
            sys.path.insert(0, str(ROOT / "test"))
            from reference_r2former import reference_rerank
            sd = {kk: v.detach().cpu() for kk, v in model.state_dict().items()}

            def run():
                with torch.no_grad():
                    reference_rerank(sd, model.cfg, g[:1].expand(k, -1), loc[:1].expand(k, -1, -1), g[1:], loc[1:])
        else:
            run = lambda: model.rerank(g[0], loc[0], g[1:], loc[1:])  # noqa: E731
        per = 1
    for _ in range(args.warmup):
        run()
        sync()
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - t0) * 1000 / per)
    return {"task": args.task, "device": str(dev), "threads": args.threads, "ms_median": statistics.median(times),
            "ms_min": min(times), "ms_max": max(times), "runs": len(times), "peak_rss_mib": _peak_rss_mib(),
            "rss_before_mib": base_rss, "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0],
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--k", type=int, default=100, help="candidates per query for reranking (default 100)")
    p.add_argument("--model", default=None, help="weights file (default: random weights, released configuration)")
    p.add_argument("--tasks", default="extract_b1,extract_b8,rerank",
                   help="comma-separated: extract_b1, extract_b8, rerank, rerank_reference (the literal test "
                        "reference, official-style: needs ~8 GB and ~30 s per query)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "model_speed.json"), help="JSON output path")
    p.add_argument("--task", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.task:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for task in args.tasks.split(","):
        cmd = [sys.executable, __file__, "--task", task, "--device", args.device, "--threads", str(args.threads),
               "--repeats", str(args.repeats if task != "rerank_reference" else 1), "--warmup",
               str(args.warmup if task != "rerank_reference" else 0), "--k", str(args.k)]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'task':<18} {'device':<7} {'ms (median)':>12} {'min':>9} {'max':>9} {'peak RSS MiB':>13} {'load':>5}")
    for r in rows:
        unit = "/image" if r["task"].startswith("extract") else "/query"
        print(f"{r['task']:<18} {r['device']:<7} {r['ms_median']:>9.1f}{unit:<3} {r['ms_min']:>9.1f} {r['ms_max']:>9.1f} "
              f"{r['peak_rss_mib']:>13.0f} {r['loadavg_1min_end']:>5.1f}")
    import torch
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "k": args.k, "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
