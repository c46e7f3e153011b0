"""image_limits: sizes read from PNG/JPEG headers and raw fields before decoding; the bomb's memory bound."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hostile import jpeg_declaring, jpeg_with_scans, png_bomb

from r2former_core.data import image_limits as L
from r2former_core.data.image_codec import decode_compressed, decode_encoded, decode_raw
from r2former_core.errors import ImageDecodeError

REPO = Path(__file__).resolve().parents[1]


def encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok
    return buf.tobytes()


def textured(h: int, w: int, channels: int = 3, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(h * 1000 + w)
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), channels)).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img = img.reshape(h, w, channels) if channels > 1 else img.reshape(h, w)
    if dtype == np.uint16:
        return (np.clip(img, 0, 255) * 257).astype(np.uint16)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def default_limit():
    L.set_max_image_pixels(L.DEFAULT_MAX_IMAGE_PIXELS)
    yield
    L.set_max_image_pixels(L.DEFAULT_MAX_IMAGE_PIXELS)


# ----------------------------------------------------------------------------- headers of real images

@pytest.mark.parametrize("h, w, channels, dtype, ext, params", [
    (48, 64, 3, np.uint8, ".png", None),
    (31, 17, 1, np.uint8, ".png", None),
    (20, 30, 4, np.uint8, ".png", None),
    (25, 33, 3, np.uint16, ".png", None),
    (480, 640, 3, np.uint8, ".jpg", None),
    (37, 51, 1, np.uint8, ".jpg", None),
    (120, 90, 3, np.uint8, ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    (64, 48, 3, np.uint8, ".jpg", [cv2.IMWRITE_JPEG_OPTIMIZE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 2]),
])
def test_header_matches_what_opencv_decodes(h, w, channels, dtype, ext, params):
    data = encode(textured(h, w, channels, dtype), ext, params)
    header = L.read_header(data)
    assert (header.width, header.height) == (w, h)
    assert header.format == ("png" if ext == ".png" else "jpeg")
    assert header.bit_depth == (16 if dtype == np.uint16 else 8)
    assert decode_encoded(data, "test").shape == (h, w, 3)


def _with_app_segments(jpeg: bytes, segments: list[bytes]) -> bytes:
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def test_jpeg_walk_skips_exif_fill_bytes_and_stray_bytes_like_libjpeg():
    base = encode(textured(40, 56), ".jpg")
    exif = b"\xff\xe1" + (2 + 30000).to_bytes(2, "big") + b"Exif\x00\x00" + bytes(29994)
    icc = b"\xff\xe2" + (2 + 60000).to_bytes(2, "big") + bytes(60000)
    # An embedded thumbnail's frame header inside APP1 must not be taken for the image's.
    fake_sof = b"\xff\xc0\x00\x11\x08\x75\x30\x75\x30\x03" + bytes(9)
    thumb = b"\xff\xe1" + (2 + len(fake_sof) + 4).to_bytes(2, "big") + fake_sof + b"\xff\xd9\x00\x00"
    data = _with_app_segments(base, [exif, icc, thumb, b"junk", b"\xff\xff\xff\xfe\x00\x05abc"])
    header = L.read_header(data)
    assert (header.width, header.height) == (56, 40)
    assert decode_encoded(data, "test").shape == (40, 56, 3)     # libjpeg agrees


@pytest.mark.parametrize("width, height", [(30000, 30000), (65535, 65535), (4097, 4096)])
def test_declared_sizes_over_the_limit_are_refused_unread(width, height):
    for data in (jpeg_declaring(width, height), png_bomb(width, 64) if width * 64 > L.DEFAULT_MAX_IMAGE_PIXELS
                 else jpeg_declaring(width, height, progressive=True)):
        with pytest.raises(L.ImageTooLargeError, match=f"{width}x"):
            decode_compressed("", data)


def test_limit_boundary_and_explicit_limits():
    data = jpeg_declaring(4096, 4096)
    assert L.check_encoded(data, "x").pixels == L.DEFAULT_MAX_IMAGE_PIXELS          # exactly the limit: accepted
    with pytest.raises(L.ImageTooLargeError):
        L.check_encoded(data, "x", max_pixels=L.DEFAULT_MAX_IMAGE_PIXELS - 1)
    small = encode(textured(30, 40), ".png")
    with pytest.raises(L.ImageTooLargeError, match="max_image_pixels = 1,199"):
        decode_compressed("png", small, max_pixels=1199)
    assert decode_compressed("png", small, max_pixels=1200).shape == (30, 40, 3)
    L.set_max_image_pixels(1199)                       # the process-wide limit applies when none is passed
    with pytest.raises(L.ImageTooLargeError):
        decode_compressed("png", small)
    with pytest.raises(L.ImageTooLargeError):
        decode_raw("rgb8", 30, 40, 120, bytes(3600))
    for bad in (0, -5, 2**31, 1.5, True, "16MP"):
        with pytest.raises(ImageDecodeError, match="max_image_pixels must be"):
            L.set_max_image_pixels(bad)
    assert L.get_max_image_pixels() == 1199


def test_png_and_jpeg_generators_are_valid_images():
    """The hostile generators make real files: a small bomb decodes to the black image it declares."""
    for colour, channels in ((0, 1), (2, 3), (6, 4)):
        img = cv2.imdecode(np.frombuffer(png_bomb(301, 77, colour), np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape[:2] == (77, 301) and (img.ndim == 2 and channels == 1 or img.shape[2] == channels)
        assert img.max() == 0
    assert len(png_bomb()) < 3_000_000            # the 30000 x 30000 RGB bomb: 2.7 GB of pixels in ~2.6 MB


@pytest.mark.parametrize("ext", [".bmp", ".tiff", ".webp", ".ppm"])
def test_formats_other_than_png_and_jpeg_are_not_decoded(ext):
    data = encode(textured(20, 20), ext)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None   # OpenCV would decode it
    with pytest.raises(ImageDecodeError, match="neither PNG nor JPEG"):
        decode_compressed("jpeg", data)


@pytest.mark.parametrize("case, reason", [
    ("dnl", "DNL"),
    ("components", "2 colour components"),
    ("sos_first", "no frame header before marker 0xDA"),
    ("no_eoi", "end-of-image"),
    ("segment_overrun", "past its end"),
    ("scan_bomb", r"610 scans, more than 500"),
    ("png_crc", "fails its CRC"),
    ("png_colour", "invalid colour type"),
    ("png_no_iend", "IEND"),
])
def test_damaged_headers_are_refused_with_the_reason(case, reason):
    jpeg = bytearray(encode(textured(32, 32), ".jpg"))
    sof = jpeg.index(b"\xff\xc0")
    png = bytearray(encode(textured(32, 32), ".png"))
    if case == "dnl":
        jpeg[sof + 5:sof + 7] = b"\x00\x00"
        data = jpeg
    elif case == "components":
        jpeg[sof + 9] = 2
        data = jpeg
    elif case == "sos_first":
        sos = jpeg.index(b"\xff\xda")
        data = jpeg[:2] + jpeg[sos:]
    elif case == "no_eoi":
        data = jpeg[:-2]
    elif case == "segment_overrun":
        data = jpeg[:sof + 6]
    elif case == "scan_bomb":
        data = jpeg_with_scans(600)
    elif case == "png_crc":
        png[20] ^= 1
        data = png
    elif case == "png_colour":
        png[25] = 5
        png[29:33] = __import__("zlib").crc32(bytes(png[12:29])).to_bytes(4, "big")
        data = png
    else:
        data = png[:-12]
    with pytest.raises(ImageDecodeError, match=reason):
        decode_compressed("", bytes(data))


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_every_truncation_and_random_damage_is_an_image_decode_error(ext):
    """Prefixes and byte flips of a real image: a decoded image of the declared size or ImageDecodeError,
    never another exception (seeded)."""
    data = encode(textured(48, 64), ext)
    rng = np.random.default_rng(12)
    cuts = sorted(set(rng.integers(0, len(data), 40).tolist()) | {0, 1, 2, 3, 8, 20, len(data) - 1})
    for cut in cuts:
        with pytest.raises(ImageDecodeError):
            decode_compressed("", data[:cut])
    decoded = 0
    for _ in range(150):
        damaged = bytearray(data)
        for pos in rng.integers(0, len(data), 3):
            damaged[pos] ^= int(rng.integers(1, 256))
        try:
            out = decode_compressed("", bytes(damaged))
        except ImageDecodeError:
            continue
        header = L.read_header(bytes(damaged))
        assert out.shape == (header.height, header.width, 3)
        decoded += 1
    assert decoded < 150


def test_raw_sizes_checked_in_python_integers_before_any_allocation():
    # 65536 x 65537 = 2^32 + 65536 pixels: in 32-bit arithmetic the product wraps to 65536.
    with pytest.raises(L.ImageTooLargeError, match="4,295,032,832 pixels"):
        decode_raw("mono8", 65537, 65536, 65536, bytes(65536))
    with pytest.raises(L.ImageTooLargeError):
        decode_raw("rgb8", 30000, 30000, 90000, bytes(100))
    with pytest.raises(ImageDecodeError, match="zero size"):
        decode_raw("rgb8", 0, 640, 1920, b"")
    assert L.check_pixels(4096, 4096, "x") == 4096 * 4096


def test_image_file_checks_do_not_read_or_block(tmp_path):
    big = tmp_path / "huge.png"
    with open(big, "wb") as f:                      # sparse: declares 300 MB without using the disk
        f.truncate(L.max_encoded_bytes() + 1)
    with pytest.raises(L.ImageTooLargeError, match="refused unread"):
        L.check_image_file(big)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        L.check_image_file(fifo)                    # returns at once: no writer needed
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        L.check_image_file(tmp_path / "empty.jpg")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())
    for _ in range(3):                               # the memory map is released even when refused
        with pytest.raises(L.ImageTooLargeError, match="30000x30000"):
            L.check_image_file(bomb)
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(textured(30, 40), ".jpg"))
    assert L.check_image_file(good).width == 40


def test_bytes_decoded_are_the_bytes_checked(tmp_path, monkeypatch):
    """A file rewritten in place between the header check and the read (here: by the first check itself) is
    refused by the second check on the bytes read; read_image_file decodes only checked bytes."""
    from r2former_core.data.sources import read_image_file
    good = encode(textured(30, 40), ".png")
    bomb = png_bomb()
    path = tmp_path / "swapped.png"
    path.write_bytes(good)
    assert read_image_file(path).shape == (30, 40, 3)
    real = L.check_encoded
    calls = []

    def check_then_rewrite(data, what="image", max_pixels=None):
        header = real(data, what, max_pixels)
        if not calls:                                # after the first (memory-mapped) check passed
            with open(path, "r+b") as f:             # same inode: the open file sees the new bytes
                f.write(bomb[:33])               # its signature and IHDR: 30000 x 30000
        calls.append(header)
        return header

    monkeypatch.setattr(L, "check_encoded", check_then_rewrite)
    with pytest.raises(L.ImageTooLargeError, match="30000x30000"):
        read_image_file(path)
    assert len(calls) == 1                           # the first check passed, the second refused


# ----------------------------------------------------------------------------- memory bound

MEMORY_PROBE = r"""
import json, resource, sys
from pathlib import Path
import numpy as np
from r2former_core.data.image_codec import decode_compressed, decode_raw
from r2former_core.data.image_limits import ImageTooLargeError
from r2former_core.data.sources import RosbagSource, read_image_file

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

