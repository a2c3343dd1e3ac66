"""Conv2D against the loop reference, finite differences, hypothesis and torch; its
construction, input and dy checks, FLOPs and input_grad=False. Its speed paths:
test_conv_products.py."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minidl
from minidl import Conv2D

from conftest import check_against_reference, conv64, randn, to_np
from reference_conv import conv_backward, conv_forward

# (N, C, H, W, F, kernel, stride, padding): random and edge cases
CONFIGS = [
    (2, 3, 7, 7, 4, (3, 3), (1, 1), (0, 0)),
    (2, 3, 7, 7, 4, (3, 3), (1, 1), (1, 1)),
    (1, 1, 5, 5, 1, (1, 1), (1, 1), (0, 0)),       # 1x1 kernel
    (2, 4, 6, 6, 3, (1, 1), (2, 2), (0, 0)),       # 1x1 kernel, stride 2
    (2, 2, 5, 5, 3, (5, 5), (1, 1), (0, 0)),       # output 1x1
    (1, 2, 3, 3, 2, (3, 3), (1, 1), (0, 0)),       # output 1x1, tiny
    (2, 2, 9, 9, 3, (2, 2), (3, 3), (0, 0)),       # stride > kernel
    (2, 2, 10, 8, 2, (2, 3), (4, 5), (1, 2)),      # stride > kernel, k1 != k2
    (2, 3, 8, 6, 2, (3, 2), (1, 1), (0, 0)),       # k1 != k2
    (2, 3, 8, 9, 2, (3, 3), (2, 1), (1, 1)),       # s1 != s2
    (2, 3, 8, 8, 2, (3, 3), (1, 1), (2, 0)),       # p1 != p2
    (2, 2, 6, 7, 3, (4, 2), (3, 1), (0, 2)),       # all different
    (1, 16, 5, 5, 12, (3, 3), (1, 1), (1, 1)),     # many channels
    (2, 8, 6, 6, 16, (2, 2), (2, 2), (0, 0)),      # non-overlapping windows
    (2, 3, 11, 11, 2, (5, 5), (2, 2), (2, 2)),     # k5 s2 p2 (shape D)
    (2, 3, 8, 8, 2, (3, 3), (3, 3), (0, 0)),       # unvisited right/bottom rows
    (3, 2, 4, 4, 2, (4, 4), (1, 1), (2, 2)),       # padding half the kernel
    (1, 1, 1, 1, 3, (1, 1), (1, 1), (0, 0)),       # 1x1 input
    (1, 2, 1, 1, 2, (3, 3), (1, 1), (1, 1)),       # 1x1 input, padded
    (2, 3, 12, 5, 4, (3, 1), (2, 1), (1, 0)),      # tall
    (2, 2, 7, 7, 2, (2, 2), (1, 1), (3, 3)),       # padding >= kernel
    (2, 1, 28, 28, 2, (3, 3), (1, 1), (1, 1)),     # MNIST-like first layer
]


def make_layer(xp, c, f, kernel, stride, padding, **kwargs):
    layer = Conv2D(c, f, kernel, stride=stride, padding=padding, dtype=np.float64, **kwargs)
    # Weights from a fixed seed, not the initialiser, so that the recorded PyTorch answers
    # (tests/golden/) hold whatever the initialiser does; a non-zero bias, so that db and
    # the forward bias term are really tested.
    layer.weight.data = randn(xp, *layer.weight.shape, seed=8)
    layer.bias.data = randn(xp, f, seed=7)
    return layer


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_loop_reference(xp, config):
    n, c, h, w, f, kernel, stride, padding = config
    layer = make_layer(xp, c, f, kernel, stride, padding)
    x = randn(xp, n, c, h, w, seed=1)
    z = layer.forward(x)
    z_ref = conv_forward(to_np(x), to_np(layer.weight.data), to_np(layer.bias.data),
                         stride, padding)
    assert z.shape == z_ref.shape
    np.testing.assert_allclose(to_np(z), z_ref, rtol=0, atol=1e-10)

    dz = randn(xp, *z.shape, seed=2)
    dx = layer.backward(dz)
    dw_ref, db_ref, dx_ref = conv_backward(to_np(dz), to_np(x), to_np(layer.weight.data),
                                           stride, padding)
    np.testing.assert_allclose(to_np(layer.weight.grad), dw_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(to_np(layer.bias.grad), db_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(to_np(dx), dx_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS[:12], ids=str)
def test_gradcheck(xp, config):
    n, c, h, w, f, kernel, stride, padding = config
    layer = make_layer(xp, c, f, kernel, stride, padding)
    assert minidl.gradcheck(layer, randn(xp, n, c, h, w, seed=3)) < 1e-6


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", minidl.LeakyReLU(0.2)])
def test_activation_inside_layer(xp, activation):
    """A = g(Z) forward and dZ = dA * g'(Z) backward (Eq. [2]), gradient-checked."""
    if isinstance(activation, minidl.Layer):
        activation = minidl.LeakyReLU(0.2, dtype=np.float64)
    layer = make_layer(xp, 2, 3, 3, 1, 1, activation=activation)
    x = randn(xp, 2, 2, 5, 5, seed=4)
    plain = make_layer(xp, 2, 3, 3, 1, 1)
    plain.weight.data = layer.weight.data.copy()
    z = to_np(plain.forward(x))
    a = to_np(layer.forward(x))
    expected = {"ReLU": np.maximum(z, 0), "Sigmoid": 1 / (1 + np.exp(-z)), "Tanh": np.tanh(z),
                "LeakyReLU": np.where(z > 0, z, 0.2 * z)}[type(layer.activation).__name__]
    np.testing.assert_allclose(a, expected, rtol=1e-12, atol=1e-12)
    # Kinks of ReLU are measure-zero for random data; eps is far below the gap.
    assert minidl.gradcheck(layer, x, eps=1e-7) < 1e-5


