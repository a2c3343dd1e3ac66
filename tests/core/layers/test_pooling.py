"""MaxPool2D, AvgPool2D, GlobalAvgPool2D: loop reference, gradcheck, PyTorch, errors,
layouts and threads."""
import numpy
import pytest

import minidl
from minidl import MaxPool2D

from conftest import channels_first_view, randn, to_np
from reference_layers import avgpool_forward_backward, maxpool_forward_backward

F64 = numpy.float64


# (kernel_size, stride, padding, (H, W)): what each case exercises
CASES = [
    pytest.param(2, None, 0, (8, 6), id="fast-path-2x2"),
    pytest.param(2, None, 0, (7, 9), id="fast-path-floor-crops"),
    pytest.param(3, 3, 1, (7, 8), id="tiles-with-padding"),
    pytest.param(2, 3, 0, (8, 7), id="gaps-stride>kernel"),
    pytest.param(3, 1, 0, (5, 6), id="overlap-stride1"),
    pytest.param(3, 2, 1, (7, 8), id="overlap-and-padding"),
    pytest.param((2, 3), (1, 2), (1, 1), (6, 7), id="rectangular"),
]


def distinct_values(xp, shape, seed=0):
    """A shuffled grid with gaps of 0.1: no ties, and eps-sized nudges never reorder."""
    values = numpy.random.default_rng(seed).permutation(int(numpy.prod(shape))) * 0.1
    return xp.asarray((values - values.mean()).reshape(shape))


def tied_values(xp, shape, seed=0):
    """Small integers: most windows hold their maximum more than once."""
    return xp.asarray(numpy.random.default_rng(seed).integers(0, 3, shape).astype(F64))


def as_pair(v):
    return (v, v) if isinstance(v, int) else v


def run(layer, x, dy):
    y = layer.forward(x)
    return y, layer.backward(dy)


# -- against the loop reference (1e-10) ------------------------------------------------

