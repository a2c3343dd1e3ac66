"""Dense: values, gradcheck, PyTorch, initialisation, dtype, errors, input_grad=False,
FLOPs."""
import math

import numpy
import pytest

import minidl
from minidl import Dense, Flatten, Sequential

from conftest import randn, to_np

F64 = numpy.float64


def test_forward_is_x_times_w_plus_b_then_activation(xp):
    layer = minidl.Dense(4, 3, activation="relu", dtype=F64)
    layer.bias.data = randn(xp, 3, seed=1)
    x = randn(xp, 5, 4, seed=2)
    z = to_np(x) @ to_np(layer.weight.data) + to_np(layer.bias.data)
    numpy.testing.assert_allclose(to_np(layer.forward(x)), numpy.maximum(z, 0),
                                  rtol=0, atol=1e-12)
    assert layer.output_shape((5, 4)) == (5, 3)


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "sigmoid", "tanh", "softmax"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(xp, activation, bias):
    layer = minidl.Dense(5, 4, activation=activation, bias=bias, dtype=F64)
    if bias:
        layer.bias.data = randn(xp, 4, seed=1)
    # seed 3 (gradcheck's own dy comes from seed 0); no z lands within eps of a ReLU kink
    assert minidl.gradcheck(layer, randn(xp, 6, 5, seed=3)) < 1e-6


def test_gradients_accumulate_over_backward_calls(xp):
    layer = minidl.Dense(3, 2, dtype=F64)
    x, dy = randn(xp, 4, 3, seed=1), randn(xp, 4, 2, seed=2)
    layer.forward(x)
    layer.backward(dy)
    once = to_np(layer.weight.grad).copy()
    layer.backward(dy)
    numpy.testing.assert_allclose(to_np(layer.weight.grad), 2 * once, rtol=1e-14)


def torch_linear_tanh(x, weight, bias, dy):
    """PyTorch's y, dx, dW and db for tanh(x W + b); torch keeps W as (out, in)."""
    def compute(torch):
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(weight, requires_grad=True)
        bt = torch.tensor(bias, requires_grad=True)
        yt = torch.tanh(torch.nn.functional.linear(xt, wt.T, bt))
        yt.backward(torch.tensor(dy))
        return {"y": yt.detach().numpy(), "dx": xt.grad.numpy(), "dw": wt.grad.numpy(),
                "db": bt.grad.numpy()}
    return compute


def test_matches_torch_linear(xp, torch_reference):
    layer = minidl.Dense(6, 4, activation="tanh", dtype=F64)
    layer.weight.data = randn(xp, 6, 4, seed=4)    # not the initialiser's: see tests/golden/
    layer.bias.data = randn(xp, 4, seed=1)
    x, dy = randn(xp, 5, 6, seed=2), randn(xp, 5, 4, seed=3)
    y = layer.forward(x)
    dx = layer.backward(dy)
    theirs = torch_reference(torch_linear_tanh(to_np(x), to_np(layer.weight.data),
                                               to_np(layer.bias.data), to_np(dy)))
    pairs = [(y, "y"), (dx, "dx"), (layer.weight.grad, "dw"), (layer.bias.grad, "db")]
    for got, key in pairs:
        numpy.testing.assert_allclose(to_np(got), theirs[key], rtol=1e-12, atol=1e-12)


# -- initialisation ---------------------------------------------------------------------------

def test_he_normal_before_relu_and_glorot_uniform_otherwise(xp):
    fan_in, fan_out = 400, 300
    for activation in ["relu", "leaky_relu", minidl.ReLU()]:
        w = to_np(minidl.Dense(fan_in, fan_out, activation=activation).weight.data)
        assert abs(w.std() / math.sqrt(2 / fan_in) - 1) < 0.02
        assert abs(w.mean()) < 0.02 * w.std()
    limit = math.sqrt(6 / (fan_in + fan_out))
    for activation in [None, "sigmoid", "tanh"]:
        w = to_np(minidl.Dense(fan_in, fan_out, activation=activation).weight.data)
        assert w.min() >= -limit and w.max() <= limit
        assert abs(w.std() / (limit / math.sqrt(3)) - 1) < 0.02     # uniform's std
    assert not to_np(minidl.Dense(3, 2).bias.data).any()


def test_same_seed_same_weights_on_every_backend(xp):
    minidl.manual_seed(7)
    a = to_np(minidl.Dense(5, 4).weight.data)
    minidl.manual_seed(7)
    b = to_np(minidl.Dense(5, 4).weight.data)
    numpy.testing.assert_array_equal(a, b)
    with minidl.set_backend("numpy"):
        minidl.manual_seed(7)
        numpy.testing.assert_array_equal(to_np(minidl.Dense(5, 4).weight.data), a)
    assert not numpy.array_equal(a, to_np(minidl.Dense(5, 4).weight.data))


