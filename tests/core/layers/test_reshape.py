"""Flatten: shapes (C, H, W order), gradient, a non-contiguous input, PyTorch (live, or
tests/golden/reshape.npz), errors, dy checks, an empty batch."""
import numpy
import pytest

import minidl

from conftest import randn, to_np

F64 = numpy.float64


def test_flatten_shapes_and_gradient(xp):
    layer = minidl.Flatten(dtype=F64)
    x = randn(xp, 2, 3, 4, 5, seed=1)
    y = layer.forward(x)
    assert y.shape == (2, 60) == layer.output_shape(x.shape)
    numpy.testing.assert_array_equal(to_np(y), to_np(x).reshape(2, 60))   # C, H, W order
    dy = randn(xp, 2, 60, seed=2)
    numpy.testing.assert_array_equal(to_np(layer.backward(dy)), to_np(dy).reshape(2, 3, 4, 5))
    assert minidl.gradcheck(layer, randn(xp, 2, 3, 2, seed=3)) < 1e-6


def test_flatten_of_a_non_contiguous_input(xp):
    x = randn(xp, 3, 2, 4, 5, seed=1).transpose(1, 0, 2, 3)     # like Conv2D's output view
    layer = minidl.Flatten(dtype=F64)
    numpy.testing.assert_array_equal(to_np(layer.forward(x)), to_np(x).reshape(2, -1))
    assert layer.backward(xp.ones((2, 60))).shape == (2, 3, 4, 5)


def test_flatten_matches_torch(xp, torch_reference):
    x = randn(xp, 2, 3, 4, 5, dtype=numpy.float32)
    theirs = torch_reference(
        lambda torch: {"y": torch.nn.Flatten()(torch.tensor(to_np(x))).numpy()})
    y = minidl.Flatten().forward(x)
    assert y.dtype == numpy.float32
    numpy.testing.assert_array_equal(to_np(y), theirs["y"])


def test_flatten_bad_input_is_rejected(xp):
    with pytest.raises(ValueError, match=r"Flatten: expected an input of shape \(N, \.\.\.\)"
                                         r".*\(5,\)"):
        minidl.Flatten().forward(xp.zeros(5, dtype=numpy.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        minidl.Flatten().backward(xp.zeros((2, 3), dtype=numpy.float32))


def test_flatten_backward_rejects_dy_of_the_wrong_shape(xp):
    layer = minidl.Flatten()
    layer.forward(xp.zeros((2, 3, 2, 2), dtype=numpy.float32))
    for shape in [(3, 8), (1, 12), (24,), (2, 3, 2, 2)]:     # same size, or broadcastable
        with pytest.raises(ValueError, match=r"Flatten\.backward: expected dy of shape \(2, 12\)"):
            layer.backward(xp.zeros(shape, dtype=numpy.float32))
    with pytest.raises(TypeError, match=r"Flatten\.backward"):
        layer.backward([[0.0] * 12] * 2)


def test_flatten_empty_batch_matches_torch(xp, torch_reference):
    """reshape(0, -1) cannot infer the -1: the flat size comes from the shape instead."""
    layer = minidl.Flatten()
    x = xp.zeros((0, 3, 4, 5), dtype=numpy.float32)
    y = layer.forward(x)
    theirs = torch_reference(
        lambda torch: {"y": torch.nn.Flatten()(torch.zeros(0, 3, 4, 5)).numpy()})
    assert y.shape == theirs["y"].shape == (0, 60)
    assert layer.output_shape(x.shape) == (0, 60)
    assert layer.backward(xp.zeros((0, 60), dtype=numpy.float32)).shape == (0, 3, 4, 5)
