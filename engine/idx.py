"""Reader for the IDX format of the MNIST files (``train-images-idx3-ubyte.gz`` and friends).

Layout (big-endian): two zero bytes, a type byte, the number of dimensions ``n``, then ``n``
32-bit sizes, then the values in C order.  Files ending in ``.gz`` are decompressed first.
Every problem (not gzip, wrong magic, unknown type, truncated or trailing data, a shape other
than the one expected) raises :class:`IdxError` with one line naming the file.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# type byte -> big-endian numpy dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxError(ValueError):
    """An IDX file is missing, malformed or not of the expected shape."""


def read_idx(path: str | Path, *, shape: Sequence[int | None] | None = None) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` or raw), in native byte order.

    ``shape``, when given, is the expected shape (``None`` entries match any size), e.g.
    ``(60000, 28, 28)`` or ``(None, 28, 28)``.

    Raises:
        IdxError: naming the file and what is wrong with it.
    """
    path = Path(path)
    name = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IdxError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise IdxError(f"{name}: is a directory, not an IDX file") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxError(f"{name}: not a valid gzip file ({exc}); the download or the "
                           "package is damaged, reinstall it") from None
    if len(raw) < 4:
        raise IdxError(f"{name}: not an IDX file ({len(raw)} bytes, shorter than the 4-byte "
                       "magic number)")
    if raw[0] != 0 or raw[1] != 0:
        raise IdxError(f"{name}: not an IDX file (the magic number {raw[:4].hex()} does not "
                       "start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in IDX_TYPES:
        raise IdxError(f"{name}: unknown IDX value type 0x{type_code:02x} (known: "
                       f"{', '.join(f'0x{k:02x}' for k in IDX_TYPES)})")
    if ndim == 0:
        raise IdxError(f"{name}: the IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{name}: truncated IDX header ({len(raw)} bytes, {header} needed for "
                       f"{ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_TYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing data"
        raise IdxError(f"{name}: {what}: the header declares shape {list(dims)} "
                       f"({expected} data bytes) but the file holds {got}")
    if shape is not None:
        want = list(shape)
        if len(want) != ndim or any(w is not None and w != d
                                    for w, d in zip(want, dims, strict=False)):
            shown = ["any" if w is None else w for w in want]
            raise IdxError(f"{name}: shape {list(dims)} is not the expected {shown}")
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}
    key = array.dtype.newbyteorder("=")
    if key not in codes:
        raise IdxError(f"{path}: dtype {array.dtype} has no IDX type code")
    code = codes[key]
    data = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes())
    path = Path(path)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
