"""The compiled kernels of the reranker (r2former_core/model/native): built on this machine, attention equal to
torch's within float32 rounding for both shapes, the mutual top-P selection equal to torch.topk, independent of
the thread count, used by the reranker, and a clean fallback when disabled or when the cached library is
damaged."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from r2former_core.model import native

REPO = Path(__file__).resolve().parents[1]


def _reference(qkv: torch.Tensor, heads: int, rows: int | None = None) -> torch.Tensor:
    b, n, _ = qkv.shape
    q, k, v = qkv.double().reshape(b, n, 3, heads, 8).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
    return out[:, :rows].float() if rows else out.float()


def test_kernel_is_built_here_or_says_why():
    status = native.status()
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is not None and os.environ.get(native.DISABLE_ENV, "1") not in ("0", "off", "false", "no"):
        assert status.available, status.detail
        fallback = Path(tempfile.gettempdir()) / f"r2former-{os.getuid()}"      # when the cache cannot be written
        assert Path(status.detail).is_file() and Path(status.detail).parent in (native.cache_dir(), fallback)
    else:
        assert not status.available and ("compiler" in status.detail or native.DISABLE_ENV in status.detail)


@pytest.mark.parametrize("batch,n,heads", [(1, 17, 4), (3, 1001, 4), (2, 255, 2), (2, 257, 1), (1, 40, 8)])
def test_long_sequences_equal_torch(batch, n, heads):
    assert native.status().available
    g = torch.Generator().manual_seed(n)
    qkv = torch.randn(batch, n, 3 * heads * 8, generator=g) * 3        # large logits: a peaked softmax too
    with torch.no_grad():
        assert native.applies(qkv, heads, 3)
        got = native.attention(qkv, heads)
    assert got.shape == (batch, n, heads * 8)
    # Scores up to ~60 here: their float32 rounding alone moves the output by ~2e-5 (torch's own fused kernel is
    # 1.6-2.4e-5 off the float64 result on such inputs).
    torch.testing.assert_close(got, _reference(qkv, heads), atol=4e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,n", [(1, 2), (15, 6), (16, 6), (33, 6), (40, 16), (17, 9)])
def test_short_sequences_equal_torch_full_and_first_row(batch, n):
    heads, c = 4, 32
    g = torch.Generator().manual_seed(batch * 100 + n)
    qkv = torch.randn(batch, n, 3 * c, generator=g) * 3
    with torch.no_grad():
        full = native.attention(qkv, heads)
        first = native.attention_rows(qkv[:, :1, :c], qkv[..., c:], heads)   # strided views, as forward_rows
    torch.testing.assert_close(full, _reference(qkv, heads), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(first, _reference(qkv, heads, rows=1), atol=2e-5, rtol=1e-5)


def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(1)
    long_qkv, short_qkv = torch.randn(5, 300, 96, generator=g), torch.randn(100, 6, 96, generator=g)
    previous = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append((native.attention(long_qkv, 4), native.attention(short_qkv, 4)))
    finally:
        torch.set_num_threads(previous)
    for long_out, short_out in outs[1:]:
        assert torch.equal(long_out, outs[0][0]) and torch.equal(short_out, outs[0][1])


def test_not_applied_where_it_does_not_compute():
    qkv = torch.randn(2, 40, 96)
    assert not native.applies(qkv, 4, 3)                            # autograd on: training stays on torch
    with torch.no_grad():
        assert native.applies(qkv, 4, 3)
        assert not native.applies(qkv.double(), 4, 3)
        assert not native.applies(torch.randn(2, 40, 192), 4, 3)     # heads of 16
        with native.disabled():
            assert not native.applies(qkv, 4, 3)
        with pytest.raises(ValueError, match="at most 16 tokens"):
            native.attention_rows(qkv[:, :1, :32], qkv[..., 32:], 4)


def test_reranker_scores_equal_with_and_without_the_kernel(tiny_config):
    """The whole reranker (top-P selection, blocks 1 and 2) through the kernels and through torch: the same
    scores."""
    import dataclasses

    from r2former_core.model import build_model
    cfg = dataclasses.replace(tiny_config, rerank_dim=32, rerank_heads=4)      # heads of 8, as released
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(3)
    n, k = cfg.num_local, 7
    q_local = torch.rand(n, cfg.local_values, generator=g)
    c_local = torch.rand(k, n, cfg.local_values, generator=g)
    q_global, c_global = torch.randn(cfg.global_dim, generator=g), torch.randn(k, cfg.global_dim, generator=g)
    with torch.no_grad():
        calls, topk_calls = [], []
        original, original_topk = native.attention, native.mutual_topk
        native.attention = lambda *a: calls.append(a[0].shape) or original(*a)
        native.mutual_topk = lambda *a: topk_calls.append(a[0].shape) or original_topk(*a)
        try:
            fast = model.reranker.rerank_query(q_global, q_local, c_global, c_local)
        finally:
            native.attention, native.mutual_topk = original, original_topk
        with native.disabled():
            slow = model.reranker.rerank_query(q_global, q_local, c_global, c_local)
    assert any(shape[1] > native.MAX_SHORT for shape in calls) and any(shape[1] <= native.MAX_SHORT for shape in calls)
    assert topk_calls == [(k, n, n)]
    torch.testing.assert_close(fast.logits, slow.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.final_score, slow.final_score, atol=1e-5, rtol=1e-5)


def _status_in_subprocess(env: dict) -> dict:
    code = ("import json; from r2former_core.model import native; s = native.status(); "
            "print(json.dumps({'available': s.available, 'detail': s.detail}))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disabled_by_environment(tmp_path):
    s = _status_in_subprocess({native.DISABLE_ENV: "0", "R2FORMER_CACHE": str(tmp_path)})
    assert not s["available"] and "R2FORMER_NATIVE=0" in s["detail"]
    assert not any(tmp_path.iterdir()), "nothing is compiled when disabled"


def test_cache_is_reused_and_a_damaged_library_is_rebuilt(tmp_path):
    first = _status_in_subprocess({"R2FORMER_CACHE": str(tmp_path)})
    assert first["available"], first["detail"]
    library = Path(first["detail"])
    assert library.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [library.name], \
        "one library, no temporary file left"
    mtime = library.stat().st_mtime_ns
    again = _status_in_subprocess({"R2FORMER_CACHE": str(tmp_path)})
    assert again == first and library.stat().st_mtime_ns == mtime, "the second process loads the cached library"
    library.write_bytes(b"not a shared library")                   # e.g. truncated by a full disk
    repaired = _status_in_subprocess({"R2FORMER_CACHE": str(tmp_path)})
    assert repaired["available"] and repaired["detail"] == first["detail"]
    assert library.read_bytes()[:4] == b"\x7fELF"


def test_no_compiler_falls_back_with_a_reason(tmp_path):
    s = _status_in_subprocess({"CC": "no-such-compiler", "PATH": str(tmp_path), "R2FORMER_CACHE": str(tmp_path)})
    assert not s["available"] and "no C compiler" in s["detail"]


def test_unusable_cache_folder_falls_back_to_a_temporary_folder(tmp_path):
    blocked = tmp_path / "a-file"          # the cache path is a file: no folder can be made there (even as root)
    blocked.write_text("")
    s = _status_in_subprocess({"R2FORMER_CACHE": str(blocked / "r2former")})
    assert s["available"], s["detail"]
    assert Path(s["detail"]).parent.name == f"r2former-{os.getuid()}"


def _narrower_targets() -> list[str]:
    """-march values that build the narrower code paths of attention.c on this machine: AVX2 (8 floats) and
    the baseline (4 floats: SSE2 on x86-64, NEON on arm64)."""
    import platform
    return ["x86-64-v3", "x86-64"] if platform.machine() in ("x86_64", "AMD64") else ["armv8-a"]


@pytest.mark.parametrize("march", _narrower_targets())
def test_narrower_vector_builds_agree_with_torch(tmp_path, march):
    """Every vector width the sources support passes the self-check against torch (a wrong result would leave
    the kernels unused) and agrees on larger inputs; the AVX2 build is what most robots' CPUs run."""
    code = ("import json, torch; from r2former_core.model import native; s = native.status(); torch.manual_seed(0)\n"
            "diffs = []\n"
            "for b, n in ((2, 300), (33, 6), (1, 1001)):\n"
            "    qkv = torch.randn(b, n, 96) * 3\n"
            "    q, k, v = qkv.double().reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)\n"
            "    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 32)\n"
            "    with torch.no_grad():\n"
            "        got = native.attention(qkv, 4).double() if s.available else ref + 1\n"
            "    diffs.append(float((got - ref).abs().max()))\n"
            "corr = torch.randn(2, 500, 300)\n"
            "topk = s.available and all(torch.equal(a, b) for a, b in zip(native.mutual_topk(corr, 5), "
            "(*corr.topk(5, dim=2), *(t.transpose(1, 2) for t in corr.topk(5, dim=1)))))\n"
            "x, norm = torch.randn(999, 32) * 3, torch.nn.LayerNorm(32, eps=1e-6)\n"
            "with torch.no_grad():\n"
            "    norm_diff = float((native.layer_norm(x, norm) - norm(x)).abs().max()) if s.available else 1.0\n"
            "print(json.dumps({'available': s.available, 'detail': s.detail, 'diffs': diffs, 'topk': topk, "
            "'norm': norm_diff}))")
    env = {**os.environ, "R2FORMER_CACHE": str(tmp_path), native.MARCH_ENV: march, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["available"], s["detail"]
    assert max(s["diffs"]) < 4e-5, s["diffs"]      # float32 rounding of scores up to ~60 (as in the test above)
    assert s["topk"] and s["norm"] < 1e-5, s


def test_a_cache_folder_others_can_write_is_not_used(tmp_path):
    """A library loaded from a folder anyone can write could be anyone's code: such a folder is refused."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    s = _status_in_subprocess({"R2FORMER_CACHE": str(shared)})
    assert s["available"], s["detail"]
    assert Path(s["detail"]).parent != shared and not any(shared.iterdir())


@pytest.mark.parametrize("n", [6, 300])
def test_a_nan_input_gives_nan_output_as_torch_does(n):
    """Corrupt inputs must not turn into plausible numbers: a NaN in a key makes every row's output NaN."""
    qkv = torch.randn(2, n, 96)
    qkv[1, n // 2, 40] = float("nan")                  # a key of pair 1, head 1
    with torch.no_grad():
        out = native.attention(qkv, 4)
    assert torch.isnan(out[1, :, 8:16]).all() and torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1, :, :8]).all(), "other heads are not touched"


