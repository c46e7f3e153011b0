"""`r2former eval --sequence` and `r2former localize --sequence` on a tiny synthetic drive with the demo model:
the JSON fields, the plot and per-frame CSV, the odometry path, and that tracking reranks fewer candidates."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from r2former_core.cli.main import main

DEMO = str(Path(__file__).resolve().parents[1] / "models" / "r2former_tiny_demo.safetensors")
FIELDS = {"within_5m", "gross_error_rate", "ms_per_frame", "reranked_per_frame", "calibration", "published",
          "median_error_m", "frames", "states"}


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    """A map drive by day (40 frames, 2.5 m apart) and a query drive at dusk (24 frames) with odometry, seed 970
    (never used in training), at the demo model's input size; the map built with the demo model."""
    root = tmp_path_factory.mktemp("seq")
    common = ["--seed", "970", "--width", "160", "--height", "128", "--spacing", "2.5"]
    assert main(["synth", "--drive", "map", "--frames", "40", "--out", str(root / "map"), *common]) == 0
    assert main(["synth", "--drive", "query", "--conditions", "dusk", "--frames", "24", "--out", str(root / "q"),
                 "--odometry", *common]) == 0
    assert main(["build-map", "--images", str(root / "map" / "images"), "--poses", str(root / "map" / "poses.txt"),
                 "--out", str(root / "m"), "--model", DEMO]) == 0
    return root


def test_eval_sequence_writes_single_and_tracking(drive, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--map", str(drive / "m"), "--queries", str(drive / "q" / "images"), "--query-poses",
                 str(drive / "q" / "poses.txt"), "--model", DEMO, "--sequence", "--tracking", "both", "--odometry",
                 str(drive / "q" / "odometry.txt"), "--top-k", "20", "--track-track-candidates", "6",
                 "--track-kidnap-candidates", "3", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"single", "tracking", "_meta"}
    single, tracking = data["single"], data["tracking"]
    for s in (single, tracking):
        assert FIELDS <= set(s)
        assert s["frames"] == 24
        for key in ("within_5m", "gross_error_rate", "published", "calibration"):
            assert 0.0 <= s[key] <= 1.0
        assert s["within_5m"] <= s["published"]
        assert s["ms_per_frame"] > 0
    assert single["reranked_per_frame"] == 20
    assert tracking["reranked_per_frame"] < 12          # 20 while searching, then 6 + 3 per frame
    assert tracking["states"].get("tracking", 0) >= 18
    assert single["within_5m"] >= 0.7 and tracking["within_5m"] >= 0.7
    assert data["_meta"]["odometry"].endswith("odometry.txt")
    assert out.with_suffix(".png").stat().st_size > 10_000
    with open(out.with_name("r_frames.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 48 and {r["mode"] for r in rows} == {"single", "tracking"}


def test_localize_sequence_writes_the_tracker_state(drive, tmp_path):
    out = tmp_path / "poses.csv"
    assert main(["localize", "--map", str(drive / "m"), "--images", str(drive / "q" / "images"), "--model", DEMO,
                 "--sequence", "--top-k", "20", "--track-track-candidates", "6", "--track-kidnap-candidates", "3",
                 "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24
    stamps = [float(r["stamp"]) for r in rows]
    assert stamps == sorted(stamps)
    assert {"state", "support", "reranked", "elsewhere", "ms_filter", "still", "coasted"} <= set(rows[0])
    assert int(rows[0]["reranked"]) == 20                 # global search first (whole top_k) ...
    assert int(rows[-1]["reranked"]) <= 9                 # ... then the belief's entries and 3 global ones
    assert sum(r["state"] == "tracking" for r in rows) >= 18
    assert sum(int(r["accepted"]) for r in rows) >= 18


def test_sequence_options_are_checked(drive, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--map", str(drive / "m"), "--queries", "x", "--sequence", "--track-min-mass", "2",
              "--out", str(tmp_path / "r.json")])
    assert "min-mass" in capsys.readouterr().err
    assert main(["localize", "--map", str(drive / "m"), "--images", str(drive / "q" / "images"), "--model", DEMO,
                 "--odometry", str(drive / "q" / "odometry.txt"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "--odometry goes with --sequence" in capsys.readouterr().err
