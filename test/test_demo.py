"""`make demo`: the evaluator's arithmetic, and the whole demo run end to end on a tiny world.

The end-to-end test runs `python -m r2former_ros.demo` (which starts synth, build_map, localize,
demo_evaluator and bag_player as separate processes talking over real topics) with a tiny random
model, and listens to the localizer's ~/pose from this process as well.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from r2former_core.data.poses import quat_from_yaw, read_tum
from r2former_core.demo_report import (
    PoseRecord,
    covariance_ellipse,
    format_table,
    ground_truth_at,
    is_spd,
    pair_latencies,
    plot_trajectory,
    pose_errors,
    summarize,
    within,
)

ROOT = Path(__file__).resolve().parents[1]


def pose(x: float, y: float, yaw_deg: float, z: float = 1.5) -> np.ndarray:
    return np.concatenate([[x, y, z], quat_from_yaw(math.radians(yaw_deg))])


# ------------------------------------------------------------------------------- arithmetic

def test_pose_errors_position_and_wrapped_yaw():
    est = np.stack([pose(3, 4, 179), pose(0, 0, 10), pose(1, 1, -90)])
    gt = np.stack([pose(0, 0, -179), pose(0, 0, -15), pose(1, 1, 90)])
    pos, yaw = pose_errors(est, gt)
    np.testing.assert_allclose(pos, [5.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(yaw, [2.0, 25.0, 180.0], atol=1e-6)


def test_within_needs_both_thresholds_inclusive_and_nan_is_outside():
    mask = within(np.array([5.0, 5.01, 1.0, 1.0, np.nan]), np.array([20.0, 1.0, 20.5, 0.0, 0.0]), 5.0, 20.0)
    assert mask.tolist() == [True, False, False, True, False]


def test_latency_pairs_by_exact_stamp_and_counts_unpaired():
    arrivals = {100: 10.0, 200: 10.1, 300: 10.2}
    lat, unpaired = pair_latencies(arrivals, [(100, 10.25), (300, 10.5), (400, 11.0)])
    np.testing.assert_allclose(lat, [0.25, 0.3])
    assert unpaired == 1


def test_ground_truth_exact_interpolated_and_missing():
    base = 1_700_000_000 * 10**9
    stamps = np.array([base, base + 50_000_000, base + 100_000_000], dtype=np.int64)
    poses = np.stack([pose(0, 0, 0), pose(1, 0, 0), pose(2, 0, 0)])
    out, valid = ground_truth_at(stamps, poses, np.array([base + 50_000_000, base + 75_000_000, base + 10**9]))
    assert valid.tolist() == [True, True, False]
    np.testing.assert_allclose(out[0, :3], [1, 0, 1.5])
    np.testing.assert_allclose(out[1, :3], [1.5, 0, 1.5], atol=1e-9)
    assert np.isnan(out[2]).all()


def test_spd_and_ellipse_axes():
    assert is_spd(np.diag([1.0, 2, 3, 4, 5, 6]))
    assert not is_spd(np.diag([1.0, 0, 3]))
    assert not is_spd(np.array([[1.0, 2.0], [0.0, 1.0]]))
    outline = covariance_ellipse(np.diag([4.0, 1.0]), sigma=2.0, points=9)
    np.testing.assert_allclose(np.abs(outline).max(0), [4.0, 2.0], atol=1e-9)   # 2 sigma: 2*2 m and 2*1 m


def test_summary_counts_fractions_and_table(tmp_path):
    base = 1_700_086_400 * 10**9
    gt_stamps = base + np.arange(6, dtype=np.int64) * 100_000_000
    gt = np.stack([pose(2.0 * i, 0, 0) for i in range(6)])
    cov = np.diag([1.0, 1.0, 0.1, 0.01, 0.01, 0.05])
    poses = [PoseRecord(int(gt_stamps[0]), pose(0.5, 0, 5), cov, 1.30),       # 0.5 m, 5 deg: within
             PoseRecord(int(gt_stamps[2]), pose(4, 6, 0), cov, 1.55),         # 6 m: outside
             PoseRecord(int(gt_stamps[4]), pose(9, 0, 30), cov, 1.80)]        # 1 m but 30 deg: outside
    arrivals = {int(s): 1.0 + 0.1 * i for i, s in enumerate(gt_stamps)}
    diag = {"received": "6", "processed": "4", "dropped": "2", "rejected": "1", "latency_total_ms": "120.5"}
    s = summarize(poses, arrivals, gt_stamps, gt, frames_published=6, diagnostics=diag)
    assert s["frames"] == dict(published=6, seen_by_evaluator=6, received_by_localizer=6, processed=4, dropped=2,
                               poses=3, rejected=1, poses_with_ground_truth=3)
    a = s["accuracy"]
    assert a["within"] == 1
    assert a["fraction_of_poses"] == pytest.approx(1 / 3)
    assert a["fraction_of_processed"] == pytest.approx(1 / 4)
    assert a["fraction_of_published"] == pytest.approx(1 / 6)
    assert a["median_position_error_m"] == pytest.approx(1.0)
    assert a["median_yaw_error_deg"] == pytest.approx(5.0)
    lat = s["latency"]
    # arrivals 1.0, 1.2, 1.4 -> latencies 0.30, 0.35, 0.40 s
    assert lat["paired"] == 3 and lat["unpaired"] == 0
    assert lat["p50_ms"] == pytest.approx(350.0)
    assert lat["localizer_stage_ms"]["total"] == pytest.approx(120.5)
    assert s["covariance"]["all_spd"]
    assert [r["within"] for r in s["poses"]] == [True, False, False]
    json.dumps(s)                                                          # JSON-ready
    table = format_table(s)
    assert "1 of 3 poses = 33.3 %" in table and "350 ms" in table
    png = plot_trajectory(s, gt, tmp_path / "t.png", map_poses=gt)
    assert png.stat().st_size > 1000


def test_summary_without_poses_or_diagnostics():
    s = summarize([], {5: 1.0}, np.array([5]), np.stack([pose(0, 0, 0)]))
    assert s["frames"]["poses"] == 0 and s["frames"]["processed"] is None
    assert s["accuracy"]["fraction_of_poses"] is None and s["latency"]["p50_ms"] is None
    assert "n/a" in format_table(s)


def test_compare_takes_every_nth_frame_and_the_node_parameters():
    import yaml

    from r2former_core.data.sources.base import ListSource, PosedImage, PoseFrames
    from r2former_core.demo_compare import EveryNth, configs_from_params
    records = [PosedImage(f"f{i}", float(i), pose(i, 0, 0), np.zeros((4, 4, 3), np.uint8)) for i in range(7)]
    sub = EveryNth(ListSource(records, PoseFrames("map", "base_link")), 3)
    assert len(sub) == 3 and sub.names == ["f0", "f3", "f6"] and [r.name for r in sub] == sub.names
    stamps, poses = sub.poses()
    assert stamps.tolist() == [0.0, 3.0, 6.0] and poses[:, 0].tolist() == [0.0, 3.0, 6.0]
    values = yaml.safe_load((Path(ROOT) / "config" / "localize.yaml").read_text())["/**"]["ros__parameters"]
    values.update(top_k=7, rerank="ransac", track_min_mass=0.8, track_kidnap_candidates=3)
    loc, track = configs_from_params(values, "cpu")
    assert (loc.top_k, loc.rerank, loc.device) == (7, "ransac", "cpu")
    assert (track.min_mass, track.kidnap_candidates, track.max_speed) == (0.8, 3, values["track_max_speed"])


# ------------------------------------------------------------------------------ end to end

def run_demo(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r2former_ros.demo", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=os.environ.copy())


@pytest.mark.ros
def test_demo_end_to_end_on_a_tiny_world(tmp_path, tiny_model):
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rostools import RosProbe, save_tiny_model

    from r2former_ros.conversions import stamp_to_ns

    model = save_tiny_model(tiny_model, tmp_path / "tiny.safetensors")
    out = tmp_path / "demo_out"
    probe = RosProbe("demo_probe")
    try:
        seen = probe.subscribe(PoseWithCovarianceStamped, "/r2former_localizer/pose")
        result = run_demo(["--out", str(out), "--map", "", "--model", str(model), "--seed", "3", "--map-frames", "12",
                           "--query-frames", "10", "--min-confidence", "0", "--top-k", "5",
                           # half speed: 2 s of camera, so a loaded machine still processes several frames
                           "--rate", "0.5",
                           # the random-weight model never makes one place hold 90 % of the belief: publish the
                           # tracker's most probable place whatever its probability
                           "--set", "track_min_mass=0.0", "--compare-every", "2",
                           "--idle-timeout", "3", "--domain-id", os.environ["ROS_DOMAIN_ID"], "--device", "cpu"])
    finally:
        probe.close()
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("[1/7]", "[6/7]", "[7/7]", "within 5 m and 20 deg", "latency p50 / p95", "tracking (live)",
                 "single (offline, 5 frames)", "tracking (offline, 5 frames)", "demo finished"):
        assert step in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    f = summary["frames"]
    assert f["published"] == 10
    assert 0 < f["seen_by_evaluator"] <= 10
    logs = "\n".join(f"--- {log.name}\n" + log.read_text()[-2000:] for log in sorted((out / "logs").glob("*.log")))
    assert 0 < f["poses"] <= f["processed"] <= f["received_by_localizer"] <= 10, f"{f}\n{logs}"
    assert f["processed"] + f["dropped"] == f["received_by_localizer"]
    assert f["rejected"] == 0                                   # track_min_mass 0: every result is published
    assert f["poses_with_ground_truth"] == f["poses"]
    a = summary["accuracy"]
    assert 0.0 <= a["fraction_of_poses"] <= 1.0 and a["median_position_error_m"] >= 0.0
    assert a["within"] == sum(r["within"] for r in summary["poses"])
    lat = summary["latency"]
    assert lat["paired"] == f["poses"] and lat["unpaired"] == 0
    assert 0 < lat["p50_ms"] <= lat["p95_ms"]
    assert summary["covariance"]["all_spd"]
    assert 0 <= a["gross_errors"] <= f["poses"]
    # tracking: live (the node's diagnostics) and offline against single frames on the same frames
    t = summary["tracking"]
    assert t["enabled"] and t["frames"] == f["processed"] and 0 < t["reranked_per_frame"] <= 5
    assert summary["demo"]["localize_params"]["tracking"] is True
    assert summary["demo"]["localize_params"]["track_min_mass"] == 0.0
    c = summary["comparison"]
    assert c["every"] == 2 and c["frames"] == 5
    for mode in ("single", "tracking"):
        m = c[mode]
        assert m["frames"] == 5 and 0.0 <= m["within_5m"] <= m["published"] <= 1.0, m
        assert 0.0 <= m["gross_error_rate"] <= m["published"] and m["ms_per_frame"] > 0
    assert c["single"]["reranked_per_frame"] == 5.0            # every frame reranks the whole top_k
    assert 0 < c["tracking"]["reranked_per_frame"] <= 5.0
    assert (out / "comparison.png").stat().st_size > 1000 and "comparison.png" in summary["files"]
    assert summary["stopped_by"] == "idle"
    assert summary["demo"]["localize_exit"] == 0 and summary["demo"]["map_images"] == 12
    assert summary["demo"]["model_fingerprint"] == tiny_model.fingerprint
    assert summary["demo"]["image_size"] == [2 * v for v in tiny_model.cfg.image_size]   # --size auto

    # Every pose is for a query frame, at the ground truth's stamps; the probe heard the same topic.
    gt_stamps, _ = read_tum(out / "work" / "query" / "poses.txt")
    gt_ns = {int(round(s * 1e9)) for s in gt_stamps}
    assert {r["stamp_ns"] for r in summary["poses"]} <= gt_ns
    heard = {stamp_to_ns(m.header.stamp) for m in seen.snapshot()}
    assert heard and heard <= {r["stamp_ns"] for r in summary["poses"]}

    assert (out / "trajectory.png").stat().st_size > 1000
    matches = sorted(out.glob("matches_*.png"))
    assert 1 <= len(matches) <= 4
    assert summary["files"] == ["trajectory.png"] + [m.name for m in matches] + ["comparison.png"]
    for log in ("synth_map", "synth_query", "build_map", "localize", "demo_evaluator", "bag_player", "compare"):
        assert (out / "logs" / f"{log}.log").is_file()


def test_demo_failed_step_is_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a model")
    result = run_demo(["--out", str(tmp_path / "out"), "--map", "", "--model", str(bad), "--map-frames", "3",
                       "--query-frames", "2",
                       "--size", "64x48"], timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("demo: step 'build_map' failed (exit 2): build_map: error:"), result.stderr
    assert "build_map.log" in last
    assert not (tmp_path / "out" / "summary.json").exists()


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.ros
def test_demo_ctrl_c_stops_every_child(tmp_path, tiny_model):
    import signal

    from rostools import save_tiny_model, wait_until

    model = save_tiny_model(tiny_model, tmp_path / "tiny.safetensors")
    out = tmp_path / "interrupted"
    log = open(tmp_path / "demo.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "r2former_ros.demo", "--out", str(out), "--map", "",
                             "--model", str(model),
                             "--map-frames", "6", "--query-frames", "600", "--size", "128x96", "--device", "cpu",
                             "--domain-id", os.environ["ROS_DOMAIN_ID"]], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=os.environ.copy())
    try:
        # the query bag (60 s) is playing: localize, demo_evaluator and bag_player are running
        assert wait_until(lambda: "[5/7]" in (tmp_path / "demo.out").read_text() or proc.poll() is not None, 240)
        assert wait_until(lambda: len(_processes_mentioning(str(out))) >= 4, 30), _processes_mentioning(str(out))
        proc.send_signal(signal.SIGINT)
        proc.wait(120)            # the nodes get SIGINT together, then SIGTERM after 10 s, then SIGKILL after 5 s
        assert proc.returncode == 130, (tmp_path / "demo.out").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "demo.out").read_text()
    assert text.strip().splitlines()[-1] == "demo: interrupted; stopping the nodes", text
    def describe(pids):
        return [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:200], Path(f"/proc/{pid}/stat").read_text()[:80])
                for pid in pids if Path(f"/proc/{pid}").exists()]
    assert wait_until(lambda: not _processes_mentioning(str(out)), 5), describe(_processes_mentioning(str(out)))
