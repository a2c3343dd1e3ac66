"""minidl.checkpoint: Sequential.save and load (all or nothing), load_model rebuilding a
model from the file alone, and the refusal of mismatched, renamed, damaged or pickled
checkpoints, each naming the file."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minidl
from minidl import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                    GlobalAvgPool2D, Identity, LeakyReLU, MaxPool2D, ReLU, Residual, Sequential,
                    Sigmoid, Softmax, Tanh, load_model)
from minidl.layers import Layer
from minidl.serialization import CheckpointError

from conftest import randn


PACKAGE_ROOT = os.path.dirname(os.path.dirname(minidl.__file__))


def small_cnn(dtype=np.float32):
    return Sequential([
        Conv2D(1, 4, 3, padding=1, dtype=dtype), ReLU(dtype=dtype), MaxPool2D(2),
        Conv2D(4, 6, 3, padding=1, activation="relu", dtype=dtype), MaxPool2D(2),
        Flatten(), Dense(6 * 2 * 2, 8, activation="relu", dtype=dtype), Dense(8, 3, dtype=dtype),
    ])


def tiny():
    return Sequential(Conv2D(1, 2, 3, activation="relu"), Flatten(), Dense(8, 3))


def test_save_load_identical_predictions(tmp_path):
    model = small_cnn()
    x = randn(np, 5, 1, 8, 8, dtype=np.float32)
    path = tmp_path / "model.npz"
    model.save(path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    minidl.manual_seed(99)
    fresh = small_cnn()
    assert not np.allclose(fresh.predict(x), model.predict(x))
    fresh.load(path)
    np.testing.assert_array_equal(fresh.predict(x), model.predict(x))
    with np.load(path, allow_pickle=False) as data:  # no pickle needed to read it
        assert "0.weight" in data.files


def _snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_corrupt_and_truncated_checkpoints_leave_model_untouched(tmp_path):
    model = small_cnn()
    good = tmp_path / "good.npz"
    model.save(good)
    target = small_cnn()
    before = _snapshot(target)
    data = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    for name in ("truncated.npz", "garbage.npz"):
        with pytest.raises(ValueError, match="corrupt, truncated"):
            target.load(tmp_path / name)
        _assert_untouched(target, before)
    with pytest.raises(FileNotFoundError):
        target.load(tmp_path / "missing.npz")


def test_mismatched_checkpoint_is_refused(tmp_path):
    path = tmp_path / "m.npz"
    small_cnn().save(path)
    other = Sequential(Conv2D(1, 4, 3, padding=1), ReLU(), MaxPool2D(2), Flatten(),
                       Dense(64, 3))
    before = _snapshot(other)
    with pytest.raises(ValueError, match="different model structure"):
        other.load(path)
    _assert_untouched(other, before)
    # Same structure, but a wrong shape in the state: refused before any change.
    bad = small_cnn().state_dict()
    bad["6.weight"] = np.zeros((5, 5), np.float32)
    target = small_cnn()
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"layer 6 \(Dense\).*'weight' has shape \(5, 5\)"):
        target.load_state_dict(bad)
    _assert_untouched(target, before)
    with pytest.raises(ValueError, match="unexpected keys"):
        target.load_state_dict({**target.state_dict(), "9.weight": np.zeros(1)})


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"0.weight": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="holds Python objects"):
        small_cnn().load(path)


# -- the model's config: every constructor argument, only registered classes ---------------
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


def test_metadata_is_saved_beside_the_model_and_read_back(tmp_path):
    """A checkpoint used to record neither the preprocessing nor the class names."""
    from minidl.checkpoint import METADATA_KEY, load_metadata
    model, path = small_cnn(), tmp_path / "m.npz"
    metadata = {"preprocessing": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]},
                "class_names": ["a", "b", "c"]}
    model.save(path, metadata=metadata)
    assert load_metadata(path) == metadata
    x = randn(np, 2, 1, 8, 8, dtype=np.float32)
    np.testing.assert_array_equal(small_cnn().load(path).predict(x), model.predict(x))
    np.testing.assert_array_equal(load_model(path).predict(x), model.predict(x))
    model.save(path)                                    # none given: none stored
    assert load_metadata(path) == {}
    with np.load(path) as data:
        arrays = dict(data)
    arrays[METADATA_KEY] = np.array(["{not json"])
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"its '__metadata__' entry is not valid JSON"):
        load_metadata(path)


# -- a crafted config: its memory bounded before anything is built -------------------------
_GIGABYTE_DENSE = {"class": "Dense", "config": {"in_features": 16000, "out_features": 16000}}


def _measured_in_a_child(path):
    """(what load_model(path) printed, its peak RSS in MB). It runs in a grandchild: a
    process starts with the peak RSS of the one that forked it, so a small Python in
    between starts it afresh, and reads the peak of its one child (KiB on Linux)."""
    load = ("import sys, minidl\n"
            "try:\n    minidl.load_model(sys.argv[1])\n    print('loaded')\n"
            "except ValueError as exc:\n    print(type(exc).__name__, exc)\n")
    between = ("import resource, subprocess, sys\n"
               "subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    done = subprocess.run([sys.executable, "-c", between, load, str(path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": PACKAGE_ROOT})
    *printed, peak_kib = done.stdout.strip().splitlines()
    return "\n".join(printed) + done.stderr, int(peak_kib) / 1024


@pytest.mark.parametrize("where", ["a layer", "an activation", "a Residual's branch"])
def test_a_3_kb_file_declaring_a_gigabyte_is_refused_in_under_200_mb(tmp_path, where):
    small = {"class": "Dense", "config": {"in_features": 2, "out_features": 2}}
    layer = {"a layer": _GIGABYTE_DENSE,
             "an activation": {"class": "Dense", "config": {**small["config"],
                                                            "activation": _GIGABYTE_DENSE}},
             "a Residual's branch": {"class": "Residual", "config": {
                 "block": small, "shortcut": _GIGABYTE_DENSE}}}[where]
    state = {} if where == "a layer" else {
        name: np.zeros(shape, np.float32) for name, shape in {
            "0.weight": (2, 2), "0.bias": (2,), "0.block.weight": (2, 2),
            "0.block.bias": (2,)}.items() if where == "an activation" or "block" in name}
    path = _with_config(tmp_path / "crafted.npz", {"class": "Sequential",
                                                   "config": {"layers": [layer]}}, state)
    assert path.stat().st_size < 3000
    printed, peak_mb = _measured_in_a_child(path)
    assert printed.startswith(f"CheckpointError checkpoint '{path}'"), printed
    assert {"a layer": "has no array '0.weight'",
            "an activation": "Dense: its activation has arrays, which checkpoints omit",
            "a Residual's branch": "has no array '0.shortcut.weight'"}[where] in printed
    assert peak_mb < 200, peak_mb        # building the Dense alone would take 1 GB (3 to draw)


def test_the_memory_of_every_layer_together_is_bounded_before_building(tmp_path, monkeypatch):
    model = Sequential(Dense(300, 300), Residual(Dense(300, 300)), Dense(300, 10))
    model.save(tmp_path / "m.npz")                       # 4 * (90300 + 90300 + 3010) bytes
    monkeypatch.setattr(minidl.checkpoint, "machine_memory", lambda: 700_000)
    draws = minidl.random.default_rng().bit_generator.state
    with pytest.raises(CheckpointError, match=r"its layers would hold 0.000684 GiB, more "
                                              r"than this machine's memory \(0.000652 GiB\)"):
        load_model(tmp_path / "m.npz")
    assert minidl.random.default_rng().bit_generator.state == draws     # nothing was built
    monkeypatch.setattr(minidl.checkpoint, "machine_memory", lambda: 800_000)
    np.testing.assert_array_equal(load_model(tmp_path / "m.npz").predict(np.ones((1, 300))),
                                  model.predict(np.ones((1, 300))))


def test_what_the_constructors_accept_loads_and_what_they_refuse_says_why(tmp_path):
    model = Sequential(Conv2D(1, 2, 3, padding="same", activation="relu"), Flatten(),
                       Dense(2 * 4 * 4, 3, dtype=np.float64))
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as data:
        state = dict(data)
    spec = json.loads(str(state.pop("__model__")[0]))
    conv, _, dense = spec["config"]["layers"]
    conv["config"].update(padding="SAME", activation="RELU")     # normalised by hand
    dense["config"]["dtype"] = None                              # None: float32, as torch
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    back = load_model(_with_config(tmp_path / "edited.npz", spec, state))
    np.testing.assert_allclose(back.predict(x), model.predict(x), rtol=1e-6)
    assert back[0].get_config() == model[0].get_config()    # as the constructor gives it
    assert back[2].dtype == np.float32
    # loaded into a model of that structure too, dtypes aside; another structure is not
    into = model.load(tmp_path / "edited.npz")
    np.testing.assert_allclose(into.predict(x), model.predict(x), rtol=1e-6)
    other = Sequential(Conv2D(1, 2, 3, padding="same"), Flatten(), Dense(2 * 4 * 4, 3))
    with pytest.raises(CheckpointError, match=r"different model structure \(layer 0: saved "
                                              r".*\"RELU\""):
        other.load(tmp_path / "edited.npz")
    assert Dense(2, 2, dtype=None).dtype == Conv2D(1, 1, 1, dtype=None).dtype == np.float32
    assert BatchNorm2D(2, dtype=None).running_mean.dtype == np.float32
    conv["config"]["padding"] = "FULL"
    with pytest.raises(CheckpointError, match=r"cannot rebuild the model from its config: "
                                              r"Sequential: Conv2D: Conv2D: padding must be"):
        load_model(_with_config(tmp_path / "edited.npz", spec, state))