# -- dtype, errors -------------------------------------------------------------------------------

def test_bad_input_is_rejected(xp):
    layer = minidl.Dense(4, 3)
    with pytest.raises(ValueError, match=r"Dense: expected input of shape \(N, 4\), got \(2, 5\)"):
        layer.forward(xp.zeros((2, 5), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"Dense: expected a 2-D input, got shape \(2, 4, 1\)"):
        layer.forward(xp.zeros((2, 4, 1), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"Dense: expected input of shape \(N, 4\), got \(2, 3\)"):
        layer.output_shape((2, 3))
    with pytest.raises(TypeError, match="Dense: expected a numpy or cupy array"):
        layer.forward([[0.0] * 4])
    with pytest.raises(RuntimeError, match="before forward"):
        minidl.Dense(4, 3).backward(xp.zeros((2, 3), dtype=numpy.float32))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="Dense: in_features must be >= 1, got 0"):
        minidl.Dense(0, 3)
    with pytest.raises(TypeError, match="Dense: out_features must be an int"):
        minidl.Dense(3, 2.0)
    with pytest.raises(ValueError, match="Dense: activation must be"):
        minidl.Dense(3, 2, activation="swish")
    assert repr(minidl.Dense(3, 2, activation="relu", bias=False)) == \
        "Dense(3, 2, activation=ReLU, bias=False)"
    assert minidl.Dense(3, 2).num_parameters() == 3 * 2 + 2


# -- dy is checked; an empty batch works ----------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "relu", "softmax"])
def test_backward_rejects_dy_of_the_wrong_shape(xp, activation):
    """A (N,) dy used to broadcast into a wrong-shaped weight.grad."""
    layer = minidl.Dense(3, 2, activation=activation, dtype=F64)
    layer.forward(randn(xp, 4, 3, seed=1))
    for shape in [(4,), (1, 2), (2, 4), (4, 2, 1)]:
        with pytest.raises(ValueError, match=r"Dense\.backward: expected dy of shape \(4, 2\)"):
            layer.backward(xp.zeros(shape))
    with pytest.raises(TypeError, match="Dense.backward"):
        layer.backward([[0.0, 0.0]] * 4)
    assert layer.weight.grad is None and layer.bias.grad is None
    layer.backward(xp.ones((4, 2)))
    assert layer.weight.grad.shape == (3, 2) and layer.bias.grad.shape == (2,)


def test_empty_batch_matches_torch(xp, torch_reference):
    layer = minidl.Dense(3, 2, activation="tanh", dtype=F64)
    y = layer.forward(xp.zeros((0, 3)))
    assert y.shape == (0, 2) == layer.output_shape((0, 3))
    dx = layer.backward(xp.zeros((0, 2)))
    theirs = torch_reference(torch_linear_tanh(numpy.zeros((0, 3)), to_np(layer.weight.data),
                                               to_np(layer.bias.data), numpy.zeros((0, 2))))
    assert dx.shape == theirs["dx"].shape == (0, 3)
    numpy.testing.assert_array_equal(to_np(layer.weight.grad), theirs["dw"])
    numpy.testing.assert_array_equal(to_np(layer.bias.grad), theirs["db"])


# -- input_grad=False (a model's first layer), FLOPs ---------------------------------------
def test_dense_input_grad_false(xp):
    layer = Dense(4, 3, dtype=numpy.float64)
    x, dy = randn(xp, 5, 4, seed=1), randn(xp, 5, 3, seed=2)
    layer.forward(x)
    dx = layer.backward(dy)
    dw, db = to_np(layer.weight.grad).copy(), to_np(layer.bias.grad).copy()
    layer.zero_grad()
    layer.input_grad = False
    layer.forward(x)
    assert layer.backward(dy) is None
    numpy.testing.assert_array_equal(to_np(layer.weight.grad), dw)
    numpy.testing.assert_array_equal(to_np(layer.bias.grad), db)
    assert dx.shape == x.shape


def test_flops_of_dense_in_summary():
    dense = Dense(64, 10)
    assert dense.flops((1, 64)) == 2 * 64 * 10
    text = Sequential(Flatten(), Dense(16, 4)).summary((1, 4, 4), print_fn=None)
    assert "Total FLOPs per sample (forward): 128" in text