def assert_matches_reference(xp, pool, x, reference, kernel, stride, padding):
    """The pool's y and dx equal the loop reference's, to 1e-10."""
    dy = randn(xp, *pool.output_shape(x.shape), seed=1)
    y, dx = run(pool, x, dy)
    k, s, p = as_pair(kernel), as_pair(stride or kernel), as_pair(padding)
    y_ref, dx_ref = reference(to_np(x), to_np(dy), k, s, p)
    numpy.testing.assert_allclose(to_np(y), y_ref, rtol=0, atol=1e-10)
    numpy.testing.assert_allclose(to_np(dx), dx_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kernel, stride, padding, hw", CASES)
@pytest.mark.parametrize("values", [distinct_values, tied_values], ids=["distinct", "tied"])
def test_maxpool_matches_loop_reference(xp, kernel, stride, padding, hw, values):
    pool = minidl.MaxPool2D(kernel, stride, padding, dtype=F64)
    assert_matches_reference(xp, pool, values(xp, (2, 3) + hw), maxpool_forward_backward,
                             kernel, stride, padding)


@pytest.mark.parametrize("kernel, stride, padding, hw", CASES)
def test_avgpool_matches_loop_reference(xp, kernel, stride, padding, hw):
    pool = minidl.AvgPool2D(kernel, stride, padding, dtype=F64)
    assert_matches_reference(xp, pool, randn(xp, 2, 3, *hw), avgpool_forward_backward,
                             kernel, stride, padding)


def test_maxpool_gives_each_window_gradient_to_one_element(xp):
    x = xp.ones((1, 1, 4, 4), dtype=F64)                   # every element ties
    pool = minidl.MaxPool2D(2, dtype=F64)
    dx = to_np(run(pool, x, xp.ones((1, 1, 2, 2), dtype=F64))[1])
    expected = numpy.zeros((4, 4))
    expected[::2, ::2] = 1                                  # the top-left: first in order
    numpy.testing.assert_array_equal(dx[0, 0], expected)


def test_backward_twice_gives_the_same_gradient(xp):
    pool = minidl.MaxPool2D(3, 2, 1, dtype=F64)
    x = tied_values(xp, (2, 2, 7, 7))
    dy = randn(xp, *pool.output_shape(x.shape), seed=1)
    pool.forward(x)
    numpy.testing.assert_array_equal(to_np(pool.backward(dy)), to_np(pool.backward(dy)))


# -- finite differences ------------------------------------------------------------------

@pytest.mark.parametrize("kernel, stride, padding, hw", CASES)
def test_maxpool_gradcheck(xp, kernel, stride, padding, hw):
    pool = minidl.MaxPool2D(kernel, stride, padding, dtype=F64)
    assert minidl.gradcheck(pool, distinct_values(xp, (2, 2) + hw)) < 1e-6


@pytest.mark.parametrize("kernel, stride, padding, hw", CASES)
def test_avgpool_gradcheck(xp, kernel, stride, padding, hw):
    pool = minidl.AvgPool2D(kernel, stride, padding, dtype=F64)
    assert minidl.gradcheck(pool, randn(xp, 2, 2, *hw, seed=3)) < 1e-6


def test_global_avgpool_gradcheck_and_values(xp):
    pool = minidl.GlobalAvgPool2D(dtype=F64)
    x = randn(xp, 3, 4, 5, 6, seed=3)
    numpy.testing.assert_allclose(to_np(pool.forward(x)), to_np(x).mean(axis=(2, 3)),
                                  rtol=0, atol=1e-12)
    assert minidl.gradcheck(pool, x) < 1e-6


# -- against PyTorch -----------------------------------------------------------------------

def torch_pool(kind, x, dy, kernel, stride, padding):
    """PyTorch's y and dx for max_pool2d or avg_pool2d."""
    def compute(torch):
        xt = torch.tensor(to_np(x), requires_grad=True)
        fn = {"max": torch.nn.functional.max_pool2d,
              "avg": torch.nn.functional.avg_pool2d}[kind]
        yt = fn(xt, kernel, stride, padding)
        yt.backward(torch.tensor(to_np(dy)))
        return {"y": yt.detach().numpy(), "dx": xt.grad.numpy()}
    return compute


@pytest.mark.parametrize("kernel, stride, padding, hw", CASES)
@pytest.mark.parametrize("values", [distinct_values, tied_values], ids=["distinct", "tied"])
def test_maxpool_matches_torch_including_ties(xp, kernel, stride, padding, hw, values,
                                              torch_reference):
    x = values(xp, (2, 3) + hw, seed=5)
    pool = minidl.MaxPool2D(kernel, stride, padding, dtype=F64)
    dy = randn(xp, *pool.output_shape(x.shape), seed=2)
    y, dx = run(pool, x, dy)
    theirs = torch_reference(torch_pool("max", x, dy, kernel, stride or kernel, padding))
    numpy.testing.assert_allclose(to_np(y), theirs["y"], rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(to_np(dx), theirs["dx"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel, stride, padding, hw", CASES)
def test_avgpool_matches_torch(xp, kernel, stride, padding, hw, torch_reference):
    x = randn(xp, 2, 3, *hw, seed=5)
    pool = minidl.AvgPool2D(kernel, stride, padding, dtype=F64)
    dy = randn(xp, *pool.output_shape(x.shape), seed=2)
    y, dx = run(pool, x, dy)
    theirs = torch_reference(torch_pool("avg", x, dy, kernel, stride or kernel, padding))
    numpy.testing.assert_allclose(to_np(y), theirs["y"], rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(to_np(dx), theirs["dx"], rtol=0, atol=1e-12)


def test_global_avgpool_matches_torch(xp, torch_reference):
    x, dy = randn(xp, 2, 3, 4, 5), randn(xp, 2, 3, seed=1)
    pool = minidl.GlobalAvgPool2D(dtype=F64)
    y, dx = run(pool, x, dy)

    def compute(torch):
        xt = torch.tensor(to_np(x), requires_grad=True)
        yt = torch.nn.functional.adaptive_avg_pool2d(xt, 1).flatten(1)
        yt.backward(torch.tensor(to_np(dy)))
        return {"y": yt.detach().numpy(), "dx": xt.grad.numpy()}

    theirs = torch_reference(compute)
    numpy.testing.assert_allclose(to_np(y), theirs["y"], rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(to_np(dx), theirs["dx"], rtol=0, atol=1e-12)


# -- dtype, shapes, errors --------------------------------------------------------------------

@pytest.mark.parametrize("cls", [minidl.MaxPool2D, minidl.AvgPool2D])
def test_stride_defaults_to_kernel_and_output_shape_matches_forward(xp, cls):
    pool = cls((2, 3))
    assert pool.stride == (2, 3)
    x = randn(xp, 2, 3, 9, 10, dtype=numpy.float32)
    assert pool.output_shape(x.shape) == pool.forward(x).shape == (2, 3, 4, 3)
    assert minidl.GlobalAvgPool2D().output_shape((2, 3, 9, 10)) == (2, 3)


@pytest.mark.parametrize("cls", [minidl.MaxPool2D, minidl.AvgPool2D])
def test_padding_over_half_the_kernel_is_rejected(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*padding.*\(2, 2\).*\(3, 3\)"):
        cls(3, padding=2)
    cls(4, padding=2)                                         # exactly half is allowed


@pytest.mark.parametrize("cls", [minidl.MaxPool2D, minidl.AvgPool2D])
def test_input_smaller_than_the_window_is_rejected(xp, cls):
    pool = cls(3)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*3x3.*2x5.*\(1, 1, 2, 5\)"):
        pool.forward(xp.zeros((1, 1, 2, 5), dtype=numpy.float32))
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*4-D.*\(2, 5\)"):
        pool.forward(xp.zeros((2, 5), dtype=numpy.float32))


def test_bad_arguments_are_rejected(xp):
    with pytest.raises(TypeError, match="MaxPool2D.*kernel_size"):
        minidl.MaxPool2D(2.5)
    with pytest.raises(ValueError, match="AvgPool2D.*stride"):
        minidl.AvgPool2D(2, stride=0)
    with pytest.raises(ValueError, match="GlobalAvgPool2D.*4-D"):
        minidl.GlobalAvgPool2D().forward(xp.zeros((2, 3), dtype=numpy.float32))
    with pytest.raises(TypeError, match="MaxPool2D"):
        minidl.MaxPool2D(2).forward([[1.0]])
    with pytest.raises(RuntimeError, match="before forward"):
        minidl.MaxPool2D(2).backward(xp.zeros((1, 1, 1, 1), dtype=numpy.float32))


def test_repr():
    assert (repr(minidl.MaxPool2D(2))
            == "MaxPool2D(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0))")


# -- NaN and -inf: as PyTorch -------------------------------------------------------------------

def with_nan_and_inf(xp, shape, seed=0):
    """Small integers with NaN, -inf and +inf sprinkled in, and a channel all -inf."""
    rng = numpy.random.default_rng(seed)
    x = rng.integers(-2, 2, shape).astype(F64)
    u = rng.random(shape)
    x[u < 0.15] = numpy.nan
    x[u > 0.7] = -numpy.inf
    x[(u > 0.65) & (u <= 0.7)] = numpy.inf
    x[:, -1] = -numpy.inf
    return xp.asarray(x)


def test_maxpool_nan_window_gives_nan_and_its_gradient_to_a_nan(xp, torch_reference):
    """PyTorch updates a window's argmax on `val > max or isnan(val)`: the output is NaN
    and the gradient goes to the window's LAST NaN in row-major order (it was dropped:
    `slab == y` never holds for NaN)."""
    nan = numpy.nan
    x = xp.asarray(numpy.array([[[[1.0, nan, 3.0, nan],
                                  [nan, 0.0, 5.0, 2.0]]]]))
    pool = minidl.MaxPool2D(2, dtype=F64)
    y, dx = run(pool, x, xp.asarray(numpy.array([[[[10.0, 20.0]]]])))
    numpy.testing.assert_array_equal(to_np(y), [[[[nan, nan]]]])
    numpy.testing.assert_array_equal(to_np(dx), [[[[0, 0, 0, 20], [10, 0, 0, 0]]]])
    theirs = torch_reference(torch_pool("max", x, numpy.array([[[[10.0, 20.0]]]]), 2, 2, 0))
    numpy.testing.assert_array_equal(to_np(dx), theirs["dx"])


def test_maxpool_padding_never_takes_the_gradient(xp, torch_reference):
    """All -inf input with padding: every window's max is -inf and its gradient goes to
    a real element (the padding, also -inf, used to take it and lose it to the crop);
    PyTorch: dx sums to dy's sum."""
    x = xp.full((1, 2, 3, 3), -numpy.inf)
    pool = minidl.MaxPool2D(3, 1, 1, dtype=F64)
    dy = xp.ones((1, 2, 3, 3))
    y, dx = run(pool, x, dy)
    assert (to_np(y) == -numpy.inf).all()
    assert float(to_np(dx).sum()) == float(to_np(dy).sum()) == 18
    theirs = torch_reference(torch_pool("max", x, dy, 3, 1, 1))
    numpy.testing.assert_array_equal(to_np(dx), theirs["dx"])


@pytest.mark.parametrize("kernel, stride, padding, hw", CASES)
def test_maxpool_matches_torch_with_nan_and_inf(xp, kernel, stride, padding, hw,
                                                torch_reference):
    x = with_nan_and_inf(xp, (2, 3) + hw, seed=4)
    pool = minidl.MaxPool2D(kernel, stride, padding, dtype=F64)
    dy = randn(xp, *pool.output_shape(x.shape), seed=2)
    y, dx = run(pool, x, dy)
    theirs = torch_reference(torch_pool("max", x, dy, kernel, stride or kernel, padding))
    numpy.testing.assert_array_equal(to_np(y), theirs["y"])          # NaN where torch's
    numpy.testing.assert_allclose(to_np(dx), theirs["dx"], rtol=0, atol=1e-12)
    numpy.testing.assert_array_equal(to_np(pool.backward(dy)), to_np(dx))   # repeatable


def test_maxpool_nan_in_a_channels_first_float32_input(xp, torch_reference):
    """The memory order of a Conv2D output, float32, NaN only in some channels."""
    x = with_nan_and_inf(xp, (4, 3, 6, 6), seed=6).astype(numpy.float32)
    x = xp.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    pool = minidl.MaxPool2D(3, 2, 1)
    dy = randn(xp, *pool.output_shape(x.shape), seed=2, dtype=numpy.float32)
    y, dx = run(pool, x, dy)
    theirs = torch_reference(torch_pool("max", x, dy, 3, 2, 1))
    numpy.testing.assert_array_equal(to_np(y), theirs["y"])
    numpy.testing.assert_allclose(to_np(dx), theirs["dx"], rtol=0, atol=1e-6)


# -- dy is checked; an empty batch works ----------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: minidl.MaxPool2D(2), lambda: minidl.MaxPool2D(3, 2, 1),
                                  lambda: minidl.AvgPool2D(2), minidl.GlobalAvgPool2D],
                         ids=["max", "max-padded", "avg", "global"])
def test_backward_rejects_dy_of_the_wrong_shape(xp, make):
    """A (1, ...) dy used to broadcast over the batch."""
    pool = make()
    name = type(pool).__name__
    y = pool.forward(randn(xp, 2, 3, 6, 6, dtype=numpy.float32))
    for shape in [(1,) + y.shape[1:], y.shape[::-1], y.shape + (1,)]:
        with pytest.raises(ValueError, match=rf"{name}\.backward: expected dy of shape "
                                             rf"\({y.shape[0]}, {y.shape[1]}"):
            pool.backward(xp.zeros(shape, dtype=numpy.float32))
    with pytest.raises(TypeError, match=rf"{name}\.backward"):
        pool.backward(to_np(xp.zeros(y.shape)).tolist())
    assert pool.backward(xp.ones_like(y)).shape == (2, 3, 6, 6)


@pytest.mark.parametrize("kind, kernel, stride, padding",
                         [("max", 2, 2, 0), ("max", 3, 2, 1), ("avg", 2, 2, 0), ("avg", 3, 1, 1)])
def test_empty_batch_matches_torch(xp, kind, kernel, stride, padding, torch_reference):
    cls = {"max": minidl.MaxPool2D, "avg": minidl.AvgPool2D}[kind]
    pool = cls(kernel, stride, padding, dtype=F64)
    x = xp.zeros((0, 3, 7, 7))
    dy = xp.zeros(pool.output_shape(x.shape))
    y, dx = run(pool, x, dy)
    theirs = torch_reference(torch_pool(kind, x, dy, kernel, stride, padding))
    assert y.shape == theirs["y"].shape and dx.shape == theirs["dx"].shape == (0, 3, 7, 7)


def test_global_avgpool_empty_batch(xp):
    pool = minidl.GlobalAvgPool2D(dtype=F64)
    y, dx = run(pool, xp.zeros((0, 3, 4, 5)), xp.zeros((0, 3)))
    assert y.shape == (0, 3) and dx.shape == (0, 3, 4, 5)


@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 3, 4, 0)])
def test_global_avg_pool_refuses_an_empty_image(xp, shape):
    layer = minidl.GlobalAvgPool2D()
    with pytest.raises(ValueError, match=r"GlobalAvgPool2D: .*H, W >= 1, got shape"):
        layer.forward(xp.zeros(shape, dtype=numpy.float32))
    with pytest.raises(ValueError, match="GlobalAvgPool2D"):
        layer.output_shape(shape)


# -- layouts: channels-first views and strided inputs, serial or in threads ----------------
@pytest.mark.parametrize("layout", ["nchw", "channels_first", "strided"])
def test_maxpool_matches_reference_in_every_layout(xp, layout, threads):
    if layout == "nchw":
        x = randn(xp, 2, 3, 6, 8, seed=1)
    elif layout == "channels_first":
        x = channels_first_view(xp, 2, 3, 6, 8, seed=1)
    else:
        x = randn(xp, 2, 3, 7, 9, seed=1)[:, :, :6, :8]
    for kernel, stride, padding in [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)),
                                    ((2, 3), (1, 2), (1, 1))]:
        pool = MaxPool2D(kernel, stride, padding)
        y = pool.forward(x)
        dy = randn(xp, *y.shape, seed=2)
        dx = pool.backward(dy)
        y_ref, dx_ref = maxpool_forward_backward(to_np(x), to_np(dy), kernel, stride, padding)
        numpy.testing.assert_allclose(to_np(y), y_ref, rtol=0, atol=1e-12)
        numpy.testing.assert_allclose(to_np(dx), dx_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [MaxPool2D, minidl.AvgPool2D])
