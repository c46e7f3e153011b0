"""Decoding of ROS image payloads to RGB uint8 arrays, without cv_bridge.

Works on plain fields, so the same code serves rclpy messages (the node), rosbags messages
(offline bag reading) and tests. Every malformed input raises `ImageDecodeError` with the reason.
Sizes are checked against `max_image_pixels` before anything is decoded or allocated
(`image_limits`: raw width x height, the PNG/JPEG header of compressed payloads); `max_pixels=None`
means the process-wide limit (`image_limits.get_max_image_pixels`).
"""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import ImageDecodeError
from .image_limits import check_encoded, check_pixels

# encoding -> (channels, numpy dtype, conversion to RGB or None for already-RGB)
RAW_ENCODINGS: dict[str, tuple[int, type, int | None]] = {
    "rgb8": (3, np.uint8, None),
    "bgr8": (3, np.uint8, cv2.COLOR_BGR2RGB),
    "rgba8": (4, np.uint8, cv2.COLOR_RGBA2RGB),
    "bgra8": (4, np.uint8, cv2.COLOR_BGRA2RGB),
    "mono8": (1, np.uint8, cv2.COLOR_GRAY2RGB),
    "8uc1": (1, np.uint8, cv2.COLOR_GRAY2RGB),
    "mono16": (1, np.uint16, cv2.COLOR_GRAY2RGB),
    "16uc1": (1, np.uint16, cv2.COLOR_GRAY2RGB),
    "8uc3": (3, np.uint8, cv2.COLOR_BGR2RGB),
    # Bayer mosaics (industrial cameras publishing the sensor's raw pattern), demosaiced by OpenCV. The name
    # gives the 2x2 pattern from the top-left pixel; OpenCV names the same pattern by its second row.
    "bayer_rggb8": (1, np.uint8, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": (1, np.uint8, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": (1, np.uint8, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": (1, np.uint8, cv2.COLOR_BayerGB2RGB),
    "bayer_rggb16": (1, np.uint16, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr16": (1, np.uint16, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg16": (1, np.uint16, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg16": (1, np.uint16, cv2.COLOR_BayerGB2RGB),
    # YUV 4:2:2, two bytes per pixel (USB cameras), BT.601 video range: ROS "yuv422" is UYVY, "yuv422_yuy2" YUYV.
    "yuv422": (2, np.uint8, cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": (2, np.uint8, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, np.uint8, cv2.COLOR_YUV2RGB_YUYV),
    "yuyv": (2, np.uint8, cv2.COLOR_YUV2RGB_YUYV),
}
COMPRESSED_FORMATS = ("jpeg", "jpg", "png")


def decode_raw(encoding: str, height: int, width: int, step: int, data, is_bigendian: bool = False,
               max_pixels: int | None = None) -> np.ndarray:
    """sensor_msgs/Image fields -> HxWx3 uint8 RGB; sizes above `max_pixels` are refused first."""
    enc = (encoding or "").strip().lower()
    if enc not in RAW_ENCODINGS:
        raise ImageDecodeError(f"unsupported image encoding {encoding!r}; supported: {', '.join(RAW_ENCODINGS)}")
    channels, dtype, conversion = RAW_ENCODINGS[enc]
    height, width, step = int(height), int(width), int(step)
    check_pixels(width, height, f"{enc} image", max_pixels)
    if channels == 2 and width % 2:
        raise ImageDecodeError(f"{enc} needs an even width (pixel pairs share U and V), got {width}")
    itemsize = np.dtype(dtype).itemsize
    row_bytes = width * channels * itemsize
    if step < row_bytes:
        raise ImageDecodeError(f"step {step} is smaller than width x channels x bytes = {row_bytes} for {enc}")
    buf = np.frombuffer(memoryview(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    if buf.size < step * height:
        raise ImageDecodeError(f"image data has {buf.size} bytes, expected step x height = {step * height}")
    rows = buf[: step * height].reshape(height, step)[:, :row_bytes]
    pixels = np.ascontiguousarray(rows).view(np.dtype(dtype).newbyteorder(">" if is_bigendian else "<"))
    pixels = pixels.reshape(height, width, channels) if channels > 1 else pixels.reshape(height, width)
    if pixels.dtype.itemsize == 2:
        pixels = (pixels.astype(np.float32) / 257.0).round().astype(np.uint8)
    if conversion is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def decode_compressed(fmt: str, data, max_pixels: int | None = None) -> np.ndarray:
    """sensor_msgs/CompressedImage fields -> HxWx3 uint8 RGB (JPEG or PNG payloads, recognised by content;
    an empty format is accepted). Sizes above `max_pixels` are refused from the header, before decoding."""
    f = (fmt or "").lower()
    if "compresseddepth" in f:
        raise ImageDecodeError(f"compressed format {fmt!r} is a depth image (compressedDepth), which is not "
                               "supported: subscribe the colour or mono camera image")
    if f and not any(name in f for name in COMPRESSED_FORMATS):
        raise ImageDecodeError(f"unsupported compressed format {fmt!r}; supported: jpeg, png")
    return decode_encoded(data, f"compressed image (format {fmt!r})", max_pixels)


def decode_encoded(data, what: str, max_pixels: int | None = None) -> np.ndarray:
    """An encoded PNG or JPEG in memory -> HxWx3 uint8 RGB, after its header passed `check_encoded`."""
    buf = np.frombuffer(memoryview(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    header = check_encoded(buf.reshape(-1), what, max_pixels)
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageDecodeError(f"{what} ({buf.size} bytes, {header.format.upper()} {header.width}x{header.height}) "
                               "could not be decoded: the data is corrupt or truncated")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_raw(image_rgb: np.ndarray, encoding: str = "rgb8") -> tuple[int, int, int, bytes]:
    """HxWx3 uint8 RGB -> (height, width, step, data) for rgb8 / bgr8 / mono8."""
    image_rgb = np.asarray(image_rgb)
    enc = encoding.lower()
    if enc == "rgb8":
        arr = image_rgb
    elif enc == "bgr8":
        arr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    elif enc == "mono8":
        arr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    else:
        raise ValueError(f"cannot encode {encoding!r}; use rgb8, bgr8 or mono8")
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    return h, w, arr.strides[0], arr.tobytes()


def encode_compressed(image_rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    bgr = cv2.cvtColor(np.asarray(image_rgb), cv2.COLOR_RGB2BGR)
    ext = ".png" if fmt.lower() == "png" else ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise ImageDecodeError(f"could not encode image as {fmt}")
    return buf.tobytes()
