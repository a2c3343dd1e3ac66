"""Sequential: passes, whole-network gradients, the container, predict, state dicts,
eval mode, and a backward without the input gradient (a model's first layer)."""
import numpy as np
import pytest

import minidl
from minidl import (BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Sequential,
                    SoftmaxCrossEntropy)

from conftest import randn, to_np


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


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (-1, ValueError),
                                               (2.5, TypeError), (None, TypeError)])
def test_predict_batch_size_must_be_a_positive_int(batch_size, error):
    model = Sequential([Dense(4, 3)])
    with pytest.raises(error, match="Sequential.predict: batch_size must be"):
        model.predict(np.zeros((5, 4), np.float32), batch_size=batch_size)


def test_a_model_in_eval_mode_runs_in_eval_mode(xp):
    model = Sequential(Dense(4, 8, activation="relu"), Dropout(0.5), Dense(8, 2))
    x = randn(xp, 16, 4, seed=1).astype(np.float32)
    model.eval()
    np.testing.assert_array_equal(to_np(model(x)), to_np(model(x)))    # no dropout noise
    np.testing.assert_array_equal(to_np(model.forward(x)), to_np(model(x)))
    model.train()
    assert not np.array_equal(to_np(model(x)), to_np(model(x)))        # dropout is on again


# -- input_grad=False: no dx for a model's first layer -------------------------------------
def small_model(dtype=np.float64):
    return Sequential([Conv2D(1, 4, 3, padding=1, dtype=dtype), BatchNorm2D(4, dtype=dtype),
                       ReLU(), MaxPool2D(2), Conv2D(4, 6, 3, padding=1, dtype=dtype), ReLU(),
                       MaxPool2D(2), Flatten(), Dense(6 * 2 * 2, 5, dtype=dtype)])


@pytest.mark.parametrize("first", ["conv", "dense", "relu"])
def test_sequential_backward_without_input_grad(xp, first):
    """Same parameter gradients; None instead of dx; the first layer's switch restored."""
    minidl.manual_seed(0)
    if first == "conv":
        model, x = small_model(), randn(xp, 3, 1, 8, 8, seed=1)
    elif first == "dense":
        model = Sequential([Dense(6, 4, dtype=np.float64), ReLU(), Dense(4, 5, dtype=np.float64)])
        x = randn(xp, 3, 6, seed=1)
    else:
        model = Sequential([ReLU(), Dense(6, 5, dtype=np.float64)])
        x = randn(xp, 3, 6, seed=1)
    dy = randn(xp, 3, 5, seed=2)
    model.forward(x)
    dx = model.backward(dy)
    assert dx.shape == x.shape
    grads = [to_np(p.grad).copy() for p in model.parameters()]
    model.zero_grad()
    model.forward(x)
    assert model.backward(dy, input_grad=False) is None
    for p, g in zip(model.parameters(), grads):
        np.testing.assert_allclose(to_np(p.grad), g, rtol=0, atol=1e-12)
    assert getattr(model[0], "input_grad", True) is True
    model.zero_grad()
    model.forward(x)
    np.testing.assert_allclose(to_np(model.backward(dy)), to_np(dx), atol=1e-12)
