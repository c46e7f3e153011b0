"""The CUDA path, run on purpose (issue 13). Every test here needs a GPU and is skipped without one.

What a GPU owner runs (README "GPU"): `pytest test/test_cuda.py -rs` and `python bench/cuda_check.py`.
The CPU-side logic of the same paths (device validation, precision resolution, float32 heads, faiss GPU
k capping and fall-back through a stand-in) is tested on every machine in test_precision.py and
test_mapdb_gpu.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_r2former import reference_extract, reference_rerank
from test_mapdb import build, make_data

from r2former_core.mapdb import MapDatabase, _faiss_gpu_available
from r2former_core.model import build_model

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_REF = REPO.parent / "shared" / "official_ref"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")


def scenes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.randn(n, 3, 12, 16, generator=g), size=(96, 128), mode="bilinear",
                                           align_corners=False) * 2
    return base, torch.roll(base, shifts=(3, -4), dims=(2, 3)) + 0.3 * torch.randn(base.shape, generator=g)


@pytest.fixture()
def models(tiny_config):
    cpu = build_model(tiny_config, seed=0)
    gpu = build_model(tiny_config, seed=0, device="cuda")
    return cpu, gpu


def test_cuda_fp32_equals_cpu_and_the_reference(models):
    cpu, gpu = models
    assert gpu.precision == "fp32"
    db, _ = scenes(4)
    a, b = cpu.extract(db), gpu.extract(db)
    assert b.global_desc.device.type == "cpu"                      # results come back where the input was
    assert torch.allclose(a.global_desc, b.global_desc, atol=1e-4, rtol=0)
    assert torch.allclose(a.attention, b.attention, atol=1e-4, rtol=0)
    sd = {k: v.detach().cpu() for k, v in cpu.state_dict().items()}
    with torch.no_grad():
        g, _, _, _ = reference_extract(sd, cpu.cfg, db)
        _, prob, _ = reference_rerank(sd, cpu.cfg, a.global_desc[:1].expand(4, -1), a.local[:1].expand(4, -1, -1),
                                      a.global_desc, a.local)
    assert torch.allclose(b.global_desc, g, atol=1e-4, rtol=0)
    out = gpu.rerank(a.global_desc[0], a.local[0], a.global_desc, a.local)
    assert torch.allclose(out.match_prob, prob, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_cuda_reduced_precision_keeps_the_ranking(models, mode):
    cpu, gpu = models
    if mode == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    gpu.set_precision(mode)
    db, q = scenes(6)
    a_db, a_q = cpu.extract(db), cpu.extract(q)
    b_db, b_q = gpu.extract(db), gpu.extract(q)
    assert torch.nn.functional.cosine_similarity(a_db.global_desc, b_db.global_desc).min() > 0.995
    assert torch.equal((a_q.global_desc @ a_db.global_desc.T).argmax(1),
                       (b_q.global_desc @ b_db.global_desc.T).argmax(1))
    for i in range(len(q)):
        ref = cpu.rerank(a_q.global_desc[i], a_q.local[i], a_db.global_desc, a_db.local).final_score
        out = gpu.rerank(b_q.global_desc[i], b_q.local[i], b_db.global_desc, b_db.local).final_score
        assert out.dtype == torch.float32
        assert (out - ref).abs().max() < 2e-2
        top = torch.sort(ref, descending=True).values
        if top[0] - top[1] > 4e-2:
            assert out.argmax() == ref.argmax()


def test_official_parity_on_cuda_in_fp32():
    if not (OFFICIAL_REF / "checkpoint_official_layout.pth").is_file():
        pytest.skip(f"no official reference folder at {OFFICIAL_REF}")
    out = subprocess.run([sys.executable, "-m", "r2former_core.cli.main", "check-parity", str(OFFICIAL_REF),
                          "--device", "cuda"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "precision fp32" in out.stdout and "parity: PASS" in out.stdout


@pytest.mark.skipif(not _faiss_gpu_available(), reason="faiss has no GPU support or sees no GPU (faiss-cpu installed)")
@pytest.mark.parametrize("kind", ["flat", "float16", "ivfpq"])
def test_faiss_gpu_round_trip(tmp_path, kind):
    d = make_data(m=1500 if kind == "ivfpq" else 300, g=256, n=2, c=3, thumbs=False)
    build(tmp_path / "m", d, index="ivfpq" if kind == "ivfpq" else "flat",
          global_dtype="float16" if kind == "float16" else "float32")
    gpu = MapDatabase.load(tmp_path / "m", device="cuda", nprobe=64)
    cpu = MapDatabase.load(tmp_path / "m", device="cpu", nprobe=64)
    assert gpu.search_device.startswith("cuda")
    s_gpu, i_gpu = gpu.search(d["glob"][:20], 600)       # IVF asks for 4 x 600 > 2048: capped
    s_cpu, i_cpu = cpu.search(d["glob"][:20], 600)
    np.testing.assert_array_equal(i_gpu[:, 0], np.arange(20))
    np.testing.assert_allclose(s_gpu[:, :10], s_cpu[:, :10], atol=2e-3)
    assert gpu.search_device.startswith("cuda")           # no fall-back happened