def test_the_kernel_sources_are_installed_with_the_package():
    """pip and colcon install from setup.py: its package data must carry the C sources and headers, or an installed
    package would always fall back to torch (checked in a built wheel once)."""
    import ast
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    installed = {path for pattern in package_data["r2former_core"] for path in (REPO / "r2former_core").glob(pattern)}
    assert set(native.SOURCES) | set(native.HEADERS) <= installed, package_data
    assert set(native.SOURCES) | set(native.HEADERS) == set(native.FOLDER.glob("*.[ch]")), "a source not compiled"


def _torch_topk(corr: torch.Tensor, p: int) -> tuple[torch.Tensor, ...]:
    val_q, idx_q = corr.topk(p, dim=2)
    val_r, idx_r = corr.topk(p, dim=1)
    return val_q, idx_q, val_r.transpose(1, 2), idx_r.transpose(1, 2)


@pytest.mark.parametrize("shape,p", [((2, 500, 500), 5), ((3, 37, 41), 5), ((1, 5, 300), 5), ((4, 19, 6), 6),
                                     ((1, 64, 80), 1), ((2, 100, 70), 16)])
def test_mutual_topk_equals_torch_topk(shape, p):
    g = torch.Generator().manual_seed(sum(shape) + p)
    corr = torch.randn(*shape, generator=g)          # continuous values: no ties, so the order is torch's exactly
    with torch.no_grad():
        assert native.topk_applies(corr, p)
        got = native.mutual_topk(corr, p)
    for a, b in zip(got, _torch_topk(corr, p)):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_mutual_topk_ties_keep_the_lower_index_first_and_nan_ranks_first():
    g = torch.Generator().manual_seed(7)
    corr = torch.randint(0, 3, (2, 40, 33), generator=g).float()      # many ties
    corr[1, 3, 7] = corr[1, 20, 7] = float("nan")
    corr[0, 11, :] = float("nan")
    row_val, row_idx, col_val, col_idx = native.mutual_topk(corr, 5)

    def expected(values: list[float]) -> list[int]:     # NaN first, then larger, then lower index
        return sorted(range(len(values)), key=lambda j: (values[j] == values[j], -values[j] if values[j] == values[j]
                                                         else 0.0, j))[:5]
    for b in range(2):
        for i in range(40):
            assert row_idx[b, i].tolist() == expected(corr[b, i].tolist())
        for j in range(33):
            assert col_idx[b, j].tolist() == expected(corr[b, :, j].tolist())
    assert torch.isnan(col_val[1, 7, :2]).all() and col_idx[1, 7, :2].tolist() == [3, 20]
    assert torch.isnan(row_val[0, 11]).all() and row_idx[0, 11].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(row_val, torch.gather(corr, 2, row_idx), equal_nan=True)   # values match indices


