"""Compiled kernels for the reranker (CPU, float32, inference), built on first use.

The reranker's time on a CPU is attention with heads of dimension 8: block 2 (4 heads over ~1001 tokens
per pair), where torch's fused kernel spends its time in the softmax rather than the two small matrix
products, and block 1 (thousands of 6-token sequences), where its per-sequence overhead dominates; around it,
operations on width-32 tokens that torch runs at a per-row rather than per-value speed. The C files beside
this one, compiled into one library:
- `attention.c`: one attention kernel for each shape: long sequences fuse scores, softmax (as powers of two)
  and the weighted sum per query row (3-4x faster per score than torch's on an AVX-512 CPU); short ones (at
  most 16 tokens) run 16 sequences at once in vector lanes (4-6x faster);
- `topk.c`: both top-P selections of the token correlations (each query token's best reference tokens and
  each reference token's best query tokens) in one pass, equal to torch.topk's;
- `layer_norm.c`: layer norm of short rows (3-4x torch's per call);
- `pair_tokens.c`: block 1's input (class token and pair embeddings) in one pass instead of gathers, adds
  and concatenations.
`parallel.h` (threads) and `vectors.h` (vector types as wide as the CPU's registers) are shared.
docs/BENCHMARKS.md section 1.0 has the figures.

How it is built: the first time a process needs it, the C files are compiled with the system's C compiler
(`cc`, or `$CC`) for this CPU (`-O3 -march=native`; `$R2FORMER_NATIVE_MARCH` replaces `native`, e.g.
`x86-64-v3` for a build any AVX2 machine runs) into a per-user cache (`$R2FORMER_CACHE`, else
`$XDG_CACHE_HOME/r2former`, else `~/.cache/r2former`; a temporary folder when that cannot be written; a
folder or library that other users can write is never used),
keyed by the source, the compiler, its flags and the CPU's instruction sets, so later processes load it in
milliseconds and a home directory shared between machines keeps one build per CPU type. The library is
written to a temporary name and renamed into place (two processes compiling at once do not collide). After
loading, its output is compared with torch's on small random inputs; a library that disagrees is not used.

Fallback: without a compiler, when compiling fails, or with `R2FORMER_NATIVE=0` in the environment,
everything runs on torch (the same results within float32 rounding, slower); the reason is
logged once and `status()` reports it (start-up log line of the localizer and `r2former` commands).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..pairs import pair_embeddings

log = logging.getLogger(__name__)

FOLDER = Path(__file__).parent
# compiled into one library
SOURCES = tuple(FOLDER / name for name in ("attention.c", "topk.c", "layer_norm.c", "pair_tokens.c"))
HEADERS = (FOLDER / "parallel.h", FOLDER / "vectors.h")
HEAD_DIM = 8
MAX_SHORT = 16          # sequences up to this many tokens go to the short-sequence kernel
MAX_PARTNERS = 64       # largest P of mutual_topk (topk.c's MAX_P)
FLAGS = ("-O3", "-fopenmp-simd", "-fPIC", "-shared", "-fno-strict-aliasing")
MARCH_ENV = "R2FORMER_NATIVE_MARCH"     # -march= value, default native (e.g. x86-64-v3 for any AVX2 machine)
COMPILE_TIMEOUT_S = 120.0
DISABLE_ENV = "R2FORMER_NATIVE"


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    detail: str          # the library's path, or why the torch kernel is used


_lock = threading.Lock()
_status: KernelStatus | None = None
_long = None
_short = None
_topk = None
_norm = None
_pairs = None


def cache_dir() -> Path:
    """Where compiled kernels are kept: $R2FORMER_CACHE, else $XDG_CACHE_HOME/r2former, else ~/.cache/r2former."""
    root = os.environ.get("R2FORMER_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "r2former"


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.machine() + platform.processor()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU implementer", "CPU part") and key not in fields:
            fields[key] = value.strip()
    return repr(sorted(fields.items()))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _flags() -> list[str]:
    return [*FLAGS, f"-march={os.environ.get(MARCH_ENV, '').strip() or 'native'}"]


def _private(path: Path) -> bool:
    """`path` belongs to this user and no one else can write it: a library loaded from it runs as this user,
    so a folder others can write (e.g. a /tmp path someone created first) is never used."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(compiler: str, rebuild: bool = False) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, compiler, version, *_flags(), _cpu_signature()])
                         .encode()).hexdigest()[:16]
    name = f"reranker_kernels-{key}.so"
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"r2former-{os.getuid()}"):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            usable = _private(folder) and os.access(folder, os.W_OK)
        except OSError:
            usable = False
        if usable:
            break
        log.warning("cache folder %s is not a folder only this user can write: the reranker's kernels are not "
                    "loaded from or written to it", folder)
    else:
        raise RuntimeError("no cache folder only this user can write (set R2FORMER_CACHE to one)")
    target = folder / name
    if target.exists() and not rebuild:
        if _private(target):
            return target
        log.warning("%s can be written by other users: compiling it again", target)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_flags(), "-o", tmp, *map(str, SOURCES), "-lpthread"],
                                capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({result.returncode}): {result.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled the reranker's kernels: %s", target)
    return target


def _self_check(long_kernel, short_kernel, topk_kernel, norm_kernel) -> float:
    """Largest difference to torch's fused attention on small random inputs (odd sizes: vector tails and
    idle lanes), through both kernels, full and class-row-only, and to torch's layer norm; infinite if the top-P
    selection differs from torch.topk's."""
    g = torch.Generator().manual_seed(0)
    h, c = 4, 4 * HEAD_DIM
    worst = 0.0
    for b, n in ((3, 37), (21, 6)):
        qkv = torch.randn(b, n, 3 * c, generator=g) * 2
        expected = _torch_attention(qkv, h)
        got = torch.empty(b, n, c)
        if n > MAX_SHORT:
            rc = _call_long(long_kernel, qkv, got, h, 2)
        else:
            rc = _call_short(short_kernel, qkv[..., :c], qkv[..., c:], got, h, 2)
        if rc != 0:
            raise RuntimeError(f"the kernel returned error {rc} on the self-check")
        worst = max(worst, float((got - expected).abs().max()))
    corr = torch.randn(3, 37, 41, generator=g)
    got_topk, rc = _call_topk(topk_kernel, corr, 5, 2)
    if rc != 0:
        raise RuntimeError(f"the top-P kernel returned error {rc} on the self-check")
    if not all(torch.equal(a, b) for a, b in zip(got_topk, _torch_topk(corr, 5))):
        worst = float("inf")
    x = torch.randn(301, 32, generator=g) * 3 + 1
    weight, bias = torch.randn(32, generator=g), torch.randn(32, generator=g)
    got = torch.empty_like(x)
    if _call_norm(norm_kernel, x, weight, bias, 1e-6, got, 2) != 0:
        raise RuntimeError("the layer norm kernel failed on the self-check")
    return max(worst, float((got - F.layer_norm(x, (32,), weight, bias, 1e-6)).abs().max()))


def _call_long(kernel, qkv: torch.Tensor, out: torch.Tensor, heads: int, threads: int) -> int:
    """qkv (B, N, 3C) contiguous -> out (B, N, C)."""
    return kernel(qkv.data_ptr(), out.data_ptr(), qkv.shape[0], qkv.shape[1], heads, HEAD_DIM ** -0.5, threads)


def _call_short(kernel, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, heads: int, threads: int) -> int:
    """q (B, rows, C) and kv (B, n, 2C) may be views with any batch/token strides and a unit channel stride."""
    c = heads * HEAD_DIM
    size = kv.element_size()
    return kernel(q.data_ptr(), q.stride(0), q.stride(1), kv.data_ptr(), kv.data_ptr() + c * size * kv.stride(2),
                  kv.stride(0), kv.stride(1), out.data_ptr(), q.shape[0], kv.shape[1], q.shape[1], heads,
                  HEAD_DIM ** -0.5, threads)


def _call_topk(kernel, corr: torch.Tensor, p: int, threads: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """corr (B, N, M) contiguous -> (row values, row indices (B, N, P), column values, column indices (B, M, P))."""
    b, n, m = corr.shape
    out = (torch.empty(b, n, p), torch.empty(b, n, p, dtype=torch.int64), torch.empty(b, m, p),
           torch.empty(b, m, p, dtype=torch.int64))
    rc = kernel(corr.data_ptr(), b, n, m, p, *(t.data_ptr() for t in out), threads)
    return out, rc


def _call_norm(kernel, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out: torch.Tensor,
               threads: int) -> int:
    """x (rows, D) contiguous -> out (rows, D)."""
    return kernel(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], weight.data_ptr(), bias.data_ptr(), eps,
                  out.data_ptr(), threads)


def _call_pairs(kernel, a_q: torch.Tensor, b_r: torch.Tensor, val_q: torch.Tensor, idx_q: torch.Tensor,
                val_r: torch.Tensor, idx_r: torch.Tensor, w_c: torch.Tensor, bias: torch.Tensor, cls: torch.Tensor,
                threads: int) -> tuple[torch.Tensor, int]:
    """a_q (1 or B, N, D), b_r (B, M, D), val/idx_q (B, N, P), val/idx_r (B, M, P), all contiguous; w_c, bias, cls
    (D,) -> (B, N + M, 1 + P, D)."""
    b, m, d = b_r.shape
    n, p = a_q.shape[1], idx_q.shape[2]
    out = torch.empty(b, n + m, 1 + p, d)
    rc = kernel(a_q.data_ptr(), 0 if a_q.shape[0] == 1 else n * d, b_r.data_ptr(), val_q.data_ptr(), idx_q.data_ptr(),
                val_r.data_ptr(), idx_r.data_ptr(), w_c.data_ptr(), bias.data_ptr(), cls.data_ptr(), out.data_ptr(),
                b, n, m, p, d, threads)
    return out, rc


def _self_check_pairs(kernel) -> float:
    """Largest difference to the reranker's torch form (`pairs.pair_embeddings` after the class token) on small
    random inputs; infinite if an index out of range is not refused."""
    g = torch.Generator().manual_seed(1)
    b, n, m, p, d = 3, 11, 13, 5, 32
    a_q, b_r = torch.randn(1, n, d, generator=g), torch.randn(b, m, d, generator=g)
    val_q, val_r = torch.randn(b, n, p, generator=g), torch.randn(b, m, p, generator=g)
    idx_q, idx_r = torch.randint(0, m, (b, n, p), generator=g), torch.randint(0, n, (b, m, p), generator=g)
    w_c, bias, cls = (torch.randn(d, generator=g) for _ in range(3))
    got, rc = _call_pairs(kernel, a_q, b_r, val_q, idx_q, val_r, idx_r, w_c, bias, cls, 2)
    if rc != 0:
        raise RuntimeError(f"the pair-token kernel returned error {rc} on the self-check")
    idx_r[1, 2, 3] = n                                   # out of range: refused, nothing read
    if _call_pairs(kernel, a_q, b_r, val_q, idx_q, val_r, idx_r, w_c, bias, cls, 2)[1] == 0:
        return float("inf")
    idx_r[1, 2, 3] = 0
    emb = pair_embeddings(a_q, b_r, val_q, idx_q, val_r, idx_r, w_c, bias)
    expected = torch.cat([cls.expand(*emb.shape[:2], 1, -1), emb], dim=2)
    return float((got - expected).abs().max())


def _torch_topk(corr: torch.Tensor, p: int) -> tuple[torch.Tensor, ...]:
    val_q, idx_q = corr.topk(p, dim=2)
    val_r, idx_r = corr.topk(p, dim=1)
    return val_q, idx_q, val_r.transpose(1, 2), idx_r.transpose(1, 2)


def _torch_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)


