"""Activation layers: gradcheck, PyTorch, extreme inputs, dtype, get_activation, their
arguments, dy checks, output_shape during a backward, layouts and threads."""
import numpy
import pytest

import minidl
from minidl import Conv2D, Dense, ReLU, Sequential, Sigmoid, Tanh
from minidl.layers import get_activation

from conftest import channels_first_view, randn, to_np

F64 = numpy.float64

ALL = [
    pytest.param(lambda dt: minidl.ReLU(dtype=dt), id="relu"),
    pytest.param(lambda dt: minidl.LeakyReLU(0.1, dtype=dt), id="leaky_relu"),
    pytest.param(lambda dt: minidl.Sigmoid(dtype=dt), id="sigmoid"),
    pytest.param(lambda dt: minidl.Tanh(dtype=dt), id="tanh"),
    pytest.param(lambda dt: minidl.Softmax(dtype=dt), id="softmax"),
    pytest.param(lambda dt: minidl.Softmax(axis=-1, dtype=dt), id="softmax-last-axis"),
    pytest.param(lambda dt: minidl.Identity(dtype=dt), id="identity"),
]


def away_from_zero(xp, *shape, seed=3):
    """Normal draws pushed to |x| >= 0.1: a +-eps nudge never crosses the ReLU kink."""
    x = numpy.random.default_rng(seed).standard_normal(shape)
    return xp.asarray(x + 0.1 * numpy.sign(x))


@pytest.mark.parametrize("make", ALL)
def test_gradcheck(xp, make):
    assert minidl.gradcheck(make(F64), away_from_zero(xp, 3, 4, 5)) < 1e-6


TORCH_PAIRS = [
    pytest.param(lambda: minidl.ReLU(dtype=F64), lambda torch, t: torch.relu(t), id="relu"),
    pytest.param(lambda: minidl.LeakyReLU(0.2, dtype=F64),
                 lambda torch, t: torch.nn.functional.leaky_relu(t, 0.2), id="leaky_relu"),
    pytest.param(lambda: minidl.Sigmoid(dtype=F64), lambda torch, t: torch.sigmoid(t),
                 id="sigmoid"),
    pytest.param(lambda: minidl.Tanh(dtype=F64), lambda torch, t: torch.tanh(t), id="tanh"),
    pytest.param(lambda: minidl.Softmax(dtype=F64), lambda torch, t: torch.softmax(t, dim=1),
                 id="softmax"),
    pytest.param(lambda: minidl.Softmax(axis=2, dtype=F64),
                 lambda torch, t: torch.softmax(t, dim=2), id="softmax-axis-2"),
]


