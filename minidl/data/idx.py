"""Read and write IDX files, the format MNIST and Fashion-MNIST ship in.

    magic = 0x00 0x00 <dtype code> <ndim>;  dims = ndim x big-endian uint32;
    body  = prod(dims) items, big-endian, C order

A file may be gzip'd: it is recognised by gzip's magic bytes (an IDX file starts
with 0x00), not by its name. Anything malformed raises ValueError naming the file,
so a damaged file never turns into a wrong-shaped array.
"""
import gzip
import math
import os
import struct
import zlib

import numpy as np

from ..serialization import open_regular

# IDX dtype code -> big-endian NumPy dtype, as the format defines them.
_CODE_TO_DTYPE = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
                  0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# Writer side, keyed by (kind, itemsize) so that any byte order is accepted.
_KIND_SIZE_TO_CODE = {(dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items()}


def is_gzip(path):
    with open_regular(path) as f:     # ValueError for a FIFO or a device
        return f.read(2) == b"\x1f\x8b"


def read_idx_bytes(path, max_bytes=None):
    """The (decompressed) bytes of an IDX file. ValueError naming the file for a corrupt
    gzip stream, or for more than ``max_bytes`` bytes: decompression stops there, as a
    small gzip file can expand to gigabytes."""
    path = os.fspath(path)
    gzipped = is_gzip(path)
    try:
        with open_regular(path) as raw, (gzip.GzipFile(fileobj=raw) if gzipped else raw) as f:
            data = f.read(-1 if max_bytes is None else max_bytes + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{path}: more than {max_bytes} bytes"
                         f"{' once decompressed' if gzipped else ''}, the most it may hold")
    return data


def decode_idx(data, name="<bytes>"):
    """The bytes of an uncompressed IDX file as a native-endian array; ``name`` labels
    the errors."""
    if len(data) < 4:
        raise ValueError(f"{name}: {len(data)} bytes is too short for an IDX header (4 bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{name}: bad IDX magic number {bytes(data[:4]).hex()}, expected 0000xxxx")
    code, ndim = data[2], data[3]
    if code not in _CODE_TO_DTYPE:
        known = ", ".join(f"0x{c:02X}" for c in _CODE_TO_DTYPE)
        raise ValueError(f"{name}: unknown IDX dtype code 0x{code:02X} (expected one of {known})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{name}: truncated header, {len(data)} bytes but {ndim} dimensions "
                         f"need {header_len}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _CODE_TO_DTYPE[code]
    expected = header_len + math.prod(dims) * dtype.itemsize  # Python ints: no overflow
    if len(data) != expected:
        raise ValueError(f"{name}: {'truncated' if len(data) < expected else 'overlong'} IDX "
                         f"file, expected {expected} bytes for shape {dims} of {dtype.name}, "
                         f"got {len(data)}")
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def read_idx(path):
    """An IDX file (gzip or raw) as a native-endian NumPy array."""
    return decode_idx(read_idx_bytes(path), name=os.fspath(path))


def encode_idx(array):
    """The uncompressed IDX bytes of ``array`` (uint8, int8, int16, int32, float32 or
    float64: cast anything else, such as int64 labels, first)."""
    array = np.asarray(array)
    code = _KIND_SIZE_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype} (supported: uint8, int8, "
                         f"int16, int32, float32, float64)")
    if any(d >= 2 ** 32 for d in array.shape):
        raise ValueError(f"IDX dimensions must be below 2**32, got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()


def write_idx(path, array, compress=None):
    """Write ``array`` as an IDX file, gzip'd if ``compress`` (None: if ``path`` ends
    in ``.gz``)."""
    path, data = os.fspath(path), encode_idx(array)
    if compress is None:
        compress = path.endswith(".gz")
    if compress:
        # No stored name and mtime=0: reproducible output. Level 6 is much faster than 9
        # on MNIST's 47 MB and barely larger.
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
