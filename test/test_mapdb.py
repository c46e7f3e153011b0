"""MapDatabase: round trip, search, local reads, thumbnails, refusals, atomic writes, IVF-PQ, sizing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from r2former_core import mapdb
from r2former_core.errors import ConfigError, DeviceError
from r2former_core.mapdb import MapDatabase, MapError, MapInfo

REPO = Path(__file__).resolve().parents[1]
M, G, N, C = 50, 32, 20, 19
FP = "fp-test-0001"
CONFIG = {"name": "tiny", "embed_dim": 48, "nested": {"a": [1, 2]}}


def make_data(m: int = M, g: int = G, n: int = N, c: int = C, seed: int = 0, thumbs: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    glob = rng.standard_normal((m, g)).astype(np.float32)
    glob /= np.linalg.norm(glob, axis=1, keepdims=True)
    local = rng.standard_normal((m, n, c)).astype(np.float32)
    quat = rng.standard_normal((m, 4))
    quat /= np.linalg.norm(quat, axis=1, keepdims=True)
    poses = np.concatenate([np.cumsum(rng.uniform(0.5, 1.5, (m, 3)), axis=0), quat], axis=1)
    stamps = 1.7e9 + np.arange(m) * 0.25
    names = [f"seq/cam0/{i:06d}.png" for i in range(m)]
    thumbnails = None
    if thumbs:
        yy, xx = np.mgrid[0:120, 0:200]
        thumbnails = [np.stack([(xx + 7 * i) % 256, yy * 2, np.full_like(xx, 10 * i % 256)], axis=2).astype(np.uint8)
                      if i % 5 else None for i in range(m)]
    return dict(glob=glob, local=local, poses=poses, stamps=stamps, names=names, thumbnails=thumbnails)


def build(path: Path, data: dict, **kw) -> MapDatabase:
    args = dict(fingerprint=FP, model_config=CONFIG, image_size=(96, 128), global_dim=data["glob"].shape[1],
                num_local=data["local"].shape[1], local_values=data["local"].shape[2], source="unit test")
    args.update(kw)
    with MapDatabase.create(path, **args) as writer:
        half = len(data["names"]) // 2
        for i in range(half):   # one by one ...
            thumb = None if data["thumbnails"] is None else data["thumbnails"][i]
            assert writer.add(data["glob"][i], data["local"][i], data["poses"][i], data["stamps"][i],
                              data["names"][i], thumbnail=thumb) == i
        sl = slice(half, None)  # ... and as a batch
        writer.add_batch(data["glob"][sl], data["local"][sl], data["poses"][sl], data["stamps"][sl],
                         data["names"][sl], None if data["thumbnails"] is None else data["thumbnails"][sl])
        assert writer.count == len(data["names"])
    assert writer.database is not None
    return writer.database


@pytest.fixture()
def data() -> dict:
    return make_data()


@pytest.fixture()
def built(tmp_path, data) -> Path:
    path = tmp_path / "maps" / "m"
    build(path, data).close()
    return path


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def edit_json(path: Path, drop: tuple[str, ...] = (), **changes) -> None:
    """Change map.json and sign it again, as a writer that made an inconsistent map would (an unsigned edit is
    refused by the checksum first: test_bad_input.py)."""
    doc = json.loads((path / "map.json").read_text())
    doc.update(changes)
    for key in drop:
        del doc[key]
    (path / "map.json").write_text(mapdb.map_json_text(doc))


# ------------------------------------------------------------------------------ round trip


def test_round_trip_every_field(built, data):
    db = MapDatabase.load(built, expected_fingerprint=FP, verify="full")
    info = db.info
    assert isinstance(info, MapInfo)
    assert info.path == built.absolute()
    assert info.format_version == mapdb.FORMAT_VERSION == 1
    assert info.fingerprint == FP and info.model_config == CONFIG
    assert info.image_size == (96, 128)
    assert (info.global_dim, info.num_local, info.local_values, info.count) == (G, N, C, M)
    assert info.frame_id == "map" and info.source == "unit test" and info.created.startswith("20")
    assert info.global_dtype == "float32" and info.index == "flat" and info.package_version
    assert len(db) == M
    assert db.global_desc.dtype == np.float32 and db.global_desc.shape == (M, G)
    np.testing.assert_array_equal(db.global_desc, data["glob"])
    np.testing.assert_allclose(db.poses, data["poses"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(db.stamps, data["stamps"])
    assert db.names == data["names"]
    np.testing.assert_array_equal(db.local(np.arange(M)), data["local"].astype(np.float16))
    doc = json.loads((built / "map.json").read_text())
    assert doc["format"] == "r2former_ros.map"
    assert set(doc["files"]) == set(mapdb.WRITTEN_FILES)
    assert doc["created"]["host"] and doc["created"]["time"]
    assert not db.global_desc.flags.writeable and not db.poses.flags.writeable
    # the documented numpy way to inspect a map
    np.testing.assert_array_equal(np.load(built / "global.npy", allow_pickle=False), data["glob"])
    raw = np.memmap(built / "local.f16", dtype=np.float16, mode="r", shape=(M, N, C))
    np.testing.assert_array_equal(raw[7], data["local"][7].astype(np.float16))
    assert (built / "local.f16").stat().st_size == M * N * C * 2


def test_frame_id_and_float16_globals(tmp_path, data):
    db = build(tmp_path / "m16", data, frame_id="odom", global_dtype="float16")
    db = MapDatabase.load(tmp_path / "m16")
    assert db.info.frame_id == "odom" and db.info.global_dtype == "float16"
    assert db.global_desc.dtype == np.float16
    np.testing.assert_array_equal(db.global_desc, data["glob"].astype(np.float16))
    _, idx = db.search(data["glob"], 3)
    np.testing.assert_array_equal(idx[:, 0], np.arange(M))


def test_pose_quaternion_normalised_on_write(tmp_path, data):
    data["poses"][:, 3:] *= 2.0
    db = build(tmp_path / "m", data)
    np.testing.assert_allclose(np.linalg.norm(db.poses[:, 3:], axis=1), 1.0, atol=1e-12)


# ------------------------------------------------------------------------------ search and reads


def test_search_finds_itself(built, data):
    db = MapDatabase.load(built)
    scores, idx = db.search(data["glob"], 5)
    assert scores.shape == idx.shape == (M, 5)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx[:, 0], np.arange(M))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    expected = np.argsort(-(data["glob"] @ data["glob"][3]))[:5]
    np.testing.assert_array_equal(idx[3], expected)
    s1, i1 = db.search(data["glob"][3], 1000)          # (G,) query, k clipped to M
    assert s1.shape == i1.shape == (1, M)
    assert set(i1[0].tolist()) == set(range(M))
    with pytest.raises(ValueError, match="shape"):
        db.search(np.zeros(G + 1, np.float32), 3)


def test_local_order_and_values(built, data):
    db = MapDatabase.load(built)
    order = [17, 3, 49, 3, 0]
    out = db.local(order)
    assert out.dtype == np.float16 and out.shape == (5, N, C)
    np.testing.assert_array_equal(out, data["local"][order].astype(np.float16))
    np.testing.assert_allclose(out.astype(np.float32), data["local"][order], rtol=1e-3, atol=1e-3)
    assert db.local([]).shape == (0, N, C)
    with pytest.raises(IndexError, match="out of range"):
        db.local([M])
    with pytest.raises(IndexError):
        db.local([-1])


def test_thumbnails_round_trip(built, data):
    db = MapDatabase.load(built)
    assert db.thumbnail(0) is None and db.thumbnail(5) is None    # none passed for i % 5 == 0
    for i in (1, 7, 49):
        thumb = db.thumbnail(i)
        assert thumb.dtype == np.uint8 and thumb.shape == (96, 160, 3)   # 120x200 -> longest side 160
        ref = data["thumbnails"][i][::5, ::5][:, :, :].astype(np.float32)
        small = thumb[::4, ::4][: ref.shape[0], : ref.shape[1]].astype(np.float32)
        assert np.abs(small - ref).mean() < 12
    assert os.path.getsize(built / "thumbnails.bin") < M * 15000


def test_small_thumbnail_not_upscaled(tmp_path):
    d = make_data(m=3)
    d["thumbnails"] = [np.full((40, 30, 3), 200, np.uint8), None, np.full((10, 10), 50, np.uint8)]
    db = build(tmp_path / "m", d)
    assert db.thumbnail(0).shape == (40, 30, 3) and abs(int(db.thumbnail(0).mean()) - 200) <= 2
    assert db.thumbnail(2).shape == (10, 10, 3)


def test_keyframe_spacing(tmp_path):
    d = make_data(m=10, thumbs=False)
    d["poses"][:, :3] = 0.0
    d["poses"][:, 0] = np.arange(10) * 0.5
    d["poses"][6:, 0] += 100.0                        # one big jump (second drive) does not matter
    db = build(tmp_path / "m", d)
    assert db.keyframe_spacing() == pytest.approx(0.5)
    one = build(tmp_path / "one", make_data(m=1, thumbs=False))
    assert one.keyframe_spacing() == 0.0


# ------------------------------------------------------------------------------ refusals


def test_missing_directory(tmp_path):
    with pytest.raises(MapError, match="does not exist"):
        MapDatabase.load(tmp_path / "nope")


def test_missing_file(built):
    (built / "poses.npy").unlink()
    with pytest.raises(MapError, match=r"poses\.npy is missing.*build-map"):
        MapDatabase.load(built)


def test_missing_map_json(built):
    (built / "map.json").unlink()
    with pytest.raises(MapError, match=r"map\.json is missing"):
        MapDatabase.load(built)


def test_malformed_map_json(built):
    (built / "map.json").write_text('{"format": "r2former_ros.map", "format_version": 1,')
    with pytest.raises(MapError, match=r"map\.json .*not valid JSON.*build-map"):
        MapDatabase.load(built)


def test_map_json_missing_field(built):
    edit_json(built, drop=("num_local",))
    with pytest.raises(MapError, match="lacks field 'num_local'"):
        MapDatabase.load(built)


def test_wrong_format_version(built):
    edit_json(built, format_version=2)
    with pytest.raises(MapError, match=r"format version 2.*reads format version 1.*r2former build-map"):
        MapDatabase.load(built)


def test_wrong_format_name(built):
    edit_json(built, format="something.else")
    with pytest.raises(MapError, match="not an r2former_ros map"):
        MapDatabase.load(built)


def test_fingerprint_mismatch(built):
    with pytest.raises(MapError) as err:
        MapDatabase.load(built, expected_fingerprint="fp-other")
    msg = str(err.value)
    assert f"built with model {FP}" in msg and "the loaded model is fp-other" in msg
    assert "rebuild the map with this model or load the model it was built with" in msg
    MapDatabase.load(built, expected_fingerprint=FP)


@pytest.mark.parametrize("name", ["local.f16", "global.npy", "poses.npy", "names.json"])
def test_truncated_file(built, name):
    path = built / name
    size = path.stat().st_size
    os.truncate(path, size - 10)
    with pytest.raises(MapError, match=rf"{name} .* has {size - 10} bytes but map\.json records {size}.*truncated"):
        MapDatabase.load(built, verify="quick")


def test_inconsistent_dims(built):
    edit_json(built, num_local=N + 1)
    with pytest.raises(MapError, match=r"local\.f16 .* expected for"):
        MapDatabase.load(built)


@pytest.mark.parametrize("name", ["global.npy", "poses.npy", "stamps.npy", "local_crc32.npy", "names.json",
                                  "thumbnails.bin"])
def test_flipped_byte_detected_at_load(built, name):
    flip_byte(built / name, (built / name).stat().st_size - 3)
    with pytest.raises(MapError, match=rf"{name} in .* is corrupted: sha256"):
        MapDatabase.load(built)                      # small map: verify="auto" hashes everything


def test_flipped_byte_in_local_full_at_load(built):
    flip_byte(built / "local.f16", 13 * N * C * 2 + 101)
    with pytest.raises(MapError, match=r"local\.f16 in .* is corrupted: sha256"):
        MapDatabase.load(built, verify="full")


def test_flipped_byte_in_local_quick_on_read(built, data):
    entry = 13
    flip_byte(built / "local.f16", entry * N * C * 2 + 101)
    db = MapDatabase.load(built, verify="quick")      # sizes only: load succeeds
    np.testing.assert_array_equal(db.local([12, 14]), data["local"][[12, 14]].astype(np.float16))
    with pytest.raises(MapError, match=rf"map entry {entry} \('seq/cam0/000013.png'\).*corrupted \(CRC32"):
        db.local([0, entry, 20])
    db.verify_reads = False
    assert db.local([entry]).shape == (1, N, C)


def test_auto_verify_skips_big_files_above_threshold(built, monkeypatch):
    flip_byte(built / "local.f16", 5)
    monkeypatch.setattr(mapdb, "AUTO_FULL_VERIFY_BYTES", 1000)
    db = MapDatabase.load(built, verify="auto")      # "big" map: local.f16 only size-checked
    with pytest.raises(MapError, match="map entry 0"):
        db.local([0])
    flip_byte(built / "poses.npy", 200)
    with pytest.raises(MapError, match=r"poses\.npy .* corrupted"):
        MapDatabase.load(built, verify="auto")       # small files are still hashed


# ------------------------------------------------------------------------------ writer behaviour


def test_writer_rejects_bad_input(tmp_path, data):
    w = MapDatabase.create(tmp_path / "m", fingerprint=FP, model_config={}, image_size=(96, 128), global_dim=G,
                           num_local=N, local_values=C)
    with pytest.raises(ValueError, match="local features must have shape"):
        w.add(data["glob"][0], data["local"][0][:5], data["poses"][0], 0.0, "a")
    with pytest.raises(ValueError, match="poses must have shape"):
        w.add(data["glob"][0], data["local"][0], data["poses"][0][:6], 0.0, "a")
    with pytest.raises(ValueError, match="NaN"):
        w.add(np.full(G, np.nan), data["local"][0], data["poses"][0], 0.0, "a")
    with pytest.raises(ValueError, match="float16 range"):
        w.add(data["glob"][0], data["local"][0] * 1e6, data["poses"][0], 0.0, "a")
    with pytest.raises(ValueError, match="uint8"):
        w.add(data["glob"][0], data["local"][0], data["poses"][0], 0.0, "a", thumbnail=np.zeros((4, 4, 3)))
    assert w.count == 0
    with pytest.raises(MapError, match="no entries"):
        w.commit()
    assert not (tmp_path / "m").exists()
    with pytest.raises(MapError, match="already aborted"):
        w.add(data["glob"][0], data["local"][0], data["poses"][0], 0.0, "a")
    with pytest.raises(ValueError, match="index"):
        MapDatabase.create(tmp_path / "x", fingerprint=FP, model_config={}, image_size=(1, 1), global_dim=G,
                           num_local=N, local_values=C, index="lsh")


def test_exception_inside_with_leaves_nothing(tmp_path, data):
    path = tmp_path / "m"
    with pytest.raises(RuntimeError, match="boom"):
        with MapDatabase.create(path, fingerprint=FP, model_config={}, image_size=(96, 128), global_dim=G,
                                num_local=N, local_values=C) as w:
            w.add_batch(data["glob"][:10], data["local"][:10], data["poses"][:10], data["stamps"][:10],
                        data["names"][:10])
            raise RuntimeError("boom")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []              # temporary directory removed too


def test_not_enough_disk_space(tmp_path):
    with pytest.raises(MapError, match="not enough disk space"):
        MapDatabase.create(tmp_path / "m", fingerprint=FP, model_config={}, image_size=(480, 640), global_dim=256,
                           num_local=500, local_values=131, expected_count=10**9)
    assert list(tmp_path.iterdir()) == []


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from r2former_core.mapdb import MapDatabase
    path, overwrite = sys.argv[1], sys.argv[2] == "1"
    rng = np.random.default_rng(1)
    w = MapDatabase.create(path, fingerprint="fp-slow", model_config={}, image_size=(96, 128), global_dim=32,
                           num_local=20, local_values=19, overwrite=overwrite)
    for i in range(100000):
        w.add(rng.standard_normal(32), rng.standard_normal((20, 19)), [i, 0, 0, 0, 0, 0, 1], float(i), str(i))
        if i == 5:
            print("WRITING", flush=True)
        time.sleep(0.01)
    w.commit()
""")


