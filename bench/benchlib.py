"""What every benchmark under bench/ records and how it writes its results, and the synthetic worlds they share.

Speed figures are only compared inside one run and one machine class (docs/BENCHMARKS.md), so every result
file names the machine the same way: the CPU model, the instruction-set extensions that decide the fast paths
(AVX2, AVX-512, AVX512-BF16, VNNI, AMX), torch's CPU capability when torch is loaded, the cores, the threads
the run used and the load average (the machines here are shared). Results are written atomically, so an
interrupted run never leaves half a JSON file in bench/results/.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

# /proc/cpuinfo flag -> the name the docs use
CPU_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "avx512_vnni": "VNNI",
             "amx_tile": "AMX"}


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 9R14" (platform.processor() where /proc/cpuinfo is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The extensions of CPU_FLAGS this CPU has, by their docs names ("AVX2", "AVX-512", ...)."""
    try:
        words: set[str] = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                words = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return []
    return [label for flag, label in CPU_FLAGS.items() if flag in words]


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """The machine of this run (see the module docstring); torch fields only when torch is imported."""
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_flags": " ".join(cpu_flags()) or "none of AVX2/AVX-512/AMX",
        "cores": os.cpu_count(), "threads": threads, "host": socket.gethostname(), "platform": platform.platform(),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg_1min": os.getloadavg()[0]}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        info["faiss"] = faiss.__version__
    return info


def describe(info: dict[str, Any]) -> str:
    """One line for the printed table: "AMD EPYC 9R14 (AVX2 AVX-512 ...), 2 cores, 1 thread, load 3.2"."""
    threads = info.get("threads")
    return (f"{info['cpu']} ({info['cpu_flags']}), {info['cores']} cores"
            + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
            + f", load {info['loadavg_1min']:.1f}")


def write_report(path: str | os.PathLike, report: dict[str, Any], indent: int = 1) -> Path:
    """Write `report` as JSON to `path` atomically (a temporary file renamed into place) and say so."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report, indent=indent, default=str) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}")
    return out



def pool_summaries(summaries: list[dict], keys: tuple[str, ...]) -> dict:
    """Figures of several sequence runs (SequenceResult summaries) over all their frames: each of `keys` that
    every summary has, weighted by its frames, and `calibration` (the share of published poses inside their
    95 % ellipse) weighted by its published poses."""
    frames = sum(s["frames"] for s in summaries)
    published = sum(s["published"] * s["frames"] for s in summaries)
    inside = sum((s["calibration"] or 0.0) * s["published"] * s["frames"] for s in summaries)
    out: dict = {"frames": frames}
    for key in keys:
        if all(key in s for s in summaries):
            out[key] = sum(s[key] * s["frames"] for s in summaries) / frames
    out["calibration"] = inside / published if published else None
    return out

# ------------------------------------------------------------------ synthetic worlds (rendered once, reused)

def rendered_drive(path: str | os.PathLike, seed: int, kind: str, conditions: str, frames: int,
                   size: tuple[int, int], spacing: float | None = None) -> Path:
    """The synthetic drive at `path` (images/, poses.txt), rendered on first use and reused after; `conditions`
    joined by "," or "+" ("night+fog"), `spacing` in metres (None: the drive's own)."""
    from r2former_core.synthetic import write_drive
    out = Path(path)
    if not (out / "poses.txt").is_file():
        write_drive(seed, out, kind=kind, conditions=conditions.replace("+", ","), frames=frames, size=size,
                    spacing=spacing)
    return out


def tracking_drive(work: Path, seed: int, kind: str, conditions: str, frames: int, size: tuple[int, int],
                   spacing: float | None = None) -> Path:
    """`rendered_drive` under the names the tracking benches share (tracking_eval, tracking_filters):
    work/{kind}_{seed}_{conditions}_{frames}[_{spacing}m]_{H}x{W}."""
    gap = "" if spacing is None else f"_{spacing:g}m"
    return rendered_drive(work / f"{kind}_{seed}_{conditions}_{frames}{gap}_{size[0]}x{size[1]}", seed, kind,
                          conditions, frames, size, spacing)


def drive_source(path: str | os.PathLike):
    """The frames of a rendered drive (r2former_core.data.sources), in stamp order."""
    from r2former_core.data.sources import open_source
    return open_source(images=str(Path(path) / "images"), poses=str(Path(path) / "poses.txt"))


def built_map(model, path: str | os.PathLike, drive: str | os.PathLike, **build_kwargs):
    """The map at `path` when it was built with `model` (same fingerprint), else built from the rendered drive
    `drive` (replacing whatever was there); `build_kwargs` go to r2former_core.mapping.build_map."""
    from r2former_core.mapdb import MapDatabase, MapError
    from r2former_core.mapping import build_map
    try:
        return MapDatabase.load(path, expected_fingerprint=model.fingerprint)
    except MapError:
        return build_map(drive_source(drive), model, path, overwrite=True, progress=False, **build_kwargs)


def odometry_in_play_order(truth, order, seed: int):
    """Noisy wheel odometry (r2former_core.odometry, seeded) of a drive with poses `truth`, chained in play
    `order`; a jump in the order (a kidnap: the robot is carried) is a zero increment. (n, 7) poses."""
    import numpy as np

    from r2former_core.odometry import chain_increments, planar_increments, simulate_odometry
    inc = planar_increments(simulate_odometry(truth, seed))
    steps = [inc[a] if b == a + 1 else np.zeros(3) for a, b in zip(order[:-1], order[1:])]
    return chain_increments(np.array(steps).reshape(-1, 3))