def test_mutual_topk_does_not_depend_on_the_thread_count():
    corr = torch.randn(9, 120, 130, generator=torch.Generator().manual_seed(2))
    previous = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(native.mutual_topk(corr, 5))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for out in outs[1:] for a, b in zip(out, outs[0]))
    assert not native.topk_applies(corr, 5), "autograd on (training): torch.topk"
    with torch.no_grad():
        assert not native.topk_applies(corr, 200) and not native.topk_applies(corr.double(), 5)
        with native.disabled():
            assert not native.topk_applies(corr, 5)


@pytest.mark.parametrize("shape", [(3, 1001, 32), (24576, 32), (7, 16), (2, 5, 256), (40000, 64)])
def test_layer_norm_equals_torch(shape):
    """Width-32 tokens as the reranker has them, the other widths it accepts, and a call long enough for threads."""
    g = torch.Generator().manual_seed(shape[-1] + len(shape))
    x = torch.randn(*shape, generator=g) * 3 + 1
    norm = torch.nn.LayerNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
        norm.bias.copy_(torch.randn(shape[-1], generator=g))
        assert native.norm_applies(x, norm)
        got = native.layer_norm(x, norm)
        expected = F.layer_norm(x.double(), (shape[-1],), norm.weight.double(), norm.bias.double(), 1e-6).float()
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_layer_norm_is_used_by_the_reranker_blocks_only_where_it_applies():
    from r2former_core.model.layers import Block
    block, x = Block(32, 4, onednn=True).eval(), torch.randn(2, 50, 32)
    with torch.no_grad():
        calls = []
        original = native.layer_norm
        native.layer_norm = lambda *a: calls.append(a[0].shape) or original(*a)
        try:
            fast = block(x)
        finally:
            native.layer_norm = original
        with native.disabled():
            slow = block(x)
        assert calls == [(2, 50, 32)] * 2
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
        norm = torch.nn.LayerNorm(24)
        assert not native.norm_applies(torch.randn(3, 24), norm), "24 is not a multiple of every vector width"
        assert not native.norm_applies(x.double(), block.norm1)
    assert not native.norm_applies(x, block.norm1), "autograd on (training): torch's layer norm"
    with torch.no_grad():
        x_nan = x.clone()
        x_nan[1, 3, 5] = float("nan")
        out = native.layer_norm(x_nan, block.norm1)
    assert torch.isnan(out[1, 3]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 4]).all()


