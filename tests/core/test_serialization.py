"""minidl.serialization: atomic writes (the usual permissions, nothing left by a failed
or killed save, temporary files of dead processes swept) and checked reads (every
member's header is checked before its data is read)."""
import io
import os
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

import minidl
from minidl import Conv2D, Dense, Flatten, Sequential, load_model
from minidl.serialization import CheckpointError, NpzReader, load_npz, open_regular, save_npz

from conftest import fails_instead_of_hanging, special_files


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_gets_the_usual_permissions_for_the_umask(tmp_path, umask):
    # not mkstemp's 0600: a checkpoint is shared like any file the user writes
    path = tmp_path / "model.npz"
    previous = os.umask(umask)
    try:
        save_npz(path, {"w": np.arange(3)})
        save_npz(path, {"w": np.arange(4)})  # replacing an existing file, too
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    np.testing.assert_array_equal(load_npz(path, {"w": ((4,), np.int64)})["w"], np.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left


def test_failed_save_leaves_no_file(tmp_path):
    class Unsaveable:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_npz(tmp_path / "model.npz", {"w": Unsaveable()})
    assert list(tmp_path.iterdir()) == []


PACKAGE_ROOT = os.path.dirname(os.path.dirname(minidl.__file__))


# -- checkpoints: every member's header is checked before its data is read ----------
def tiny():
    return Sequential(Conv2D(1, 2, 3, activation="relu"), Flatten(), Dense(8, 3))


def _npy_header(shape, descr="<f4"):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def _write_zip(path, members):
    """A zip written by hand from (name, raw deflate stream, size, crc) members."""
    body, central = b"", b""
    for name, deflated, size, crc in members:
        fields = (0, 8, 0, 33, crc, len(deflated), size, len(name), 0)
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, *fields, 0, 0, 0, 0,
                               len(body)) + name.encode()
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, *fields) + name.encode() + deflated
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members),
                      len(central), len(body), 0)
    path.write_bytes(body + central + end)


def _deflated_member(name, data):
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return name, compressor.compress(data) + compressor.flush(), len(data), zlib.crc32(data)


def _bomb(path, model, gib=1.5):
    """A ~1.5 MB checkpoint of ``model`` whose '0.weight' deflates to ``gib`` GiB of
    float32 (its CRC is left 0: nothing may read that far)."""
    mib = int(gib * 1024)
    header = _npy_header((mib << 18,))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    # Full flushes make each piece stand alone, so one MiB of zeros can be repeated.
    head = compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)
    zeros = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    deflated = head + zeros * mib + compressor.flush()
    model.save(path)
    with np.load(path) as data:
        members = [_deflated_member(f"{k}.npy", _npy_bytes(data[k])) for k in data.files
                   if k != "0.weight"]
    _write_zip(path, members + [("0.weight.npy", deflated, len(header) + (mib << 20), 0)])
    return path


def _npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _refused_fast(load, path, match):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=match) as info:
            load(path)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert seconds < 2 and peak < 16 << 20, (seconds, peak)


def test_deflate_bomb_member_is_refused_from_its_header(tmp_path):
    model = tiny()
    path = _bomb(tmp_path / "bomb.npz", model)
    assert path.stat().st_size < 2 << 20
    _refused_fast(model.load, path, r"'0.weight' is float32 of shape \(402653184,\), expected "
                                    r"float32 of shape \(2, 1, 3, 3\)")
    _refused_fast(load_model, path, r"'0.weight' is float32 of shape \(402653184,\)")


def test_member_claiming_a_huge_shape_is_refused_from_its_header(tmp_path):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("0.weight.npy", _npy_header((10 ** 12,)) + bytes(64))
    _refused_fast(tiny().load, path, r"holds 192 bytes, but its header says 4000000000128")
    with pytest.raises(ValueError, match="holds 192 bytes"):
        NpzReader(path)


# -- temporary files of killed processes -------------------------------------------
def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_save_sweeps_temp_files_of_dead_processes_only(tmp_path):
    stale = tmp_path / f".model.npz.{_dead_pid()}.0a1b2c3d.tmp"
    live = tmp_path / f".model.npz.{os.getpid()}.0a1b2c3d.tmp"   # a save in progress
    other = tmp_path / ".notes.123.tmp"                          # not a name minidl makes
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    tiny().save(tmp_path / "model.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        sorted([live.name, other.name, "model.npz"])


def test_temp_file_of_a_killed_save_is_swept_by_the_next_save(tmp_path):
    # A child starts a save and is killed mid-write (SIGKILL: no cleanup runs).
    code = ("import sys, time, minidl.serialization as s\n"
            "with s.atomic_write(sys.argv[1]) as tmp:\n"
            "    print(tmp, flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "model.npz")],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": PACKAGE_ROOT})
    leftover = child.stdout.readline().strip()
    child.kill()
    child.wait()
    assert os.path.exists(leftover)
    tiny().save(tmp_path / "model.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


# -- what is read: regular files only, one member per name, every header parsed or refused
@pytest.mark.skipif(os.name != "posix", reason="FIFOs and /dev/zero are POSIX")
def test_a_fifo_or_a_device_is_refused_not_waited_on(tmp_path):
    for path in special_files(tmp_path, "model.npz"):
        kind = "a FIFO" if path.name.startswith("fifo") else "a device"
        for read in (open_regular, NpzReader, load_model, tiny().load):
            with fails_instead_of_hanging(), \
                    pytest.raises(ValueError, match=f"'{path}' is {kind}, not a regular file"):
                read(path)
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(CheckpointError, match="folder.npz' is a folder, not a regular file"):
        load_model(tmp_path / "folder.npz")
    tiny().save(tmp_path / "model.npz")           # a link to a regular file is followed
    (tmp_path / "link.npz").symlink_to(tmp_path / "model.npz")
    load_model(tmp_path / "link.npz")


def test_duplicate_members_are_refused(tmp_path):
    # zipfile reads the last of two members of one name: a file could show one
    # array to a checker that lists members and load another
    model, path = tiny(), tmp_path / "twice.npz"
    model.save(path)
    with np.load(path) as data:
        arrays = dict(data)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as z:
        z.writestr("0.weight.npy", _npy_bytes(np.ones_like(arrays["0.weight"])))
    before = model.state_dict()
    for load in (model.load, load_model, NpzReader):
        with pytest.raises(CheckpointError, match="it holds two members of one name"):
            load(path)
    np.testing.assert_array_equal(model.state_dict()["0.weight"], before["0.weight"])


def test_every_damaged_npy_header_is_a_checkpoint_error(tmp_path):
    """Each byte of a member's .npy header set to characters that matter to the parser
    (a quote, brackets, separators, a newline) or flipped: the file loads as it says,
    or is refused as a CheckpointError; never tokenize's or ast's errors."""
    tiny().save(tmp_path / "m.npz")
    with zipfile.ZipFile(tmp_path / "m.npz") as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    data = members["0.weight.npy"]
    header_end = 10 + int.from_bytes(data[8:10], "little")
    outcomes = set()
    for position in range(header_end):
        for value in {*b"'({,:\n", data[position] ^ 1}:
            damaged = bytearray(data)
            damaged[position] = value
            with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
                for name, member in members.items():
                    z.writestr(name, bytes(damaged) if name == "0.weight.npy" else member)
            try:
                load_model(tmp_path / "d.npz")
                outcomes.add("loaded")
            except CheckpointError:
                outcomes.add("refused")
    assert outcomes == {"loaded", "refused"}      # e.g. a space in the padding still loads