@pytest.mark.parametrize("make, torch_fn", TORCH_PAIRS)
def test_matches_torch(xp, make, torch_fn, torch_reference):
    x, dy = away_from_zero(xp, 2, 3, 4) * 3, randn(xp, 2, 3, 4, seed=1)
    layer = make()
    y, dx = layer.forward(x), layer.backward(dy)

    def compute(torch):
        xt = torch.tensor(to_np(x), requires_grad=True)
        yt = torch_fn(torch, xt)
        yt.backward(torch.tensor(to_np(dy)))
        return {"y": yt.detach().numpy(), "dx": xt.grad.numpy()}

    theirs = torch_reference(compute)
    numpy.testing.assert_allclose(to_np(y), theirs["y"], rtol=1e-12, atol=1e-14)
    numpy.testing.assert_allclose(to_np(dx), theirs["dx"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [numpy.float32, F64])
def test_extreme_inputs_stay_finite(xp, dtype):
    x = xp.asarray(numpy.array([[-1e4, -100.0, 0.0, 100.0, 1e4]], dtype=dtype))
    with numpy.errstate(over="raise"):                    # no overflow, not even hidden
        y = minidl.Sigmoid(dtype=dtype).forward(x)
        p = minidl.Softmax(dtype=dtype).forward(x)
    numpy.testing.assert_allclose(to_np(y), [[0, 0, 0.5, 1, 1]], atol=1e-30)
    numpy.testing.assert_allclose(to_np(p), [[0, 0, 0, 0, 1]], atol=1e-30)


def test_get_activation_names_instances_and_errors():
    assert isinstance(get_activation(None, "Owner", F64), minidl.Identity)
    assert isinstance(get_activation("ReLU", "Owner", F64), minidl.ReLU)
    assert isinstance(get_activation("linear", "Owner", F64), minidl.Identity)
    layer = minidl.LeakyReLU(0.2)
    given = get_activation(layer, "Owner", F64)      # a copy: its cache is its own
    assert isinstance(given, minidl.LeakyReLU) and given is not layer
    assert given.negative_slope == 0.2
    with pytest.raises(ValueError, match="Owner: activation must be.*'gelu'"):
        get_activation("gelu", "Owner", F64)


def test_softmax_axis_out_of_range_is_rejected(xp):
    with pytest.raises(ValueError, match=r"Softmax: axis 2.*2-D.*\(3, 4\)"):
        minidl.Softmax(axis=2).forward(xp.zeros((3, 4), dtype=numpy.float32))


def test_softmax_takes_a_numpy_integer_axis(xp):
    x = randn(xp, 2, 3, seed=1)
    layer = minidl.Softmax(axis=numpy.int64(-1))
    assert type(layer.axis) is int
    numpy.testing.assert_allclose(to_np(layer.forward(x)), to_np(minidl.Softmax().forward(x)))


@pytest.mark.parametrize("shape", [(3, 0), (0, 4)])
def test_softmax_of_an_empty_input_is_empty(xp, shape):
    layer = minidl.Softmax(axis=1)
    y = layer.forward(xp.zeros(shape, dtype=numpy.float32))
    assert y.shape == shape and y.dtype == numpy.float32
    assert layer.backward(xp.zeros(shape, dtype=numpy.float32)).shape == shape


def test_leaky_relu_slope_must_be_finite():
    with pytest.raises(ValueError, match="LeakyReLU: negative_slope must be a finite"):
        minidl.LeakyReLU(float("inf"))


@pytest.mark.parametrize("make", [ReLU, Sigmoid, Tanh, lambda: minidl.LeakyReLU(0.1)])
def test_output_shape_between_forward_and_backward(xp, make):
    layer, reference = make(), make()
    x = randn(xp, 2, 5, seed=1)
    dy = randn(xp, 2, 5, seed=2)
    layer.forward(x)
    reference.forward(x)
    assert layer.output_shape((7, 3)) == (7, 3)
    numpy.testing.assert_array_equal(to_np(layer.backward(dy)), to_np(reference.backward(dy)))


def test_one_activation_instance_given_to_two_layers(xp):
    """Each layer gets its own copy, so their caches do not overwrite each other."""
    shared = ReLU()
    minidl.manual_seed(0)
    a = Sequential(Dense(3, 4, activation=shared, dtype=numpy.float64),
                   Dense(4, 2, activation=shared, dtype=numpy.float64))
    minidl.manual_seed(0)
    b = Sequential(Dense(3, 4, activation="relu", dtype=numpy.float64),
                   Dense(4, 2, activation="relu", dtype=numpy.float64))
    x, dy = randn(xp, 5, 3, seed=1), randn(xp, 5, 2, seed=2)
    a.forward(x)
    b.forward(x)
    numpy.testing.assert_allclose(to_np(a.backward(dy)), to_np(b.backward(dy)))


@pytest.mark.parametrize("make", [ReLU, Sigmoid, Tanh, minidl.Softmax, minidl.Identity,
                                  lambda: minidl.LeakyReLU(0.1)])
def test_activation_backward_checks_dy(xp, make):
    layer = make()
    name = type(layer).__name__
    with pytest.raises(RuntimeError, match=f"{name}.backward called before forward"):
        layer.backward(xp.ones((2, 3)))
    layer.forward(xp.ones((2, 3)))
    with pytest.raises(ValueError, match=rf"{name}.backward: expected dy of shape \(2, 3\).*"
                                         rf"got \(1, 3\)"):
        layer.backward(xp.ones((1, 3)))
    with pytest.raises(TypeError, match=f"{name}.backward: expected a numpy or cupy array"):
        layer.backward([[1.0, 2.0, 3.0]] * 2)


@pytest.mark.parametrize("make, message", [
    (lambda: minidl.LeakyReLU("a"), "LeakyReLU: negative_slope must be a real number"),
    (lambda: minidl.Softmax(axis=None), "Softmax: axis must be an int"),
    (lambda: minidl.Softmax(axis="1"), "Softmax: axis must be an int"),
    (lambda: minidl.Softmax(axis=1.0), "Softmax: axis must be an int"),
    (lambda: Dense(3, 2, bias="False"), "Dense: bias must be True or False"),
    (lambda: Conv2D(1, 2, 3, bias=0), "Conv2D: bias must be True or False"),
])
def test_activation_arguments_are_checked(make, message):
    with pytest.raises(TypeError, match=message):
        make()


def test_relu_with_threads_and_layouts(xp, threads):
    x = channels_first_view(xp, 3, 5, 2, 3, 1)
    relu = ReLU()
    y = relu.forward(x)
    dy = randn(xp, 3, 5, 2, 3, seed=2)
    dx = relu.backward(dy)
    numpy.testing.assert_array_equal(to_np(y), numpy.maximum(to_np(x), 0))
    numpy.testing.assert_array_equal(to_np(dx), to_np(dy) * (to_np(x) > 0))
