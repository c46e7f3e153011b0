"""Image size limits, checked from the header before any decoding or allocation.

A PNG of a few megabytes can declare 30000 x 30000 pixels (a "decompression bomb"): OpenCV
allocates the full 2.7 GB image before it notices anything, and a localizer beside Nav2 on an
8 GB robot is killed for it. Every image this project decodes (ROS messages, image files, bag
messages) therefore goes through this module first:

* encoded images: only PNG and JPEG content is accepted (recognised by its signature, whatever the
  file name or message format says); the size is read from the PNG IHDR chunk or from the JPEG
  frame header (SOFn), found by walking the marker segments as libjpeg does, and a JPEG may hold at
  most `MAX_JPEG_SCANS` scans (each progressive scan is one more pass over the whole image);
* raw images: width x height from the message, in Python integers (no 32-bit overflow);
* image files: additionally at most `max_encoded_bytes` bytes, checked before the file is read.

The limit is `max_image_pixels` (`r2former_core.options.LocalizerConfig`, CLI `--max-image-pixels`):
callers pass it explicitly or leave it to the process-wide value (`set_max_image_pixels`, set by the
`r2former` command line from its option; default `DEFAULT_MAX_IMAGE_PIXELS`).

This module needs only the standard library, so it can run before numpy or OpenCV touch the bytes.
"""
from __future__ import annotations

import mmap
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageDecodeError

# 16 MP: 4096 x 4096 = 16,777,216 pixels, above every camera a robot localizes with (12 MP 4000 x 3000,
# 16 MP 4656 x 3496 sensors included) and ~50 MB once decoded to RGB.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# OpenCV refuses images above 2^30 pixels itself (CV_IO_MAX_IMAGE_PIXELS): a larger limit means nothing.
MAX_IMAGE_PIXELS_CEILING = 1 << 30
# An encoded image is never much larger than its pixels: 16-bit RGBA PNG stored without compression is
# 8 bytes per pixel plus row filters and chunk framing; metadata (EXIF, ICC) rarely exceeds a few MB.
ENCODED_BYTES_PER_PIXEL = 8
ENCODED_EXTRA_BYTES = 16 * 1024 * 1024
# Progressive JPEGs have ~10 scans; libjpeg-turbo suggests refusing more than 500 (each scan is a pass
# over the whole coefficient buffer, so thousands of tiny scans take minutes to decode).
MAX_JPEG_SCANS = 500
# Marker segments walked before the JPEG frame header must appear (real files have < 30).
MAX_JPEG_SEGMENTS = 1000

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"              # the PNG's last chunk, always the same 12 bytes
JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC), which share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}   # RSTn and TEM carry no length
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}            # colour type -> channels once decoded
_CHUNK = 1 << 20
_COPY_LIMIT = 8 << 20            # payloads up to this size are searched in one copy

_max_pixels = DEFAULT_MAX_IMAGE_PIXELS


class ImageTooLargeError(ImageDecodeError):
    """An image whose declared size exceeds `max_image_pixels` (refused before decoding)."""


