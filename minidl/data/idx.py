"""Read and write IDX files, the format MNIST and Fashion-MNIST ship in.

An IDX file is a 4-byte magic number, one big-endian uint32 per dimension,
then the array body in big-endian C order:

    magic  = 0x00 0x00 <dtype code> <ndim>
    dims   = ndim x uint32 (big-endian)
    body   = prod(dims) x itemsize bytes

Files may be gzip-compressed; the reader recognises gzip by its own magic bytes
(an IDX file always starts with 0x00, gzip with 0x1f 0x8b), so the file name
does not matter. Anything malformed -- a corrupt gzip stream, a wrong magic,
an unknown dtype code, a body shorter or longer than the header promises --
raises ValueError naming the file, so a damaged file can never turn into a
wrong-shaped array.
"""
import gzip
import math
import os
import struct
import zlib

import numpy as np

# IDX dtype code -> big-endian NumPy dtype, as defined by the format.
_CODE_TO_DTYPE = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# Writer side, keyed by (kind, itemsize) so any byte order is accepted.
_KIND_SIZE_TO_CODE = {(dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items()}

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_LEN = 4  # magic number; the dimensions follow


def is_gzip(path):
    """Whether the file starts with gzip's magic bytes (an IDX file starts with 00)."""
    with open(path, "rb") as f:
        return f.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC


def read_idx_bytes(path, max_bytes=None):
    """Return the (decompressed) bytes of an IDX file, gzip or raw.

    A corrupt or truncated gzip stream raises ValueError naming the file, and so does a
    file of more than ``max_bytes`` bytes (decompressed): the decompression stops there,
    as a small gzip file can expand to gigabytes.
    """
    path = os.fspath(path)
    limit = -1 if max_bytes is None else max_bytes + 1
    gzipped = is_gzip(path)
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read(limit)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{path}: more than {max_bytes} bytes"
                         f"{' once decompressed' if gzipped else ''}, the most it may hold")
    return data


def decode_idx(data, name="<bytes>"):
    """Parse the bytes of an uncompressed IDX file into a native-endian array.

    ``name`` only labels error messages (usually the file path).
    """
    if len(data) < _HEADER_LEN:
        raise ValueError(f"{name}: {len(data)} bytes is too short for an IDX header "
                         f"(expected at least {_HEADER_LEN})")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(f"{name}: bad IDX magic number {bytes(data[:4]).hex()} "
                         f"(expected it to start with 0000)")
    if code not in _CODE_TO_DTYPE:
        known = ", ".join(f"0x{c:02X}" for c in _CODE_TO_DTYPE)
        raise ValueError(f"{name}: unknown IDX dtype code 0x{code:02X} (expected one of {known})")
    header_len = _HEADER_LEN + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{name}: truncated header, {len(data)} bytes but {ndim} dimensions "
                         f"need {header_len}")
    dims = struct.unpack(f">{ndim}I", data[_HEADER_LEN:header_len])
    dtype = _CODE_TO_DTYPE[code]
    count = math.prod(dims)  # Python ints: a huge claimed shape cannot overflow
    expected = header_len + count * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "overlong"
        raise ValueError(f"{name}: {problem} IDX file, expected {expected} bytes for shape "
                         f"{dims} of {dtype.name}, got {len(data)}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header_len).reshape(dims)
    # astype copies: the result is writable, owns its memory, and is native-endian.
    return array.astype(dtype.newbyteorder("="))


def read_idx(path):
    """Read an IDX file (gzip or raw) into a native-endian NumPy array."""
    path = os.fspath(path)
    return decode_idx(read_idx_bytes(path), name=path)


def encode_idx(array):
    """Return the uncompressed IDX bytes of ``array``.

    Supported dtypes are those IDX can hold: uint8, int8, int16, int32,
    float32, float64. Cast anything else (e.g. int64 labels) first.
    """
    array = np.asarray(array)
    code = _KIND_SIZE_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype} (supported: uint8, int8, "
                         f"int16, int32, float32, float64)")
    if array.ndim > 255:
        raise ValueError(f"IDX stores at most 255 dimensions, got {array.ndim}")
    if any(d >= 2 ** 32 for d in array.shape):
        raise ValueError(f"IDX dimensions must be below 2**32, got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes()
    return header + body


def write_idx(path, array, compress=None):
    """Write ``array`` as an IDX file.

    ``compress``: True for gzip, False for raw, None (default) for gzip exactly
    when ``path`` ends in ``.gz``.
    """
    path = os.fspath(path)
    data = encode_idx(array)
    if compress is None:
        compress = path.endswith(".gz")
    if compress:
        # No stored name and mtime=0 keep the output reproducible; level 6 is much
        # faster than 9 on 47 MB of MNIST pixels and barely larger.
        with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb",
                                                    compresslevel=6, mtime=0) as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)