def _load() -> KernelStatus:
    global _long, _short, _topk, _norm, _pairs
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        return KernelStatus(False, f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}")
    compiler = _compiler()
    if compiler is None:
        return KernelStatus(False, "no C compiler found (cc, gcc or clang; or set CC): install one (e.g. "
                                   "build-essential) for 2x faster reranking on a CPU")
    try:
        path = _build(compiler)
        try:
            library = ctypes.CDLL(str(path))
        except OSError as e:          # a damaged cache file (e.g. a disk that filled up): build it again
            log.warning("cannot load %s (%s): compiling it again", path, e)
            library = ctypes.CDLL(str(_build(compiler, rebuild=True)))
        pointer, long_, int_, float_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
        long_kernel = library.r2f_attention_hd8
        long_kernel.argtypes = [pointer, pointer, long_, long_, int_, float_, int_]
        long_kernel.restype = int_
        short_kernel = library.r2f_attention_small_hd8
        short_kernel.argtypes = [pointer, long_, long_, pointer, pointer, long_, long_, pointer, long_, int_, int_,
                                 int_, float_, int_]
        short_kernel.restype = int_
        topk_kernel = library.r2f_mutual_topk
        topk_kernel.argtypes = [pointer, long_, long_, long_, int_, pointer, pointer, pointer, pointer, int_]
        topk_kernel.restype = int_
        norm_kernel = library.r2f_layer_norm
        norm_kernel.argtypes = [pointer, long_, int_, pointer, pointer, float_, pointer, int_]
        norm_kernel.restype = int_
        pairs_kernel = library.r2f_pair_tokens
        pairs_kernel.argtypes = [pointer, long_, *[pointer] * 9, long_, long_, long_, int_, int_, int_]
        pairs_kernel.restype = int_
        error = _self_check(long_kernel, short_kernel, topk_kernel, norm_kernel)
        error = max(error, _self_check_pairs(pairs_kernel))
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        return KernelStatus(False, f"could not build or load the kernel: {e}")
    if not error < 1e-5:
        return KernelStatus(False, f"{path} disagrees with torch by {error:.2e} on the self-check: not used")
    _long, _short, _topk, _norm, _pairs = long_kernel, short_kernel, topk_kernel, norm_kernel, pairs_kernel
    return KernelStatus(True, str(path))