def test_forward_refuses_a_padded_input_that_would_not_fit_in_memory(monkeypatch, cls):
    monkeypatch.setattr(minidl.checks, "machine_memory", lambda: 2 ** 30)
    layer = cls.from_config({"kernel_size": 4000, "padding": 2000})     # a crafted config
    with pytest.raises(ValueError, match=rf"{cls.__name__}: its padded input of shape "
                                         rf"\(64, 32, 4028, 4028\) would hold 3.32e\+10 values"):
        layer.forward(numpy.zeros((64, 32, 28, 28), numpy.float32))


# -- ceil_mode and count_include_pad: partial last windows, as PyTorch -----------------------

# (kernel_size, stride, padding, (H, W)), each with a last window that ceil_mode keeps
# although it reaches past the input (or the padding)
CEIL_CASES = [
    pytest.param(2, 2, 0, (7, 9), id="2x2-odd-sizes"),
    pytest.param(3, 2, 1, (8, 7), id="overlap-and-padding"),
    pytest.param(3, 3, 1, (7, 8), id="tiles-with-padding"),
    pytest.param(2, 3, 0, (8, 7), id="gaps-stride>kernel"),
    pytest.param((2, 3), (1, 2), (1, 1), (6, 7), id="rectangular"),
    pytest.param(2, 2, 1, (5, 5), id="last-window-would-start-in-the-padding"),
    pytest.param(4, 3, 2, (5, 6), id="padding-half-the-kernel"),
]


