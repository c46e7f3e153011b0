"""Hostile inputs for the reliability tests, generated on the fly (no committed binaries).

* `png_bomb`: a valid, complete PNG whose IHDR declares a huge image and whose IDAT is deflate-compressed
  zero rows (30000 x 30000 RGB: 2.7 GB of pixels in ~2.6 MB of file);
* `jpeg_declaring`: a real small JPEG whose frame header is patched to declare another size;
* `PickleBomb`: an object whose unpickling would create a marker file (proof that a loader never
  executed it);
* `flip_byte`, `truncate`: damage files in place.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_CHANNELS = {0: 1, 2: 3, 6: 4}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 30000, height: int = 30000, colour_type: int = 2) -> bytes:
    """A complete PNG of `width` x `height` black pixels (8-bit, colour type 0 grey, 2 RGB or 6 RGBA).

    The zlib stream is built without deflating gigabytes: rows are compressed once in a block that ends
    with a full flush (byte-aligned, no reference to earlier data), the block is repeated, and the stream
    is closed by an empty final block and the Adler-32 of the data (all zero bytes: filter type 0 rows
    of black pixels, whose Adler-32 is closed-form).
    """
    row = bytes(1 + width * _COLOUR_CHANNELS[colour_type])           # filter type 0 + zero pixels
    rows_per_block = max(1, min(height, (8 << 20) // len(row)))
    blocks, rest = divmod(height, rows_per_block)
    co = zlib.compressobj(9)
    first = co.compress(row * rows_per_block) + co.flush(zlib.Z_FULL_FLUSH)         # with the zlib header
    again = co.compress(row * rows_per_block) + co.flush(zlib.Z_FULL_FLUSH)         # the same block, headerless
    tail = (co.compress(row * rest) + co.flush(zlib.Z_FULL_FLUSH)) if rest else b""
    adler = (len(row) * height % 65521) << 16 | 1            # Adler-32 of that many zero bytes
    stream = first + again * (blocks - 1) + tail + b"\x03\x00" + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int, progressive: bool = False) -> bytes:
    """A real 16x16 JPEG whose SOF header claims `width` x `height` (the scan data stays that of 16x16)."""
    img = np.full((16, 16, 3), 128, np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] + ([cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else [])
    ok, buf = cv2.imencode(".jpg", img, params)
    assert ok
    data = bytearray(buf.tobytes())
    pos = 2
    while True:                                         # walk to the SOF segment
        assert data[pos] == 0xFF
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[pos + 5:pos + 7] = height.to_bytes(2, "big")
            data[pos + 7:pos + 9] = width.to_bytes(2, "big")
            return bytes(data)
        pos += 2 + length


def jpeg_with_scans(scans: int) -> bytes:
    """A progressive-looking JPEG stream with `scans` SOS markers (a "scan bomb"; never decoded in tests)."""
    base = jpeg_declaring(16, 16, progressive=True)
    sos = base.index(b"\xff\xda")
    extra = b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x00" + b"\x00" * 4      # minimal SOS segments + data
    return base[:sos] + extra * scans + base[sos:]


class PickleBomb:
    """Unpickling this calls `open(marker, 'w')`: a loader that executed pickled code leaves the file."""

    def __init__(self, marker: str | os.PathLike) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
