"""Message <-> numpy conversions: every image encoding, malformed messages, stamps, poses."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy")

from builtin_interfaces.msg import Time  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from r2former_ros.conversions import (  # noqa: E402
    ImageDecodeError,
    compressed_msg_to_rgb,
    covariance_to_msg,
    image_msg_to_rgb,
    msg_to_rgb,
    ns_to_stamp,
    pose_array_msg,
    pose_from_msg,
    pose_msg,
    pose_with_covariance_msg,
    rgb_to_compressed_msg,
    rgb_to_image_msg,
    sec_to_stamp,
    stamp_to_ns,
    stamp_to_sec,
)

H, W = 12, 16


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def raw_msg(pixels: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False) -> Image:
    """An Image message built by hand (row padding `pad` bytes), independent of the code under test."""
    arr = np.ascontiguousarray(pixels)
    if arr.dtype.itemsize == 2:
        arr = arr.astype(">u2" if bigendian else "<u2")
    rows = arr.reshape(arr.shape[0], -1).view(np.uint8)
    rows = np.concatenate([rows, np.zeros((rows.shape[0], pad), np.uint8)], axis=1)
    msg = Image(height=arr.shape[0], width=arr.shape[1], encoding=encoding, is_bigendian=int(bigendian),
                step=rows.shape[1])
    msg.data = rows.tobytes()
    return msg


@pytest.mark.parametrize("pad", [0, 5])
def test_color_encodings(rgb, pad):
    bgr = rgb[..., ::-1]
    alpha = np.full((H, W, 1), 200, np.uint8)
    cases = {"rgb8": rgb, "bgr8": bgr, "rgba8": np.concatenate([rgb, alpha], 2),
             "bgra8": np.concatenate([bgr, alpha], 2)}
    for encoding, pixels in cases.items():
        out = image_msg_to_rgb(raw_msg(pixels, encoding, pad))
        assert out.dtype == np.uint8 and out.shape == (H, W, 3), encoding
        assert np.array_equal(out, rgb), encoding


def test_mono_encodings(rgb):
    gray = rgb[..., 0]
    out = image_msg_to_rgb(raw_msg(gray, "mono8"))
    assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    gray16 = gray.astype(np.uint16) * 257
    for big in (False, True):
        out = image_msg_to_rgb(raw_msg(gray16, "mono16", bigendian=big))
        assert np.array_equal(out[..., 1], gray), big


@pytest.mark.parametrize("case", ["encoding", "zero", "short", "step"])
def test_malformed_raw_messages_raise(rgb, case):
    msg = raw_msg(rgb, "rgb8")
    if case == "encoding":
        msg.encoding = "32FC1"
    elif case == "zero":
        msg = Image(height=0, width=0, encoding="rgb8", step=0)
    elif case == "short":
        msg.data = bytes(msg.data)[: msg.step * H - 1]
    elif case == "step":
        msg.step = W * 3 - 1
    with pytest.raises(ImageDecodeError):
        image_msg_to_rgb(msg)


@pytest.fixture
def smooth():
    """A smooth colour image (JPEG keeps it close)."""
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([xx * 15, yy * 20, np.full_like(xx, 90)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "rgb8; jpeg compressed bgr8"])
def test_compressed_round_trip(smooth, fmt):
    rgb = smooth
    msg = rgb_to_compressed_msg(rgb, fmt="png" if "png" in fmt else "jpeg")
    msg.format = fmt
    out = compressed_msg_to_rgb(msg)
    assert out.shape == (H, W, 3)
    if fmt == "png":
        assert np.array_equal(out, rgb)
    else:
        assert np.abs(out.astype(int) - rgb).mean() < 8
    assert np.array_equal(msg_to_rgb(msg), out)


def test_compressed_from_opencv_bgr_is_rgb():
    """A JPEG made by a typical driver (cv2.imencode of BGR) decodes to the right colours."""
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 255   # red
    ok, buf = cv2.imencode(".png", rgb[..., ::-1])
    msg = CompressedImage(format="png")
    msg.data = buf.tobytes()
    assert compressed_msg_to_rgb(msg)[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("case", ["corrupt", "empty", "format"])
def test_malformed_compressed_messages_raise(rgb, case):
    msg = rgb_to_compressed_msg(rgb)
    if case == "corrupt":
        msg.data = bytes(msg.data)[:20] + b"\x00" * 50
    elif case == "empty":
        msg.data = b""
    else:
        msg.format = "h264"
    with pytest.raises(ImageDecodeError):
        compressed_msg_to_rgb(msg)


def test_image_message_for_publishing(rgb):
    header = Header(frame_id="cam", stamp=Time(sec=3, nanosec=4))
    msg = rgb_to_image_msg(rgb, header)
    assert (msg.height, msg.width, msg.step, msg.encoding) == (H, W, W * 3, "rgb8")
    assert msg.header.frame_id == "cam" and msg.header.stamp.nanosec == 4
    assert np.array_equal(image_msg_to_rgb(msg), rgb)
    assert np.array_equal(image_msg_to_rgb(rgb_to_image_msg(rgb, encoding="bgr8")), rgb)


def test_stamps():
    assert stamp_to_ns(Time(sec=12, nanosec=345)) == 12_000_000_345
    t = ns_to_stamp(1_700_000_000_123_456_789)
    assert (t.sec, t.nanosec) == (1_700_000_000, 123_456_789)
    assert stamp_to_sec(Time(sec=1, nanosec=500_000_000)) == 1.5
    s = sec_to_stamp(100.05)
    assert (s.sec, s.nanosec) == (100, 50_000_000)
    assert stamp_to_sec(sec_to_stamp(1_700_000_000.25)) == pytest.approx(1_700_000_000.25, abs=1e-6)


def test_pose_with_covariance():
    cov = np.diag([1.0, 2, 3, 0.1, 0.2, 0.3])
    cov[0, 1] = 0.5     # not symmetric on purpose: the message gets the symmetric part
    msg = pose_with_covariance_msg(np.array([1, 2, 3, 0, 0, 0, 2.0]), cov, "map", Time(sec=5, nanosec=6))
    assert msg.header.frame_id == "map" and (msg.header.stamp.sec, msg.header.stamp.nanosec) == (5, 6)
    assert pose_from_msg(msg.pose.pose).tolist() == [1, 2, 3, 0, 0, 0, 1]
    c = np.asarray(msg.pose.covariance).reshape(6, 6)
    assert np.allclose(c, c.T) and c[0, 1] == 0.25 and c[2, 2] == 3
    assert covariance_to_msg(np.eye(6)).shape == (36,)
    with pytest.raises(ValueError):
        covariance_to_msg(np.eye(3))
    with pytest.raises(ValueError):
        pose_msg([1, 2, 3])
    assert pose_msg([0, 0, 0, 0, 0, 0, 0]).orientation.w == 1.0   # unknown orientation -> identity


def test_pose_array():
    poses = np.zeros((4, 7))
    poses[:, 0] = np.arange(4)
    poses[:, 6] = 1
    msg = pose_array_msg(poses, "map")
    assert msg.header.frame_id == "map" and len(msg.poses) == 4
    assert [p.position.x for p in msg.poses] == [0, 1, 2, 3]
    assert len(pose_array_msg(np.zeros((0, 7)), "map").poses) == 0


def _mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample an RGB image through a 2x2 colour-filter pattern such as "rggb" (top-left first, row-major)."""
    idx = {"r": 0, "g": 1, "b": 2}
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for k, c in enumerate(pattern):
        dy, dx = divmod(k, 2)
        out[dy::2, dx::2] = rgb[dy::2, dx::2, idx[c]]
    return out


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_encodings_demosaic_to_the_right_colours(pattern):
    """A flat orange scene seen through each pattern must come back orange, not blue or green."""
    scene = np.zeros((H, W, 3), np.uint8)
    scene[...] = (230, 120, 20)
    out = image_msg_to_rgb(raw_msg(_mosaic(scene, pattern), f"bayer_{pattern}8"))
    assert out.shape == (H, W, 3)
    inner = out[2:-2, 2:-2].reshape(-1, 3).astype(int)          # away from the border interpolation
    assert np.abs(inner - scene[0, 0]).max() <= 2, (pattern, inner.mean(0))
    out16 = image_msg_to_rgb(raw_msg(_mosaic(scene.astype(np.uint16) * 257, pattern), f"bayer_{pattern}16"))
    assert np.abs(out16[2:-2, 2:-2].reshape(-1, 3).astype(int) - scene[0, 0]).max() <= 2, pattern


