"""The bad-input matrix through the LIVE localize node (docs/RELIABILITY.md §5).

Every `raw-*` and `compressed-*` row of test/test_bad_input.py is sent over a real topic to a localize node
running in its own process: one node subscribing raw `Image`s and one subscribing `CompressedImage`s, each
shared by all rows of its kind (in file order). A refused row must be counted in the node's diagnostics
(`malformed`, with the row's reason in `last_malformed`) and a good frame sent after it must be localized; a
decoded row must be localized itself. The process must never die.

Then the decompression bombs: the 2.6 MB PNG declaring 30000 x 30000 as a `CompressedImage`, and a raw `Image`
declaring 30000 x 30000 with 100 bytes of data: the node's peak resident memory (VmHWM in /proc/<pid>/status)
must stay within 100 MB of its steady state, and good frames sent right after are localized. A raw image just
above the limit *with* its full 50 MB of data is measured as well (DDS delivers a whole message before any
callback, so that memory is spent whatever the node does; it is printed, not bounded).

The node subscribes reliably (depth 10) so that the 2.6 MB bomb and the large raw message reach it over the
default UDP transport (large best-effort samples need the shared-memory profile, see config/fastdds_shm.xml).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from rostools import (
    NodeProcess,
    RosProbe,
    build_test_map,
    diagnostic_values,
    line_poses,
    memory_kb,
    save_tiny_model,
    synthetic_images,
    wait_until,
)

pytestmark = pytest.mark.ros

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from hostile import png_bomb  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from test_bad_input import COMPRESSED_REFUSED, RAW_REFUSED, compressed, image_msg_of, textured  # noqa: E402

from r2former_ros.conversions import rgb_to_compressed_msg, rgb_to_image_msg, sec_to_stamp, stamp_to_ns  # noqa: E402

MAP_SIZE = 8
BOMB_SENDS = 5
PEAK_BOUND_KB = 100 * 1024
PUB_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("live_bad_input")
    images = synthetic_images(MAP_SIZE, seed=21)
    model = save_tiny_model(tiny_model, root / "tiny.safetensors")
    path = build_test_map(tiny_model, images, line_poses(MAP_SIZE), root / "map")
    return dict(root=root, model=model, map=path, images=images)


class LiveNode:
    """A localize node under test (its own process) and the probe's publisher, poses and diagnostics."""

    def __init__(self, probe: RosProbe, assets: dict, name: str, transport: str) -> None:
        self.probe, self.name, self.transport = probe, name, transport
        self.images = assets["images"]
        msg_type = CompressedImage if transport == "compressed" else Image
        self.topic = f"/{name}/camera"
        self.pub = probe.publisher(msg_type, self.topic, PUB_QOS)
        self.poses = probe.subscribe(PoseWithCovarianceStamped, f"/{name}/pose")
        self.diagnostics = probe.subscribe(DiagnosticArray, "/diagnostics")
        remap = f"image/compressed:={self.topic}" if transport == "compressed" else f"image:={self.topic}"
        self.node = NodeProcess("r2former_ros.localize_node", [
            "--ros-args", "-r", f"__node:={name}", "-r", remap,
            "-p", f"map_path:={assets['map']}", "-p", f"model_path:={assets['model']}", "-p", "device:=cpu",
            "-p", f"image_transport:={transport}", "-p", "min_confidence:=0.0", "-p", "top_k:=3",
            "-p", "tracking:=false",   # single frames: every good image gives a pose
            "-p", "diagnostics_rate:=10.0", "-p", "matches_rate:=0.0", "-p", "qos_reliability:=reliable",
            "-p", "qos_depth:=10"], assets["root"] / "logs")
        self.stamp = 100.0

    def ready(self) -> bool:
        return self.probe.wait_for_subscriber(self.topic, 90) and wait_until(lambda: self.diag(1.0) is not None, 60)

    def diag(self, timeout: float = 10.0) -> dict[str, str] | None:
        """The localization status of a diagnostics message of this node received after this call."""
        n = len(self.diagnostics)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for array in self.diagnostics.snapshot()[n:]:
                values = diagnostic_values(array, "localization", self.name)
                if values is not None:
                    return values
            time.sleep(0.02)
        return None

    def send(self, msg: Image | CompressedImage, frame_id: str = "camera") -> int:
        self.stamp += 0.1
        msg.header.stamp = sec_to_stamp(self.stamp)
        msg.header.frame_id = frame_id
        self.pub.publish(msg)
        return stamp_to_ns(msg.header.stamp)

    def good(self, i: int = 0) -> Image | CompressedImage:
        image = self.images[i % MAP_SIZE]
        return rgb_to_compressed_msg(image) if self.transport == "compressed" else rgb_to_image_msg(image)

    def localized(self, stamp_ns: int, timeout: float = 30.0) -> bool:
        return wait_until(lambda: any(stamp_to_ns(p.header.stamp) == stamp_ns for p in self.poses.snapshot()[-30:]),
                          timeout)

    def malformed(self) -> int:
        d = self.diag()
        assert d is not None, self.node.output()[-3000:]
        return int(d["malformed"])

    def wait_malformed(self, count: int, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            d = self.diag()
            if d is not None and int(d["malformed"]) >= count:
                return d
        raise AssertionError(f"malformed count did not reach {count}: {self.diag()}\n{self.node.output()[-3000:]}")

    def peak_kb(self) -> int:
        return memory_kb(self.node.proc.pid)["VmHWM"]


@pytest.fixture(scope="module")
def nodes(assets):
    probe = RosProbe("live_bad_input_probe")
    raw = LiveNode(probe, assets, "bad_input_raw", "raw")
    comp = LiveNode(probe, assets, "bad_input_compressed", "compressed")
    try:
        for n in (raw, comp):
            assert n.ready(), n.node.output()[-3000:]
            for i in range(3):           # warm-up: decoding, the model and the publishers have run
                assert n.localized(n.send(n.good(i)), 60), n.node.output()[-3000:]
        yield {"raw": raw, "compressed": comp}
    finally:
        for n in (raw, comp):
            n.node.stop()
        probe.close()


def raw_row_message(row: str) -> Image:
    """The message of a RAW_REFUSED row, built as test_bad_input.test_raw_image_refused builds it."""
    fields = RAW_REFUSED[row][0]
    base = image_msg_of(textured(0), "rgb8")
    return image_msg_of(None, fields.get("encoding", "rgb8"), fields.get("height", base.height),
                        fields.get("width", base.width), fields.get("step", base.step),
                        fields.get("data", bytes(base.data)))


def check_refused(n: LiveNode, msg, needle: str, row: str) -> None:
    before = n.malformed()
    n.send(msg)
    d = n.wait_malformed(before + 1)
    assert int(d["malformed"]) == before + 1, d
    assert needle in d["last_malformed"], (needle, d["last_malformed"])
    assert n.localized(n.send(n.good(1))), "a good frame after the bad one must be localized"
    assert n.node.alive()
    print(f"\nLIVE {row}: counted (malformed {before} -> {before + 1}), next good frame localized; "
          f"diagnostics: {d['last_malformed'][:110]}")


@pytest.mark.parametrize("row", RAW_REFUSED)
def test_live_node_refuses_raw_row_and_keeps_serving(nodes, row):
    check_refused(nodes["raw"], raw_row_message(row), RAW_REFUSED[row][2], row)


@pytest.mark.parametrize("row", COMPRESSED_REFUSED)
def test_live_node_refuses_compressed_row_and_keeps_serving(nodes, row):
    make, _, needle = COMPRESSED_REFUSED[row]
    check_refused(nodes["compressed"], make(), needle, row)


def _mono16(bigendian: bool) -> Image:
    gray = np.arange(15, dtype=np.uint16).reshape(3, 5) * 4000
    rows = gray.astype(">u2" if bigendian else "<u2").view(np.uint8).reshape(3, 10)
    padded = np.concatenate([rows, np.full((3, 1), 0xAB, np.uint8)], axis=1)       # step 11: odd, one pad byte
    return image_msg_of(None, "mono16", 3, 5, 11, padded.tobytes(), bigendian=bigendian)


@pytest.mark.parametrize("row, make", [
    ("raw-1x1", lambda: image_msg_of(np.array([[[10, 20, 30]]], np.uint8), "rgb8")),
    ("raw-mono16-odd-step", lambda: _mono16(False)),
    ("raw-mono16-big-endian", lambda: _mono16(True)),
])
def test_live_node_localizes_decodable_raw_row(nodes, row, make):
    n = nodes["raw"]
    before = n.malformed()
    assert n.localized(n.send(make())), n.node.output()[-3000:]
    assert n.malformed() == before and n.node.alive()


def test_live_node_localizes_compressed_with_empty_format(nodes):
    n = nodes["compressed"]
    before = n.malformed()
    msg = rgb_to_compressed_msg(n.images[2])
    msg.format = ""
    assert n.localized(n.send(msg)), n.node.output()[-3000:]
    assert n.malformed() == before and n.node.alive()


def test_malformed_images_are_logged_throttled(nodes):
    """Each node saw several malformed images within seconds: the warning is logged, not once per image."""
    for n in nodes.values():
        lines = [line for line in n.node.output().splitlines() if "skipping image" in line]
        assert lines, n.node.output()[-3000:]
        assert len(lines) < n.malformed(), lines


# ------------------------------------------------------------------------------------------------ bombs

def bomb_run(n: LiveNode, bomb, label: str) -> dict[str, int]:
    """Steady state (after good frames), the bomb BOMB_SENDS times, good frames right after: peak RSS figures."""
    for i in range(5):
        assert n.localized(n.send(n.good(i)))
    steady = memory_kb(n.node.proc.pid)
    before = n.malformed()
    for k in range(BOMB_SENDS):
        n.send(bomb())
        n.wait_malformed(before + k + 1, timeout=60)
    after = memory_kb(n.node.proc.pid)
    d = n.diag()
    assert int(d["too_large"]) >= BOMB_SENDS and "30000x30000" in d["last_malformed"], d
    good = [n.send(n.good(i)) for i in range(3)]
    assert n.localized(good[-1]), "the frame sent right after the bombs must be localized"
    assert n.node.alive()
    figures = {"steady_rss_kb": steady["VmRSS"], "steady_peak_kb": steady["VmHWM"], "after_peak_kb": after["VmHWM"],
               "after_rss_kb": after["VmRSS"], "delta_peak_kb": after["VmHWM"] - steady["VmHWM"]}
    print(f"\nBOMB {label}: {BOMB_SENDS} sent; node peak RSS {steady['VmHWM'] / 1024:.0f} MB -> "
          f"{after['VmHWM'] / 1024:.0f} MB (+{figures['delta_peak_kb'] / 1024:.1f} MB; bound 100 MB); "
          f"RSS {steady['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MB; good frames right after localized")
    return figures


def test_png_bomb_through_live_node_keeps_peak_memory_flat(nodes):
    n = nodes["compressed"]
    payload = png_bomb()
    figures = bomb_run(n, lambda: compressed("png", payload), f"PNG {len(payload) / 1e6:.1f} MB as CompressedImage")
    assert figures["delta_peak_kb"] < PEAK_BOUND_KB, figures


def test_raw_bomb_through_live_node_keeps_peak_memory_flat(nodes):
    n = nodes["raw"]
    figures = bomb_run(n, lambda: image_msg_of(None, "rgb8", 30000, 30000, 90000, bytes(100)),
                       "raw Image declaring 30000x30000 with 100 bytes")
    assert figures["delta_peak_kb"] < PEAK_BOUND_KB, figures


def test_large_raw_message_with_full_data_costs_its_bytes_in_the_middleware(nodes):
    """4100 x 4100 rgb8 (just above 16 MP) with all its 50 MB: refused by size, the node keeps serving. The
    peak RSS it costs is printed (DDS reassembles the whole sample and rclpy copies it into Python before any
    callback runs): the limit bounds only what decoding would add."""
    n = nodes["raw"]
    side = 4100
    msg = image_msg_of(None, "rgb8", side, side, side * 3, bytes(side * side * 3))
    steady = memory_kb(n.node.proc.pid)
    before = n.malformed()
    n.send(msg)
    d = n.wait_malformed(before + 1, timeout=120)
    assert "4100x4100" in d["last_malformed"], d
    after = memory_kb(n.node.proc.pid)
    assert n.localized(n.send(n.good(0)))
    assert n.node.alive()
    delta_kb = after["VmHWM"] - steady["VmHWM"]
    print(f"\nLARGE RAW {side}x{side} rgb8 ({side * side * 3 / 1e6:.0f} MB of data): refused by size; node peak RSS "
          f"{steady['VmHWM'] / 1024:.0f} -> {after['VmHWM'] / 1024:.0f} MB "
          f"(+{delta_kb / 1024:.0f} MB = {delta_kb * 1024 / (side * side * 3):.1f} x the message's data), "
          "RSS afterwards "
          f"{after['VmRSS'] / 1024:.0f} MB (steady {steady['VmRSS'] / 1024:.0f} MB)")