@pytest.mark.parametrize("shared_query", [True, False])
def test_pair_tokens_equal_the_torch_form(shared_query):
    """The block-1 input assembled by the kernel equals the reranker's torch form (gathers, adds, class token)."""
    g = torch.Generator().manual_seed(5)
    b, n, m, p, d = 4, 37, 29, 5, 32
    a_q = torch.randn(1 if shared_query else b, n, d, generator=g)
    b_r = torch.randn(b, m, d, generator=g)
    val_q, val_r = torch.randn(b, n, p, generator=g), torch.randn(b, m, p, generator=g)
    idx_q, idx_r = torch.randint(0, m, (b, n, p), generator=g), torch.randint(0, n, (b, m, p), generator=g)
    w_c, bias, cls = (torch.randn(d, generator=g) for _ in range(3))
    with torch.no_grad():
        assert native.pairs_apply(b_r)
        got = native.pair_tokens(a_q, b_r, val_q, idx_q, val_r, idx_r, w_c, bias, cls[None, None])
    bi = torch.arange(b)[:, None, None]
    a_full = a_q.expand(b, -1, -1)
    q_side = a_full[:, :, None] + b_r[bi, idx_q] + val_q[..., None] * w_c
    r_side = a_full[bi, idx_r] + b_r[:, :, None] + val_r[..., None] * w_c
    emb = torch.cat([q_side, r_side], 1) + bias
    expected = torch.cat([cls.expand(b, n + m, 1, d), emb], 2)
    assert got.shape == (b, n + m, 1 + p, d)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    idx_q[2, 3, 1] = m                                   # one index out of range: refused, nothing read or written
    with pytest.raises(ValueError, match="out of range"):
        native.pair_tokens(a_q, b_r, val_q, idx_q, val_r, idx_r, w_c, bias, cls)
