"""Conv2D's speed paths (minidl/layers/conv_products.py) against the loop reference.

Every path the products take for speed (the im2col buffer kept between calls and reused
for dcols, chunked im2col, per-sample backward products up to SMALL_K rows of cols and
one product above, dz in either layout, a 1x1 conv on a channels-first input, one product
per group, depthwise without cols, ConvTranspose2D in chunks) must give the numbers of
tests/reference_conv.py. Timing lives in benchmarks/bench_conv.py, never
here."""
import numpy as np
import pytest

from minidl import ConvTranspose2D

from conftest import channels_first_view, check_against_reference, conv64, randn, to_np
from reference_conv import conv_transpose_backward, conv_transpose_forward

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


# -- the convolution family: groups and dilation in every path --------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config", [
    (5, 4, 8, 7, 6, (3, 3), (1, 1), (2, 2), (2, 2), 2),     # dilated and grouped
    (5, 6, 9, 8, 6, (3, 2), (2, 1), (1, 1), (1, 2), 6),     # depthwise: builds no cols
    (7, 8, 7, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4),     # groups, many rows of cols
], ids=str)
def test_chunked_family_matches_reference(xp, config, bias):
    """Two samples per chunk with dilation and groups."""
    n, c, h, w, f, kernel, stride, padding, dilation, groups = config
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ho, wo = conv64(xp, c, f, kernel, **geometry).output_shape((n, c, h, w))[2:]
    layer = conv64(xp, c, f, kernel, bias=bias, **geometry,
                   max_im2col_bytes=2 * c * kernel[0] * kernel[1] * ho * wo * 8)
    check_against_reference(layer, randn(xp, n, c, h, w, seed=1),
                            randn(xp, n, f, ho, wo, seed=2), stride, padding)


@pytest.mark.parametrize("c, groups", [(2, 2), (8, 2), (8, 4)],
                         ids=["few-rows", "many-rows", "groups4"])     # C*k1*k2: 12, 48, 48
@pytest.mark.parametrize("dz_layout", ["nchw", "channels_first"])
@pytest.mark.parametrize("chunk_samples", [None, 2])
def test_grouped_backward_matches_reference(xp, c, groups, dz_layout, chunk_samples):
    """The per-sample products (few rows) and the one product per chunk, per group."""
    n, h, w, f, kernel, stride, padding = 5, 7, 6, 4, (3, 2), (2, 1), (1, 1)
    geometry = dict(stride=stride, padding=padding, groups=groups)
    ho, wo = conv64(xp, c, f, kernel, **geometry).output_shape((n, c, h, w))[2:]
    budget = {} if chunk_samples is None else {
        "max_im2col_bytes": chunk_samples * c * kernel[0] * kernel[1] * ho * wo * 8}
    layer = conv64(xp, c, f, kernel, **geometry, **budget)
    if dz_layout == "nchw":
        dz = randn(xp, n, f, ho, wo, seed=2)
    else:
        dz = channels_first_view(xp, n, f, ho, wo, seed=2)
    check_against_reference(layer, randn(xp, n, c, h, w, seed=1), dz, stride, padding)


@pytest.mark.parametrize("c_out, groups", [(2, 1), (6, 2), (4, 4)],
                         ids=["few-rows", "many-rows", "depthwise"])
def test_chunked_transposed_matches_reference(xp, c_out, groups):
    """ConvTranspose2D's products in chunks of two samples: its forward (col2im of
    W2.T @ X2), its dx (W2 @ cols(dY_pad)) and its dW, which reuses those cols."""
    n, c_in, h, w, kernel, stride, padding, output_padding = 5, 4, 3, 4, 3, 2, 1, 1
    probe = ConvTranspose2D(c_in, c_out, kernel, stride, padding, output_padding,
                            groups=groups)
    ho, wo = probe.output_shape((n, c_in, h, w))[2:]
    layer = ConvTranspose2D(c_in, c_out, kernel, stride, padding, output_padding,
                            groups=groups, dtype=np.float64,
                            max_im2col_bytes=2 * c_out * kernel * kernel * h * w * 8)
    layer.bias.data = randn(xp, c_out, seed=7)
    x, dy = randn(xp, n, c_in, h, w, seed=1), randn(xp, n, c_out, ho, wo, seed=2)
    weight, bias = to_np(layer.weight.data), to_np(layer.bias.data)
    geometry = ((stride, stride), (padding, padding))
    np.testing.assert_allclose(
        to_np(layer.forward(x)),
        conv_transpose_forward(to_np(x), weight, bias, *geometry,
                               (output_padding, output_padding), groups=groups),
        rtol=0, atol=1e-10)
    dx_ref, dw_ref, _ = conv_transpose_backward(to_np(dy), to_np(x), weight, *geometry,
                                                groups=groups)
    np.testing.assert_allclose(to_np(layer.backward(dy)), dx_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(to_np(layer.weight.grad), dw_ref, rtol=0, atol=1e-10)
