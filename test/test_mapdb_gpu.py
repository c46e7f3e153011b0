"""The map's faiss GPU path, exercised on a CPU through a stand-in for faiss's GPU functions.

The stand-in does what matters of faiss GPU here (docs/MAP_FORMAT.md, issue 13): it refuses k above
2048, has no flat scalar-quantizer (float16) index, and needs IVF-PQ lookup tables within 48 KiB of
shared memory; searches run on a CPU clone. The real GPU round trip is in test_cuda.py (CUDA only).
"""
from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
from test_mapdb import build, make_data

from r2former_core import mapdb
from r2former_core.localizer import Localizer, LocalizerConfig
from r2former_core.mapdb import MapDatabase


class FakeGpuIndex:
    def __init__(self, cpu_index, options):
        if isinstance(cpu_index, faiss.IndexScalarQuantizer):
            raise RuntimeError("faiss GPU: IndexScalarQuantizer is not supported")
        if isinstance(cpu_index, faiss.IndexIVFPQ):
            table = cpu_index.pq.M * (1 << cpu_index.pq.nbits) * (2 if options.useFloat16 else 4)
            if table > 48 * 1024:
                raise RuntimeError(f"faiss GPU: lookup tables of {table} bytes exceed shared memory")
        self.inner = faiss.clone_index(cpu_index)
        self.ntotal = self.inner.ntotal
        self.source = cpu_index
        self.options = options
        self.ks: list[int] = []
        self.fail = False

    @property
    def nprobe(self):
        return self.inner.nprobe

    @nprobe.setter
    def nprobe(self, value):
        self.inner.nprobe = value

    def search(self, q, k):
        assert k <= mapdb.GPU_MAX_K, f"faiss GPU: k={k} > {mapdb.GPU_MAX_K}"
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.ks.append(k)
        return self.inner.search(q, k)


class Options:
    def __init__(self):
        self.useFloat16 = False


@pytest.fixture()
def fake_gpu(monkeypatch):
    made: list[FakeGpuIndex] = []

    def to_gpu(res, device, index, options=None):
        gpu = FakeGpuIndex(index, options or Options())
        made.append(gpu)
        return gpu

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    return made


def test_flat_map_searches_on_the_gpu(tmp_path, fake_gpu):
    d = make_data(m=60, g=16, n=2, c=4, thumbs=False)
    build(tmp_path / "m", d)
    db = MapDatabase.load(tmp_path / "m", device="cuda")
    assert db.search_device == "cuda:0" and len(fake_gpu) == 1
    _, idx = db.search(d["glob"], 5)
    np.testing.assert_array_equal(idx[:, 0], np.arange(60))
    assert fake_gpu[0].ks == [5]
    assert MapDatabase.load(tmp_path / "m", device="cpu").search_device == "cpu"


def test_float16_flat_map_gets_a_float32_gpu_copy(tmp_path, fake_gpu, caplog):
    d = make_data(m=60, g=16, n=2, c=4, thumbs=False)
    build(tmp_path / "m", d, global_dtype="float16")
    with caplog.at_level(logging.INFO, logger="r2former_core.mapdb"):
        db = MapDatabase.load(tmp_path / "m", device="cuda:0")
    assert db.search_device == "cuda:0"
    assert isinstance(fake_gpu[0].source, faiss.IndexFlatIP)     # not the float16 scalar quantizer
    assert "float32 copy" in caplog.text
    scores, idx = db.search(d["glob"], 3)
    cpu_scores, cpu_idx = MapDatabase.load(tmp_path / "m", device="cpu").search(d["glob"], 3)
    np.testing.assert_array_equal(idx, cpu_idx)
    np.testing.assert_allclose(scores, cpu_scores, atol=1e-3)


def test_k_above_the_gpu_limit_runs_on_the_cpu(tmp_path, fake_gpu, caplog):
    d = make_data(m=2100, g=8, n=2, c=3, thumbs=False)
    build(tmp_path / "m", d)
    db = MapDatabase.load(tmp_path / "m", device="cuda")
    with caplog.at_level(logging.WARNING, logger="r2former_core.mapdb"):
        scores, idx = db.search(d["glob"][:2], 2100)
    assert idx.shape == (2, 2100) and idx[0, 0] == 0 and idx[1, 0] == 1
    assert fake_gpu[0].ks == [] and "2048" in caplog.text
    assert db.search_device == "cuda:0"          # only that search left the GPU
    db.search(d["glob"][:1], 10)
    assert fake_gpu[0].ks == [10]