work = Path(sys.argv[1])
bomb = (work / "bomb.png").read_bytes()
good = (work / "good.jpg").read_bytes()
paths = {}
try:
    from sensor_msgs.msg import CompressedImage, Image
    from r2former_ros.conversions import compressed_msg_to_rgb, image_msg_to_rgb
    def via_message(data):
        msg = CompressedImage(format="png")
        msg.data = data
        return compressed_msg_to_rgb(msg)
    def raw_message():
        msg = Image(height=30000, width=30000, encoding="rgb8", step=90000)
        msg.data = bytes(1000)
        return image_msg_to_rgb(msg)
    paths["message"] = True
except ImportError:
    via_message = lambda data: decode_compressed("png", data)
    raw_message = lambda: decode_raw("rgb8", 30000, 30000, 90000, bytes(1000))
    paths["message"] = False

def all_paths_good():
    assert via_message(good).shape == (480, 640, 3)
    assert decode_compressed("jpeg", good).shape == (480, 640, 3)
    assert read_image_file(work / "good.jpg").shape == (480, 640, 3)
    return sum(1 for _ in RosbagSource(work / "good_bag", "/camera/image_raw"))

for _ in range(5):                               # warm-up: the steady state of every decoding path
    all_paths_good()
steady = hwm_mb()
refused = 0
for _ in range(10):
    for attempt in (lambda: via_message(bomb), lambda: decode_compressed("", bomb),
                    lambda: read_image_file(work / "bomb.png"), raw_message):
        try:
            attempt()
        except ImageTooLargeError:
            refused += 1