_enabled = True


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside, the reranker runs on torch alone in this process (benchmarks and tests compare both)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def status() -> KernelStatus:
    """Whether the compiled kernel is used in this process (builds or loads it on the first call)."""
    global _status
    with _lock:
        if _status is None:
            _status = _load()
            if not _status.available:
                log.warning("reranker attention runs on torch's kernel: %s", _status.detail)
        return _status


def describe() -> str:
    """For start-up logs: whether the reranker runs on the compiled kernels or on torch alone."""
    s = status()
    return "reranker kernels: compiled (native)" if s.available else "reranker kernels: torch"


def _cpu_inference(x: torch.Tensor) -> bool:
    """What every kernel needs: a float32 CPU tensor outside autograd and autocast, the kernels enabled and built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and _enabled and status().available)


def applies(x: torch.Tensor, heads: int, width: int) -> bool:
    """The kernels compute this call: CPU float32 inference on (B, N, width) with heads of dimension 8."""
    return (x.dim() == 3 and x.shape[2] == width * heads * HEAD_DIM and x.stride(2) == 1 and _cpu_inference(x))


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError(f"a reranker kernel failed with error {rc} ({os.strerror(rc)})")


def attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention of the (B, N, 3C) projection `qkv` (q, k, v each C = heads x 8 wide, in that order)
    -> (B, N, C), heads side by side, scale 1/sqrt(8): what `F.scaled_dot_product_attention` gives after the
    usual split into heads, permute and merge. Call only where `applies(qkv, heads, 3)`."""
    qkv = qkv.contiguous()
    b, n, _ = qkv.shape
    c = heads * HEAD_DIM
    out = torch.empty(b, n, c, dtype=torch.float32)
    if n <= MAX_SHORT:
        _check(_call_short(_short, qkv[..., :c], qkv[..., c:], out, heads, torch.get_num_threads()))
    else:
        _check(_call_long(_long, qkv, out, heads, torch.get_num_threads()))
    return out