def _yuv422(rgb: np.ndarray, order: str) -> np.ndarray:
    """BT.601 video-range YUV 4:2:2 by hand (what cameras send: Y 16-235): each pixel pair shares the mean U
    and V; bytes in `order` (uyvy / yuyv)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    u2, v2 = (u[:, 0::2] + u[:, 1::2]) / 2, (v[:, 0::2] + v[:, 1::2]) / 2
    planes = {"y0": y[:, 0::2], "y1": y[:, 1::2], "u": u2, "v": v2}
    names = ["u", "y0", "v", "y1"] if order == "uyvy" else ["y0", "u", "y1", "v"]
    packed = np.stack([planes[n] for n in names], axis=-1).reshape(rgb.shape[0], rgb.shape[1], 2)
    return np.clip(np.round(packed), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("encoding, order", [("yuv422", "uyvy"), ("uyvy", "uyvy"), ("yuv422_yuy2", "yuyv"),
                                             ("yuyv", "yuyv")])
def test_yuv422_encodings(encoding, order):
    scene = np.zeros((H, W, 3), np.uint8)
    scene[:, : W // 2] = (200, 40, 30)            # red left half, blue right half (both pixel-pair aligned)
    scene[:, W // 2:] = (20, 60, 210)
    out = image_msg_to_rgb(raw_msg(_yuv422(scene, order), encoding))
    assert out.shape == (H, W, 3)
    assert np.abs(out.astype(int) - scene.astype(int)).max() <= 6, encoding
    with pytest.raises(ImageDecodeError, match="even width"):
        image_msg_to_rgb(raw_msg(_yuv422(scene, order)[:, :-1], encoding))