def run_slow_writer_and_kill(path: Path, overwrite: bool) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path), "1" if overwrite else "0"],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", f"writer did not start (rc={proc.poll()})"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    stale = list(path.parent.glob(f"{path.name}.tmp-{proc.pid}-*"))
    assert len(stale) == 1, "the killed writer should have left its temporary directory"


def test_killed_writer_leaves_nothing_loadable(tmp_path, data):
    path = tmp_path / "m"
    run_slow_writer_and_kill(path, overwrite=False)
    assert not path.exists()
    with pytest.raises(MapError):
        MapDatabase.load(path)
    db = build(path, data)                             # a rerun succeeds ...
    assert len(MapDatabase.load(path, expected_fingerprint=FP)) == M
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]   # ... and removed the dead writer's temp dir
    db.close()


def test_killed_overwrite_keeps_old_map(built, data):
    run_slow_writer_and_kill(built, overwrite=True)
    db = MapDatabase.load(built, expected_fingerprint=FP, verify="full")
    np.testing.assert_array_equal(db.global_desc, data["glob"])


def test_overwrite_semantics(built, tmp_path):
    other = make_data(m=7, seed=3, thumbs=False)
    with pytest.raises(MapError, match="already exists.*overwrite=True"):
        build(built, other)
    assert len(MapDatabase.load(built)) == M
    db = build(built, other, overwrite=True, source="second")
    assert len(db) == 7 and db.info.source == "second"
    assert sorted(p.name for p in built.parent.iterdir()) == ["m"]   # old map deleted, no leftovers
    np.testing.assert_array_equal(MapDatabase.load(built, verify="full").global_desc, other["glob"])