def attention_rows(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of the first rows only: q (B, rows, C) against kv (B, N, 2C) (keys then values) -> (B, rows, C).
    Short sequences only (N <= MAX_SHORT); call only where `applies(kv, heads, 2)` and `applies(q, heads, 1)`."""
    b, rows, c = q.shape
    if kv.shape[1] > MAX_SHORT:
        raise ValueError(f"attention_rows takes at most {MAX_SHORT} tokens, got {kv.shape[1]}")
    out = torch.empty(b, rows, c, dtype=torch.float32)
    _check(_call_short(_short, q, kv, out, heads, torch.get_num_threads()))
    return out


def mutual_topk(corr: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The P largest correlations of every row and of every column of each (N, M) pair, in descending order with
    their int64 indices: `corr.topk(p, dim=2)` and `corr.topk(p, dim=1)` (the latter transposed to (B, M, P)),
    in one pass. Equal values keep the lower index first (torch leaves their order unspecified); NaN ranks
    first, as in torch. Call only where `topk_applies(corr, p)`."""
    out, rc = _call_topk(_topk, corr.contiguous(), p, torch.get_num_threads())
    _check(rc)
    return out  # type: ignore[return-value]


def topk_applies(corr: torch.Tensor, p: int) -> bool:
    """`mutual_topk` computes this call: CPU float32 inference on (B, N, M) with N and M at least P."""
    return (corr.dim() == 3 and 1 <= p <= MAX_PARTNERS and min(corr.shape[1], corr.shape[2]) >= p
            and _cpu_inference(corr))


def norm_applies(x: torch.Tensor, norm: torch.nn.LayerNorm) -> bool:
    """`layer_norm` computes this call: CPU float32 inference, a last dimension of 16 to 256 values in steps of 16
    (every vector width divides it), with the affine weight and bias."""
    d = x.shape[-1] if x.dim() else 0
    return (16 <= d <= 256 and d % 16 == 0 and tuple(norm.normalized_shape) == (d,)
            and norm.weight is not None and norm.bias is not None and norm.weight.dtype == torch.float32
            and _cpu_inference(x))


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """`norm(x)` over the last dimension (mean, then the mean squared deviation, as torch): 3-4x faster than
    torch's kernel for the reranker's width-32 tokens. Call only where `norm_applies(x, norm)`."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _check(_call_norm(_norm, x, norm.weight, norm.bias, norm.eps, out, torch.get_num_threads()))
    return out


def pair_tokens(a_q: torch.Tensor, b_r: torch.Tensor, val_q: torch.Tensor, idx_q: torch.Tensor, val_r: torch.Tensor,
                idx_r: torch.Tensor, w_c: torch.Tensor, bias: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """The reranker's block-1 input in one pass: for each of B pairs, every query token (then every reference token)
    becomes the class token `cls` followed by its P pair embeddings own + partner + value * w_c + bias (`a_q`
    (1 or B, N, D) the query tokens' terms, `b_r` (B, M, D) the reference tokens', partners by `idx_q` (B, N, P)
    into b_r and `idx_r` (B, M, P) into a_q) -> (B, N + M, 1 + P, D). Call only where `pairs_apply(b_r)`."""
    out, rc = _call_pairs(_pairs, a_q.contiguous(), b_r.contiguous(), val_q.contiguous(), idx_q.contiguous(),
                          val_r.contiguous(), idx_r.contiguous(), w_c.contiguous(), bias.contiguous(),
                          cls.reshape(-1).contiguous(), torch.get_num_threads())
    if rc == errno.EINVAL:
        raise ValueError("pair_tokens: an index out of range or sizes the kernel does not take")
    _check(rc)
    return out


def pairs_apply(b_r: torch.Tensor) -> bool:
    """`pair_tokens` computes this call: CPU float32 inference with a token width of 16 to 256 in steps of 16."""
    d = b_r.shape[-1] if b_r.dim() == 3 else 0
    return 16 <= d <= 256 and d % 16 == 0 and _cpu_inference(b_r)
