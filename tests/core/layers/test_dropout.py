"""Dropout: statistics, mask reuse, eval, seeds, errors, dy checks, an empty batch."""
import math

import numpy
import pytest

import minidl

from conftest import randn, to_np

F64 = numpy.float64


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_dropout_keeps_the_mean_and_drops_a_fraction_p(xp, p):
    x = xp.ones((200, 500), dtype=numpy.float32)
    y = to_np(minidl.Dropout(p, seed=0).forward(x))
    size = y.size                                        # 5-sigma bounds for 100k draws
    assert abs((y == 0).mean() - p) < 5 * math.sqrt(p * (1 - p) / size)
    assert abs(y.mean() - 1) < 5 * math.sqrt(p / (1 - p) / size)
    kept = y[y != 0]
    numpy.testing.assert_allclose(kept, 1 / (1 - p), rtol=1e-6)   # inverted scaling


def test_dropout_backward_reuses_the_forward_mask(xp):
    layer = minidl.Dropout(0.5, seed=1, dtype=F64)
    x = randn(xp, 30, 40, seed=2) + 5                    # never 0, so y / x is the mask
    y = layer.forward(x)
    dy = randn(xp, 30, 40, seed=3)
    mask = to_np(y) / to_np(x)
    numpy.testing.assert_allclose(to_np(layer.backward(dy)), to_np(dy) * mask, rtol=1e-14)
    numpy.testing.assert_allclose(to_np(layer.backward(dy)), to_np(dy) * mask, rtol=1e-14)


def test_dropout_is_the_identity_at_eval_and_for_p_zero(xp):
    x, dy = randn(xp, 4, 5, seed=1), randn(xp, 4, 5, seed=2)
    for layer, training in [(minidl.Dropout(0.5, dtype=F64), False),
                            (minidl.Dropout(0.0, dtype=F64), True)]:
        numpy.testing.assert_array_equal(to_np(layer.forward(x, training=training)), to_np(x))
        numpy.testing.assert_array_equal(to_np(layer.backward(dy)), to_np(dy))
        assert minidl.gradcheck(layer, x, training=training) < 1e-6


def test_dropout_seed_reproduces_masks_and_each_forward_draws_a_new_one(xp):
    x = xp.ones((50, 50), dtype=numpy.float32)
    a, b, c = minidl.Dropout(0.5, seed=3), minidl.Dropout(0.5, seed=3), minidl.Dropout(0.5, seed=4)
    first_a, first_b = to_np(a.forward(x)), to_np(b.forward(x))
    numpy.testing.assert_array_equal(first_a, first_b)
    numpy.testing.assert_array_equal(to_np(a.forward(x)), to_np(b.forward(x)))
    assert not numpy.array_equal(first_a, to_np(a.forward(x)))
    assert not numpy.array_equal(first_a, to_np(c.forward(x)))


def test_dropout_without_seed_follows_manual_seed(xp):
    x = xp.ones((20, 20), dtype=numpy.float32)
    minidl.manual_seed(5)
    a = to_np(minidl.Dropout(0.5).forward(x))
    minidl.manual_seed(5)
    numpy.testing.assert_array_equal(to_np(minidl.Dropout(0.5).forward(x)), a)


def test_dropout_bad_arguments_are_rejected(xp):
    for p in [1.0, -0.1, 1.5]:
        with pytest.raises(ValueError, match=rf"Dropout: p must be .*>= 0 and < 1, got {p}"):
            minidl.Dropout(p)
    with pytest.raises(TypeError, match="Dropout: p must be a real number"):
        minidl.Dropout("0.5")
    for seed in (-1, "abc", 1.5):
        with pytest.raises((TypeError, ValueError), match="Dropout: seed must be"):
            minidl.Dropout(seed=seed)
    with pytest.raises(RuntimeError, match="before forward"):
        minidl.Dropout().backward(xp.zeros(3, dtype=numpy.float32))
    assert repr(minidl.Dropout(0.25, seed=1)) == "Dropout(p=0.25, seed=1)"


# -- dy is checked; an empty batch works ----------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_dropout_backward_rejects_dy_of_the_wrong_shape(xp, training):
    """A (1, ...) dy used to broadcast against the mask (and pass straight through in eval)."""
    layer = minidl.Dropout(0.5, seed=0)
    layer.forward(xp.ones((2, 4), dtype=numpy.float32), training=training)
    for shape in [(1, 4), (4, 2), (2, 4, 1)]:
        with pytest.raises(ValueError, match=r"Dropout\.backward: expected dy of shape \(2, 4\)"):
            layer.backward(xp.zeros(shape, dtype=numpy.float32))
    with pytest.raises(TypeError, match=r"Dropout\.backward"):
        layer.backward([[0.0] * 4] * 2)
    assert layer.backward(xp.ones((2, 4), dtype=numpy.float32)).shape == (2, 4)


def test_dropout_empty_batch(xp):
    layer = minidl.Dropout(0.5, seed=0)
    empty = xp.zeros((0, 4), dtype=numpy.float32)
    for training in [True, False]:
        assert layer.forward(empty, training=training).shape == (0, 4)
        assert layer.backward(empty).shape == (0, 4)