@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image declares about itself."""
    format: str        # "png" or "jpeg"
    width: int
    height: int
    channels: int
    bit_depth: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


# ----------------------------------------------------------------------------- the limit

def set_max_image_pixels(value: int) -> None:
    """Set the process-wide limit used when a caller passes no `max_pixels`."""
    global _max_pixels
    _max_pixels = _checked_limit(value)


def get_max_image_pixels() -> int:
    """The process-wide limit (`DEFAULT_MAX_IMAGE_PIXELS` unless `set_max_image_pixels` changed it)."""
    return _max_pixels


def _checked_limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGE_PIXELS_CEILING:
        raise ImageDecodeError(f"max_image_pixels must be an integer in [1, {MAX_IMAGE_PIXELS_CEILING}], "
                               f"got {value!r}")
    return value


def _limit(max_pixels: int | None) -> int:
    return _max_pixels if max_pixels is None else _checked_limit(max_pixels)


def max_encoded_bytes(max_pixels: int | None = None) -> int:
    """The largest encoded image file accepted under a pixel limit (see ENCODED_BYTES_PER_PIXEL)."""
    return ENCODED_BYTES_PER_PIXEL * _limit(max_pixels) + ENCODED_EXTRA_BYTES


def check_pixels(width: int, height: int, what: str, max_pixels: int | None = None, source: str = "") -> int:
    """width x height in pixels, or ImageTooLargeError when it exceeds the limit (ImageDecodeError for <= 0)."""
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{what} has zero size ({width}x{height})")
    limit = _limit(max_pixels)
    pixels = width * height            # Python integers: no wrap-around, whatever the declared sizes
    if pixels > limit:
        raise ImageTooLargeError(
            f"{what} declares {width}x{height} = {pixels:,} pixels{source}, more than max_image_pixels = "
            f"{limit:,}; refused without decoding (raise --max-image-pixels / the max_image_pixels parameter "
            "if the camera really sends such images)")
    return pixels


# ----------------------------------------------------------------------------- header parsing

class _Bytes:
    """Random access to a buffer (bytes, bytearray, memoryview, array.array, numpy uint8 array, mmap).

    Searches run in C: on the object itself when it has `find` (bytes, mmap), on one copy when it is
    small (a camera frame), else over 1 MB windows (nothing larger than a window is copied)."""

    def __init__(self, data: Any) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        self.view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
        self.size = self.view.nbytes
        if isinstance(data, (bytes, bytearray, mmap.mmap)):
            self.whole: Any = data
        else:
            self.whole = bytes(self.view) if self.size <= _COPY_LIMIT else None

    def get(self, pos: int, n: int) -> bytes:
        return bytes(self.view[pos:pos + n])

    def _windows(self, pos: int, pattern: bytes, backwards: bool = False):
        """(start, bytes) windows of the buffer from `pos`, overlapping by len(pattern) - 1 bytes."""
        starts = range(pos, self.size, _CHUNK)
        for start in reversed(starts) if backwards else starts:
            yield start, bytes(self.view[start:start + _CHUNK + len(pattern) - 1])

    def find(self, pattern: bytes, pos: int) -> int:
        """Offset of the next `pattern` at or after `pos`, or -1."""
        if self.whole is not None:
            return self.whole.find(pattern, pos)
        for start, window in self._windows(pos, pattern):
            if (hit := window.find(pattern)) >= 0:
                return start + hit
        return -1

    def rfind(self, pattern: bytes, pos: int) -> int:
        """Offset of the last `pattern` at or after `pos`, or -1."""
        if self.whole is not None:
            return self.whole.rfind(pattern, pos)
        for start, window in self._windows(pos, pattern, backwards=True):
            if (hit := window.rfind(pattern)) >= 0:
                return start + hit
        return -1

    def count(self, pattern: bytes, pos: int) -> int:
        """Occurrences of `pattern` (which cannot overlap itself) at or after `pos`."""
        if self.whole is not None:
            return self.whole.count(pattern, pos)
        return sum(window[:_CHUNK + len(pattern) - 1].count(pattern) for _, window in self._windows(pos, pattern))


def sniff_format(head: bytes) -> str | None:
    """"png", "jpeg" or None from the first bytes of an encoded image."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SOI + b"\xff"):
        return "jpeg"
    return None


def _png_header(buf: _Bytes, what: str) -> ImageHeader:
    head = buf.get(8, 25)                       # IHDR: length, type, 13 data bytes, CRC
    if len(head) < 25 or head[:8] != b"\x00\x00\x00\x0dIHDR":
        raise ImageDecodeError(f"{what} is a PNG without a valid IHDR chunk (truncated or damaged)")
    if zlib.crc32(head[4:21]) != int.from_bytes(head[21:25], "big"):
        raise ImageDecodeError(f"{what} is a PNG whose IHDR chunk fails its CRC (damaged)")
    if buf.get(buf.size - len(PNG_IEND), len(PNG_IEND)) != PNG_IEND:
        raise ImageDecodeError(f"{what} is a PNG that does not end with its IEND chunk (truncated)")
    width, height = int.from_bytes(head[8:12], "big"), int.from_bytes(head[12:16], "big")
    depth, colour = head[16], head[17]
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise ImageDecodeError(f"{what} is a PNG with an invalid colour type {colour} / bit depth {depth}")
    return ImageHeader("png", width, height, _PNG_CHANNELS[colour], depth)


def _jpeg_header(buf: _Bytes, what: str) -> ImageHeader:
    """Walk the marker segments to the frame header, skipping stray bytes between markers as libjpeg does,
    then count the scans (SOS markers) of the whole stream."""
    pos = 2
    for _ in range(MAX_JPEG_SEGMENTS):
        if buf.get(pos, 1) != b"\xff":               # well-formed streams: the next marker is right here
            pos = buf.find(b"\xff", pos)
        while 0 <= pos and buf.get(pos + 1, 1) in (b"\xff", b"\x00"):   # fill bytes and stuffed zeros
            pos = buf.find(b"\xff", pos + 1)
        if pos < 0 or pos + 1 >= buf.size:
            raise ImageDecodeError(f"{what} is a JPEG that ends before its frame header (truncated)")
        marker = buf.get(pos + 1, 1)[0]
        pos += 2
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI, 0xD8):
            raise ImageDecodeError(f"{what} is a JPEG with no frame header before marker 0x{marker:02X} (damaged)")
        length = int.from_bytes(buf.get(pos, 2), "big")
        if length < 2 or pos + length > buf.size:
            raise ImageDecodeError(f"{what} is a JPEG with a segment running past its end (truncated or damaged)")
        if marker in _JPEG_SOF:
            sof = buf.get(pos + 2, 6)
            if length < 8 or len(sof) < 6:
                raise ImageDecodeError(f"{what} is a JPEG with a short frame header (damaged)")
            height, width, components = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big"), sof[5]
            if height == 0:
                raise ImageDecodeError(f"{what} is a JPEG whose height is defined later in the stream (DNL "
                                       "marker), which is not supported")
            if components not in (1, 3, 4):
                raise ImageDecodeError(f"{what} is a JPEG with {components} colour components (1, 3 or 4 expected)")
            _check_scans(buf, pos, what)
            return ImageHeader("jpeg", width, height, components, sof[0])
        pos += length
    raise ImageDecodeError(f"{what} is a JPEG without a frame header in its first {MAX_JPEG_SEGMENTS} segments")