def test_ivfpq_uses_float16_tables_and_caps_the_refined_k(tmp_path, fake_gpu, monkeypatch):
    monkeypatch.setattr(mapdb, "GPU_MAX_K", 512)      # the real limit is 2048: a smaller one keeps the map small
    d = make_data(m=1100, g=256, n=2, c=3, thumbs=False)
    build(tmp_path / "ivf", d, index="ivfpq")
    db = MapDatabase.load(tmp_path / "ivf", device="cuda", nprobe=4)
    assert db.info.index == "ivfpq" and db._cpu_index.pq.M * 256 * 4 > mapdb.GPU_SHARED_MEMORY_BYTES
    assert db.search_device == "cuda:0" and fake_gpu[0].options.useFloat16
    assert fake_gpu[0].nprobe == 4
    db.nprobe = db._cpu_index.nlist                  # every list: the exact re-scoring finds each vector
    scores, idx = db.search(d["glob"][:3], 200)      # 4 x 200 candidates would exceed the limit
    assert fake_gpu[0].ks == [512]
    np.testing.assert_array_equal(idx[:, 0], np.arange(3))
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_gpu_search_error_falls_back_to_the_cpu(tmp_path, fake_gpu, caplog):
    d = make_data(m=60, g=16, n=2, c=4, thumbs=False)
    build(tmp_path / "m", d)
    db = MapDatabase.load(tmp_path / "m", device="cuda")
    fake_gpu[0].fail = True
    with caplog.at_level(logging.WARNING, logger="r2former_core.mapdb"):
        _, idx = db.search(d["glob"][:4], 2)
    np.testing.assert_array_equal(idx[:, 0], np.arange(4))
    assert db.search_device == "cpu" and "GPU search failed" in caplog.text
    _, idx = db.search(d["glob"][:4], 2)            # and stays there
    np.testing.assert_array_equal(idx[:, 0], np.arange(4))


def test_gpu_index_failure_at_load_stays_on_cpu(tmp_path, monkeypatch, fake_gpu, caplog):
    d = make_data(m=60, g=16, n=2, c=4, thumbs=False)
    build(tmp_path / "m", d)

    def broken(*args):
        raise RuntimeError("invalid device ordinal")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", broken)
    with caplog.at_level(logging.WARNING, logger="r2former_core.mapdb"):
        db = MapDatabase.load(tmp_path / "m", device="cuda:3")
    assert db.search_device == "cpu" and "invalid device ordinal" in caplog.text
    assert db.search(d["glob"][:1], 1)[1][0, 0] == 0


def test_localizer_from_files_loads_the_map_on_its_device(tmp_path, monkeypatch, fake_gpu, tiny_model):
    """Localizer.from_files passes config.device to the map (the model is stubbed to the CPU: no CUDA here)."""
    from r2former_core import localizer as localizer_module
    from r2former_core.features import extract_arrays

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(4)]
    f = extract_arrays(tiny_model, images)
    cfg = tiny_model.cfg
    with MapDatabase.create(tmp_path / "map", fingerprint=tiny_model.fingerprint, model_config={}, image_size=(96, 128),
                            global_dim=cfg.global_dim, num_local=cfg.local_tokens,
                            local_values=cfg.local_values) as writer:
        writer.add_batch(f.global_desc, f.local, np.tile([0, 0, 0, 0, 0, 0, 1.0], (4, 1)), np.arange(4.0),
                         [f"{i}.png" for i in range(4)])
    seen = {}

    def fake_load_model(path, device="cpu", precision="fp32"):
        seen["model_device"] = device
        return tiny_model

    monkeypatch.setattr(localizer_module, "load_model", fake_load_model)
    loc = Localizer.from_files("unused", tmp_path / "map", LocalizerConfig(device="cuda:0", precision="fp32"))
    assert seen["model_device"] == "cuda:0"
    assert loc.map.search_device == "cuda:0" and len(fake_gpu) == 1