def test_backward_accumulates_grad(xp):
    layer = make_layer(xp, 2, 3, 3, 1, 1)
    x = randn(xp, 2, 2, 5, 5)
    dz = randn(xp, 2, 3, 5, 5, seed=5)
    layer.forward(x)
    layer.backward(dz)
    first = to_np(layer.weight.grad).copy()
    layer.forward(x)
    layer.backward(dz)
    np.testing.assert_allclose(to_np(layer.weight.grad), 2 * first, rtol=1e-12)
    layer.zero_grad()
    assert layer.weight.grad is None and layer.bias.grad is None


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), f=st.integers(1, 4),
       h=st.integers(1, 9), w=st.integers(1, 9),
       k1=st.integers(1, 4), k2=st.integers(1, 4), s1=st.integers(1, 3), s2=st.integers(1, 3),
       p1=st.integers(0, 2), p2=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_property_random_shapes(n, c, f, h, w, k1, k2, s1, s2, p1, p2, seed):
    """Any valid shape/stride/padding agrees with the loop reference (numpy backend)."""
    if k1 > h + 2 * p1 or k2 > w + 2 * p2:
        with pytest.raises(ValueError, match="larger than the padded input"):
            Conv2D(c, f, (k1, k2), (s1, s2), (p1, p2))(np.zeros((n, c, h, w), np.float32))
        return
    layer = make_layer(np, c, f, (k1, k2), (s1, s2), (p1, p2))
    x = randn(np, n, c, h, w, seed=seed)
    z = layer.forward(x)
    ref = conv_forward(x, layer.weight.data, layer.bias.data, (s1, s2), (p1, p2))
    np.testing.assert_allclose(z, ref, atol=1e-10)
    dz = randn(np, *z.shape, seed=seed + 1)
    dx = layer.backward(dz)
    dw_ref, db_ref, dx_ref = conv_backward(dz, x, layer.weight.data, (s1, s2), (p1, p2))
    np.testing.assert_allclose(dx, dx_ref, atol=1e-10)
    np.testing.assert_allclose(layer.weight.grad, dw_ref, atol=1e-10)
    np.testing.assert_allclose(layer.bias.grad, db_ref, atol=1e-10)


def test_input_cast_to_layer_dtype():
    layer = Conv2D(1, 2, 3)
    y = layer.forward(np.arange(25, dtype=np.uint8).reshape(1, 1, 5, 5))
    assert y.dtype == np.float32


@pytest.mark.parametrize("kernel", [3, 4, (2, 5)])
def test_same_padding_keeps_size(kernel):
    layer = Conv2D(2, 3, kernel, padding="same", dtype=np.float64)
    x = randn(np, 1, 2, 7, 6)
    assert layer.forward(x).shape == (1, 3, 7, 6)
    assert minidl.gradcheck(layer, x) < 1e-6


def test_valid_padding_is_zero():
    assert Conv2D(1, 1, 3, padding="valid").forward(np.zeros((1, 1, 5, 5))).shape == (1, 1, 3, 3)


def test_he_initialisation_is_seeded_and_scaled():
    minidl.manual_seed(3)
    a = Conv2D(16, 32, 3).weight.data
    minidl.manual_seed(3)
    b = Conv2D(16, 32, 3).weight.data
    np.testing.assert_array_equal(a, b)
    assert abs(a.std() - np.sqrt(2 / (16 * 9))) < 0.01
    assert Conv2D(16, 32, 3).bias.data.sum() == 0


