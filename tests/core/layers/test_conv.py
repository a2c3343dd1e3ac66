"""Conv2D and ConvTranspose2D against the loop reference, finite differences, hypothesis
and torch, with dilation, groups and depthwise; their construction, input and dy checks,
FLOPs, input_grad=False and load_model. Their speed paths: test_conv_products.py."""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minidl
from minidl import Conv2D, ConvTranspose2D

from conftest import check_against_reference, conv64, randn, to_np
from reference_conv import (conv_backward, conv_forward, conv_transpose_backward,
                            conv_transpose_forward)

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


# -- the convolution family: dilation, groups, depthwise ---------------------------------

# (N, C, H, W, F, kernel, stride, padding, dilation, groups)
FAMILY = [
    pytest.param((2, 3, 9, 9, 4, 3, 1, 2, 2, 1), id="dilation2-stride1"),
    pytest.param((2, 3, 11, 10, 4, 3, 2, 1, 2, 1), id="dilation2-stride2"),
    pytest.param((2, 2, 12, 11, 3, 3, 1, 3, 3, 1), id="dilation3-stride1"),
    pytest.param((2, 2, 13, 12, 3, 3, 2, 2, 3, 1), id="dilation3-stride2"),
    pytest.param((2, 3, 9, 8, 2, (2, 3), (1, 2), (1, 2), (3, 2), 1), id="dilation-rectangular"),
    pytest.param((2, 4, 7, 7, 6, 3, 1, 1, 1, 2), id="groups2"),
    pytest.param((2, 8, 7, 6, 8, 3, 2, 1, 1, 4), id="groups4-stride2"),
    pytest.param((2, 8, 9, 9, 4, 3, 1, 2, 2, 4), id="groups4-dilation2"),
    pytest.param((2, 2, 6, 6, 4, 3, 1, 1, 1, 2), id="groups2-few-rows"),     # C*k1*k2 <= 32
    pytest.param((2, 6, 7, 7, 6, 3, 1, 1, 1, 6), id="depthwise"),
    pytest.param((2, 6, 8, 7, 6, 3, 2, 1, 2, 6), id="depthwise-stride2-dilation2"),
    pytest.param((2, 4, 8, 9, 4, (3, 2), (1, 2), (2, 1), (2, 3), 4), id="depthwise-rectangular"),
    pytest.param((2, 4, 7, 7, 8, 3, 1, 1, 1, 4), id="channel-multiplier-2"),
]


def make_family(xp, config, bias=True, **kwargs):
    """The layer of a FAMILY config, with seeded weights (and bias), and its input."""
    n, c, h, w, f, kernel, stride, padding, dilation, groups = config
    layer = Conv2D(c, f, kernel, stride, padding, dilation, groups, bias=bias,
                   dtype=np.float64, **kwargs)
    layer.weight.data = randn(xp, *layer.weight.shape, seed=8)
    if bias:
        layer.bias.data = randn(xp, f, seed=7)
    return layer, randn(xp, n, c, h, w, seed=1)


def pads_of(layer):
    return layer.pads[0][0], layer.pads[1][0]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("config", FAMILY)
def test_family_matches_loop_reference(xp, config, bias):
    layer, x = make_family(xp, config, bias)
    dz = randn(xp, *layer.output_shape(x.shape), seed=2)
    check_against_reference(layer, x, dz, layer.stride, pads_of(layer))


@pytest.mark.parametrize("config", FAMILY)
def test_family_gradcheck(xp, config):
    layer, x = make_family(xp, config)
    assert minidl.gradcheck(layer, x) < 1e-6


@pytest.mark.parametrize("config", FAMILY)
def test_family_without_input_grad(xp, config):
    """A first layer: dW and db only, the same numbers."""
    layer, x = make_family(xp, config)
    layer.input_grad = False
    dz = randn(xp, *layer.output_shape(x.shape), seed=2)
    check_against_reference(layer, x, dz, layer.stride, pads_of(layer), dx=False)


