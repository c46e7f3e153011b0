"""The 60-second version of the soak benchmark (bench/node_soak.py; the 10-minute figures are in
docs/RELIABILITY.md §5): the localize node in its own process under a 30 Hz 640x480 raw stream (best effort over
Fast DDS shared memory) with 1 % malformed messages. Asserts bounded memory, the one-frame queue bound, the
drop accounting and a clean log; never wall-clock figures.

The benchmark runs as its own process: the Fast DDS shared-memory profile it needs for 640x480 best-effort
images must be loaded before the first DDS participant of the process exists.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rostools import save_tiny_model

pytestmark = [pytest.mark.ros, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_soak_60_s_memory_bounded_one_frame_waits_drops_accounted(tmp_path, tiny_model):
    pytest.importorskip("rclpy")
    model = save_tiny_model(tiny_model, tmp_path / "tiny.safetensors")
    out = tmp_path / "soak.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "node_soak.py"), "--duration", "60", "--warmup", "20",
                        "--map-images", "12", "--model", str(model), "--work", str(tmp_path / "work"),
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    print("\n" + r.stdout)
    d = res["diagnostics"]
    assert res["node_alive_at_end"], (tmp_path / "work" / "node.log").read_text()[-3000:]
    assert res["memory"]["growth_mb"] <= 50.0, res["memory"]
    assert res["max_pending"] is not None and res["max_pending"] <= 1, res["max_pending"]
    assert res["diagnostics_samples"] >= 30
    assert d["received"] > 0 and d["processed"] > 0 and res["latency_ms"]["poses"] > 0, d
    assert d["pending"] == 0 and d["dropped"] == d["received"] - d["processed"], d
    assert d["received"] <= res["sent_good"] + res["sent_malformed"], d
    assert 0 < d["malformed"] <= res["sent_malformed"], d         # malformed frames dropped unread are not counted
    assert d["errors"] == 0, d
    assert res["unexpected_log_lines"] == [], res["unexpected_log_lines"]
    assert res["malformed_log_lines"] >= 1
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