def test_parameters_and_bias_false():
    layer = Conv2D(3, 8, (3, 5), bias=False)
    assert [p.name for p in layer.parameters()] == ["weight"]
    assert layer.weight.shape == (8, 3, 3, 5)
    assert layer.num_parameters() == 8 * 3 * 15
    x = randn(np, 1, 3, 6, 6, dtype=np.float32)
    dx = layer.backward(layer.forward(x))
    assert dx.shape == x.shape
    assert "bias=False" in repr(layer) and "kernel_size=(3, 5)" in repr(layer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_size=0), "kernel_size must be >= 1"),
    (dict(kernel_size=(3, -1)), "kernel_size must be >= 1"),
    (dict(kernel_size=3, stride=0), "stride must be >= 1"),
    (dict(kernel_size=3, padding=-1), "padding must be >= 0"),
    (dict(kernel_size=3, padding="same", stride=2), "'same' needs stride 1"),
    (dict(kernel_size=3, padding="full"), "padding must be"),
    (dict(kernel_size=3, activation="swish"), "activation must be"),
])
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Conv2D(3, 4, **kwargs)


def test_bad_construction_types():
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        Conv2D(3, 4, kernel_size=2.5)
    with pytest.raises(TypeError, match="in_channels must be an int"):
        Conv2D("3", 4, 3)
    with pytest.raises(ValueError, match="dtype must be a float type"):
        Conv2D(3, 4, 3, dtype=np.int32)


@pytest.mark.parametrize("shape, message", [
    ((2, 4, 8, 8), r"expected 3 input channels, got input of shape \(2, 4, 8, 8\)"),
    ((3, 8, 8), r"expected a 4-D input, got shape \(3, 8, 8\)"),
    ((1, 3, 2, 8), r"kernel \(3, 3\) is larger than the padded input \(2, 8\)"),
])
def test_bad_input(shape, message):
    with pytest.raises(ValueError, match=message):
        Conv2D(3, 4, 3).forward(np.zeros(shape, np.float32))


def test_bad_input_type_and_backward_first():
    layer = Conv2D(1, 1, 1)
    with pytest.raises(TypeError, match="Conv2D: expected a numpy or cupy array, got list"):
        layer.forward([[[[1.0]]]])
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 1, 1, 1)))


