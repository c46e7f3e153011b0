"""Offline pipeline end to end: build-map -> localize -> eval, through the CLI, with a tiny model."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from r2former_core.cli.main import main
from r2former_core.data.poses import quat_from_yaw, write_tum
from r2former_core.localizer import Localizer, LocalizerConfig
from r2former_core.mapdb import MapDatabase
from r2former_core.model import save_model


def make_images(n, seed=0, size=(120, 160)):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
        images.append(cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC))
    return images


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("world")
    images = make_images(12)
    stamps = 1_700_000_000.0 + np.arange(12) * 0.5
    poses = np.zeros((12, 7))
    poses[:, 0] = np.arange(12) * 3.0          # 3 m apart along x
    poses[:, 3:] = quat_from_yaw(np.zeros(12))
    (root / "images").mkdir()
    for s, im in zip(stamps, images):
        cv2.imwrite(str(root / "images" / f"{s:.6f}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    write_tum(root / "poses.txt", stamps, poses)
    model_path = save_model(tiny_model, root / "tiny.safetensors")
    return root, images, poses, model_path


def test_build_localize_eval(world, tmp_path):
    root, images, poses, model_path = world
    map_dir = tmp_path / "map"
    assert main(["build-map", "--device", "cpu", "--images", str(root / "images"), "--poses", str(root / "poses.txt"),
                 "--out", str(map_dir), "--model", str(model_path)]) == 0
    mapdb = MapDatabase.load(map_dir)
    assert len(mapdb) == 12
    assert np.allclose(mapdb.poses, poses)
    assert mapdb.thumbnail(0) is not None

    out_csv = tmp_path / "results.csv"
    assert main(["localize", "--device", "cpu", "--map", str(map_dir), "--images", str(root / "images"),
                 "--out", str(out_csv), "--model", str(model_path), "--rerank", "ransac",
                 "--save-matches", str(tmp_path / "m")]) == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 12
    for i, row in enumerate(rows):
        assert int(row["best_index"]) == i                       # every image finds its own frame
        # frames are 3 m apart: a pose pulled towards a neighbour by even a sixth of that spacing is a bug
        assert abs(float(row["x"]) - poses[i, 0]) < 0.5
        assert all(float(row[k]) > 0 for k in ("var_x", "var_y", "var_yaw"))
        stages = [float(row[f"ms_{k}"]) for k in ("decode", "extract", "search", "rerank", "pose")]
        assert all(v >= 0 for v in stages) and float(row["ms_extract"]) > 0
        assert float(row["ms_total"]) >= sum(stages) - 0.5            # total covers every stage (CSV rounding)
    assert len(list((tmp_path / "m").glob("*.jpg"))) == 12

    report = tmp_path / "eval.json"
    assert main(["eval", "--device", "cpu", "--map", str(map_dir), "--queries", str(root / "images"), "--query-poses",
                 str(root / "poses.txt"), "--model", str(model_path), "--out", str(report), "--threshold-m", "1"]) == 0
    data = json.loads(report.read_text())
    assert set(data) >= {"none", "ransac", "r2former"}
    assert data["none"]["recall@1"] == 1.0 and data["ransac"]["recall@1"] == 1.0
    r2 = data["r2former"]      # random reranker weights: only the structure of recall@N is known
    assert r2["recall@1"] <= r2["recall@5"] <= r2["recall@10"] == 1.0
    assert report.with_suffix(".png").stat().st_size > 0
    # The published pose: the weighted mean of candidates within 5 m of the best one, which is the query's
    # own frame here, so every pose is within the default 5 m; the confidence table is monotone.
    assert data["none"]["pose_correct"] == 1.0 and data["none"]["pose_threshold_m"] == 5.0
    for mode in ("none", "ransac", "r2former"):
        rows = data[mode]["confidence_table"]
        assert rows[0]["min_confidence"] == 0.0 and rows[0]["accepted"] == 1.0
        assert [r["accepted"] for r in rows] == sorted((r["accepted"] for r in rows), reverse=True)
    # ransac finds every query's own frame: sub-metre poses, all inside the covariance's 95 % ellipse
    assert data["ransac"]["pose_median_error_m"] < 0.5 and data["ransac"]["inside_95_ellipse"] == 1.0
    assert (tmp_path / "eval_confidence.png").stat().st_size > 0


def test_build_map_with_keyframe_selection(world, tmp_path):
    root, _, _, model_path = world
    assert main(["build-map", "--device", "cpu", "--images", str(root / "images"), "--poses", str(root / "poses.txt"),
                 "--out", str(tmp_path / "kf"), "--model", str(model_path), "--min-distance", "5"]) == 0
    assert len(MapDatabase.load(tmp_path / "kf")) == 6          # every other frame (3 m apart)


def test_localizer_result_and_mismatched_map(world, tmp_path, tiny_config):
    root, images, poses, model_path = world
    main(["build-map", "--device", "cpu", "--images", str(root / "images"), "--poses", str(root / "poses.txt"), "--out",
          str(tmp_path / "map"), "--model", str(model_path)])
    loc = Localizer.from_files(model_path, tmp_path / "map", LocalizerConfig(top_k=5, rerank="none", device="cpu"))
    res = loc.localize(images[4])
    assert res.best_index == 4 and len(res.candidates) == 5
    assert res.candidates[0].score >= res.candidates[1].score
    assert np.allclose(res.covariance, res.covariance.T) and np.all(np.linalg.eigvalsh(res.covariance) > 0)
    assert {"decode", "extract", "search", "rerank", "pose", "total"} <= set(res.timings_ms)
    assert len(res.matches) > 0 and res.matches.query_xy.shape[1] == 2
    # A map built with another model is refused with a message that says what to do.
    from r2former_core.model import build_model
    other = save_model(build_model(tiny_config, seed=99), tmp_path / "other.safetensors")
    code = main(["localize", "--device", "cpu", "--map", str(tmp_path / "map"), "--images", str(root / "images"),
                 "--out", str(tmp_path / "x.csv"), "--model", str(other)])
    assert code == 2


def test_cli_expected_failures_are_one_line(tmp_path, capsys, world):
    root, _, _, model_path = world
    assert main(["build-map", "--device", "cpu", "--images", str(tmp_path / "missing"), "--poses", "p.txt", "--out",
                 str(tmp_path / "m"), "--model", str(model_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("r2former build-map: error:")
    assert main(["localize", "--device", "cpu", "--map", str(tmp_path / "nomap"), "--images", str(root / "images"),
                 "--out", str(tmp_path / "o.csv"), "--model", str(model_path)]) == 2
    assert main(["build-map", "--device", "cpu", "--images", str(root / "images"), "--poses", str(root / "poses.txt"),
                 "--out", str(tmp_path / "m2"), "--model", str(tmp_path / "nomodel.pth")]) == 2


@pytest.mark.parametrize("command, bad", [
    ("localize", ["--top-k", "0"]),
    ("localize", ["--min-confidence", "2"]),
    ("eval", ["--threshold-m", "-1"]),
    ("eval", ["--top-k", "many"]),
    ("build-map", ["--batch-size", "0"]),
    ("build-map", ["--min-distance", "-3"]),
])
def test_out_of_range_options_are_usage_errors(world, tmp_path, capsys, command, bad):
    root, _, _, model_path = world
    common = {"localize": ["--map", str(tmp_path / "m"), "--images", str(root / "images"), "--out", "o.csv"],
              "eval": ["--map", str(tmp_path / "m"), "--queries", str(root / "images"), "--query-poses",
                       str(root / "poses.txt")],
              "build-map": ["--images", str(root / "images"), "--poses", str(root / "poses.txt"), "--out",
                            str(tmp_path / "m")]}[command]
    with pytest.raises(SystemExit) as exc:
        main([command, "--device", "cpu", *common, "--model", str(model_path), *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert bad[0] in err and ("out of range" in err or "is not a" in err) and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_localize_user_errors_leave_no_partial_csv(world, tmp_path, capsys):
    import shutil

    import torch
    root, _, _, model_path = world
    map_dir = tmp_path / "map"
    assert main(["build-map", "--device", "cpu", "--images", str(root / "images"), "--poses", str(root / "poses.txt"),
                 "--out", str(map_dir), "--model", str(model_path)]) == 0
    queries = tmp_path / "queries"
    shutil.copytree(root / "images", queries)
    names = sorted(p.name for p in queries.iterdir())
    (queries / names[3]).write_bytes(b"\x89PNG broken")       # the 4th query does not decode
    out = tmp_path / "out" / "res.csv"
    args = ["localize", "--device", "cpu", "--map", str(map_dir), "--images", str(queries), "--out", str(out),
            "--model", str(model_path)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert names[3] in err and "--skip-unreadable" in err
    assert not out.exists() and not list(out.parent.glob(".*tmp*"))    # no CSV with 3 rows that looks complete
    assert main([*args, "--skip-unreadable"]) == 0
    assert len(list(csv.DictReader(open(out)))) == len(names) - 1
    # --save-matches naming an existing file, and a CUDA request on a machine without one: one line, exit 2.
    assert main([*args, "--skip-unreadable", "--save-matches", str(out)]) == 2
    assert "is a file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--skip-unreadable", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "CUDA is not available" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_killed_build_map_leaves_nothing_loadable_and_rerun_succeeds(world, tmp_path):
    """SIGKILL `r2former build-map` while it writes: no map under the final name; a rerun builds it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from r2former_core.mapdb import MapError

    root, _, _, model_path = world
    n = 150
    images = make_images(n, seed=5)
    stamps = 1_700_000_000.0 + np.arange(n) * 0.5
    poses = np.zeros((n, 7))
    poses[:, 0] = np.arange(n) * 3.0
    poses[:, 3:] = quat_from_yaw(np.zeros(n))
    (tmp_path / "images").mkdir()
    for s, im in zip(stamps, images):
        cv2.imwrite(str(tmp_path / "images" / f"{s:.6f}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    write_tum(tmp_path / "poses.txt", stamps, poses)
    out = tmp_path / "maps" / "m"
    out.parent.mkdir()
    args = ["build-map", "--device", "cpu", "--images", str(tmp_path / "images"),
            "--poses", str(tmp_path / "poses.txt"), "--out", str(out), "--model", str(model_path)]
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "r2former_core.cli.main", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill as soon as the first batch of entries is in the temporary map: the build then still has
        # most of its batches to go, whatever the machine's speed (sleeping a fixed time raced with fast
        # machines, where the build had already renamed its map into place).
        deadline = time.monotonic() + 120

        def entries_written() -> bool:
            return any(f.stat().st_size > 0 for f in out.parent.glob("m.tmp-*/local.f16"))

        while not entries_written() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "build-map ended before it could be killed mid-way"
    assert list(out.parent.glob("m.tmp-*")), "the killed build-map should have been writing a temporary map"
    assert not out.exists()
    with pytest.raises(MapError):
        MapDatabase.load(out)
    t0 = time.monotonic()
    assert main(args) == 0                                   # the rerun succeeds
    print(f"rerun took {time.monotonic() - t0:.1f} s")
    db = MapDatabase.load(out)
    assert len(db) == n and np.allclose(db.poses, poses)
    db.close()
    assert [p.name for p in out.parent.iterdir()] == ["m"]   # and cleaned up the dead writer's temp dir


def test_map_info_reports_the_map_and_names_damage(world, tmp_path, capsys):
    root, _, poses, model_path = world
    map_dir = tmp_path / "map"
    assert main(["build-map", "--device", "cpu", "--images", str(root / "images"), "--poses", str(root / "poses.txt"),
                 "--out", str(map_dir), "--model", str(model_path)]) == 0
    capsys.readouterr()
    assert main(["map-info", str(map_dir), "--json", "--model", str(model_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 12 and info["thumbnails"] == 12 and info["verified"] == "full"
    assert info["trajectory_length_m"] == pytest.approx(33.0)          # 11 steps of 3 m
    assert info["extent_m"]["x"] == pytest.approx([0.0, 33.0])
    assert info["disk_bytes"] == sum(f.stat().st_size for f in map_dir.iterdir())
    assert main(["map-info", str(map_dir)]) == 0
    assert "12 (format version 1" in capsys.readouterr().out
    assert main(["map-info", str(map_dir), "--log-level", "ERROR"]) == 0      # logging options after the command
    assert "map loaded" not in capsys.readouterr().err
    # One flipped byte in the global descriptors: full verification names the file, exit 2.
    g = map_dir / "global.npy"
    data = bytearray(g.read_bytes())
    data[-5] ^= 0xFF
    g.write_bytes(bytes(data))
    assert main(["map-info", str(map_dir)]) == 2
    assert "global.npy" in capsys.readouterr().err


def test_default_extraction_batch_follows_the_measured_optimum(tiny_model):
    """docs/BENCHMARKS.md: on a CPU the DeiT-S 480x640 model is fastest one image at a time, small models at 8."""
    from r2former_core.mapping import default_batch_size
    from r2former_core.model import ModelConfig, build_model, preset
    assert default_batch_size(build_model(ModelConfig(), seed=0)) == 1
    assert default_batch_size(build_model(preset("r2former_demo"), seed=0)) == 8
    assert 1 <= default_batch_size(tiny_model) <= 8
