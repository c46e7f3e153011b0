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


def test_torchrun_two_ranks_on_the_gpus_of_this_machine(tmp_path, tiny_model):
    """torchrun with 2 processes and --device cuda: with two or more GPUs every rank gets its own and the run
    ends cleanly; with one GPU the second rank stops with the DeviceError that says what to do (issue 13.1),
    never a raw "invalid device ordinal"."""
    from test_train import DATA, SPACING, _free_port

    from r2former_core.model import save_model
    init = save_model(tiny_model, tmp_path / "tiny.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "r2former_core.cli.main", "train", "global", "--data", DATA, "--out", str(tmp_path / "ddp"),
           "--model", str(init), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "3",
           "--refresh-steps", "2", "--db-sample", "60", "--cache-dir", str(tmp_path / "cache"),
           "--spacing", str(SPACING), "--no-progress", "--device", "cuda"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert "invalid device ordinal" not in output
    if torch.cuda.device_count() >= 2:
        assert proc.returncode == 0, output[-3000:]
        assert "world size 2" in (tmp_path / "ddp" / "train.log").read_text()
    else:
        assert proc.returncode != 0
        assert "needs GPU 1" in output and "--nproc_per_node <= 1" in output, output[-3000:]


def test_localize_node_on_cuda_publishes_poses(tmp_path, tiny_model):
    """The localize node with device:=cuda (model and map search on the GPU) over real topics: a pose for a
    published image, and diagnostics that name the CUDA device."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rostools import (
        LATCHED,
        NodeProcess,
        RosProbe,
        build_test_map,
        diagnostic_values,
        line_poses,
        save_tiny_model,
        synthetic_images,
    )
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from r2former_ros.conversions import rgb_to_image_msg, sec_to_stamp

    images = synthetic_images(8, seed=1)
    model = save_tiny_model(tiny_model, tmp_path / "tiny.safetensors")
    map_dir = build_test_map(tiny_model, images, line_poses(8), tmp_path / "map")
    probe = RosProbe("cuda_probe")
    poses = probe.subscribe(PoseWithCovarianceStamped, "/cuda_localizer/pose")
    state = probe.subscribe(String, "/cuda_localizer/state", LATCHED)
    diagnostics = probe.subscribe(DiagnosticArray, "/diagnostics")
    camera = probe.publisher(Image, "/cuda_cam/image")
    node = NodeProcess("r2former_ros.localize_node", [
        "--ros-args", "-r", "__node:=cuda_localizer", "-r", "image:=/cuda_cam/image",
        "-p", f"map_path:={map_dir}", "-p", f"model_path:={model}", "-p", "device:=cuda",
        "-p", "min_confidence:=0.0", "-p", "diagnostics_rate:=5.0", "-p", "qos_reliability:=reliable"],
        tmp_path / "logs")
    try:
        assert probe.wait_for_subscriber("/cuda_cam/image", 120) and state.wait(1, 60), node.output()
        for i in range(5):
            msg = rgb_to_image_msg(images[3])
            msg.header.stamp = sec_to_stamp(100.0 + i)
            msg.header.frame_id = "camera"
            camera.publish(msg)
            if poses.wait(1, 10):
                break
        assert len(poses) >= 1, node.output()
        assert diagnostics.wait(len(diagnostics) + 1, 10)
        values = diagnostic_values(diagnostics.last(), "localization")
        assert values is not None and values["device"].startswith("cuda"), values
    finally:
        node.stop()
        probe.close()
