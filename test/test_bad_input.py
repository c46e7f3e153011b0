"""The bad-input matrix of docs/RELIABILITY.md: every row is a test here (the row id is in the test id).

Rows reachable from the command line run the real `r2former` CLI in a subprocess and check exit status 2,
exactly one `r2former <command>: error:` line naming the problem, and no traceback. CLI runs of one
category start together (two at a time) from a module fixture; each row is still its own test. Message
rows (raw and compressed images) go through `r2former_ros.conversions`, the functions the nodes call;
phase 2 of issue 12 runs them through the live node as well.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from bagtools import image_msg, pose_msg, typestore, write_image_pose_bag, write_tf_bag
from hostile import PickleBomb, flip_byte, jpeg_declaring, png_bomb, truncate

from r2former_core import mapdb
from r2former_core.data.image_limits import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, set_max_image_pixels
from r2former_core.data.poses import quat_from_yaw, read_pose_csv, read_tum, write_tum
from r2former_core.data.sources import RosbagSource
from r2former_core.errors import ConfigError, DataError, ImageDecodeError, MapError
from r2former_core.mapdb import MapDatabase

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "RELIABILITY.md"
H, W = 96, 128
N_IMAGES = 6
T0 = 1_700_000_000.0
IMAGE_TOPIC = "/camera/image_raw"


# ============================================================================ helpers

def observed(row: str, text: str) -> None:
    """What a row observed (collected for the 'observed' column of docs/RELIABILITY.md with `pytest -s`)."""
    print(f"\nOBSERVED {row}: {text}")


def textured(i: int, h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(100 + i)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def trajectory(n: int) -> np.ndarray:
    poses = np.zeros((n, 7))
    poses[:, 0] = np.arange(n) * 3.0
    poses[:, 3:] = quat_from_yaw(np.zeros(n))
    return poses


def run_cli(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `r2former` command line in its own process (this worktree first on the path)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "r2former_core.cli.main", *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(REPO))


def run_all(jobs: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run CLI invocations two at a time (the CI machine has two cores)."""
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(jobs, pool.map(run_cli, jobs.values())))