def torch_conv2d(x, weight, bias, dz, stride, padding):
    """PyTorch's z, dx, dW and db for one convolution (db only with a bias)."""
    def compute(torch):
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(weight, requires_grad=True)
        bt = None if bias is None else torch.tensor(bias, requires_grad=True)
        zt = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding)
        zt.backward(torch.tensor(dz))
        answer = {"z": zt.detach().numpy(), "dx": xt.grad.numpy(), "dw": wt.grad.numpy()}
        return answer if bias is None else dict(answer, db=bt.grad.numpy())
    return compute


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_torch(config, torch_reference):
    n, c, h, w, f, kernel, stride, padding = config
    layer = make_layer(np, c, f, kernel, stride, padding)
    x = randn(np, n, c, h, w, seed=11)
    z = layer.forward(x)
    dz = randn(np, *z.shape, seed=12)
    dx = layer.backward(dz)
    theirs = torch_reference(torch_conv2d(x, layer.weight.data, layer.bias.data, dz,
                                          stride, padding))
    np.testing.assert_allclose(z, theirs["z"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(dx, theirs["dx"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(layer.weight.grad, theirs["dw"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(layer.bias.grad, theirs["db"], rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_even_kernel_matches_torch(torch_reference):
    layer = make_layer(np, 2, 3, (4, 2), 1, "same")
    x = randn(np, 2, 2, 7, 6)
    z = layer.forward(x)
    dz = randn(np, *z.shape, seed=12)
    theirs = torch_reference(torch_conv2d(x, layer.weight.data, layer.bias.data, dz,
                                          1, "same"))
    np.testing.assert_allclose(z, theirs["z"], rtol=0, atol=1e-10)


# -- dy is checked against the output of the last forward ------------------------------------

@pytest.mark.parametrize("c, kernel, activation", [
    (2, 3, None),            # C*k1*k2 <= SMALL_K: the per-sample backward products
    (16, 3, None),           # one product over all positions
    (2, 1, None),            # 1x1: the pointwise backward
    (2, 3, "relu"),          # an activation inside the layer
], ids=["per-sample", "one-product", "pointwise", "relu"])
def test_backward_rejects_dy_of_the_wrong_shape(xp, c, kernel, activation):
    layer = make_layer(xp, c, 4, kernel, 1, kernel // 2, activation=activation)
    x = randn(xp, 2, c, 3, 3, seed=1)
    assert layer.forward(x).shape == (2, 4, 3, 3)
    for shape in [(4, 2, 3, 3), (1, 4, 3, 3), (2, 4, 9)]:      # swapped, broadcastable, flat
        with pytest.raises(ValueError, match=r"Conv2D\.backward: expected dy of shape "
                                             rf"\(2, 4, 3, 3\).*got {re.escape(str(shape))}"):
            layer.backward(xp.zeros(shape))
    with pytest.raises(TypeError, match="Conv2D.backward"):
        layer.backward(to_np(xp.zeros((2, 4, 3, 3))).tolist())
    assert layer.weight.grad is None and layer.bias.grad is None    # nothing accumulated
    assert layer.backward(xp.ones((2, 4, 3, 3))).shape == x.shape


@pytest.mark.parametrize("c, f, kernel, stride, padding, bias", [
    (3, 4, 3, 1, 1, True),        # per-sample backward products
    (16, 4, 3, 2, 0, True),       # one product over all positions
    (3, 4, 1, 1, 0, True),        # pointwise
    (3, 4, 3, 1, 1, False),
])
def test_empty_batch_matches_torch(c, f, kernel, stride, padding, bias, torch_reference):
    """N = 0: torch gives an empty output, zero dW and db, and an empty dx; so do we."""
    layer = make_layer(np, c, f, kernel, stride, padding) if bias else Conv2D(
        c, f, kernel, stride=stride, padding=padding, bias=False, dtype=np.float64)
    x = np.zeros((0, c, 7, 7))
    z = layer.forward(x)
    b = layer.bias.data if bias else None
    theirs = torch_reference(torch_conv2d(x, layer.weight.data, b, np.zeros(z.shape),
                                          stride, padding))
    assert z.shape == theirs["z"].shape == layer.output_shape(x.shape)
    dx = layer.backward(np.zeros(z.shape))
    assert dx.shape == theirs["dx"].shape == x.shape
    np.testing.assert_array_equal(layer.weight.grad, theirs["dw"])
    assert layer.weight.grad.shape == layer.weight.shape
    if bias:
        np.testing.assert_array_equal(layer.bias.grad, theirs["db"])
        assert layer.bias.grad.shape == (f,)
    layer.input_grad = False
    layer.forward(x)
    assert layer.backward(np.zeros(z.shape)) is None


# -- input_grad=False: no dx for a model's first layer ------------------------------------

@pytest.mark.parametrize("make", [
    lambda xp: conv64(xp, 2, 3, 3, padding=1),
    lambda xp: conv64(xp, 2, 3, 1),
    lambda xp: conv64(xp, 2, 3, 3, padding=1, max_im2col_bytes=1),   # one sample per chunk
])
def test_conv_input_grad_false_gives_the_same_parameter_grads(xp, make):
    layer = make(xp)
    layer.input_grad = False
    x = randn(xp, 3, 2, 5, 5, seed=1)
    z = layer.forward(x)
    padding = (layer.pads[0][0], layer.pads[1][0])
    check_against_reference(layer, x, randn(xp, *z.shape, seed=2), (1, 1), padding, dx=False)


# -- FLOPs ---------------------------------------------------------------------------------
def test_flops_of_conv():
    conv = Conv2D(3, 8, 3, padding=1)
    assert conv.flops((1, 3, 10, 10)) == 2 * 3 * 9 * 8 * 100


@pytest.mark.parametrize("config, message", [
    ({"padding": 20000}, r"Conv2D: its output of shape \(3, 4, 40026, 40026\) would hold "
                         r"1.92e\+10 values \(71.6 GiB\), more than this machine's memory"),
    ({"padding": 8000, "stride": 8000},                   # a 3x3 output, a huge padded input
     r"Conv2D: its padded input of shape \(3, 1, 16028, 16028\)"),
    ({"kernel_size": 400, "padding": 200, "max_im2col_bytes": 10 ** 15},     # in one chunk:
     r"Conv2D: its im2col columns of shape \(160000, 2523\)"),    # 3 samples of 29x29
])
def test_forward_refuses_what_would_not_fit_in_memory(monkeypatch, config, message):
    # loaded from a crafted config, a forward must not end in MemoryError or swap
    monkeypatch.setattr(minidl.checks, "machine_memory", lambda: 2 ** 30)
    layer = Conv2D.from_config({"in_channels": 1, "out_channels": 4, "kernel_size": 3, **config})
    with pytest.raises(ValueError, match=message):
        layer.forward(np.zeros((3, 1, 28, 28), np.float32))
