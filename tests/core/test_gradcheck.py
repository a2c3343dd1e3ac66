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
    with pytest.raises(ValueError, match=r"gradient of parameter 'w' has shape \(2, 3\), "
                                         r"expected \(3,\)"):
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


@pytest.mark.parametrize("eps, error", [(0, ValueError), (-1e-4, ValueError),
                                        (float("nan"), ValueError), (float("inf"), ValueError),
                                        ("1e-4", TypeError), (True, TypeError)])
def test_eps_must_be_a_positive_finite_number(eps, error):
    with pytest.raises(error, match="gradcheck: eps must be"):
        minidl.gradcheck(Scale((2,)), randn(np, 3, 2), eps=eps)


def hundred_seed_cases(seed):
    """Correct layers and losses of test size, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    f64 = np.float64
    yield minidl.Dense(5, 4, dtype=f64), rng.standard_normal((6, 5)), None
    yield minidl.BatchNorm2D(3, dtype=f64), rng.standard_normal((2, 3, 2, 3)) * 2 + 0.5, None
    yield minidl.Tanh(dtype=f64), rng.standard_normal((3, 4, 5)), None
    # Cross-entropy over 16 and 64 rows: at eps=1e-6 these failed in most seeds.
    yield (minidl.SoftmaxCrossEntropy(0.1), rng.standard_normal((16, 10)) * 3,
           rng.integers(0, 10, 16))
    yield minidl.SoftmaxCrossEntropy(), rng.standard_normal((64, 10)), rng.integers(0, 10, 64)
    yield minidl.MSE(), rng.standard_normal((8, 4)), rng.standard_normal((8, 4))


@pytest.mark.slow
def test_correct_layers_pass_on_a_hundred_seeds():
    worst = {}
    for seed in range(100):
        minidl.manual_seed(seed)
        for layer, x, target in hundred_seed_cases(seed):
            # 16 random entries per tensor: 100 seeds still visit most of them
            err = minidl.gradcheck(layer, x, target=target, seed=seed, max_entries=16)
            name = type(layer).__name__
            worst[name] = max(worst.get(name, 0.0), err)
    assert max(worst.values()) < 1e-6, worst


class WrongCrossEntropy(minidl.SoftmaxCrossEntropy):
    """Forgets the label smoothing in backward: off by eps/K per entry."""

    def backward(self):
        p, labels = self.cache["p"], self.cache["labels"]
        dz = p.copy()
        dz[np.arange(len(labels)), labels] -= 1.0
        return dz / len(labels)


def test_a_wrong_loss_gradient_fails_on_every_seed():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x, labels = rng.standard_normal((16, 10)), rng.integers(0, 10, 16)
        assert minidl.gradcheck(WrongCrossEntropy(0.01), x, target=labels) > 1e-3
