"""The IDX format (minidl/data/idx.py): round trips of every dtype, the big-endian
layout, gzip found by content, and malformed, truncated or corrupt files refused
naming the file."""
import gzip
import math
import os
import struct

import numpy as np
import pytest

from minidl.data import read_idx, write_idx
from minidl.data.idx import encode_idx

from conftest import fails_instead_of_hanging, special_files


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, dtype, suffix):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype)  # native byte order
    assert back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_idx_gzip_is_detected_by_content_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "raw.gz", array, compress=False)
    write_idx(tmp_path / "zipped", array, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "zipped"), array)


def test_idx_layout_is_big_endian(tmp_path):
    path = tmp_path / "a.idx"
    write_idx(path, np.array([[1, 2]], dtype=np.int16))
    assert path.read_bytes() == bytes([0, 0, 0x0B, 2]) + struct.pack(">II", 1, 2) + \
        struct.pack(">hh", 1, 2)


def test_idx_empty_array(tmp_path):
    write_idx(tmp_path / "e.idx", np.zeros((0, 28, 28), np.uint8))
    assert read_idx(tmp_path / "e.idx").shape == (0, 28, 28)


def _bad_file(tmp_path, data, gz=False):
    path = tmp_path / ("bad.idx.gz" if gz else "bad.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\x00", "overlong"),
    (lambda b: b"\x01" + b[1:], "magic"),
    (lambda b: b[:2] + b"\x0a" + b[3:], "dtype code 0x0A"),
    (lambda b: b[:6], "truncated header"),
    (lambda b: b[:2], "too short"),
])
def test_idx_malformed_files_are_refused(tmp_path, gz, mutate, message):
    good = encode_idx(np.ones((3, 2, 2), np.uint8))
    path = _bad_file(tmp_path, mutate(good), gz=gz)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("dims", [(2 ** 16,) * 4, (2 ** 32 - 1,) * 3])
def test_idx_huge_claimed_shape_is_a_clear_error(tmp_path, dims):
    # 2**64 elements wrapped around to 0 in int64 arithmetic: the header "matched"
    header = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path = _bad_file(tmp_path, header)
    expected = len(header) + math.prod(dims)
    with pytest.raises(ValueError, match=f"truncated IDX file, expected {expected} bytes") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", [
    lambda z: z[:-6],                                   # truncated stream
    lambda z: z[:20] + bytes([z[20] ^ 0xFF]) + z[21:],  # flipped byte in the body
])
def test_idx_corrupt_gzip_is_refused(tmp_path, damage):
    zipped = gzip.compress(encode_idx(np.arange(4000, dtype=np.int32)))
    path = tmp_path / "bad.gz"
    path.write_bytes(damage(zipped))
    with pytest.raises(ValueError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_write_idx_refuses_dtypes_idx_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x.idx", np.zeros(3, np.int64))


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and /dev/zero are POSIX")
def test_a_fifo_or_a_device_is_refused_not_read(tmp_path):
    for path in special_files(tmp_path, "train-images-idx3-ubyte"):
        with fails_instead_of_hanging(), pytest.raises(ValueError, match="not a regular file"):
            read_idx(path)
