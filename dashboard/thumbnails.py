"""Small grayscale PNGs from pixel payloads, without PIL: table thumbnails (data URIs) and
``st.image`` arrays."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Sequence

import numpy as np


def pixels_to_uint8(pixels: Sequence[float] | np.ndarray, shape: Sequence[int],
                    scale: int = 1) -> np.ndarray:
    """Reshape a flat pixel list to ``shape``, stretch it to 0..255 and upscale by ``scale``.

    Each image is stretched on its own range (a constant image becomes black); dark = low value.
    """
    arr = np.asarray(pixels, dtype=np.float64).reshape(tuple(int(s) for s in shape))
    lo, hi = float(arr.min()), float(arr.max())
    norm = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    img = np.round(norm * 255).astype(np.uint8)
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    return img


def png_bytes(gray: np.ndarray) -> bytes:
    """Encode a 2-D uint8 array as an 8-bit grayscale PNG."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError("png_bytes expects a 2-D uint8 array")
    height, width = gray.shape
    raw = b"".join(b"\x00" + gray[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def png_data_uri(pixels: Sequence[float] | np.ndarray, shape: Sequence[int], scale: int = 4) -> str:
    """``data:image/png;base64,...`` URI of one image, for ``st.column_config.ImageColumn``."""
    encoded = base64.b64encode(png_bytes(pixels_to_uint8(pixels, shape, scale))).decode("ascii")
    return "data:image/png;base64," + encoded


def infer_shape(pixels: Sequence[float] | np.ndarray) -> tuple[int, int]:
    """Square shape for a flat payload when the manifest gives none (64 values -> 8x8)."""
    n = len(pixels)
    side = int(round(n ** 0.5))
    return (side, side) if side * side == n else (1, n)
