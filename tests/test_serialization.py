"""minidl.serialization and checkpoints: atomic writes, checked reads, load_model."""
import io
import json
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
from minidl import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                    GlobalAvgPool2D, Identity, LeakyReLU, MaxPool2D, ReLU, Sequential, Sigmoid,
                    Softmax, Tanh, load_model)
from minidl.layers import Layer
from minidl.serialization import NpzReader, load_npz, save_npz


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


def test_keys_must_be_exactly_the_canonical_names(tmp_path):
    model = tiny()
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as data:
        state = dict(data)
    renamed = {("00.weight" if k == "0.weight" else k): v for k, v in state.items()}
    both = {**state, "00.weight": np.zeros_like(state["0.weight"])}
    for name, arrays in (("renamed", renamed), ("both", both)):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        target = tiny()
        before = target.state_dict()
        with pytest.raises(ValueError, match=r"unexpected arrays \['00.weight'\]"):
            target.load(tmp_path / f"{name}.npz")
        for key, value in target.state_dict().items():
            np.testing.assert_array_equal(value, before[key])
        with pytest.raises(ValueError, match=r"unexpected keys \['00.weight'\]"):
            target.load_state_dict({k: v for k, v in arrays.items() if k != "__model__"})
    for key in ("+0.weight", "\u0660.weight", " 0.weight"):   # int() would take each
        with pytest.raises(ValueError, match="unexpected keys"):
            tiny().load_state_dict({**tiny().state_dict(), key: state["0.weight"]})


def test_constructor_arguments_must_match(tmp_path):
    Sequential(Conv2D(1, 2, 3, stride=1, activation="relu")).save(tmp_path / "m.npz")
    other = Sequential(Conv2D(1, 2, 3, stride=2, padding=1, activation="tanh"))
    with pytest.raises(ValueError, match="different model structure") as info:
        other.load(tmp_path / "m.npz")
    message = str(info.value)
    assert str(tmp_path / "m.npz") in message
    assert '"stride": [1, 1], "padding": [0, 0], "activation": {"class": "ReLU"' in message
    assert '"stride": [2, 2], "padding": [1, 1], "activation": {"class": "Tanh"' in message
    # dtypes and Dropout seeds do not make a checkpoint incompatible
    Sequential(Dense(2, 2, dtype=np.float64), Dropout(0.2, seed=3)).save(tmp_path / "d.npz")
    Sequential(Dense(2, 2), Dropout(0.2)).load(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=r"saved 2 layers, this model has 1"):
        Sequential(Dense(2, 2)).load(tmp_path / "d.npz")


def every_layer_model():
    inner = Sequential(Dense(8, 6, activation=LeakyReLU(0.2)), BatchNorm1D(6, momentum=0.3),
                       Dropout(0.25, seed=7), Dense(6, 4, bias=False), Softmax(axis=1))
    return Sequential(
        Conv2D(2, 4, (3, 2), stride=1, padding="same"), BatchNorm2D(4, eps=1e-3),
        Sigmoid(), AvgPool2D(2, stride=1, padding=1), Conv2D(4, 8, 1, activation="tanh"),
        MaxPool2D(2), Tanh(), ReLU(), Identity(), GlobalAvgPool2D(), Flatten(), inner)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_model_rebuilds_every_layer_from_the_file_alone(tmp_path, dtype):
    model = every_layer_model()
    if dtype == np.float64:
        model = Sequential(Dense(3, 2, dtype=dtype, activation="leaky_relu"))
    x = np.random.default_rng(0).standard_normal(
        (5, 2, 6, 6) if dtype == np.float32 else (5, 3)).astype(dtype)
    model.forward(x, training=True)  # moves the batch-norm statistics
    model.save(tmp_path / "m.npz")
    back = load_model(tmp_path / "m.npz")
    assert back.get_config() == json.loads(json.dumps(model.get_config()))
    np.testing.assert_array_equal(back.predict(x), model.predict(x))
    assert back.predict(x).dtype == dtype


def _with_config(path, config, state=None):
    np.savez(path, __model__=np.array([json.dumps(config)]), **(state or {}))
    return path


@pytest.mark.parametrize("spec, message", [
    ({"class": "Popen", "config": {"args": ["true"]}}, "unknown layer class 'Popen'"),
    ({"class": "Sequential", "config": {"layers": [{"class": "eval", "config": {}}]}},
     "unknown layer class 'eval'"),
    ({"class": "Sequential", "config": {"layers": [{"class": "Dense", "config": {"x": 1}}]}},
     "Dense: .*unexpected keyword argument 'x'"),
    ({"class": "Sequential", "config": {"layers": [{"class": "Dense",
                                                    "config": {"in_features": -1,
                                                               "out_features": 2}}]}},
     "in_features must be >= 1"),
    ({"class": "Sequential", "config": {"layers": 3}}, "Sequential: "),
    ({"class": "ReLU", "config": {}}, "describes a ReLU, not a Sequential"),
    ({"class": "Sequential", "config": {"layers": [{"class": "Dense", "config": {
        "in_features": 10 ** 7, "out_features": 10 ** 7}}]}}, "cannot rebuild the model"),
    ([1, 2], "expected {'class': name"),
])
def test_load_model_builds_only_allowed_classes_from_valid_configs(tmp_path, spec, message):
    path = _with_config(tmp_path / "m.npz", spec)
    with pytest.raises(ValueError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_custom_layers_save_and_load_but_load_model_refuses_them(tmp_path):
    class Double(Layer):
        def forward(self, x, training=True):
            return 2 * x

    model = Sequential(Dense(2, 2), Double())
    model.save(tmp_path / "m.npz")
    Sequential(Dense(2, 2), Double()).load(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="unknown layer class 'Double'"):
        load_model(tmp_path / "m.npz")


@pytest.mark.parametrize("config, message", [
    (np.array("{}"), r"'__model__' is <U2 of shape \(\), expected"),  # 0-d
    (np.array(["{not json"]), "'__model__' entry is not valid JSON"),
    (np.array(["[" * 10 ** 5 + "]" * 10 ** 5]), "'__model__' entry is not valid JSON"),
    (np.array([1.0]), r"'__model__' is float64"),
    (None, "has no '__model__' entry"),
])
def test_damaged_config_entries_are_refused(tmp_path, config, message):
    path = tmp_path / "m.npz"
    state = tiny().state_dict()
    np.savez(path, **state, **({} if config is None else {"__model__": config}))
    for load in (tiny().load, load_model):
        with pytest.raises(ValueError, match=message) as info:
            load(path)
        assert str(path) in str(info.value)


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
