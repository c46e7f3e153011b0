"""What every benchmark under bench/ records and how it writes its results.

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
