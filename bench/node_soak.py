#!/usr/bin/env python3
"""Soak: the `localize` node in its own process under a 30 Hz 640x480 camera stream with 1 % malformed messages.

The camera is this process: an rclpy publisher of raw rgb8 `sensor_msgs/Image`s, best effort (what camera
drivers do), over Fast DDS shared memory (config/fastdds_shm.xml is loaded here before rclpy starts: large
best-effort samples are lost over UDP). Every `--malformed-every`-th message is malformed (cycling through: data
shorter than step x height, an unknown encoding, 30000 x 30000 declared with short data, zero size, step smaller
than a row). The map is built first from distinct synthetic 640x480 images with the same model; the stream
cycles through them.

Measured:
* the node's resident memory (VmRSS from /proc/<pid>/status) every second: growth after `--warmup` seconds
  (median of the last 30 samples minus median of the first 30 after warm-up, shorter windows for short runs),
  the least-squares slope after warm-up and over its second half (what remains once allocators settled),
  the peak (VmHWM);
* the node's diagnostics (`received`, `processed`, `dropped`, `pending`, `malformed`) every second: `pending`
  (frames waiting in the node: its one-slot buffer) must never exceed 1, and at the end `dropped` must equal
  `received - processed`;
* latency from publishing an image to receiving its pose here (p50, p95, max), and the node's own
  decode-to-publish time (`latency_total_ms`, smoothed);
* the node's log: every WARN/ERROR line that is not about a skipped malformed image is reported.

Prints a table and writes JSON (default bench/results/node_soak.json).

    python bench/node_soak.py [--duration 600] [--rate 30] [--malformed-every 100] [--warmup 60]
                              [--model models/r2former_tiny_demo.safetensors] [--out bench/results/node_soak.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import machine_info, write_report

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("node_soak")

NODE = "soak_localizer"
TOPIC = "/soak/image"
MALFORMED_KINDS = ("data-short", "unknown-encoding", "huge-size", "zero-size", "step-too-small")
RSS_BOUND_MB = 50.0
EXPECTED_LOG = re.compile(r"skipping image")


# ------------------------------------------------------------------------------------------------- inputs

def synthetic_frames(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct smooth RGB images (sine gratings and discs), deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for _ in range(count):
        img = np.zeros((height, width, 3), np.float32)
        for c in range(3):
            fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
            img[..., c] = 127 + 100 * np.sin(fx * xx + phase) * np.cos(fy * yy - phase)
        for _ in range(12):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 80)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def build_soak_map(model_path: Path, frames: list[np.ndarray], out: Path) -> Path:
    """A map of `frames` along a line (1 m apart), extracted with the node's model."""
    from r2former_core.features import extract_image
    from r2former_core.mapdb import MapDatabase
    from r2former_core.model import load_model
    model = load_model(model_path, device="cpu")
    cfg = model.cfg
    writer = MapDatabase.create(out, fingerprint=model.fingerprint, model_config=json.loads(cfg.to_json()),
                                image_size=cfg.image_size, global_dim=cfg.global_dim, num_local=cfg.local_tokens,
                                local_values=cfg.local_values, frame_id="map", child_frame="base_link",
                                source="bench/node_soak.py")
    for i, frame in enumerate(frames):
        global_desc, local = extract_image(model, frame)
        writer.add(global_desc, local, [float(i), 0, 0, 0, 0, 0, 1], float(i), f"soak{i:03d}", thumbnail=frame)
    writer.commit().close()
    return out


def malformed_message(kind: str, good):
    """A malformed copy of the good Image `good`."""
    from sensor_msgs.msg import Image
    msg = Image(height=good.height, width=good.width, encoding=good.encoding, step=good.step, is_bigendian=0)
    if kind == "data-short":
        msg.data = bytes(good.data)[:-1]
    elif kind == "unknown-encoding":
        msg.encoding, msg.data = "weird8", bytes(good.data)
    elif kind == "huge-size":
        msg.height, msg.width, msg.step, msg.data = 30000, 30000, 90000, bytes(100)
    elif kind == "zero-size":
        msg.height, msg.width, msg.step, msg.data = 0, 0, 0, b""
    else:
        msg.step, msg.data = good.step - 1, bytes(good.data)
    return msg


# ------------------------------------------------------------------------------------------------ records

