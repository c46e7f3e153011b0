#!/usr/bin/env python3
"""Map building throughput: one process against `torchrun` with N processes, and whether the maps are equal.

For each model (the packaged demo model at 128 x 160, and the released DeiT-S configuration at
480 x 640 with random weights: speed does not depend on the values), a synthetic drive is rendered
and `r2former build-map` is run as one process (torch threads = --threads) and under
`torchrun --standalone --nproc_per_node=N` (gloo, OMP_NUM_THREADS = threads / N per process), and once
more as one process with threads / N threads (what each rank gets, to separate the gain of sharding
from that of avoiding OpenMP threads on a busy CPU). The
wall time of the whole command (start-up, model load, extraction, merge, commit) and of the
extraction-and-write part alone (from the log: first "extracts keyframes" line to "map written") are
reported, with images per second, and the two maps' data files are compared by sha256 (map.json
`files`).

    python bench/sharded_build.py [--procs 2] [--threads 2] [--demo-frames 400] [--deits-frames 40]
                                  [--work /tmp/r2former_sharded] [--out bench/results/sharded_build.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from benchlib import machine_info, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_STAMP = re.compile(r"^(\d\d:\d\d:\d\d)")


def log_span(stderr: str, start: str, end: str) -> float | None:
    """Seconds between the first log line containing `start` and the last containing `end` (1 s resolution)."""
    def when(pattern: str, last: bool) -> datetime | None:
        lines = [ln for ln in stderr.splitlines() if pattern in ln and _STAMP.match(ln)]
        if not lines:
            return None
        return datetime.strptime(_STAMP.match(lines[-1 if last else 0]).group(1), "%H:%M:%S")
    a, b = when(start, False), when(end, True)
    return None if a is None or b is None else (b - a).total_seconds()


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2, help="processes under torchrun (default 2)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in total (default 2 = this machine)")
    p.add_argument("--demo-frames", type=int, default=400, help="images for the demo model (default 400)")
    p.add_argument("--deits-frames", type=int, default=40, help="images for DeiT-S 480x640 (default 40)")
    p.add_argument("--work", default="/tmp/r2former_sharded", help="scratch folder (deleted at the end)")
    p.add_argument("--out", default=str(ROOT / "bench/results/sharded_build.json"), help="JSON output")
    args = p.parse_args()

    from r2former_core.model import ModelConfig, build_model, save_model
    from r2former_core.synthetic import write_drive
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    deits = save_model(build_model(ModelConfig(), seed=0), work / "deits_random.safetensors")
    models = [("demo 128x160", ROOT / "models/r2former_tiny_demo.safetensors", (128, 160), args.demo_frames),
              ("DeiT-S 480x640", deits, (480, 640), args.deits_frames)]
    base_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for label, model, size, frames in models:
        drive = write_drive(950, work / f"drive_{size[0]}", kind="map", conditions="day", frames=frames, size=size,
                            spacing=2.0)
        common = ["build-map", "--images", str(drive / "images"), "--poses", str(drive / "poses.txt"),
                  "--model", str(model), "--device", "cpu", "--log-level", "INFO"]
        single_env = dict(base_env, OMP_NUM_THREADS=str(args.threads))
        multi_env = dict(base_env, OMP_NUM_THREADS=str(max(1, args.threads // args.procs)))
        load0 = os.getloadavg()[0]
        t1, err1 = run([sys.executable, "-m", "r2former_core.cli.main", *common, "--out", str(work / "single")],
                       single_env)
        t1n, _ = run([sys.executable, "-m", "r2former_core.cli.main", *common, "--out", str(work / "single_n")],
                     multi_env)
        tn, errn = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.procs}", "-m", "r2former_core.cli.main", *common, "--out",
                        str(work / "sharded")], multi_env)
        f1 = json.loads((work / "single" / "map.json").read_text())["files"]
        fn = json.loads((work / "sharded" / "map.json").read_text())["files"]
        x1 = log_span(err1, "building map", "map written")
        xn = log_span(errn, "extracts keyframes", "map written")
        row = {"model": label, "images": frames, "single_s": round(t1, 1), "sharded_s": round(tn, 1),
               "single_images_per_s": round(frames / t1, 2), "sharded_images_per_s": round(frames / tn, 2),
               "speedup": round(t1 / tn, 2), "single_extract_write_s": x1, "sharded_extract_write_s": xn,
               "single_rank_threads_s": round(t1n, 1), "speedup_vs_single_rank_threads": round(t1n / tn, 2),
               "identical_files": f1 == fn, "loadavg_1min_start": load0, "loadavg_1min_end": os.getloadavg()[0]}
        rows.append(row)
        print(f"{label:<16} {frames:>5} images: 1 process {t1:7.1f} s ({frames / t1:6.2f} img/s; with "
              f"{max(1, args.threads // args.procs)} thread(s) {t1n:.1f} s), "
              f"{args.procs} processes {tn:7.1f} s ({frames / tn:6.2f} img/s), x{t1 / tn:.2f}; "
              f"extract+write {x1} s vs {xn} s; identical map files: {f1 == fn}", flush=True)
        for name in ("single", "single_n", "sharded"):
            shutil.rmtree(work / name)
    shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "sharded_build", "procs": args.procs, "threads_total": args.threads,
              "machine": machine_info(args.threads),
              "notes": ["wall time of the whole command, including Python start-up and model load in every process",
                        "extract_write_s: from the log (1 s resolution), extraction of the keyframes to the map "
                        "written",
                        "the CPUs are shared with other work: see loadavg"],
              "results": rows}
    write_report(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