def cli_error(result: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit status 2, no traceback, exactly one error line (containing every needle); returns that line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"r2former {command}: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def cli_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, tiny_config):
    """A tiny model (and another one), a posed image folder, and a map of it."""
    from r2former_core.data.sources import ImageFolderSource
    from r2former_core.mapping import build_map
    from r2former_core.model import build_model, save_model
    root = tmp_path_factory.mktemp("bad_input")
    (root / "images").mkdir()
    stamps = T0 + np.arange(N_IMAGES) * 0.5
    for i, s in enumerate(stamps):
        cv2.imwrite(str(root / "images" / f"{s:.6f}.png"), cv2.cvtColor(textured(i), cv2.COLOR_RGB2BGR))
    write_tum(root / "poses.txt", stamps, trajectory(N_IMAGES))
    model = save_model(tiny_model, root / "tiny.safetensors")
    other = save_model(build_model(tiny_config, seed=99), root / "other.safetensors")
    build_map(ImageFolderSource(root / "images", root / "poses.txt"), tiny_model, root / "map",
              progress=False).close()
    return {"root": root, "model": str(model), "other": str(other), "map": root / "map", "stamps": stamps}


def fresh_map(world, dest: Path) -> Path:
    shutil.copytree(world["map"], dest)
    return dest


def resign(map_dir: Path, change) -> None:
    """Edit map.json with `change(doc)` and sign it again (as a foreign or buggy writer would)."""
    doc = json.loads((map_dir / "map.json").read_text())
    change(doc)
    (map_dir / "map.json").write_text(mapdb.map_json_text(doc))


# ============================================================================ raw images (messages)

def image_msg_of(pixels: np.ndarray | None, encoding: str, height: int | None = None, width: int | None = None,
                 step: int | None = None, data: bytes | None = None, bigendian: bool = False):
    msgs = pytest.importorskip("sensor_msgs.msg")
    msg = msgs.Image(encoding=encoding, is_bigendian=int(bigendian))
    if pixels is not None:
        arr = np.ascontiguousarray(pixels)
        msg.height, msg.width = arr.shape[:2]
        msg.step = arr.strides[0]
        msg.data = arr.tobytes()
    if height is not None:
        msg.height = height
    if width is not None:
        msg.width = width
    if step is not None:
        msg.step = step
    if data is not None:
        msg.data = data
    return msg


RAW_REFUSED = {
    "raw-unknown-encoding": (dict(encoding="weird8"), ImageDecodeError, "unsupported image encoding 'weird8'"),
    "raw-32fc1": (dict(encoding="32FC1", height=4, width=4, step=16, data=bytes(64)), ImageDecodeError,
                  "unsupported image encoding '32FC1'"),
    "raw-step-too-small": (dict(step=W * 3 - 1), ImageDecodeError, "step 383 is smaller than width x channels"),
    "raw-data-short": (dict(data=bytes(W * 3 * H - 1)), ImageDecodeError, "expected step x height"),
    "raw-zero-size": (dict(height=0, width=0, step=0, data=b""), ImageDecodeError, "zero size"),
    "raw-huge-size": (dict(height=30000, width=30000, step=90000, data=bytes(100)), ImageTooLargeError,
                      "30000x30000 = 900,000,000 pixels"),
    "raw-product-overflows-32-bits": (dict(encoding="mono8", height=65537, width=65536, step=65536,
                                           data=bytes(65536)), ImageTooLargeError, "4,295,032,832 pixels"),
    "raw-step-overflows-32-bits": (dict(encoding="mono8", height=2, width=4, step=2**32 - 1, data=bytes(64)),
                                   ImageDecodeError, "expected step x height = 8589934590"),
    "raw-yuv422-odd-width": (dict(encoding="yuv422", height=2, width=3, step=6, data=bytes(12)), ImageDecodeError,
                             "even width"),
}


@pytest.mark.parametrize("row", RAW_REFUSED)
def test_raw_image_refused(row):
    from r2former_ros.conversions import image_msg_to_rgb
    fields, error, needle = RAW_REFUSED[row]
    msg = image_msg_of(textured(0), "rgb8")
    msg = image_msg_of(None, fields.get("encoding", "rgb8"), fields.get("height", msg.height),
                       fields.get("width", msg.width), fields.get("step", msg.step),
                       fields.get("data", bytes(msg.data)))
    with pytest.raises(error) as info:
        image_msg_to_rgb(msg)
    assert needle in str(info.value) and "\n" not in str(info.value)
    observed(row, str(info.value))


def test_raw_image_1x1_decodes():
    from r2former_ros.conversions import image_msg_to_rgb
    out = image_msg_to_rgb(image_msg_of(np.array([[[10, 20, 30]]], np.uint8), "rgb8"))
    assert out.shape == (1, 1, 3) and out[0, 0].tolist() == [10, 20, 30]
    observed("raw-1x1", "decoded to a 1x1 RGB image (the localizer resizes it)")


def test_raw_image_mono16_odd_step_and_big_endian():
    from r2former_ros.conversions import image_msg_to_rgb
    gray = (np.arange(15, dtype=np.uint16).reshape(3, 5) * 4000)
    for bigendian in (False, True):
        rows = gray.astype(">u2" if bigendian else "<u2").view(np.uint8).reshape(3, 10)
        padded = np.concatenate([rows, np.full((3, 1), 0xAB, np.uint8)], axis=1)   # step 11: odd, one pad byte
        out = image_msg_to_rgb(image_msg_of(None, "mono16", 3, 5, 11, padded.tobytes(), bigendian=bigendian))
        np.testing.assert_array_equal(out[..., 0], np.round(gray / 257.0).astype(np.uint8))
    observed("raw-mono16-odd-step", "decoded; the pad byte of each 11-byte row is ignored")
    observed("raw-mono16-big-endian", "decoded with the declared byte order (is_bigendian=1)")


# ============================================================================ compressed images (messages)

def compressed(fmt: str, data: bytes):
    msgs = pytest.importorskip("sensor_msgs.msg")
    msg = msgs.CompressedImage(format=fmt)
    msg.data = data
    return msg


def _jpeg(i: int = 0) -> bytes:
    ok, buf = cv2.imencode(".jpg", textured(i))
    return buf.tobytes()


COMPRESSED_REFUSED = {
    "compressed-empty": (lambda: compressed("jpeg", b""), ImageDecodeError, "has no data"),
    "compressed-random-bytes": (lambda: compressed("jpeg", np.random.default_rng(0).bytes(5000)), ImageDecodeError,
                                "neither PNG nor JPEG"),
    "compressed-truncated-jpeg": (lambda: compressed("jpeg", _jpeg()[:len(_jpeg()) * 2 // 3]), ImageDecodeError,
                                  "truncated"),
    "compressed-png-bomb": (lambda: compressed("png", png_bomb()), ImageTooLargeError,
                            "30000x30000 = 900,000,000 pixels in its PNG header"),
    "compressed-jpeg-bomb": (lambda: compressed("jpeg", jpeg_declaring(30000, 30000)), ImageTooLargeError,
                             "in its JPEG header"),
    "compressed-unsupported-format": (lambda: compressed("h264", _jpeg()), ImageDecodeError,
                                      "unsupported compressed format 'h264'"),
    "compressed-depth": (lambda: compressed("16UC1; compressedDepth png", b"\0" * 12 + png_bomb(8, 8)),
                         ImageDecodeError, "compressedDepth"),
    "compressed-other-format-content": (lambda: compressed("jpeg", cv2.imencode(".bmp", textured(0))[1].tobytes()),
                                        ImageDecodeError, "neither PNG nor JPEG"),
}


@pytest.mark.parametrize("row", COMPRESSED_REFUSED)
def test_compressed_image_refused(row):
    from r2former_ros.conversions import compressed_msg_to_rgb
    make, error, needle = COMPRESSED_REFUSED[row]
    with pytest.raises(error) as info:
        compressed_msg_to_rgb(make())
    assert needle in str(info.value) and "\n" not in str(info.value)
    observed(row, str(info.value)[:160])


def test_compressed_empty_format_is_decoded_by_content():
    from r2former_ros.conversions import compressed_msg_to_rgb
    assert compressed_msg_to_rgb(compressed("", _jpeg())).shape == (H, W, 3)
    observed("compressed-empty-format", "decoded: PNG/JPEG recognised by content")


def test_good_frames_decode_right_after_a_bomb():
    from r2former_ros.conversions import compressed_msg_to_rgb, image_msg_to_rgb
    with pytest.raises(ImageTooLargeError):
        compressed_msg_to_rgb(compressed("png", png_bomb()))
    assert compressed_msg_to_rgb(compressed("jpeg", _jpeg(1))).shape == (H, W, 3)
    assert image_msg_to_rgb(image_msg_of(textured(2), "rgb8")).shape == (H, W, 3)


# ============================================================================ image files (CLI build-map)

@pytest.fixture(scope="module")
def file_results(world):
    root = world["root"] / "files"
    root.mkdir()
    cases = {"file-png-bomb": png_bomb(), "file-random-bytes": np.random.default_rng(1).bytes(3000),
             "file-truncated-jpeg": _jpeg()[:700]}
    jobs = {}
    for row, payload in cases.items():
        folder = root / row
        shutil.copytree(world["root"] / "images", folder)
        first = folder / f"{world['stamps'][0]:.6f}.png"
        first.unlink()
        first.with_suffix(".jpg" if "jpeg" in row else ".png").write_bytes(payload)
        jobs[row] = ["build-map", "--images", str(folder), "--poses", str(world["root"] / "poses.txt"), "--out",
                     str(root / f"{row}.map"), "--model", world["model"], "--device", "cpu"]
    jobs["file-png-bomb-skipped"] = jobs["file-png-bomb"][:-6] + ["--out", str(root / "skipped.map"), "--model",
                                                                 world["model"], "--device", "cpu", "--skip-unreadable"]
    jobs["file-over-max-image-pixels"] = ["build-map", "--images", str(world["root"] / "images"), "--poses",
                                          str(world["root"] / "poses.txt"), "--out", str(root / "limit.map"),
                                          "--model", world["model"], "--max-image-pixels", "12287"]
    return root, run_all(jobs)


@pytest.mark.parametrize("row, needles", [
    ("file-png-bomb", ("30000x30000", "--skip-unreadable")),
    ("file-random-bytes", ("neither PNG nor JPEG", "--skip-unreadable")),
    ("file-truncated-jpeg", ("truncated", "--skip-unreadable")),
    ("file-over-max-image-pixels", ("96 = 12,288 pixels", "max_image_pixels = 12,287")),
])
def test_image_file_refused(file_results, row, needles):
    root, results = file_results
    line = cli_error(results[row], "build-map", *needles)
    assert not (root / f"{row}.map").exists()
    observed(row, line)


def test_image_file_bomb_skipped_on_request(file_results):
    root, results = file_results
    cli_ok(results["file-png-bomb-skipped"])
    assert "skipping unreadable image" in results["file-png-bomb-skipped"].stderr
    assert len(MapDatabase.load(root / "skipped.map")) == N_IMAGES - 1
    observed("file-png-bomb-skipped", "--skip-unreadable: logged, counted, the map holds the other 5 images")


# ============================================================================ bags

def write_bag(path: Path, records: list[tuple[float, str, str, object]], storage: str = "sqlite3") -> Path:
    """A rosbag2 from (bag time, topic, msgtype, message) records, written in the given order."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    ts = typestore()
    with Writer(path, version=9, storage_plugin={"sqlite3": StoragePlugin.SQLITE3,
                                                   "mcap": StoragePlugin.MCAP}[storage]) as writer:
        conns = {}
        for t, topic, msgtype, msg in records:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(conns[topic], int(round(t * 1e9)), ts.serialize_cdr(msg, msgtype))
    return path


def storage_file(bag: Path) -> Path:
    return next(p for p in bag.iterdir() if p.suffix in (".db3", ".mcap"))


def good_bag(path: Path, storage: str, images: list | None = None, image_type: str = "raw", fmt: str = "jpeg") -> Path:
    stamps = list(T0 + np.arange(N_IMAGES) * 0.5)
    images = images if images is not None else [textured(i) for i in range(N_IMAGES)]
    return write_image_pose_bag(path, images, stamps, trajectory(N_IMAGES), stamps, storage=storage,
                                image_type=image_type, compressed_format=fmt)


@pytest.fixture(scope="module")
def bag_results(world):
    from rosbags.rosbag2 import StoragePlugin, Writer
    root = world["root"] / "bags"
    root.mkdir()
    with Writer(root / "empty", version=9, storage_plugin=StoragePlugin.SQLITE3):
        pass
    write_image_pose_bag(root / "no_images", [], [], trajectory(1), [T0])     # an image topic without messages
    (root / "no_images_conn").mkdir()
    bags = {"sqlite3": good_bag(root / "good_sqlite3", "sqlite3"), "mcap": good_bag(root / "good_mcap", "mcap")}
    truncated = {}
    for storage, bag in bags.items():
        for label, cut in (("end", lambda size: size - 2000), ("middle", lambda size: size // 2)):
            copy = shutil.copytree(bag, root / f"trunc_{storage}_{label}")
            f = storage_file(copy)       # "end": into the last data (sqlite3 then fails while messages are read)
            truncate(f, cut(f.stat().st_size))
            truncated[f"{storage}-{label}"] = copy
    # TF: a loop map -> odom -> base_link -> map, and a tree without the 'map' frame.
    pose = trajectory(1)[0]
    stamps = list(T0 + np.arange(3) * 0.5)
    images = [textured(i) for i in range(3)]
    loop = [(t, [(t, "map", "odom", pose), (t, "odom", "base_link", pose), (t, "base_link", "map", pose)])
            for t in stamps]
    write_tf_bag(root / "tf_loop", images, stamps, tf=loop)
    write_tf_bag(root / "tf_no_parent", images, stamps, tf=[(t, [(t, "odom", "base_link", pose)]) for t in stamps])
    bomb_images = [textured(i) for i in range(N_IMAGES)]
    bomb_images[2] = png_bomb()
    good_bag(root / "bomb", "mcap", bomb_images, image_type="compressed", fmt="png")

    def build(bag: Path, *extra: str, out: str = "m") -> list[str]:
        return ["build-map", "--bag", str(bag), *extra, "--out", str(root / "out" / f"{bag.name}_{out}"),
                "--model", world["model"], "--device", "cpu"]
    jobs = {"bag-empty": build(root / "empty"),
            "bag-no-image-messages": build(root / "no_images", "--image-topic", IMAGE_TOPIC, "--pose-topic", "/odom"),
            "bag-missing-topic": build(bags["mcap"], "--image-topic", "/camera/nope", "--pose-topic", "/odom"),
            "bag-no-metadata": build(root / "no_images_conn", "--image-topic", IMAGE_TOPIC),
            "bag-tf-loop": build(root / "tf_loop", "--image-topic", IMAGE_TOPIC, "--tf-frames", "map:base_link"),
            "bag-tf-missing-parent": build(root / "tf_no_parent", "--image-topic", IMAGE_TOPIC, "--tf-frames",
                                           "map:base_link"),
            "bag-png-bomb-message": build(root / "bomb", "--image-topic", IMAGE_TOPIC, "--pose-topic", "/odom")}
    for label, bag in truncated.items():
        jobs[f"bag-truncated-{label}"] = build(bag, "--image-topic", IMAGE_TOPIC, "--pose-topic", "/odom")
    return root, run_all(jobs)


@pytest.mark.parametrize("row, needles", [
    ("bag-empty", ("the bag has no topics",)),
    ("bag-no-image-messages", ("image topic '/camera/image_raw' of bag", "has no readable messages (0 messages")),
    ("bag-missing-topic", ("image topic '/camera/nope' is not in bag", "/camera/image_raw (sensor_msgs/msg/Image)")),
    ("bag-no-metadata", ("no metadata.yaml",)),
    ("bag-truncated-sqlite3-end", ("cannot read bag", "truncated or damaged")),
    ("bag-truncated-sqlite3-middle", ("cannot read bag", "malformed")),
    ("bag-truncated-mcap-end", ("cannot read bag",)),
    ("bag-truncated-mcap-middle", ("cannot read bag",)),
    ("bag-tf-loop", ("has a cycle",)),
    ("bag-tf-missing-parent", ("frame 'map' not in the TF of bag", "frames seen: base_link, odom")),
])
def test_bag_refused(bag_results, row, needles):
    root, results = bag_results
    line = cli_error(results[row], "build-map", *needles)
    assert {p.name for p in (root / "out").iterdir()} <= {"bomb_m"}        # no map, no temporary directory
    observed(row, line[:220])


def test_bag_image_bomb_is_skipped_and_the_map_built(bag_results):
    root, results = bag_results
    cli_ok(results["bag-png-bomb-message"])
    assert "skipping undecodable image" in results["bag-png-bomb-message"].stderr
    assert "30000x30000" in results["bag-png-bomb-message"].stderr
    assert len(MapDatabase.load(root / "out" / "bomb_m")) == N_IMAGES - 1
    observed("bag-png-bomb-message", "warning naming the image and 30000x30000; map built from the other 5")


def test_bag_out_of_order_duplicate_and_non_finite(tmp_path, caplog):
    """Header stamps out of bag order, a repeated stamp, NaN / inf poses: each image gets the pose at its own
    stamp, the repeat is skipped and counted, invalid poses are ignored and counted."""
    ts = typestore()
    traj = lambda t: np.array([2.0 * (t - T0), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])   # noqa: E731
    image_stamps = [T0 + 1.0, T0 + 0.5, T0 + 1.5, T0 + 1.5, T0 + 2.0]            # out of order + a duplicate
    records = []
    pose_stamps = np.arange(0, 3.01, 0.25) + T0
    for k, t in enumerate(pose_stamps):
        pose = traj(t)
        if k == 3:
            pose[0] = np.nan
        if k == 5:
            pose[1] = np.inf
        records.append((t, "/odom", "nav_msgs/msg/Odometry", pose_msg(ts, pose, t)))
    for k, t in enumerate(image_stamps):
        records.append((T0 + 0.1 * k, IMAGE_TOPIC, "sensor_msgs/msg/Image", image_msg(ts, textured(k), t)))
    records.sort(key=lambda r: r[0])
    for storage in ("sqlite3", "mcap"):
        bag = write_bag(tmp_path / storage, records, storage)
        with caplog.at_level(logging.WARNING):
            src = RosbagSource(bag, IMAGE_TOPIC, "/odom")
        stamps, poses = src.poses()
        np.testing.assert_allclose(stamps, [T0 + 1.0, T0 + 0.5, T0 + 1.5, T0 + 2.0])
        np.testing.assert_allclose(poses[:, 0], 2.0 * (stamps - T0), atol=1e-9)
        assert src.counts.duplicate_stamps == 1 and src.counts.bad_poses == 2
        assert "already seen stamp" in caplog.text and "invalid pose" in caplog.text
        assert len(list(src)) == 4
    observed("bag-out-of-order-stamps", "accepted: each image gets the pose interpolated at its own header stamp")
    observed("bag-duplicate-stamps", "the repeat is skipped, counted and logged ('image(s) with an already seen "
                                     "stamp skipped')")
    observed("bag-non-finite-poses", "ignored, counted and logged ('pose message(s) with an invalid pose'); "
                                     "images are posed from the valid samples")


# ============================================================================ pose files

@pytest.fixture(scope="module")
def pose_results(world):
    root = world["root"] / "posefiles"
    root.mkdir()
    s = world["stamps"]
    line = lambda t, x=0.0: f"{t:.6f} {x} 0 0 0 0 0 1"       # noqa: E731
    bodies = {
        "pose-malformed-line": [line(s[0]), f"{s[1]:.6f} 1 2 3 0 0 1"],
        "pose-non-numeric": [line(s[0]), f"{s[1]:.6f} 1 2 x 0 0 0 1"],
        "pose-nan": [line(s[0]), f"{s[1]:.6f} nan 0 0 0 0 0 1"],
        "pose-non-monotonic": [line(s[1]), line(s[0]), line(s[2])],
        "pose-duplicate-timestamp": [line(s[0]), line(s[1], 1.0), line(s[1], 2.0)],
    }
    jobs = {}
    for row, lines in bodies.items():
        (root / f"{row}.txt").write_text("\n".join(lines) + "\n")
        jobs[row] = ["build-map", "--images", str(world["root"] / "images"), "--poses", str(root / f"{row}.txt"),
                     "--out", str(root / f"{row}.map"), "--model", world["model"]]
    return root, run_all(jobs)


@pytest.mark.parametrize("row, needles", [
    ("pose-malformed-line", (":2: expected 8 values",)),
    ("pose-non-numeric", (":2: non-numeric value",)),
    ("pose-nan", (":2: non-finite value",)),
    ("pose-duplicate-timestamp", (":3: timestamp 1700000000.5 repeats line 2 with another pose",)),
])
def test_pose_file_refused(pose_results, row, needles):
    root, results = pose_results
    line = cli_error(results[row], "build-map", *needles)
    assert not (root / f"{row}.map").exists()
    observed(row, line)


def test_pose_file_out_of_time_order_is_used_sorted_with_one_warning(pose_results, world):
    root, results = pose_results
    r = results["pose-non-monotonic"]
    cli_ok(r)
    warnings = [line for line in r.stderr.splitlines() if "go back in time" in line]
    assert len(warnings) == 1 and "first on line 2 (1700000000.0 after 1700000000.5 on line 1)" in warnings[0]
    db = MapDatabase.load(root / "pose-non-monotonic.map")
    np.testing.assert_allclose(db.stamps, world["stamps"][:3])        # the images the 3 poses cover
    np.testing.assert_allclose(db.poses[:, 0], [0.0, 0.0, 0.0])
    observed("pose-non-monotonic", warnings[0].split("WARNING", 1)[-1].strip()[:200])


def test_pose_file_exact_repeats_dropped_and_csv_duplicates_refused(tmp_path, caplog):
    path = tmp_path / "p.txt"
    path.write_text("1.0 0 0 0 0 0 0 1\n2.0 1 0 0 0 0 0 1\n2.0 1 0 0 0 0 0 1\n3.0 2 0 0 0 0 0 1\n")
    with caplog.at_level(logging.WARNING):
        stamps, _ = read_tum(path)
    assert stamps.tolist() == [1.0, 2.0, 3.0] and "1 repeated line(s)" in caplog.text
    observed("pose-exact-repeat", "dropped with a warning ('1 repeated line(s) (same timestamp and pose) ignored')")
    csv = tmp_path / "p.csv"
    csv.write_text("name,x,y,yaw\na.png,0,0,0\nb.png,1,0,0\na.png,2,0,0\n")
    with pytest.raises(DataError, match="name 'a.png' already used on line 2") as info:
        read_pose_csv(csv)
    observed("pose-csv-duplicate-name", str(info.value))


# ============================================================================ maps

MAP_FILES = ("map.json",) + mapdb.DATA_FILES


def test_map_truncated_at_random_offsets(world, tmp_path):
    """Every file of a map cut at three seeded random offsets: the load fails with a MapError naming it."""
    rng = np.random.default_rng(7)
    for name in MAP_FILES:
        size = (world["map"] / name).stat().st_size
        for cut in sorted(set(rng.integers(0, size, 3).tolist())):
            m = fresh_map(world, tmp_path / f"{name}-{cut}")
            truncate(m / name, cut)
            with pytest.raises(MapError) as info:
                MapDatabase.load(m)
            assert (name in str(info.value) or "map.json" in str(info.value)), (name, cut, str(info.value))
            shutil.rmtree(m)
    observed("map-truncated", "MapError naming the file: 'local.f16 in … has 2720 bytes but map.json records "
                              "3648: the file is truncated or was modified; rebuild …'")


def test_map_flipped_byte_in_each_file(world, tmp_path):
    """One flipped byte (seeded offset) in each file: refused at load (sha256 of every data file, map.json by its
    own checksum or as invalid JSON); in map.json every byte of its first 100 (the checksum and its key) and 60
    seeded offsets in the rest."""
    rng = np.random.default_rng(8)
    for name in MAP_FILES:
        size = (world["map"] / name).stat().st_size
        offsets = (list(range(100)) + rng.integers(100, size, 60).tolist() if name == "map.json"
                   else rng.integers(0, size, 1).tolist())
        for offset in offsets:
            m = fresh_map(world, tmp_path / f"{name}-{offset}")
            flip_byte(m / name, offset)
            with pytest.raises(MapError) as info:
                MapDatabase.load(m)
            assert name in str(info.value) or "map.json" in str(info.value)
            shutil.rmtree(m)
    for name in (n for n in mapdb.DATA_FILES if n.endswith(".npy")):   # headers, with no sha256 check before
        for offset in range(8, 120, 7):
            m = fresh_map(world, tmp_path / f"quick-{name}-{offset}")
            flip_byte(m / name, offset)
            try:
                MapDatabase.load(m, verify="quick")
            except MapError as e:
                assert name in str(e)
            else:   # a flip numpy's parser ignores (padding spaces) leaves the header meaning the same
                assert np.array_equal(np.load(m / name), np.load(world["map"] / name))
            shutil.rmtree(m)
    observed("map-flipped-byte", "MapError: 'poses.npy in … is corrupted: sha256 … does not match … recorded in "
                                 "map.json'; map.json: 'corrupted: its content does not match its own checksum'")


@pytest.fixture(scope="module")
def map_results(world):
    root = world["root"] / "maps"
    root.mkdir()
    maps = {row: fresh_map(world, root / row) for row in (
        "map-wrong-version", "map-missing-file", "map-other-model", "map-names-outside", "map-files-outside",
        "map-symlinked-file", "map-truncated-cli", "map-unsigned-edit")}
    resign(maps["map-wrong-version"], lambda d: d.update(format_version=2))
    (maps["map-missing-file"] / "poses.npy").unlink()
    names = json.loads((maps["map-names-outside"] / "names.json").read_text())
    names[1] = "../../etc/passwd"
    (maps["map-names-outside"] / "names.json").write_text(json.dumps(names))

    def rename_in_json(d: dict, old: str = "names.json", new: str = "../names.json") -> None:
        d["files"][new] = d["files"].pop(old)
    names_bytes = (maps["map-names-outside"] / "names.json").read_bytes()   # its checksum and size, signed again
    resign(maps["map-names-outside"], lambda d: d["files"]["names.json"].update(
        bytes=len(names_bytes), sha256=hashlib.sha256(names_bytes).hexdigest()))
    resign(maps["map-files-outside"], rename_in_json)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    shutil.move(maps["map-symlinked-file"] / "local.f16", elsewhere / "local.f16")
    (maps["map-symlinked-file"] / "local.f16").symlink_to(elsewhere / "local.f16")
    truncate(maps["map-truncated-cli"] / "global.npy", 200)
    doc = json.loads((maps["map-unsigned-edit"] / "map.json").read_text())
    doc["frame_id"] = "odom"                            # a hand edit that leaves valid JSON
    (maps["map-unsigned-edit"] / "map.json").write_text(json.dumps(doc, indent=2))
    jobs = {row: ["map-info", str(path)] for row, path in maps.items()}
    jobs["map-other-model"] += ["--model", world["other"]]
    jobs["map-localize-other-model"] = ["localize", "--map", str(maps["map-other-model"]), "--images",
                                        str(world["root"] / "images"), "--out", str(root / "o.csv"), "--model",
                                        world["other"]]
    return root, run_all(jobs)


@pytest.mark.parametrize("row, needles", [
    ("map-wrong-version", ("has format version 2", "reads format version 1")),
    ("map-missing-file", ("is incomplete: poses.npy is missing",)),
    ("map-other-model", ("was built with model", "rebuild the map with this model")),
    ("map-names-outside", ("entry 1 '../../etc/passwd' has a '..' component",)),
    ("map-files-outside", ("lists files outside the map directory (../names.json)",)),
    ("map-symlinked-file", ("local.f16 in", "is a symbolic link", "copy the map")),
    ("map-truncated-cli", ("global.npy in", "the file is truncated")),
    ("map-unsigned-edit", ("map.json in", "is damaged or was edited")),
])
def test_map_refused_by_map_info(map_results, row, needles):
    _, results = map_results
    observed(row, cli_error(results[row], "map-info", *needles))


def test_map_of_other_model_refused_by_localize(map_results):
    root, results = map_results
    line = cli_error(results["map-localize-other-model"], "localize", "was built with model")
    assert not (root / "o.csv").exists()
    observed("map-localize-other-model", line)


def test_map_symlinked_map_json_dir_is_file_and_ivfpq_index_outside(world, tmp_path):
    m = fresh_map(world, tmp_path / "m")
    shutil.move(m / "map.json", tmp_path / "map.json")
    (m / "map.json").symlink_to(tmp_path / "map.json")
    with pytest.raises(MapError, match="map.json in .* is a symbolic link"):
        MapDatabase.load(m)
    observed("map-symlinked-map-json", "MapError: 'map.json in … is a symbolic link (to …)'")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MapError, match="is not a directory"):
        MapDatabase.load(tmp_path / "file")
    # An IVF-PQ map whose map.json points its index file outside the map.
    rng = np.random.default_rng(0)
    glob = rng.standard_normal((1000, 8)).astype(np.float32)
    ivf = tmp_path / "ivf"
    with MapDatabase.create(ivf, fingerprint="fp", model_config={}, image_size=(8, 8), global_dim=8, num_local=2,
                            local_values=3, index="ivfpq") as w:
        w.add_batch(glob, np.zeros((1000, 2, 3), np.float32), np.tile([0, 0, 0, 0, 0, 0, 1.0], (1000, 1)),
                    np.arange(1000.0), [str(i) for i in range(1000)])
    resign(ivf, lambda d: d["index"].update(file="../../index.faiss"))
    with pytest.raises(MapError, match="index file '../../index.faiss' is not 'index.faiss'"):
        MapDatabase.load(ivf)
    observed("map-index-file-outside", "MapError: 'index file '../../index.faiss' is not 'index.faiss''")


def test_map_writer_refuses_names_that_leave_a_folder(tmp_path):
    with MapDatabase.create(tmp_path / "m", fingerprint="fp", model_config={}, image_size=(8, 8), global_dim=4,
                            num_local=2, local_values=3) as w:
        for bad in ("../x.png", "/abs/x.png", "a/../../b", "tab\there"):
            with pytest.raises(ValueError, match="entry name"):
                w.add(np.ones(4), np.zeros((2, 3)), [0, 0, 0, 0, 0, 0, 1], 0.0, bad)
        w.add(np.ones(4), np.zeros((2, 3)), [0, 0, 0, 0, 0, 0, 1], 0.0, "seq/000001.png")
    assert MapDatabase.load(tmp_path / "m").names == ["seq/000001.png"]


def test_map_thumbnail_bomb_not_decoded(world, tmp_path):
    """thumbnails.bin is not hashed under verify='quick': a bomb put there is refused (a thumbnail is at most
    160 x 160) and thumbnail() returns None; the rest of the map works."""
    m = fresh_map(world, tmp_path / "m")
    index = np.load(m / "thumbnails_index.npy")
    offset, length = (int(v) for v in index[0])
    bomb = jpeg_declaring(30000, 30000)
    assert len(bomb) <= length
    with open(m / "thumbnails.bin", "r+b") as f:
        f.seek(offset)
        f.write(bomb + bytes(length - len(bomb)))
    db = MapDatabase.load(m, verify="quick")
    assert db.thumbnail(0) is None and db.thumbnail(1) is not None
    with pytest.raises(MapError, match="thumbnails.bin .* is corrupted"):
        MapDatabase.load(m)                          # the default verify hashes it (map < 2 GiB)
    observed("map-thumbnail-bomb", "verify=auto: MapError (sha256); verify=quick: thumbnail(0) is None, logged")


# ============================================================================ checkpoints

@pytest.fixture(scope="module")
def checkpoint_results(world, tiny_model):
    import torch
    from safetensors.torch import load_file, save_file
    root = world["root"] / "checkpoints"
    root.mkdir()
    marker = root / "EXECUTED"
    torch.save({"model_state_dict": {k: v for k, v in tiny_model.state_dict().items()}, "extra": PickleBomb(marker)},
               root / "pickle_payload.pth")
    with open(root / "plain_pickle.pth", "wb") as f:
        __import__("pickle").dump({"state_dict": PickleBomb(marker)}, f)
    state = load_file(world["model"])
    meta = __import__("safetensors").safe_open(world["model"], "pt").metadata()
    missing = dict(state)
    missing.pop(sorted(missing)[3])
    save_file(missing, root / "missing_keys.safetensors", metadata=meta)
    shaped = dict(state)
    key = next(k for k in sorted(shaped) if shaped[k].ndim == 2)
    shaped[key] = torch.zeros(shaped[key].shape[0] + 1, shaped[key].shape[1])
    save_file(shaped, root / "wrong_shapes.safetensors", metadata=meta)
    data = Path(world["model"]).read_bytes()
    (root / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    from r2former_core.model.checkpoint import save_official_checkpoint
    pth = save_official_checkpoint(tiny_model, root / "official.pth")
    (root / "truncated.pth").write_bytes(pth.read_bytes()[:pth.stat().st_size // 2])
    jobs = {row: ["map-info", str(world["map"]), "--model", str(root / name)] for row, name in (
        ("checkpoint-pickle-payload", "pickle_payload.pth"), ("checkpoint-plain-pickle", "plain_pickle.pth"),
        ("checkpoint-missing-keys", "missing_keys.safetensors"),
        ("checkpoint-wrong-shapes", "wrong_shapes.safetensors"),
        ("checkpoint-truncated-safetensors", "truncated.safetensors"), ("checkpoint-truncated-pth", "truncated.pth"))}
    return marker, run_all(jobs)


@pytest.mark.parametrize("row, needles", [
    ("checkpoint-pickle-payload", ("is refused: it holds pickled Python objects", "was not executed")),
    ("checkpoint-plain-pickle", ("is refused: it holds pickled Python objects",)),
    ("checkpoint-missing-keys", ("missing keys:",)),
    ("checkpoint-wrong-shapes", ("mis-shaped keys:",)),
    ("checkpoint-truncated-safetensors", ("cannot read", "truncated")),
    ("checkpoint-truncated-pth", ("cannot read", "truncated")),
])
def test_checkpoint_refused(checkpoint_results, row, needles):
    marker, results = checkpoint_results
    line = cli_error(results[row], "map-info", *needles)
    assert not marker.exists(), "a pickled payload was executed"
    observed(row, line[:240])


def test_pickle_payload_really_executes_when_unpickled(checkpoint_results, tmp_path):
    """Control for the rows above: the payload does create its marker when unpickled the unsafe way."""
    import pickle
    marker = tmp_path / "EXECUTED"
    pickle.loads(pickle.dumps(PickleBomb(marker)))
    assert marker.exists()


# ============================================================================ parameters and options

@pytest.fixture(scope="module")
def option_results(world):
    base = {"localize": ["localize", "--map", str(world["map"]), "--images", str(world["root"] / "images"), "--out",
                         str(world["root"] / "opt.csv"), "--model", world["model"]],
            "eval": ["eval", "--map", str(world["map"]), "--queries", str(world["root"] / "images"), "--query-poses",
                     str(world["root"] / "poses.txt"), "--model", world["model"]],
            "build-map": ["build-map", "--images", str(world["root"] / "images"), "--poses",
                          str(world["root"] / "poses.txt"), "--out", str(world["root"] / "opt.map"), "--model",
                          world["model"]]}
    cases = {"option-out-of-range": ("localize", ["--top-k", "0"]),
             "option-wrong-type": ("localize", ["--min-confidence", "high"]),
             "option-unknown-mode": ("localize", ["--rerank", "magic"]),
             "option-unknown-device": ("build-map", ["--device", "gpu"]),
             "option-max-image-pixels-zero": ("eval", ["--max-image-pixels", "0"]),
             "option-max-image-pixels-text": ("build-map", ["--max-image-pixels", "16MP"]),
             "option-unknown-verify": ("map-info", None)}
    jobs = {row: (base[cmd] + extra if extra is not None else ["map-info", str(world["map"]), "--verify", "some"])
            for row, (cmd, extra) in cases.items()}
    return world, {row: cases[row][0] for row in cases}, run_all(jobs)


@pytest.mark.parametrize("row, needle", [
    ("option-out-of-range", "argument --top-k: 0 is out of range: expected an integer in [1, 1000]"),
    ("option-wrong-type", "argument --min-confidence: 'high' is not a number"),
    ("option-unknown-mode", "argument --rerank: invalid choice: 'magic'"),
    ("option-unknown-device", "argument --device: 'gpu' is not auto, cpu, cuda or cuda:N"),
    ("option-max-image-pixels-zero", "argument --max-image-pixels: 0 is out of range"),
    ("option-max-image-pixels-text", "argument --max-image-pixels: '16MP' is not an integer"),
    ("option-unknown-verify", "argument --verify: invalid choice: 'some'"),
])
def test_option_refused_as_usage_error(option_results, row, needle):
    world, commands, results = option_results
    r = results[row]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = cli_error(r, commands[row], needle)
    assert not (world["root"] / "opt.map").exists() and not (world["root"] / "opt.csv").exists()
    observed(row, line)


def test_config_and_parameter_values_refused():
    from r2former_core.options import LocalizerConfig, PoseConfig
    for bad, needle in ((LocalizerConfig(rerank="magic"), "rerank: 'magic' is not one of"),
                        (LocalizerConfig(max_image_pixels=0), "max_image_pixels: 0 is not an integer in [1, "),
                        (LocalizerConfig(top_k=5000), "top_k: 5000 is not an integer in [1, 1000]"),
                        (LocalizerConfig(pose=PoseConfig(mode="median")), "'median' is not one of best, weighted")):
        with pytest.raises(ConfigError) as info:
            bad.validate()
        assert needle in str(info.value)
    observed("config-invalid-value", "ConfigError: 'max_image_pixels: 0 is not an integer in [1, 1073741824]'")
    pytest.importorskip("rclpy")
    from r2former_ros.parameters import ParamSpec
    spec = ParamSpec.from_config(LocalizerConfig, "max_image_pixels")
    assert spec.default == DEFAULT_MAX_IMAGE_PIXELS and spec.check(spec.default) is None
    assert "must be an integer in [1, " in spec.check(0)
    d = spec.descriptor()
    assert d.integer_range[0].from_value == 1 and d.integer_range[0].to_value == 2**30
    observed("parameter-out-of-range", spec.check(0))


# ============================================================================ the matrix in the docs

def row_ids() -> set[str]:
    """Every row id this file tests (parametrized ids and the ids named by `observed` calls)."""
    text = Path(__file__).read_text()
    ids = set(RAW_REFUSED) | set(COMPRESSED_REFUSED)
    ids |= set(re.findall(r'^\s+\("([a-z0-9-]+)", \(', text, re.M))       # (row, needles) parameters
    ids |= set(re.findall(r'^\s+\("([a-z0-9-]+)", "', text, re.M))        # (row, needle) parameters
    ids |= set(re.findall(r'observed\("([a-z0-9-]+)"', text))
    return ids


def test_every_row_is_in_docs_reliability_and_every_documented_row_is_tested():
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), re.M))
    tested = row_ids()
    assert len(tested) >= 25
    assert tested - documented == set(), "rows tested but missing from docs/RELIABILITY.md"
    assert documented - tested == set(), "rows in docs/RELIABILITY.md without a test"


@pytest.fixture(autouse=True)
def default_limit():
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
    yield
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)