def test_overwrite_refuses_non_map_directory(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("do not delete")
    with pytest.raises(MapError, match="not a map"):
        build(target, make_data(m=3, thumbs=False), overwrite=True)
    assert (target / "thesis.tex").read_text() == "do not delete"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_failure_restores_old_map(built, data, monkeypatch, exchange):
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in str(src):                       # the new map cannot be moved into place
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    def failing_exchange(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mapdb.os, "rename", failing_rename)
    # with the atomic exchange failing, or unsupported (then the two renames run and the second fails)
    monkeypatch.setattr(mapdb, "_exchange", failing_exchange if exchange else lambda a, b: False)
    with pytest.raises(MapError, match="nothing was written"):
        build(built, make_data(m=7, seed=3, thumbs=False), overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(MapDatabase.load(built, verify="full").global_desc, data["glob"])
    assert sorted(p.name for p in built.parent.iterdir()) == ["m"]


def test_interrupted_overwrite_is_recovered(built, data):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    moved = built.parent / f"{built.name}.old-{dead_pid}-abcd1234"
    os.rename(built, moved)                            # as if killed between the two renames
    with pytest.raises(MapError, match="rename it back"):
        MapDatabase.load(built)
    with pytest.raises(MapError, match="already exists"):
        build(built, make_data(m=3, thumbs=False))    # the next writer first puts the old map back
    np.testing.assert_array_equal(MapDatabase.load(built).global_desc, data["glob"])


# ------------------------------------------------------------------------------ IVF-PQ and devices


def test_ivfpq_index_builds_saves_and_reloads(tmp_path):
    d = make_data(m=2000, g=32, n=4, c=3, thumbs=False)
    path = tmp_path / "ivf"
    build(path, d, index="ivfpq")
    assert (path / "index.faiss").is_file()
    doc = json.loads((path / "map.json").read_text())
    assert doc["index"]["type"] == "ivfpq" and "index.faiss" in doc["files"]
    assert 32 % doc["index"]["m"] == 0
    db = MapDatabase.load(path, verify="full", nprobe=8)
    assert db.info.index == "ivfpq" and db.nprobe == 8
    scores, idx = db.search(d["glob"], 10)
    np.testing.assert_array_equal(idx[:, 0], np.arange(2000))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    np.testing.assert_allclose(scores, np.einsum("qg,qkg->qk", d["glob"], d["glob"][idx]), atol=1e-5)  # exact
    exact_top = np.argsort(-(d["glob"][:50] @ d["glob"].T), axis=1)[:, :10]
    db.nprobe = doc["index"]["nlist"]                   # all lists: only PQ approximation + exact re-scoring
    _, idx_all = db.search(d["glob"][:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx_all, exact_top)])
    assert recall >= 0.95
    flip_byte(path / "index.faiss", (path / "index.faiss").stat().st_size // 2)
    with pytest.raises(MapError, match=r"index\.faiss .* corrupted"):
        MapDatabase.load(path)


@pytest.mark.parametrize("global_dtype", ["float32", "float16"])
def test_hnsw_index_round_trip(tmp_path, global_dtype, caplog):
    d = make_data(m=1500, g=32, n=4, c=3, thumbs=False)
    path = tmp_path / "hnsw"
    build(path, d, index="hnsw", global_dtype=global_dtype)
    doc = json.loads((path / "map.json").read_text())
    assert doc["index"] == {"type": "hnsw", "file": "index.faiss", "m": mapdb.HNSW_M,
                            "ef_construction": mapdb.HNSW_EF_CONSTRUCTION, "ef_search": mapdb.HNSW_EF_SEARCH,
                            "metric": "inner_product"}
    assert "index.faiss" in doc["files"]
    db = MapDatabase.load(path, verify="full")
    assert db.info.index == "hnsw" and db.ef_search == mapdb.HNSW_EF_SEARCH
    stored = d["glob"].astype(global_dtype)
    np.testing.assert_array_equal(db.global_desc, stored)     # the graph's storage is the map's descriptors
    assert db.global_desc.dtype == np.dtype(global_dtype)
    scores, idx = db.search(stored, 10)
    np.testing.assert_array_equal(idx[:, 0], np.arange(1500))
    exact = np.einsum("qg,qkg->qk", stored.astype(np.float32), stored[idx].astype(np.float32))
    np.testing.assert_allclose(scores, exact, atol=1e-5)      # scores are exact inner products
    truth = np.argsort(-(stored[:100].astype(np.float32) @ stored.astype(np.float32).T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx[:100], truth)])
    assert recall >= 0.95
    db.ef_search = 10
    assert db.search(stored[:3], 50)[1].shape == (3, 50)     # k above ef_search: ef_search = k is used
    assert (db.search(stored[:3], 50)[1] >= 0).all()
    flat = build(tmp_path / "flat", make_data(m=5, thumbs=False))
    assert flat.ef_search is None
    with pytest.raises(ConfigError, match="HNSW maps only"):
        flat.ef_search = 5
    # a GPU cannot search an HNSW graph: the load says so and stays on CPU without trying
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(mapdb, "_faiss_gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda *a: pytest.fail("HNSW moved to a GPU"), raising=False)
    with caplog.at_level("INFO", logger="r2former_core.mapdb"):
        assert MapDatabase.load(path, device="cuda").search_device == "cpu"
    monkeypatch.undo()
    assert "HNSW index, which faiss cannot search on a GPU" in caplog.text
    flip_byte(path / "index.faiss", (path / "index.faiss").stat().st_size // 2)
    with pytest.raises(MapError, match=r"index\.faiss .* corrupted"):
        MapDatabase.load(path)


def test_hnsw_file_of_another_kind_is_refused(tmp_path):
    d = make_data(m=1200, g=32, n=4, c=3, thumbs=False)
    build(tmp_path / "ivf", d, index="ivfpq")
    build(tmp_path / "h", d, index="hnsw")
    (tmp_path / "h" / "index.faiss").write_bytes((tmp_path / "ivf" / "index.faiss").read_bytes())
    files = json.loads((tmp_path / "h" / "map.json").read_text())["files"]
    files["index.faiss"]["bytes"] = (tmp_path / "h" / "index.faiss").stat().st_size
    edit_json(tmp_path / "h", files=files)
    with pytest.raises(MapError, match="not an HNSW index over float32 vectors"):
        MapDatabase.load(tmp_path / "h", verify="quick")


def test_small_ivfpq_request_falls_back_to_flat(tmp_path, data):
    db = build(tmp_path / "m", data, index="ivfpq")
    assert db.info.index == "flat" and not (tmp_path / "m" / "index.faiss").exists()


def test_gpu_branch_stays_on_cpu_without_gpus(built, monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)   # even with GPU symbols
    assert not mapdb._faiss_gpu_available()
    for device in ("auto", "cuda", "cuda:1", "cpu"):
        db = MapDatabase.load(built, device=device)
        assert db.search_device == "cpu"
        assert db.search(db.global_desc[:2], 1)[1][:, 0].tolist() == [0, 1]
    monkeypatch.delattr(faiss, "StandardGpuResources")
    assert not mapdb._faiss_gpu_available()
    with pytest.raises(DeviceError, match="unknown device"):
        MapDatabase.load(built, device="tpu")


# ------------------------------------------------------------------------------ sizing


@pytest.mark.parametrize("thumbs", [False, True])
def test_estimate_size_matches_disk(tmp_path, thumbs):
    d = make_data(m=20, g=256, n=500, c=131, thumbs=thumbs)
    path = tmp_path / "m"
    build(path, d)
    actual = sum(p.stat().st_size for p in path.iterdir())
    thumb_bytes = (path / "thumbnails.bin").stat().st_size / 20
    est = MapDatabase.estimate_size(20, 256, 500, 131, thumb_bytes=thumb_bytes, name_bytes=20)
    assert abs(est["disk_bytes"] - actual) / actual < 0.10
    assert set(est["files"]) >= set(mapdb.DATA_FILES)
    big = MapDatabase.estimate_size(1_000_000, 256, 500, 131)
    assert big["disk_bytes_per_image"] <= 140_000
    assert big["ram_bytes"] < 3 * 1024**3
    assert MapDatabase.estimate_size(10, 256, 500, 131, global_dtype="float16")["files"]["global.npy"] == 128 + 5120


def test_search_threads_only_for_the_call(built, data):
    before = faiss.omp_get_max_threads()
    for threads in (None, 1, 2):
        db = MapDatabase.load(built, search_threads=threads)
        _, idx = db.search(data["glob"], 3)
        np.testing.assert_array_equal(idx[:, 0], np.arange(M))
        assert faiss.omp_get_max_threads() == before
    assert MapDatabase.load(built)._threads_for(1) == 1            # tiny search: one thread
    big = MapDatabase.load(built)
    big.search_threads = 3
    assert big._threads_for(1) == 3
