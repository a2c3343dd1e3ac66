"""Sequential: passes, whole-network gradients, state, checkpoints, summary."""
import os

import numpy as np
import pytest

import minidl
from minidl import (Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential,
                    SoftmaxCrossEntropy)

from conftest import randn


def small_cnn(dtype=np.float32):
    return Sequential([
        Conv2D(1, 4, 3, padding=1, dtype=dtype), ReLU(dtype=dtype), MaxPool2D(2),
        Conv2D(4, 6, 3, padding=1, activation="relu", dtype=dtype), MaxPool2D(2),
        Flatten(), Dense(6 * 2 * 2, 8, activation="relu", dtype=dtype), Dense(8, 3, dtype=dtype),
    ])


class WithLoss:
    """model + loss as one function of x, so gradcheck sees the whole chain."""

    def __init__(self, model, loss):
        self.model, self.loss = model, loss

    def forward(self, x, target):
        return self.loss.forward(self.model.forward(x), target)

    def backward(self):
        return self.model.backward(self.loss.backward())

    def named_parameters(self):
        return self.model.named_parameters()


def test_whole_cnn_gradcheck_end_to_end(xp):
    """Conv2D, ReLU, MaxPool2D, Flatten, Dense and the loss, chained, in float64."""
    model = small_cnn(np.float64)
    x = randn(xp, 3, 1, 8, 8, seed=21)
    labels = xp.asarray(np.array([0, 2, 1]))
    err = minidl.gradcheck(WithLoss(model, SoftmaxCrossEntropy()), x, target=labels, eps=1e-6)
    assert err < 1e-5


def test_forward_backward_order_and_shapes():
    model = small_cnn()
    x = randn(np, 2, 1, 8, 8, dtype=np.float32)
    y = model.forward(x)
    assert y.shape == (2, 3) and y.dtype == np.float32
    dx = model.backward(np.ones_like(y))
    assert dx.shape == x.shape
    assert all(p.grad is not None for p in model.parameters())


def test_container_api():
    model = Sequential(Conv2D(1, 2, 3), ReLU())
    model.add(Flatten())
    assert len(model) == 3 and isinstance(model[0], Conv2D) and isinstance(model[-1], Flatten)
    assert isinstance(model[:2], Sequential) and len(model[:2]) == 2
    assert [type(l).__name__ for l in model] == ["Conv2D", "ReLU", "Flatten"]
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    with pytest.raises(TypeError, match="expected a Layer, got int"):
        model.add(3)
    assert "(0) Conv2D(1, 2" in repr(model)


def test_predict_is_batched_eval_and_numpy():
    model = Sequential(Flatten(), Dense(4, 2), minidl.Dropout(0.5))
    x = randn(np, 10, 1, 2, 2, dtype=np.float32)
    full = model.forward(x, training=False)
    np.testing.assert_allclose(model.predict(x, batch_size=3), full, rtol=1e-6)


def test_state_dict_roundtrip_with_buffers():
    model = Sequential(Conv2D(1, 2, 3), minidl.BatchNorm2D(2), Flatten())
    model.forward(randn(np, 4, 1, 5, 5, dtype=np.float32))  # moves running stats
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                          "1.running_var"} | ({"1.num_batches_tracked"} & set(state))
    other = Sequential(Conv2D(1, 2, 3), minidl.BatchNorm2D(2), Flatten())
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


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


def test_summary_table():
    model = Sequential(Conv2D(1, 32, 3, padding=1, activation="relu"), MaxPool2D(2),
                       Conv2D(32, 64, 3, padding=1, activation="relu"), MaxPool2D(2),
                       Flatten(), Dense(3136, 128, activation="relu"), Dense(128, 10))
    lines = []
    text = model.summary((1, 28, 28), print_fn=lines.append)
    assert lines == [text]
    assert "(32, 28, 28)" in text and "(64, 7, 7)" in text and "(10,)" in text
    assert "Total params: 421,642" in text
    conv1 = next(l for l in text.splitlines() if l.startswith("0: Conv2D"))
    assert "3x3" in conv1 and "320" in conv1
    conv2 = next(l for l in text.splitlines() if l.startswith("2: Conv2D"))
    assert "8x8" in conv2  # 3 + 1*(2-1) + 2*(3-1)
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2D\) cannot take input"):
        model.summary((3, 28, 28), print_fn=None)


def test_flops_of_conv():
    conv = Conv2D(3, 8, 3, padding=1)
    assert conv.flops((1, 3, 10, 10)) == 2 * 3 * 9 * 8 * 100


def test_flops_of_dense_in_summary():
    dense = Dense(64, 10)
    assert dense.flops((1, 64)) == 2 * 64 * 10
    text = Sequential(Flatten(), Dense(16, 4)).summary((1, 4, 4), print_fn=None)
    assert "Total FLOPs per sample (forward): 128" in text