@pytest.mark.parametrize("kernel, stride, padding, hw", CEIL_CASES)
@pytest.mark.parametrize("values", [distinct_values, tied_values], ids=["distinct", "tied"])
def test_maxpool_ceil_mode_matches_loop_reference(xp, kernel, stride, padding, hw, values):
    pool = minidl.MaxPool2D(kernel, stride, padding, ceil_mode=True, dtype=F64)
    x = values(xp, (2, 3) + hw)
    dy = randn(xp, *pool.output_shape(x.shape), seed=1)
    y, dx = run(pool, x, dy)
    y_ref, dx_ref = maxpool_forward_backward(to_np(x), to_np(dy), as_pair(kernel),
                                             as_pair(stride), as_pair(padding), ceil_mode=True)
    numpy.testing.assert_allclose(to_np(y), y_ref, rtol=0, atol=1e-10)
    numpy.testing.assert_allclose(to_np(dx), dx_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("ceil_mode, count_include_pad", [(True, True), (True, False),
                                                          (False, False)])
@pytest.mark.parametrize("kernel, stride, padding, hw", CEIL_CASES + CASES)
def test_avgpool_divisors_match_loop_reference(xp, kernel, stride, padding, hw, ceil_mode,
                                              count_include_pad):
    pool = minidl.AvgPool2D(kernel, stride, padding, ceil_mode, count_include_pad, dtype=F64)
    x = randn(xp, 2, 3, *hw)
    dy = randn(xp, *pool.output_shape(x.shape), seed=1)
    y, dx = run(pool, x, dy)
    y_ref, dx_ref = avgpool_forward_backward(to_np(x), to_np(dy), as_pair(kernel),
                                             as_pair(stride or kernel), as_pair(padding),
                                             ceil_mode, count_include_pad)
    numpy.testing.assert_allclose(to_np(y), y_ref, rtol=0, atol=1e-10)
    numpy.testing.assert_allclose(to_np(dx), dx_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kernel, stride, padding, hw", CEIL_CASES)
def test_ceil_mode_gradcheck(xp, kernel, stride, padding, hw):
    x = distinct_values(xp, (2, 2) + hw)
    assert minidl.gradcheck(minidl.MaxPool2D(kernel, stride, padding, True, dtype=F64), x) < 1e-6
    avg = minidl.AvgPool2D(kernel, stride, padding, True, count_include_pad=False, dtype=F64)
    assert minidl.gradcheck(avg, x) < 1e-6


def torch_pool_modes(kind, x, dy, kernel, stride, padding, ceil_mode, count_include_pad=True):
    """PyTorch's y and dx for max_pool2d or avg_pool2d with ceil_mode (and
    count_include_pad)."""
    def compute(torch):
        xt = torch.tensor(to_np(x), requires_grad=True)
        if kind == "max":
            yt = torch.nn.functional.max_pool2d(xt, kernel, stride, padding, ceil_mode=ceil_mode)
        else:
            yt = torch.nn.functional.avg_pool2d(xt, kernel, stride, padding, ceil_mode,
                                                count_include_pad)
        yt.backward(torch.tensor(to_np(dy)))
        return {"y": yt.detach().numpy(), "dx": xt.grad.numpy()}
    return compute


@pytest.mark.parametrize("kernel, stride, padding, hw", CEIL_CASES)
def test_maxpool_ceil_mode_matches_torch(xp, kernel, stride, padding, hw, torch_reference):
    x = tied_values(xp, (2, 3) + hw, seed=5)
    pool = minidl.MaxPool2D(kernel, stride, padding, ceil_mode=True, dtype=F64)
    dy = randn(xp, *pool.output_shape(x.shape), seed=2)
    y, dx = run(pool, x, dy)
    theirs = torch_reference(torch_pool_modes("max", x, dy, kernel, stride, padding, True))
    assert y.shape == theirs["y"].shape
    numpy.testing.assert_allclose(to_np(y), theirs["y"], rtol=0, atol=1e-9)
    numpy.testing.assert_allclose(to_np(dx), theirs["dx"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("ceil_mode, count_include_pad", [(True, True), (True, False),
                                                          (False, False)])
@pytest.mark.parametrize("kernel, stride, padding, hw", CEIL_CASES)
def test_avgpool_modes_match_torch(xp, kernel, stride, padding, hw, ceil_mode,
                                   count_include_pad, torch_reference):
    x = randn(xp, 2, 3, *hw, seed=5)
    pool = minidl.AvgPool2D(kernel, stride, padding, ceil_mode, count_include_pad, dtype=F64)
    dy = randn(xp, *pool.output_shape(x.shape), seed=2)
    y, dx = run(pool, x, dy)
    theirs = torch_reference(torch_pool_modes("avg", x, dy, kernel, stride, padding,
                                              ceil_mode, count_include_pad))
    assert y.shape == theirs["y"].shape
    numpy.testing.assert_allclose(to_np(y), theirs["y"], rtol=0, atol=1e-9)
    numpy.testing.assert_allclose(to_np(dx), theirs["dx"], rtol=0, atol=1e-9)


def test_maxpool_ceil_mode_with_nan_and_inf(xp, torch_reference):
    """The extra -inf rows of ceil_mode never take a gradient, NaN windows as before."""
    x = with_nan_and_inf(xp, (2, 3, 7, 8), seed=4)
    pool = minidl.MaxPool2D(3, 2, 1, ceil_mode=True, dtype=F64)
    dy = randn(xp, *pool.output_shape(x.shape), seed=2)
    y, dx = run(pool, x, dy)
    theirs = torch_reference(torch_pool_modes("max", x, dy, 3, 2, 1, True))
    numpy.testing.assert_array_equal(to_np(y), theirs["y"])
    numpy.testing.assert_allclose(to_np(dx), theirs["dx"], rtol=0, atol=1e-12)


def test_modes_in_repr_config_and_output_shape():
    pool = minidl.AvgPool2D(3, 2, 1, ceil_mode=True, count_include_pad=False)
    assert repr(pool) == ("AvgPool2D(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), "
                          "ceil_mode=True, count_include_pad=False)")
    assert pool.get_config()["ceil_mode"] is True
    assert minidl.AvgPool2D(**pool.get_config()).get_config() == pool.get_config()
    assert pool.output_shape((1, 1, 8, 8)) == (1, 1, 5, 5)           # floor mode: 4
    assert minidl.MaxPool2D(2, 2, 1, ceil_mode=True).output_shape((1, 1, 5, 5)) == (1, 1, 3, 3)
    with pytest.raises(TypeError, match="MaxPool2D: ceil_mode must be True or False"):
        minidl.MaxPool2D(2, ceil_mode=1)
    with pytest.raises(TypeError, match="AvgPool2D: count_include_pad must be True or False"):
        minidl.AvgPool2D(2, count_include_pad="no")


def test_a_crafted_kernel_visits_only_the_offsets_that_read_the_input():
    """MaxPool2D(4000, padding=2000) from a crafted config: its one window holds 16
    million offsets, all but 28 x 28 of them padding; looping over all of them took 19 s
    per forward of one image (a kernel of 1000 here: a million offsets, the same logic).
    Skipping those that only ever read padding changes nothing: -inf adds nothing to a
    max, 0 nothing to a sum, and they take no gradient."""
    x = numpy.random.default_rng(0).standard_normal((2, 3, 28, 28))
    big = minidl.MaxPool2D(1000, padding=500, dtype=F64)
    assert len(big._offsets((28, 28), (1, 1))) == 28 * 28
    y, dx = run(big, x, numpy.ones((2, 3, 1, 1)))
    numpy.testing.assert_array_equal(y[..., 0, 0], x.max(axis=(2, 3)))
    numpy.testing.assert_array_equal(dx, x == x.max(axis=(2, 3), keepdims=True))
    for include, divisor in ((False, 28 * 28), (True, 1000 * 1000)):
        mean = minidl.AvgPool2D(1000, padding=500, count_include_pad=include, dtype=F64)
        y, dx = run(mean, x, numpy.ones((2, 3, 1, 1)))
        numpy.testing.assert_allclose(y[..., 0, 0], x.sum(axis=(2, 3)) / divisor, rtol=1e-12)
        numpy.testing.assert_allclose(dx, numpy.full(x.shape, 1 / divisor), rtol=1e-12)
    # an ordinary pool visits every offset, in row-major order
    assert minidl.MaxPool2D(3, 2, 1)._offsets((7, 7), (4, 4)) == [
        (m, l) for m in range(3) for l in range(3)]