def torch_conv(x, weight, bias, dz, **geometry):
    """PyTorch's y, dx, dW and db (with a bias) of conv2d or, with ``transposed``,
    conv_transpose2d; ``geometry``: their keyword arguments."""
    def compute(torch):
        transposed = geometry.pop("transposed", False)
        fn = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(weight, requires_grad=True)
        bt = None if bias is None else torch.tensor(bias, requires_grad=True)
        yt = fn(xt, wt, bt, **geometry)
        yt.backward(torch.tensor(dz))
        answer = {"y": yt.detach().numpy(), "dx": xt.grad.numpy(), "dw": wt.grad.numpy()}
        return answer if bias is None else dict(answer, db=bt.grad.numpy())
    return compute


def assert_matches_torch(layer, x, torch_reference, **geometry):
    """The layer's y, dx, dW (and db) against PyTorch's, float64, to 1e-9."""
    y = layer.forward(x)
    dy = randn(np, *y.shape, seed=12)
    dx = layer.backward(dy)
    bias = None if layer.bias is None else layer.bias.data
    theirs = torch_reference(torch_conv(x, layer.weight.data, bias, dy, **geometry))
    assert y.shape == theirs["y"].shape
    np.testing.assert_allclose(y, theirs["y"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(dx, theirs["dx"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(layer.weight.grad, theirs["dw"], rtol=0, atol=1e-9)
    if bias is not None:
        np.testing.assert_allclose(layer.bias.grad, theirs["db"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("config", FAMILY)
def test_family_matches_torch(config, bias, torch_reference):
    layer, x = make_family(np, config, bias)
    assert_matches_torch(layer, x, torch_reference, stride=layer.stride,
                         padding=pads_of(layer), dilation=layer.dilation, groups=layer.groups)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel, dilation", [(3, 2), (4, 2), ((2, 3), (3, 2))])
def test_same_padding_with_dilation_matches_torch(kernel, dilation, torch_reference):
    """padding="same" pads d*(k - 1) in all, the odd one at the bottom or right."""
    layer, x = make_family(np, (2, 2, 7, 6, 3, kernel, 1, "same", dilation, 1))
    assert layer.output_shape(x.shape) == (2, 3, 7, 6)
    assert_matches_torch(layer, x, torch_reference, padding="same", dilation=dilation)


def test_depthwise_over_many_channels_in_threads(xp, threads):
    """Depthwise splits its channels over threads: every split gives the same numbers."""
    layer, x = make_family(xp, (2, 12, 6, 5, 12, 3, 1, 1, 1, 12))
    dz = randn(xp, *layer.output_shape(x.shape), seed=2)
    check_against_reference(layer, x, dz, layer.stride, pads_of(layer))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(groups=3), ValueError,
     r"Conv2D: in_channels \(4\) and out_channels \(6\) must be divisible by groups \(3\)"),
    (dict(groups=4), ValueError, r"out_channels \(6\) must be divisible by groups \(4\)"),
    (dict(groups=0), ValueError, "groups must be >= 1"),
    (dict(groups=2.0), TypeError, "groups must be an int"),
    (dict(dilation=0), ValueError, "dilation must be >= 1"),
    (dict(dilation=(2, "1")), TypeError, "dilation must be an int or a pair of ints"),
    (dict(dilation=2, stride=2, padding="same"), ValueError, "'same' needs stride 1"),
])
def test_bad_dilation_and_groups(kwargs, error, message):
    with pytest.raises(error, match=message):
        Conv2D(4, 6, 3, **kwargs)


def test_a_dilated_kernel_that_does_not_fit_is_refused():
    layer = Conv2D(1, 1, 3, dilation=3, padding=1)           # spans 7x7
    with pytest.raises(ValueError, match=r"Conv2D: kernel \(3, 3\) is larger than the padded "
                                         r"input \(6, 6\) .*dilation \(3, 3\): spans \(7, 7\)"):
        layer.forward(np.zeros((1, 1, 4, 4), np.float32))
    assert layer.output_shape((1, 1, 5, 5)) == (1, 1, 1, 1)


def test_family_repr_config_and_flops():
    layer = Conv2D(4, 8, 3, padding=2, dilation=2, groups=4, bias=False)
    assert repr(layer) == ("Conv2D(4, 8, kernel_size=(3, 3), stride=(1, 1), padding=2, "
                           "dilation=(2, 2), groups=4, bias=False)")
    assert layer.weight.shape == (8, 1, 3, 3)
    config = layer.get_config()
    assert config["dilation"] == [2, 2] and config["groups"] == 4
    assert Conv2D(**config).get_config() == config
    assert layer.flops((1, 4, 10, 10)) == 2 * 1 * 9 * 8 * 100     # C/G*k1*k2 per output
    assert "dilation" not in repr(Conv2D(4, 8, 3))


# -- ConvTranspose2D ------------------------------------------------------------------------

# (N, C_in, H, W, C_out, kernel, stride, padding, output_padding, dilation, groups)
TRANSPOSED = [
    pytest.param((2, 3, 4, 5, 2, 3, 1, 0, 0, 1, 1), id="plain"),
    pytest.param((2, 4, 4, 4, 6, 3, 2, 1, 1, 1, 1), id="stride2-padding1-output_padding1"),
    pytest.param((2, 4, 3, 4, 6, 3, 2, 1, 1, 2, 2),
                 id="stride2-padding1-output_padding1-dilation2-groups2"),
    pytest.param((2, 3, 4, 3, 2, 4, 2, 1, 0, 1, 1), id="4x4-stride2-doubles-the-size"),
    pytest.param((2, 2, 3, 3, 3, 3, 1, 1, 1, 2, 1), id="output_padding-below-dilation"),
    pytest.param((2, 3, 3, 4, 2, 2, 3, 0, 2, 1, 1), id="stride-over-kernel"),
    pytest.param((2, 4, 3, 3, 4, (2, 3), (3, 1), (0, 1), (2, 0), (1, 2), 4),
                 id="depthwise-rectangular"),
    pytest.param((2, 6, 3, 4, 8, 3, 2, 1, 1, 1, 2), id="many-rows"),       # C_out*k1*k2 > 32
]


def make_transposed(xp, config, bias=True, **kwargs):
    n, c, h, w, f, kernel, stride, padding, output_padding, dilation, groups = config
    layer = ConvTranspose2D(c, f, kernel, stride, padding, output_padding, dilation, groups,
                            bias=bias, dtype=np.float64, **kwargs)
    layer.weight.data = randn(xp, *layer.weight.shape, seed=8)
    if bias:
        layer.bias.data = randn(xp, f, seed=7)
    return layer, randn(xp, n, c, h, w, seed=1)


def transposed_geometry(layer):
    return layer.stride, layer.padding, layer.dilation, layer.groups


@pytest.mark.parametrize("config", TRANSPOSED)
def test_transposed_matches_loop_reference(xp, config):
    layer, x = make_transposed(xp, config)
    stride, padding, dilation, groups = transposed_geometry(layer)
    y = layer.forward(x)
    y_ref = conv_transpose_forward(to_np(x), to_np(layer.weight.data), to_np(layer.bias.data),
                                   stride, padding, layer.output_padding, dilation, groups)
    assert y.shape == y_ref.shape == layer.output_shape(x.shape)
    np.testing.assert_allclose(to_np(y), y_ref, rtol=0, atol=1e-10)
    dy = randn(xp, *y.shape, seed=2)
    dx = layer.backward(dy)
    dx_ref, dw_ref, db_ref = conv_transpose_backward(to_np(dy), to_np(x),
                                                     to_np(layer.weight.data), stride, padding,
                                                     dilation, groups)
    np.testing.assert_allclose(to_np(dx), dx_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(to_np(layer.weight.grad), dw_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(to_np(layer.bias.grad), db_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("config", TRANSPOSED)
def test_transposed_gradcheck(xp, config):
    layer, x = make_transposed(xp, config)
    assert minidl.gradcheck(layer, x) < 1e-6


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("config", TRANSPOSED)
def test_transposed_matches_torch(config, bias, torch_reference):
    layer, x = make_transposed(np, config, bias)
    stride, padding, dilation, groups = transposed_geometry(layer)
    assert_matches_torch(layer, x, torch_reference, transposed=True, stride=stride,
                         padding=padding, output_padding=layer.output_padding, groups=groups,
                         dilation=dilation)


@pytest.mark.parametrize("config", [c for c in TRANSPOSED
                                    if c.id != "output_padding-below-dilation"])
def test_transposed_is_conv_backward(xp, config):
    """With the same weights, ConvTranspose2D's forward is Conv2D's dx, and its dx is
    Conv2D's forward (docs/conv2d.md, "ConvTranspose2D is Conv2D's backward"). (Not
    with output_padding >= stride: that Conv2D would give back more rows than x has.)"""
    transposed, x = make_transposed(xp, config, bias=False)
    y = transposed.forward(x)
    conv = Conv2D(transposed.out_channels, transposed.in_channels, transposed.kernel_size,
                  transposed.stride, transposed.padding, transposed.dilation, transposed.groups,
                  bias=False, dtype=np.float64)
    conv.weight.data = transposed.weight.data
    assert conv.output_shape(y.shape) == x.shape       # Conv2D maps y's shape back to x's
    conv.forward(xp.zeros(y.shape))
    np.testing.assert_allclose(to_np(conv.backward(x)), to_np(y), rtol=0, atol=1e-12)
    dy = randn(xp, *y.shape, seed=2)
    np.testing.assert_allclose(to_np(transposed.backward(dy)), to_np(conv.forward(dy)),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", TRANSPOSED[:3])
def test_transposed_without_input_grad(xp, config):
    layer, x = make_transposed(xp, config)
    y = layer.forward(x)
    dy = randn(xp, *y.shape, seed=2)
    layer.backward(dy)
    dw = to_np(layer.weight.grad).copy()
    layer.zero_grad()
    layer.input_grad = False
    layer.forward(x)
    assert layer.backward(dy) is None
    np.testing.assert_allclose(to_np(layer.weight.grad), dw, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(stride=2, output_padding=2), ValueError,
     r"ConvTranspose2D: output_padding must be smaller than the stride or the dilation, "
     r"got output_padding=\(2, 2\) for stride=\(2, 2\), dilation=\(1, 1\)"),
    (dict(output_padding=1), ValueError, "output_padding must be smaller"),
    (dict(output_padding=-1), ValueError, "output_padding must be >= 0"),
    (dict(padding="same"), TypeError, "ConvTranspose2D: padding must be an int or a pair"),
    (dict(groups=4), ValueError, r"out_channels \(6\) must be divisible by groups \(4\)"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
])
def test_transposed_bad_construction(kwargs, error, message):
    arguments = dict(kernel_size=3) | kwargs
    with pytest.raises(error, match=message):
        ConvTranspose2D(4, 6, **arguments)


def test_transposed_bad_input():
    layer = ConvTranspose2D(2, 3, 3, padding=2)          # (H - 1) - 4 + 3: H = 1 gives -1
    with pytest.raises(ValueError, match=r"ConvTranspose2D: input 1x5 gives an output of "
                                         r"-1x3 \(padding \(2, 2\)\)"):
        layer.forward(np.zeros((1, 2, 1, 5), np.float32))
    with pytest.raises(ValueError, match="expected 2 input channels"):
        layer.forward(np.zeros((1, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="H, W >= 1"):
        ConvTranspose2D(2, 3, 3, stride=4).forward(np.zeros((1, 2, 0, 5), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 3, 5, 5)))


def test_transposed_repr_config_flops_and_shapes():
    layer = ConvTranspose2D(32, 16, 4, stride=2, padding=1, activation="relu")
    assert layer.weight.shape == (32, 16, 4, 4)
    assert layer.output_shape((64, 32, 7, 7)) == (64, 16, 14, 14)
    assert repr(layer) == ("ConvTranspose2D(32, 16, kernel_size=(4, 4), stride=(2, 2), "
                           "padding=(1, 1), activation=ReLU)")
    config = ConvTranspose2D(32, 16, 4, stride=2, padding=1, output_padding=1).get_config()
    assert config["output_padding"] == [1, 1] and config["padding"] == [1, 1]
    assert ConvTranspose2D(**config).get_config() == config
    assert layer.flops((1, 32, 7, 7)) == 2 * 32 * 16 * 16 * 49    # per input position
    assert "output_padding=(1, 1)" in repr(ConvTranspose2D(2, 2, 3, 2, output_padding=1))


def test_transposed_activation_inside_the_layer(xp):
    layer, x = make_transposed(xp, TRANSPOSED[1].values[0])
    layer.activation = minidl.Tanh(dtype=np.float64)
    plain, _ = make_transposed(xp, TRANSPOSED[1].values[0])
    np.testing.assert_allclose(to_np(layer.forward(x)), np.tanh(to_np(plain.forward(x))),
                               rtol=1e-12, atol=1e-12)
    assert minidl.gradcheck(layer, x) < 1e-6


# -- an empty batch; load_model rebuilds every new argument --------------------------------

@pytest.mark.parametrize("make", [
    lambda: Conv2D(4, 4, 3, padding=1, groups=4, dtype=np.float64),
    lambda: Conv2D(4, 6, 3, padding=2, dilation=2, groups=2, dtype=np.float64),
    lambda: ConvTranspose2D(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                            dtype=np.float64),
], ids=["depthwise", "dilated-groups", "transposed"])
def test_family_empty_batch(make):
    layer = make()
    x = np.zeros((0, 4, 7, 7))
    y = layer.forward(x)
    assert y.shape == layer.output_shape(x.shape) and y.shape[0] == 0
    assert layer.backward(np.zeros(y.shape)).shape == x.shape
    np.testing.assert_array_equal(layer.weight.grad, np.zeros(layer.weight.shape))


def test_load_model_rebuilds_the_family(tmp_path):
    minidl.manual_seed(0)
    model = minidl.Sequential([
        Conv2D(2, 4, 3, padding="same", dilation=2, groups=2, activation="relu"),
        Conv2D(4, 4, 3, padding=1, groups=4, bias=False),
        minidl.MaxPool2D(3, 2, ceil_mode=True),
        ConvTranspose2D(4, 2, 3, stride=2, padding=1, output_padding=1, dilation=1, groups=2),
        minidl.AvgPool2D(3, 2, 1, ceil_mode=True, count_include_pad=False),
    ])
    x = randn(np, 2, 2, 10, 9, dtype=np.float32)
    model.save(tmp_path / "family.npz")
    rebuilt = minidl.load_model(tmp_path / "family.npz")
    assert [layer.get_config() for layer in rebuilt] == [layer.get_config() for layer in model]
    np.testing.assert_array_equal(rebuilt.predict(x), model.predict(x))


@pytest.mark.parametrize("config, message", [
    ({"stride": 5000}, r"ConvTranspose2D: its padded output of shape \(4, 3, 135003, 135003\)"),
    ({"kernel_size": 400}, r"ConvTranspose2D: its im2col columns of shape \(640000, 784\)"),
])
def test_transposed_forward_refuses_what_would_not_fit_in_memory(monkeypatch, config, message):
    """As Conv2D's: a crafted config must not end in MemoryError or swap."""
    monkeypatch.setattr(minidl.checks, "machine_memory", lambda: 2 ** 30)
    layer = ConvTranspose2D.from_config({"in_channels": 1, "out_channels": 4, "kernel_size": 3,
                                         **config})
    with pytest.raises(ValueError, match=message):
        layer.forward(np.zeros((3, 1, 28, 28), np.float32))
