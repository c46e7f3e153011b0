"""build-map with sessions: --append adds a drive as a new session; under torchrun two CPU processes (gloo)
write the same map as one process, byte for byte."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from r2former_core.cli.main import main
from r2former_core.data.poses import quat_from_yaw, write_tum
from r2former_core.mapdb import MapDatabase
from r2former_core.mapshards import shard_range
from r2former_core.model import save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def drive(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("drive")
    rng = np.random.default_rng(3)
    n = 21
    stamps = 1_700_000_000.0 + np.arange(n) * 0.5
    poses = np.zeros((n, 7))
    poses[:, 0] = np.arange(n) * 2.0
    poses[:, 3:] = quat_from_yaw(np.linspace(0, 0.5, n))
    (root / "images").mkdir()
    for s in stamps:
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = cv2.resize(small, (128, 96), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / "images" / f"{s:.6f}.png"), img)
    write_tum(root / "poses.txt", stamps, poses)
    return root, save_model(tiny_model, root / "tiny.safetensors")


def test_shard_ranges_are_contiguous_whole_batches():
    for n, b, w in [(21, 4, 2), (21, 4, 3), (5, 8, 2), (100, 1, 7), (3, 1, 5)]:
        ranges = [shard_range(n, b, r, w) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == c[0] for a, c in zip(ranges, ranges[1:]))            # contiguous, in rank order
        assert all(start % b == 0 for start, _ in ranges)                        # cut at batch boundaries
    assert [shard_range(21, 4, r, 2) for r in range(2)] == [(0, 12), (12, 21)]   # 6 batches (the last one short)


def test_two_process_torchrun_build_equals_single_process_build(drive, tmp_path):
    root, model = drive
    args = ["build-map", "--images", str(root / "images"), "--poses", str(root / "poses.txt"), "--model", str(model),
            "--device", "cpu", "--batch-size", "4", "--min-distance", "1", "--session-name", "day",
            "--conditions", "day"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "r2former_core.cli.main", *args, "--out", str(tmp_path / "sharded"),
                           "--shard-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 of 2 extracts keyframes 12..20 of 21" in proc.stderr
    assert "received 9 map entries from rank 1" in proc.stderr
    single = json.loads((tmp_path / "single" / "map.json").read_text())
    sharded = json.loads((tmp_path / "sharded" / "map.json").read_text())
    assert single["count"] == sharded["count"] == 21
    # every data file, byte for byte: same entries in the same order, same features, poses, thumbnails
    assert sharded["files"] == single["files"]
    drop_time = [{k: v for k, v in s.items() if k != "created"} for s in single["sessions"]]
    assert drop_time == [{k: v for k, v in s.items() if k != "created"} for s in sharded["sessions"]]
    assert drop_time[0]["count"] == 21 and drop_time[0]["conditions"] == ["day"]
    assert MapDatabase.load(tmp_path / "sharded", verify="full").names == MapDatabase.load(tmp_path / "single").names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded", "single"]   # the shard spool is gone


def test_build_map_append_adds_a_session_and_refuses_another_model(drive, tmp_path, tiny_config, capsys):
    from r2former_core.model import build_model
    root, model = drive
    src = ["--images", str(root / "images"), "--poses", str(root / "poses.txt"), "--device", "cpu"]
    out = tmp_path / "map"
    assert main(["build-map", *src, "--model", str(model), "--out", str(out), "--min-distance", "5",
                 "--session-name", "day", "--conditions", "day"]) == 0
    first = MapDatabase.load(out)
    n1 = len(first)
    assert main(["build-map", *src, "--model", str(model), "--append", str(out), "--session-name", "dusk",
                 "--conditions", "dusk, rain"]) == 0
    assert "in 2 sessions" in capsys.readouterr().out
    db = MapDatabase.load(out, verify="full")
    assert len(db) == n1 + 21 and db.sessions.tolist() == [0] * n1 + [1] * 21
    assert [(s.name, s.conditions) for s in db.info.sessions] == [("day", ("day",)), ("dusk", ("dusk", "rain"))]
    np.testing.assert_array_equal(db.global_desc[:n1], first.global_desc)
    # --append with --out leaves the appended map as it is
    assert main(["build-map", *src, "--model", str(model), "--append", str(out), "--out", str(tmp_path / "copy"),
                 "--min-distance", "10"]) == 0
    assert len(MapDatabase.load(tmp_path / "copy")) == n1 + 21 + 5 and len(MapDatabase.load(out)) == n1 + 21
    other = save_model(build_model(tiny_config, seed=99), tmp_path / "other.safetensors")
    before = (out / "map.json").read_bytes()
    capsys.readouterr()
    assert main(["build-map", *src, "--model", str(other), "--append", str(out), "--log-level", "ERROR"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot append to map" in err[0] and "append with the map's model" in err[0]
    assert (out / "map.json").read_bytes() == before
    assert main(["build-map", *src, "--model", str(model), "--log-level", "ERROR"]) == 2
    assert "--out MAP" in capsys.readouterr().err
