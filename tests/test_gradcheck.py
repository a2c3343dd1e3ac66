"""minidl.gradcheck itself: it must pass right gradients and catch wrong ones."""
import numpy as np
import pytest

import minidl
from minidl import Layer, Parameter

from conftest import randn


class Scale(Layer):
    """y = x * w (elementwise); a deliberately tiny layer to test the checker."""

    def __init__(self, shape, wrong=False, dtype=np.float64):
        super().__init__(dtype)
        self.w = Parameter(np.linspace(0.5, 1.5, int(np.prod(shape))).reshape(shape), "w")
        self.wrong = wrong

    def forward(self, x, training=True):
        self.x = x
        return x * self.w.data

    def backward(self, dy):
        dw = (dy * self.x).sum(axis=0)
        self.w.accumulate_grad(dw * (1.001 if self.wrong else 1.0))
        return dy * self.w.data


def test_passes_correct_layer():
    assert minidl.gradcheck(Scale((3, 4)), randn(np, 2, 3, 4)) < 1e-6


def test_catches_slightly_wrong_parameter_gradient():
    assert minidl.gradcheck(Scale((3, 4), wrong=True), randn(np, 2, 3, 4)) > 5e-4


def test_catches_wrong_input_gradient():
    layer = minidl.ReLU(dtype=np.float64)
    layer.backward = lambda dy: dy  # forgets the mask
    assert minidl.gradcheck(layer, randn(np, 4, 5)) > 0.5


def test_subset_of_entries():
    err = minidl.gradcheck(minidl.Conv2D(2, 3, 3, dtype=np.float64), randn(np, 1, 2, 6, 6),
                           max_entries=10)
    assert err < 1e-6


def test_requires_float64():
    with pytest.raises(ValueError, match="input must be float64"):
        minidl.gradcheck(Scale((2,)), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="build the layer with dtype=numpy.float64"):
        minidl.gradcheck(minidl.Conv2D(1, 1, 1), np.zeros((1, 1, 2, 2)))


def test_missing_parameter_gradient_is_reported():
    layer = Scale((2,))
    layer.backward = lambda dy: dy * layer.w.data
    with pytest.raises(ValueError, match="left the gradient of parameter 'w' unset"):
        minidl.gradcheck(layer, randn(np, 3, 2))


def test_wrong_gradient_shape_is_reported():
    layer = Scale((3,))
    layer.backward = lambda dy: layer.w.accumulate_grad(dy * layer.x) or dy * layer.w.data
    with pytest.raises(ValueError, match=r"gradient of parameter 'w' has shape \(2, 3\), expected \(3,\)"):
        minidl.gradcheck(layer, randn(np, 2, 3))


def test_gradcheck_leaves_batchnorm_statistics_as_they_were(xp):
    bn = minidl.BatchNorm2D(3, dtype=np.float64)
    state = bn.state_dict()
    assert minidl.gradcheck(bn, randn(xp, 2, 3, 2, 2, seed=1), max_entries=5) < 1e-6
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


def test_gradcheck_without_an_input_gradient(xp):
    layer = minidl.Conv2D(2, 3, 3, padding=1, dtype=np.float64)
    layer.input_grad = False
    x = randn(xp, 2, 2, 4, 4, seed=1)
    with pytest.raises(ValueError, match="returned no input gradient.*check_input=False"):
        minidl.gradcheck(layer, x)
    assert minidl.gradcheck(layer, x, check_input=False, max_entries=10) < 1e-6


def test_gradcheck_refuses_a_float32_layer_without_parameters(xp):
    with pytest.raises(ValueError, match="Sigmoid computes in float32"):
        minidl.gradcheck(minidl.Sigmoid(dtype=np.float32), randn(xp, 2, 3, seed=1))


def test_gradcheck_refuses_a_non_contiguous_parameter(xp):
    layer = minidl.Dense(3, 2, dtype=np.float64)
    layer.weight.data = xp.asfortranarray(layer.weight.data)
    with pytest.raises(ValueError, match="not C-contiguous"):
        minidl.gradcheck(layer, randn(xp, 4, 3, seed=1))