@dataclass
class Records:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[int, float] = field(default_factory=dict)        # stamp ns -> publish time (good frames)
    latencies: list[float] = field(default_factory=list)        # seconds, publish -> pose received
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    memory: list[tuple[float, int, int]] = field(default_factory=list)   # (t, VmRSS kB, VmHWM kB)
    good_sent: int = 0
    malformed_sent: int = 0

    def on_pose(self, msg) -> None:
        now = time.monotonic()
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self.lock:
            t = self.sent.pop(stamp, None)
            if t is not None:
                self.latencies.append(now - t)

    def on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name == f"{NODE}: localization":
                values = {kv.key: kv.value for kv in status.values}
                values["_t"] = time.monotonic()
                values["_level"] = status.level[0] if isinstance(status.level, bytes) else int(status.level)
                values["_message"] = status.message
                with self.lock:
                    self.diagnostics.append(values)


def memory_kb(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


# ---------------------------------------------------------------------------------------------- analysis

def rss_summary(memory: list[tuple[float, int, int]], t_start: float, warmup: float) -> dict[str, float]:
    """Growth of VmRSS after warm-up: median of the last window minus median of the first (MB), slope (MB/min)."""
    t = np.array([m[0] - t_start for m in memory])
    rss = np.array([m[1] / 1024 for m in memory])
    after = t >= warmup
    if after.sum() < 4:
        raise ValueError(f"only {after.sum()} memory samples after the warm-up of {warmup} s")
    ts, rs = t[after], rss[after]
    window = max(2, min(30, len(rs) // 4))
    slope = float(np.polyfit(ts / 60.0, rs, 1)[0])
    half = ts >= ts[0] + (ts[-1] - ts[0]) / 2           # settling (allocator, caches) shows in the first half
    slope_late = float(np.polyfit(ts[half] / 60.0, rs[half], 1)[0]) if half.sum() >= 4 else float("nan")
    return {"warmup_s": warmup, "samples": int(len(rs)), "window_samples": window,
            "rss_at_warmup_mb": float(np.median(rs[:window])), "rss_final_mb": float(np.median(rs[-window:])),
            "growth_mb": float(np.median(rs[-window:]) - np.median(rs[:window])),
            "growth_max_mb": float(rs.max() - np.median(rs[:window])), "slope_mb_per_min": slope,
            "slope_second_half_mb_per_min": slope_late,
            "rss_min_mb": float(rss.min()), "rss_max_mb": float(rss.max()),
            "peak_hwm_mb": float(max(m[2] for m in memory) / 1024)}


def unexpected_log_lines(text: str) -> list[str]:
    """WARN / ERROR / FATAL lines of the node's log that are not about a skipped malformed image."""
    return [line for line in text.splitlines()
            if re.search(r"\[(WARN|ERROR|FATAL)\]", line) and not EXPECTED_LOG.search(line)]


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q)) if values else float("nan")


# ------------------------------------------------------------------------------------------------ run

def node_command(map_dir: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "r2former_ros.localize_node", "--ros-args", "-r", f"__node:={NODE}",
            "-r", f"image:={TOPIC}", "-p", f"map_path:={map_dir}", "-p", f"model_path:={model}", "-p", "device:=cpu",
            "-p", "min_confidence:=0.0", "-p", "matches_rate:=0.0", "-p", "diagnostics_rate:=1.0",
            "-p", "expected_image_rate_max:=100.0"]


def run_soak(model: Path, duration: float, rate: float = 30.0, malformed_every: int = 100, warmup: float = 60.0,
             width: int = 640, height: int = 480, map_images: int = 30, work: Path | None = None,
             progress: bool | None = None) -> dict[str, Any]:
    """Run the soak; returns the results (see the module doc). `work` keeps the map and the node's log."""
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(ROOT / "config" / "fastdds_shm.xml"))
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from tqdm import tqdm

    from r2former_ros.conversions import rgb_to_image_msg

    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="node_soak-")) if work is None else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    frames = synthetic_frames(map_images, height, width)
    t0 = time.monotonic()
    map_dir = build_soak_map(Path(model), frames, work / "map")
    log.info("map of %d %dx%d images built in %.1f s", map_images, width, height, time.monotonic() - t0)
    good = [rgb_to_image_msg(f) for f in frames]
    for msg in good:
        msg.header.frame_id = "camera"
    load_start = os.getloadavg()

    node_log = work / "node.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with open(node_log, "wb") as out:
        node = subprocess.Popen(node_command(map_dir, Path(model)), stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    records = Records()
    context = rclpy.Context()
    rclpy.init(context=context, signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
    probe = rclpy.create_node("soak_camera", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(probe)
    spinner = threading.Thread(target=lambda: _spin(executor, context), daemon=True)
    spinner.start()
    camera = probe.create_publisher(Image, TOPIC, QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT))
    probe.create_subscription(PoseWithCovarianceStamped, f"/{NODE}/pose", records.on_pose, 100)
    probe.create_subscription(DiagnosticArray, "/diagnostics", records.on_diagnostics, 100)
    try:
        deadline = time.monotonic() + 120
        while camera.get_subscription_count() == 0 or not records.diagnostics:
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node did not come up:\n{node_log.read_text()[-3000:]}")
            time.sleep(0.1)
        t_start = time.monotonic()
        sampler_stop = threading.Event()
        sampler = threading.Thread(target=_sample_memory, args=(node.pid, records, sampler_stop), daemon=True)
        sampler.start()
        period = 1.0 / rate
        total = int(round(duration * rate))
        bar = tqdm(total=total, desc="soak frames", unit="frame", disable=None if progress is None else not progress)
        next_t = time.monotonic()
        stamp_ns = 1_000_000_000_000
        for i in range(total):
            stamp_ns += int(period * 1e9)
            base = good[i % len(good)]
            if malformed_every and (i + 1) % malformed_every == 0:
                msg = malformed_message(MALFORMED_KINDS[(i // malformed_every) % len(MALFORMED_KINDS)], base)
                records.malformed_sent += 1
            else:
                msg = base
                with records.lock:
                    records.sent[stamp_ns] = time.monotonic()
                records.good_sent += 1
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
            camera.publish(msg)
            bar.update(1)
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if node.poll() is not None:
                break
        bar.close()
        stream_end = time.monotonic()
        time.sleep(3.0)                              # the last frame is processed, diagnostics settle
        sampler_stop.set()
        sampler.join(5)
        alive = node.poll() is None
        final_diag = records.diagnostics[-1] if records.diagnostics else {}
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGINT)
            try:
                node.wait(15)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(5)
        context.try_shutdown()
        spinner.join(2)
        probe.destroy_node()
    load_end = os.getloadavg()

    diags = [d for d in records.diagnostics if d["_t"] >= t_start]
    pending = [int(d["pending"]) for d in diags]
    counts = {k: int(final_diag.get(k, -1)) for k in ("received", "processed", "dropped", "pending", "malformed",
                                                     "too_large", "errors", "published")}
    log_text = node_log.read_text(errors="replace")
    results = {
        "command": " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith("node_soak.py")
                             else "run_soak", f"--duration {duration:g}", f"--rate {rate:g}",
                             f"--malformed-every {malformed_every}", f"--warmup {warmup:g}"]),
        "transport": "raw rgb8 sensor_msgs/Image, best effort, Fast DDS shared memory (config/fastdds_shm.xml)",
        "image": f"{width}x{height}", "rate_hz": rate, "duration_s": duration,
        "stream_seconds": stream_end - t_start, "model": str(model), "map_images": map_images,
        "sent_good": records.good_sent, "sent_malformed": records.malformed_sent,
        "node_alive_at_end": alive, "node_exit_code": node.returncode,
        "diagnostics": counts, "diagnostics_samples": len(diags),
        "max_pending": max(pending) if pending else None,
        "dropped_equals_received_minus_processed": counts["dropped"] == counts["received"] - counts["processed"]
        - counts["pending"] and counts["pending"] == 0,
        "latency_ms": {"p50": percentile_ms(records.latencies, 50), "p95": percentile_ms(records.latencies, 95),
                       "max": percentile_ms(records.latencies, 100), "poses": len(records.latencies)},
        "node_latency_total_ms": float(final_diag.get("latency_total_ms", "nan")),
        "memory": rss_summary(records.memory, t_start, warmup) if records.memory else {},
        "memory_samples": [(round(t - t_start, 2), rss, hwm) for t, rss, hwm in records.memory],
        "unexpected_log_lines": unexpected_log_lines(log_text),
        "malformed_log_lines": sum(1 for line in log_text.splitlines() if EXPECTED_LOG.search(line)),
        "load_average_start": load_start, "load_average_end": load_end,
        "machine": machine_info(), "work": str(work),
    }
    if own_work:
        shutil.rmtree(work, ignore_errors=True)
        results["work"] = "(removed)"
    return results


def _spin(executor, context) -> None:
    try:
        while context.ok():
            executor.spin_once(timeout_sec=0.05)
    except Exception:  # noqa: BLE001 - shutting down
        pass


def _sample_memory(pid: int, records: Records, stop: threading.Event) -> None:
    next_t = time.monotonic()
    while not stop.is_set():
        try:
            rss, hwm = memory_kb(pid)
        except (FileNotFoundError, ProcessLookupError, KeyError):
            return
        records.memory.append((time.monotonic(), rss, hwm))
        next_t += 1.0
        stop.wait(max(0.0, next_t - time.monotonic()))




def table(r: dict[str, Any]) -> str:
    m, d, lat = r["memory"], r["diagnostics"], r["latency_ms"]
    rows = [
        ("stream", f"{r['image']} {r['transport']}, {r['rate_hz']:g} Hz for {r['stream_seconds']:.0f} s"),
        ("sent", f"{r['sent_good']} good + {r['sent_malformed']} malformed"),
        ("node (diagnostics)", f"received {d['received']}, processed {d['processed']}, dropped {d['dropped']}, "
                               f"pending {d['pending']}, malformed {d['malformed']} (too large {d['too_large']}), "
                               f"errors {d['errors']}"),
        ("dropped = received - processed", str(r["dropped_equals_received_minus_processed"])),
        ("max frames waiting in the node", str(r["max_pending"])),
        ("RSS after warm-up", f"{m['rss_at_warmup_mb']:.0f} MB -> {m['rss_final_mb']:.0f} MB: growth "
                              f"{m['growth_mb']:+.1f} MB (max {m['growth_max_mb']:+.1f} MB; bound {RSS_BOUND_MB:g}), "
                              f"slope {m['slope_mb_per_min']:+.3f} MB/min "
                              f"(second half {m['slope_second_half_mb_per_min']:+.3f}), "
                              f"peak (VmHWM) {m['peak_hwm_mb']:.0f} MB"),
        ("latency image -> pose", f"p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, max {lat['max']:.0f} ms "
                                  f"({lat['poses']} poses)"),
        ("node decode..publish (smoothed)", f"{r['node_latency_total_ms']:.0f} ms"),
        ("log lines", f"{r['malformed_log_lines']} about malformed images (throttled), "
                      f"{len(r['unexpected_log_lines'])} other WARN/ERROR"),
        ("node alive at the end", str(r["node_alive_at_end"])),
        ("load average start / end", f"{r['load_average_start'][0]:.1f} / {r['load_average_end'][0]:.1f} "
                                     f"({r['machine']['cores']} cores)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Run on a shared machine, note the load average it prints.")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of streaming (default 600)")
    p.add_argument("--rate", type=float, default=30.0, help="camera rate in Hz (default 30)")
    p.add_argument("--malformed-every", type=int, default=100,
                   help="every N-th message is malformed (default 100 = 1 %%; 0 = none)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS growth is measured (default 60)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--map-images", type=int, default=30, help="synthetic images in the map (default 30)")
    p.add_argument("--model", default=str(ROOT / "models" / "r2former_tiny_demo.safetensors"),
                   help="model file of the node (default: the packaged demo model)")
    p.add_argument("--work", default=None, help="keep the map and the node's log here (default: a removed temp dir)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "node_soak.json"), help="JSON results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    r = run_soak(Path(args.model), args.duration, args.rate, args.malformed_every, args.warmup, args.width,
                 args.height, args.map_images, Path(args.work) if args.work else None)
    r["command"] = "python bench/node_soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(r))
    out = write_report(args.out, r)
    log.info("results written to %s", out)
    ok = (r["node_alive_at_end"] and r["max_pending"] is not None and r["max_pending"] <= 1
          and r["dropped_equals_received_minus_processed"] and r["memory"]["growth_mb"] <= RSS_BOUND_MB
          and not r["unexpected_log_lines"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
