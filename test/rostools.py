"""Helpers for the ROS tests: a probe node spinning in a thread, node processes, waiting.

The tests start the nodes under test in separate processes (`NodeProcess`) and talk to them over
real topics from a probe node (`RosProbe`) in the test process. conftest.py isolates the ROS
graph (loopback discovery, random domain, temporary log directory).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class Received:
    """Messages of one subscription with their arrival times (time.monotonic())."""
    messages: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, msg: Any) -> None:
        with self.lock:
            self.messages.append(msg)
            self.times.append(time.monotonic())

    def __len__(self) -> int:
        with self.lock:
            return len(self.messages)

    def last(self) -> Any:
        with self.lock:
            return self.messages[-1] if self.messages else None

    def snapshot(self) -> list[Any]:
        with self.lock:
            return list(self.messages)

    def wait(self, count: int = 1, timeout: float = 10.0) -> bool:
        return wait_until(lambda: len(self) >= count, timeout)


class RosProbe:
    """An rclpy node (own context) spinning in a background thread."""

    def __init__(self, name: str = "test_probe") -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, signal_handler_options=rclpy.signals.SignalHandlerOptions.NO)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            while self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except Exception:  # noqa: BLE001 - shutting down
            pass

    def subscribe(self, msg_type: type, topic: str, qos: QoSProfile = RELIABLE) -> Received:
        received = Received()
        self.node.create_subscription(msg_type, topic, received.add, qos)
        return received

    def publisher(self, msg_type: type, topic: str, qos: QoSProfile = RELIABLE):
        return self.node.create_publisher(msg_type, topic, qos)

    def wait_for_publisher(self, topic: str, timeout: float = 20.0) -> bool:
        return wait_until(lambda: self.node.count_publishers(topic) > 0, timeout)

    def wait_for_subscriber(self, topic: str, timeout: float = 20.0) -> bool:
        return wait_until(lambda: self.node.count_subscribers(topic) > 0, timeout)

    def call(self, srv_type: type, name: str, request: Any, timeout: float = 30.0) -> Any:
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout), f"service {name} not available"
            future = client.call_async(request)
            assert wait_until(future.done, timeout), f"service {name} did not answer in {timeout} s"
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self.context.try_shutdown()
        self._thread.join(2.0)
        self.node.destroy_node()


class NodeProcess:
    """A node under test in its own Python process; output goes to files in `log_dir`."""

    def __init__(self, module: str, args: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.module = module
        log_dir.mkdir(parents=True, exist_ok=True)
        stem = module.rsplit(".", 1)[-1]
        self.stdout_path = log_dir / f"{stem}.{os.getpid()}.{time.monotonic_ns()}.out"
        self._out = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env if env is not None else os.environ.copy())

    def output(self) -> str:
        self._out.flush()
        return self.stdout_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def interrupt(self, timeout: float = 5.0) -> tuple[int | None, float]:
        """SIGINT; returns (exit status or None if still running after `timeout`, seconds taken)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - t0

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.interrupt(5.0)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._out.close()


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) ... of a running process, in kB, from /proc/<pid>/status (Linux)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def diagnostic_values(array: Any, name_suffix: str, node: str = "") -> dict[str, str] | None:
    """Values (plus `_level`, `_message`) of the status named `<node>: <name_suffix>` in a DiagnosticArray
    (any node when `node` is empty); None when the array has no such status."""
    for status in array.status:
        head, _, tail = status.name.rpartition(": ")
        if tail == name_suffix and (not node or head == node):
            return {kv.key: kv.value for kv in status.values} | {"_level": status.level[0] if isinstance(
                status.level, bytes) else status.level, "_message": status.message}
    return None


def with_tf2_msgs(env: dict[str, str], path: Path | None) -> dict[str, str]:
    """`env` with the tf2_msgs built by the `tf2_msgs_path` fixture on PYTHONPATH (unchanged when None: a
    ROS installation provides tf2_msgs)."""
    if path is None:
        return env
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([str(path)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def synthetic_images(count: int, height: int = 120, width: int = 160, seed: int = 0) -> list[np.ndarray]:
    """Distinct smooth RGB images (blobs and stripes), deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for _ in range(count):
        img = np.zeros((height, width, 3), np.float32)
        for c in range(3):
            fx, fy, phase = rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15), rng.uniform(0, 6.28)
            img[..., c] = 127 + 100 * np.sin(fx * xx + phase) * np.cos(fy * yy - phase)
        for _ in range(4):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(8, 25)
            color = rng.uniform(0, 255, 3)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            img[mask] = color
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


# ----------------------------------------------------------------------------- models and maps

def save_tiny_model(model, path: Path) -> Path:
    from r2former_core.model import save_model
    return save_model(model, path)


def line_poses(count: int, spacing: float = 1.0) -> np.ndarray:
    """Poses along +x, `spacing` metres apart, heading +x."""
    poses = np.zeros((count, 7))
    poses[:, 0] = np.arange(count) * spacing
    poses[:, 6] = 1.0
    return poses


def build_test_map(model, images: Sequence[np.ndarray], poses: np.ndarray, path: Path,
                   frame_id: str = "map", child_frame: str = "", overwrite: bool = False) -> Path:
    """A map of `images` at `poses`, written through MapDatabase like the real builders do (with
    `overwrite`, an existing map at `path` is replaced the way `build-map --overwrite` replaces it)."""
    import json

    from r2former_core.mapdb import MapDatabase
    from r2former_core.model import preprocess
    cfg = model.cfg
    writer = MapDatabase.create(path, fingerprint=model.fingerprint, model_config=json.loads(cfg.to_json()),
                                image_size=cfg.image_size, global_dim=cfg.global_dim, num_local=cfg.local_tokens,
                                local_values=cfg.local_values, frame_id=frame_id, child_frame=child_frame,
                                source="test", overwrite=overwrite)
    for i, (image, pose) in enumerate(zip(images, poses)):
        feats = model.extract(preprocess(image, size=cfg.image_size))
        writer.add(feats.global_desc[0].numpy(), feats.local[0].numpy(), pose, float(i), f"img{i:03d}",
                   thumbnail=image)
    writer.commit()
    return path