def _check_scans(buf: _Bytes, pos: int, what: str) -> None:
    """At most MAX_JPEG_SCANS scans after the frame header at `pos`, and an end-of-image marker after the last
    one. In entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so these byte pairs are
    real markers. One pass over the data (the count); the end marker is normally the file's last two bytes."""
    scans = buf.count(b"\xff\xda", pos)
    if scans > MAX_JPEG_SCANS:
        raise ImageTooLargeError(f"{what} is a JPEG with {scans} scans, more than {MAX_JPEG_SCANS}; refused without "
                                 "decoding (decoding it would take minutes)")
    if scans == 0:
        raise ImageDecodeError(f"{what} is a JPEG without image data (no scan; truncated)")
    end = buf.rfind(b"\xff\xd9", pos)
    if end < 0 or buf.find(b"\xff\xda", end) >= 0:
        raise ImageDecodeError(f"{what} is a JPEG without its end-of-image marker (truncated)")


def read_header(data: Any, what: str = "image") -> ImageHeader:
    """The header of an encoded PNG or JPEG held in memory; ImageDecodeError for anything else."""
    buf = _Bytes(data)
    if buf.size == 0:
        raise ImageDecodeError(f"{what} has no data")
    kind = sniff_format(buf.get(0, 8))
    if kind == "png":
        return _png_header(buf, what)
    if kind == "jpeg":
        return _jpeg_header(buf, what)
    raise ImageDecodeError(f"{what} ({buf.size} bytes) is neither PNG nor JPEG (first bytes "
                           f"{buf.get(0, 8).hex(' ')}); only PNG and JPEG images are decoded")


def check_encoded(data: Any, what: str = "image", max_pixels: int | None = None) -> ImageHeader:
    """Header of an encoded PNG/JPEG in memory, after checking its declared size against the limit."""
    header = read_header(data, what)
    check_pixels(header.width, header.height, what, max_pixels, source=f" in its {header.format.upper()} header")
    return header


def check_image_file(path: str | os.PathLike, max_pixels: int | None = None) -> ImageHeader:
    """Check an image file before it is read: a regular file, at most `max_encoded_bytes`, PNG or JPEG, and
    within the pixel limit (the header is read through a memory map, so nothing is loaded)."""
    return _open_checked(Path(path), max_pixels, read=False)[0]


def read_checked_file(path: str | os.PathLike, max_pixels: int | None = None) -> bytes:
    """The bytes of an image file that passed `check_image_file`, read through the same open file and checked
    again once in memory: the bytes that get decoded are the bytes that were checked, even when the file is
    replaced or rewritten between the check and the read."""
    return _open_checked(Path(path), max_pixels, read=True)[1]


def _open_checked(path: Path, max_pixels: int | None, read: bool) -> tuple[ImageHeader, bytes]:
    what = f"image file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)   # a FIFO named *.png must not block the reader
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {what}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError(f"{what} is not a regular file")
        cap = max_encoded_bytes(max_pixels)
        if st.st_size > cap:
            raise ImageTooLargeError(f"{what} has {st.st_size:,} bytes, more than the {cap:,} an image of "
                                     f"max_image_pixels = {_limit(max_pixels):,} can need; refused unread")
        if st.st_size == 0:
            raise ImageDecodeError(f"{what} is empty")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                header = check_encoded(view, what, max_pixels)
            finally:
                view.release()      # before the map closes, even when a traceback still refers to it
        if not read:
            return header, b""
        chunks, total = [], 0
        while True:                 # bounded: a file that grew past the cap since fstat is refused
            chunk = os.pread(fd, min(1 << 20, cap + 1 - total), total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise ImageTooLargeError(f"{what} grew past {cap:,} bytes while it was read; refused")
        data = b"".join(chunks)
        return check_encoded(data, what, max_pixels), data
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {what}: {exc}") from exc
    finally:
        os.close(fd)


__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageHeader", "ImageTooLargeError", "MAX_IMAGE_PIXELS_CEILING",
           "MAX_JPEG_SCANS", "check_encoded", "check_image_file", "check_pixels", "get_max_image_pixels",
           "read_checked_file",
           "max_encoded_bytes", "read_header", "set_max_image_pixels", "sniff_format"]
