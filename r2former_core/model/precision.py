"""Numeric precision of extraction and reranking: one setting for the localizer, the CLI, the node,
the benchmarks and the trainer's evaluation passes.

Modes (`options.PRECISIONS`):
  fp32  exact: within 1e-4 of the literal reference and of the official outputs (also on CUDA:
        TF32 is switched off inside the model's calls);
  bf16  bfloat16 autocast for the backbone (about 1.8x faster than fp32 on an AVX512-BF16 CPU);
        the reranker's block stacks run on a bfloat16 copy of their weights on CUDA, and on AMX CPUs
        when the compiled float32 kernels are not available. Otherwise on CPUs the reranker stays float32
        (`rerank_precision`): its time is the fused
        attention over 1001 tokens of head dimension 8, which is no faster in bfloat16 there and
        whose 6-token block-1 attention is twice as slow (docs/BENCHMARKS.md section 1); in float32 on a
        CPU both attentions run on the compiled kernels of `native` (2-3x faster than torch's);
  fp16  float16 autocast on CUDA (what the package did unconditionally on CUDA before);
  int8  dynamic int8 linear layers in the backbone (CPU, fbgemm, VNNI); the reranker runs in fp32;
  auto  the fastest mode this machine accelerates among those that keep the ranking
        (`RANKING_EQUIVALENT`): CUDA -> fp16, CPU with AMX or AVX512-BF16 -> bf16, else fp32.
        bf16 and int8 do not pass the equivalence rule on the held-out set (top-1 agreement with
        fp32 ~90 %, every disagreement a near-tie between adjacent keyframes, R@1 unchanged;
        docs/BENCHMARKS.md section 5), so `auto` is fp32 on every CPU today; fp16 could not be
        measured here (no GPU): `bench/cuda_check.py` measures it on a GPU.

Logits and probabilities are always computed in float32, whatever the mode.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ConfigError
from ..options import PRECISIONS

log = logging.getLogger(__name__)

# Modes that keep the ranking (top-1 agreement with fp32 >= 99 % and R@1 within 0.5 points on the held-out
# synthetic set and on random official-layout weights; docs/BENCHMARKS.md section 5). `auto` picks only from
# these. bf16 and int8 failed the top-1 agreement (near-ties only); fp16 is the CUDA mode the package always
# used, not measurable without a GPU (bench/cuda_check.py reports its agreement; remove it here if it fails).
RANKING_EQUIVALENT = ("fp32", "fp16")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> dict[str, bool]:
    """Which instruction-set extensions that matter for precision this CPU has (torch's own checks,
    else /proc/cpuinfo): avx2, avx512 (F), avx512_bf16, amx (AMX tiles), vnni."""
    checks = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported",
              "vnni": "_is_vnni_supported"}
    flags: dict[str, bool] = {}
    text = ""
    for name, fn in checks.items():
        check = getattr(torch.cpu, fn, None)
        if check is not None:
            try:
                flags[name] = bool(check())
                continue
            except RuntimeError:
                pass
        if not text:
            try:
                text = Path("/proc/cpuinfo").read_text()
            except OSError:
                text = " "
        words = {"avx2": "avx2", "avx512": "avx512f", "avx512_bf16": "avx512_bf16", "amx": "amx_tile",
                 "vnni": "avx512_vnni"}
        flags[name] = f" {words[name]} " in text.replace("\n", " ")
    return flags


def cpu_flags_text() -> str:
    """"AVX2 AVX-512 AVX512-BF16 AMX" style summary of `cpu_flags()` (present flags only)."""
    labels = {"avx2": "AVX2", "avx512": "AVX-512", "avx512_bf16": "AVX512-BF16", "vnni": "VNNI", "amx": "AMX"}
    flags = cpu_flags()
    return " ".join(label for key, label in labels.items() if flags.get(key)) or "none of AVX2/AVX-512/AMX"


def bf16_accelerated(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    flags = cpu_flags()
    return flags["amx"] or flags["avx512_bf16"]


def auto_precision(device: torch.device) -> str:
    """The fastest ranking-equivalent mode `device` accelerates."""
    if device.type == "cuda" and "fp16" in RANKING_EQUIVALENT:
        return "fp16"
    if device.type == "cpu" and bf16_accelerated(device) and "bf16" in RANKING_EQUIVALENT:
        return "bf16"
    return "fp32"


def resolve_precision(name: str, device: torch.device | str) -> str:
    """The concrete mode (fp32, bf16, fp16 or int8) for `name` on `device`; ConfigError when the device
    cannot run it (fp16 on a CPU, int8 on CUDA)."""
    device = torch.device(device)
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return auto_precision(device)
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (CPUs have no fast float16 path): use bf16, int8, "
                          "fp32 or auto")
    if name == "int8" and device.type != "cpu":
        raise ConfigError("precision int8 runs on the CPU only (dynamic int8 linear layers): use fp16, bf16, "
                          "fp32 or auto on CUDA")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16 is not supported by this GPU: use fp16, fp32 or auto")
    if name == "bf16" and device.type == "cpu" and not bf16_accelerated(device):
        log.warning("precision bf16 on a CPU without AVX512-BF16 or AMX is emulated and slower than fp32")
    return name


def rerank_precision(precision: str, device: torch.device) -> str:
    """The mode the reranker runs in for a concrete mode: int8 quantizes only the backbone (reranker fp32);
    bf16 on a CPU keeps the reranker in fp32 unless the CPU has AMX and the compiled float32 kernels are not
    available: without AMX bfloat16 is no faster there (see above); with AMX torch's bfloat16 reranking was
    measured 1.06x its float32 (issue 14, an AMX Xeon), while the kernels make float32 2-3x torch's (docs/
    BENCHMARKS.md section 1.0; not measured on an AMX CPU)."""
    if precision == "int8":
        return "fp32"
    if precision == "bf16" and device.type == "cpu":
        from . import native
        if not cpu_flags()["amx"] or native.status().available:
            return "fp32"
    return precision


def describe(setting: str, precision: str, device: torch.device) -> str:
    """One line for logs and diagnostics: what was asked, what runs where, and the hardware it depends on."""
    where = (f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else f"cpu ({cpu_flags_text()})")
    return (f"precision {setting} -> {precision}: extraction {precision}, reranking "
            f"{rerank_precision(precision, device)} on {where}")


@contextlib.contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """Exact float32: no TF32 in CUDA matmuls and convolutions (restored afterwards)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in for a concrete mode (`resolve_precision`'s result)."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=DTYPES[precision])
    if precision == "fp32":
        return strict_fp32(device)
    return contextlib.nullcontext()   # int8: the quantized layers carry their own arithmetic


__all__ = ["DTYPES", "RANKING_EQUIVALENT", "auto_precision", "autocast", "bf16_accelerated", "cpu_flags",
           "cpu_flags_text", "describe", "rerank_precision", "resolve_precision", "strict_fp32"]