bag = RosbagSource(work / "bomb_bag", "/camera/image_raw")
bag_frames = sum(1 for _ in bag)
after = hwm_mb()
good_after = all_paths_good()
# Control: decoding a 6000 x 6000 image (a small bomb, allowed by a raised limit) must show up in VmHWM,
# or the figures above would prove nothing.
control = decode_compressed("png", (work / "control.png").read_bytes(), max_pixels=6000 * 6000)
control_after = hwm_mb()
print(json.dumps({"steady_mb": steady, "after_mb": after, "refused": refused, "bag_frames": bag_frames,
                  "bag_skipped": bag.skipped_undecodable, "good_after": good_after, "control_mb": control_after,
                  "control_shape": list(control.shape),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "message_path": paths["message"]}))
"""


def test_png_bomb_keeps_peak_memory_within_100_mb_of_the_steady_state(tmp_path):
    """The 2.6 MB PNG declaring 30000 x 30000 (2.7 GB decoded), through a CompressedImage message, the
    codec, an image file and a bag message, 10 times each: peak RSS (VmHWM) grows < 100 MB over the warmed-up
    steady state, and good images still decode after it. Measured in a fresh subprocess."""
    from bagtools import write_image_pose_bag
    bomb = png_bomb()
    (tmp_path / "bomb.png").write_bytes(bomb)
    good_rgb = textured(480, 640)
    (tmp_path / "good.jpg").write_bytes(encode(good_rgb, ".jpg"))
    (tmp_path / "control.png").write_bytes(png_bomb(6000, 6000))
    stamps = [1.0, 2.0, 3.0]
    write_image_pose_bag(tmp_path / "good_bag", [good_rgb] * 3, stamps, image_type="compressed")
    write_image_pose_bag(tmp_path / "bomb_bag", [good_rgb, bomb, good_rgb], stamps, image_type="compressed",
                         compressed_format="png")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"bomb memory: steady {r['steady_mb']:.0f} MB, after {r['after_mb']:.0f} MB, "
          f"control {r['control_mb']:.0f} MB")
    assert r["refused"] == 40 and r["bag_frames"] == 2 and r["bag_skipped"] == 1 and r["good_after"] == 3
    assert r["after_mb"] - r["steady_mb"] < 100
    assert r["control_shape"] == [6000, 6000, 3] and r["control_mb"] - r["after_mb"] > 100   # the probe sees 100 MB
