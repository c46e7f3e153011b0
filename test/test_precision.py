"""Precision modes and devices: resolution, validation, float32 heads, and ranking equivalence on small inputs.

The full equivalence tables (held-out synthetic set, DeiT-S with random official-layout weights) are in
docs/BENCHMARKS.md; these tests check the same properties on the tiny model so they run in seconds.
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from r2former_core import device as device_module
from r2former_core.cli.check_parity import add_parser as add_check_parity
from r2former_core.cli.common import add_model_options
from r2former_core.errors import ConfigError, DeviceError
from r2former_core.model import build_model, precision
from r2former_core.model.reranker import Reranker


def cpu_with(monkeypatch, **flags):
    base = {"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False, "vnni": False}
    base.update(flags)
    monkeypatch.setattr(precision, "cpu_flags", lambda: base)


# ------------------------------------------------------------------------------ resolution

@pytest.mark.parametrize("flags, expected", [({}, "fp32"), ({"avx512": True}, "fp32"),
                                             ({"avx512": True, "avx512_bf16": True}, "bf16"),
                                             ({"avx512": True, "amx": True}, "bf16")])
def test_auto_picks_bf16_only_where_the_cpu_accelerates_it(monkeypatch, flags, expected):
    cpu_with(monkeypatch, **flags)
    monkeypatch.setattr(precision, "RANKING_EQUIVALENT", ("fp32", "bf16", "fp16"))   # as if bf16 had passed
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("fp32", "cpu") == "fp32"


def test_auto_never_picks_a_mode_that_failed_the_ranking_equivalence(monkeypatch):
    """The shipped list holds what the measurements of docs/BENCHMARKS.md section 5 allow."""
    assert "int8" not in precision.RANKING_EQUIVALENT and "fp32" in precision.RANKING_EQUIVALENT
    for flags in ({}, {"avx512": True, "avx512_bf16": True}, {"avx512": True, "amx": True}):
        cpu_with(monkeypatch, **flags)
        assert precision.resolve_precision("auto", "cpu") in precision.RANKING_EQUIVALENT
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) in precision.RANKING_EQUIVALENT


def test_auto_is_fp16_on_cuda_and_only_picks_ranking_equivalent_modes(monkeypatch):
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) == "fp16"
    monkeypatch.setattr(precision, "RANKING_EQUIVALENT", ("fp32",))     # as if fp16/bf16 failed equivalence
    assert precision.resolve_precision("auto", torch.device("cuda", 0)) == "fp32"
    cpu_with(monkeypatch, avx512_bf16=True)
    assert precision.resolve_precision("auto", "cpu") == "fp32"


def test_modes_a_device_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        precision.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="int8 runs on the CPU"):
        precision.resolve_precision("int8", torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="unknown precision"):
        precision.resolve_precision("fp8", "cpu")


def test_reranker_stays_fp32_for_int8_and_for_bf16_on_cpus_unless_amx_without_the_kernels(monkeypatch):
    from r2former_core.model import native
    cpu = torch.device("cpu")
    cpu_with(monkeypatch, avx512_bf16=True)
    assert precision.rerank_precision("bf16", cpu) == "fp32"
    assert precision.rerank_precision("int8", cpu) == "fp32"
    cpu_with(monkeypatch, amx=True)
    assert native.status().available
    assert precision.rerank_precision("bf16", cpu) == "fp32", "the float32 kernels beat torch's bfloat16"
    monkeypatch.setattr(native, "status", lambda: native.KernelStatus(False, "no C compiler found"))
    assert precision.rerank_precision("bf16", cpu) == "bf16"
    assert precision.rerank_precision("fp16", torch.device("cuda", 0)) == "fp16"


def test_precision_option_is_on_the_model_commands():
    p = argparse.ArgumentParser()
    add_model_options(p)
    assert p.parse_args([]).precision == "auto"
    assert p.parse_args(["--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        p.parse_args(["--precision", "fp64"])
    sub = argparse.ArgumentParser().add_subparsers()
    parity = add_check_parity(sub)
    assert parity.parse_args(["folder"]).precision == "fp32"       # parity is a float32 check by default
    assert parity.parse_args(["folder", "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        parity.parse_args(["folder", "--device", "cudafoo"])


# --------------------------------------------------------------------------------- devices

@pytest.fixture()
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_existing_cuda_devices_are_accepted(one_gpu):
    assert device_module.resolve_device("cuda") == torch.device("cuda")
    assert device_module.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert device_module.resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert device_module.resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("bad", ["cuda:1", "cuda:5", torch.device("cuda", 2)])
def test_missing_cuda_devices_are_refused(one_gpu, bad):
    with pytest.raises(DeviceError, match="does not exist: this machine has 1 CUDA device"):
        device_module.resolve_device(bad)


@pytest.mark.parametrize("bad", ["cudafoo", "cuda:", "cuda:x", "gpu", "mps", torch.device("meta")])
def test_junk_devices_are_refused(bad):
    with pytest.raises(DeviceError, match="unknown device"):
        device_module.resolve_device(bad)


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", torch.device("cuda", 0)):
        with pytest.raises(DeviceError, match="CUDA is not available"):
            device_module.resolve_device(name)
    assert device_module.resolve_device("auto") == torch.device("cpu")


# ----------------------------------------------------------------------------- float32 heads

@pytest.mark.parametrize("classes", [1, 2])
def test_probabilities_are_float32_and_rank_fp16_range_logits_strictly(tiny_config, classes):
    """A float16 sigmoid/softmax rounds every logit above ~8.3 to exactly 1.0; the scores must not tie."""
    from dataclasses import replace
    reranker = Reranker(replace(tiny_config, rerank_classes=classes))
    high = torch.tensor([8.5, 9.0, 9.5, 10.0, 11.0], dtype=torch.float16)
    logits = high[:, None] if classes == 1 else torch.stack([torch.zeros_like(high), high], dim=1)
    assert torch.all(torch.sigmoid(high) == 1.0)            # what float16 arithmetic would give
    out = reranker.scores(logits, torch.zeros(5, dtype=torch.float16))
    assert out.match_prob.dtype == torch.float32 and out.final_score.dtype == torch.float32
    assert torch.all(torch.diff(out.match_prob) > 0)
    assert torch.all(torch.diff(out.final_score) > 0)


def test_reduced_precision_stacks_return_float32_logits(tiny_model):
    feats = tiny_model.extract(torch.randn(3, 3, 96, 128))
    logits = tiny_model.reranker.logits(feats.local[:1], feats.local, dtype=torch.bfloat16)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, tiny_model.reranker.logits(feats.local[:1], feats.local), atol=5e-2)


# ------------------------------------------------------------------------ model precision switch

def scene_batch(n_places: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Database images of distinct smooth scenes and queries that are noisy, shifted views of them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.randn(n_places, 3, 12, 16, generator=g), size=(96, 128),
                                           mode="bilinear", align_corners=False) * 2
    queries = torch.roll(base, shifts=(3, -4), dims=(2, 3)) + 0.3 * torch.randn(base.shape, generator=g)
    return base, queries


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_reduced_precision_keeps_the_ranking_on_small_inputs(tiny_config, mode):
    """Every reduced CPU mode: global descriptors and rerank scores close to fp32, same top-1 for every query
    whose fp32 margin is clear of the mode's error."""
    model = build_model(tiny_config, seed=0)
    model.reranker.ratio.data.fill_(0.5)
    base, queries = scene_batch()
    ref_db, ref_q = model.extract(base), model.extract(queries)
    assert model.set_precision(mode) == mode and model.precision == mode
    db, q = model.extract(base), model.extract(queries)
    cos = torch.nn.functional.cosine_similarity(db.global_desc, ref_db.global_desc, dim=-1)
    assert cos.min() > (0.999 if mode == "bf16" else 0.99), cos
    ref = np.stack([model_scores(model, "fp32", ref_q, ref_db, i) for i in range(len(queries))])
    out = np.stack([model_scores(model, mode, q, db, i) for i in range(len(queries))])
    err = np.abs(out - ref).max()
    assert err < (0.002 if mode == "bf16" else 0.005), err
    top = np.sort(ref, axis=1)
    margin = top[:, -1] - top[:, -2]
    same = out.argmax(axis=1) == ref.argmax(axis=1)
    assert same[margin > 2 * err].all()                      # every query the error cannot flip keeps its top-1
    assert same.mean() >= 5 / 6 and (margin > 2 * err).sum() >= 3


def model_scores(model, mode, q, db, i) -> np.ndarray:
    model.set_precision(mode)
    out = model.rerank(q.global_desc[i], q.local[i], db.global_desc, db.local)
    return out.final_score.numpy()


def test_int8_uses_a_quantized_copy_and_keeps_the_weights(tiny_config):
    model = build_model(tiny_config, seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprint = model.fingerprint
    x = torch.randn(2, 3, 96, 128)
    fp32 = model.extract(x)
    model.set_precision("int8")
    int8 = model.extract(x)
    assert not torch.equal(int8.global_desc, fp32.global_desc)      # really another computation
    assert model.fingerprint == fingerprint
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "int8" in model.describe_precision() and "reranking fp32" in model.describe_precision()
    model.set_precision("fp32")
    assert torch.equal(model.extract(x).global_desc, fp32.global_desc)
