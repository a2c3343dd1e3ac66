"""Conv2D's speed paths (minidl/layers/conv_products.py) against the loop reference.

Every path the products take for speed (the im2col buffer kept between calls and reused
for dcols, chunked im2col, per-sample backward products up to SMALL_K rows of cols and
one product above, dz in either layout, a 1x1 conv on a channels-first input) must give
the numbers of tests/reference_conv.py. Timing lives in benchmarks/bench_conv.py, never
here."""
import numpy as np
import pytest

from conftest import channels_first_view, check_against_reference, conv64, randn, to_np

# -- 1x1 convolution ------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_1x1_conv_on_a_channels_first_input(xp, bias):
    """The output of a Conv2D is an NCHW view of channels-first memory: a 1x1 layer
    after it must still give the reference's numbers."""
    first = conv64(xp, 2, 4, 3, padding=1)
    x = first.forward(randn(xp, 3, 2, 5, 5, seed=3))
    layer = conv64(xp, 4, 6, 1, bias=bias)
    check_against_reference(layer, x, randn(xp, 3, 6, 5, 5, seed=4), (1, 1), (0, 0))


# -- buffer reuse ------------------------------------------------------------------------

def test_buffer_reuse_across_shapes_and_outputs_stay_intact(xp):
    """The im2col buffer is kept between calls: growing, shrinking (a smaller last
    batch uses the front of it) and growing again must all stay exact, and arrays
    returned earlier must not change when the buffer is reused."""
    layer = conv64(xp, 3, 4, 3, padding=1)
    shapes = [(2, 3, 6, 6), (4, 3, 7, 5), (1, 3, 6, 6), (3, 3, 9, 9), (2, 3, 6, 6)]
    kept = []
    for k, shape in enumerate(shapes):
        x = randn(xp, *shape, seed=10 + k)
        dz = randn(xp, shape[0], 4, shape[2], shape[3], seed=20 + k)
        z = check_against_reference(layer, x, dz, (1, 1), (1, 1))
        kept.append((z, to_np(z).copy()))
    for z, copy in kept:
        np.testing.assert_array_equal(to_np(z), copy)


def test_second_backward_after_one_forward(xp):
    """Backward reuses the cols buffer for dcols; a second backward of the same forward
    must rebuild cols, not read dcols."""
    layer = conv64(xp, 2, 3, 3, padding=1)
    x, dz = randn(xp, 2, 2, 5, 5, seed=1), randn(xp, 2, 3, 5, 5, seed=2)
    layer.forward(x)
    dx1 = to_np(layer.backward(dz))
    dw1 = to_np(layer.weight.grad).copy()
    dx2 = to_np(layer.backward(dz))
    np.testing.assert_allclose(dx2, dx1, atol=1e-12)
    np.testing.assert_allclose(to_np(layer.weight.grad), 2 * dw1, atol=1e-12)


# -- chunked im2col ---------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config", [
    (5, 3, 6, 6, 4, (3, 3), (1, 1), (1, 1)),
    (7, 2, 9, 8, 3, (5, 3), (2, 1), (2, 1)),
    (3, 1, 7, 7, 2, (2, 2), (2, 2), (0, 0)),
], ids=str)
def test_chunked_im2col_matches_reference(xp, config, bias):
    """A budget of two samples: chunks of 2, 2, ... and a shorter last one."""
    n, c, h, w, f, kernel, stride, padding = config
    probe = conv64(xp, c, f, kernel, stride=stride, padding=padding)
    ho, wo = probe.output_shape((n, c, h, w))[2:]
    per_sample = c * kernel[0] * kernel[1] * ho * wo * 8
    layer = conv64(xp, c, f, kernel, stride=stride, padding=padding, bias=bias,
                   max_im2col_bytes=2 * per_sample)
    x, dz = randn(xp, n, c, h, w, seed=1), randn(xp, n, f, ho, wo, seed=2)
    check_against_reference(layer, x, dz, stride, padding)


# -- backward products: few rows of cols (a first layer) or many ------------------------

@pytest.mark.parametrize("c", [1, 8], ids=["few-rows", "many-rows"])   # C*k1*k2 = 6 or 48
@pytest.mark.parametrize("dz_layout", ["nchw", "channels_first"])
@pytest.mark.parametrize("chunk_samples", [None, 2])
@pytest.mark.parametrize("input_grad", [True, False])
def test_backward_matches_reference(xp, c, dz_layout, chunk_samples, input_grad):
    n, h, w, f, kernel, stride, padding = 5, 7, 6, 4, (3, 2), (2, 1), (1, 1)
    probe = conv64(xp, c, f, kernel, stride=stride, padding=padding)
    ho, wo = probe.output_shape((n, c, h, w))[2:]
    budget = {} if chunk_samples is None else {
        "max_im2col_bytes": chunk_samples * c * kernel[0] * kernel[1] * ho * wo * 8}
    layer = conv64(xp, c, f, kernel, stride=stride, padding=padding, **budget)
    layer.input_grad = input_grad
    if dz_layout == "nchw":
        dz = randn(xp, n, f, ho, wo, seed=2)
    else:
        dz = channels_first_view(xp, n, f, ho, wo, seed=2)
    check_against_reference(layer, randn(xp, n, c, h, w, seed=1), dz, stride, padding,
                            dx=input_grad)
