"""The fast paths of issue #7 against the loop references.

Every path a layer can take for speed (per-sample products, reused im2col buffers, chunked
im2col, threaded im2col/col2im, skipping dx for a model's first layer, layouts kept
channels first between layers) must give the numbers of tests/reference_conv.py and
tests/reference_layers.py. Timing lives in benchmarks/bench_conv.py, never here.
"""
import numpy as np
import pytest

import minidl
from minidl import (BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential,
                    SoftmaxCrossEntropy)
from minidl.layers import parallel as parallel_module
from minidl.ext.zoo import mnist_cnn

from conftest import randn, to_np
from reference_conv import conv_backward, conv_forward
from reference_layers import (batchnorm_train_forward_backward, maxpool_forward_backward)


def conv64(xp, c, f, kernel, stride=1, padding=0, **kwargs):
    layer = Conv2D(c, f, kernel, stride=stride, padding=padding, dtype=np.float64, **kwargs)
    if layer.bias is not None:
        layer.bias.data = randn(xp, f, seed=7)
    return layer


def check_against_reference(layer, x, dz, stride, padding, dx=True):
    """Forward, backward and all three gradients against the loop reference."""
    w = to_np(layer.weight.data)
    b = to_np(layer.bias.data) if layer.bias is not None else np.zeros(w.shape[0])
    z = layer.forward(x)
    np.testing.assert_allclose(to_np(z), conv_forward(to_np(x), w, b, stride, padding),
                               rtol=0, atol=1e-10)
    layer.zero_grad()
    got_dx = layer.backward(dz)
    dw_ref, db_ref, dx_ref = conv_backward(to_np(dz), to_np(x), w, stride, padding)
    np.testing.assert_allclose(to_np(layer.weight.grad), dw_ref, rtol=0, atol=1e-10)
    if layer.bias is not None:
        np.testing.assert_allclose(to_np(layer.bias.grad), db_ref, rtol=0, atol=1e-10)
    if dx:
        np.testing.assert_allclose(to_np(got_dx), dx_ref, rtol=0, atol=1e-10)
    else:
        assert got_dx is None
    return z


def channels_first_view(xp, n, c, h, w, seed):
    """An NCHW array stored channels first, as a Conv2D output is."""
    return randn(xp, c, n, h, w, seed=seed).transpose(1, 0, 2, 3)


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


# -- threaded im2col / col2im ------------------------------------------------------------

@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("channels", [1, 5])          # 1 channel: split over samples
def test_threaded_im2col_and_col2im_match_reference(monkeypatch, threads, channels):
    monkeypatch.setattr(parallel_module, "NUM_THREADS", threads)
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)
    layer = conv64(np, channels, 3, 3, stride=1, padding=1)
    x, dz = randn(np, 4, channels, 6, 5, seed=1), randn(np, 4, 3, 6, 5, seed=2)
    check_against_reference(layer, x, dz, (1, 1), (1, 1))
    layer = conv64(np, channels, 2, (3, 2), stride=(2, 1), padding=(1, 0))
    x = randn(np, 4, channels, 7, 6, seed=3)
    dz = randn(np, 4, 2, 4, 5, seed=4)
    check_against_reference(layer, x, dz, (2, 1), (1, 0))


def test_in_pieces_splits_big_passes_and_keeps_small_ones_whole(monkeypatch):
    monkeypatch.setattr(parallel_module, "NUM_THREADS", 3)
    seen = []

    def record(a, b):
        seen.append((a.shape, b.shape))
        b[...] = 2 * a

    a, b = np.arange(7 * 4.0).reshape(2, 7, 2), np.zeros((2, 7, 2))
    parallel_module.in_pieces(record, a, b)                    # small: one call
    assert seen == [((2, 7, 2), (2, 7, 2))]
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)
    seen.clear()
    b[...] = 0
    parallel_module.in_pieces(record, a, b, axis=1)            # 7 channels: 3 + 3 + 1
    assert sorted(s[0][1] for s in seen) == [1, 3, 3]
    np.testing.assert_array_equal(b, 2 * a)


def test_in_pieces_reraises_a_workers_error(monkeypatch):
    monkeypatch.setattr(parallel_module, "NUM_THREADS", 2)
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)

    def fail_on_first_part(a):
        if a[0, 0] == 0:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        parallel_module.in_pieces(fail_on_first_part, np.arange(8.0).reshape(1, 8))


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


def test_dense_input_grad_false(xp):
    layer = Dense(4, 3, dtype=np.float64)
    x, dy = randn(xp, 5, 4, seed=1), randn(xp, 5, 3, seed=2)
    layer.forward(x)
    dx = layer.backward(dy)
    dw, db = to_np(layer.weight.grad).copy(), to_np(layer.bias.grad).copy()
    layer.zero_grad()
    layer.input_grad = False
    layer.forward(x)
    assert layer.backward(dy) is None
    np.testing.assert_array_equal(to_np(layer.weight.grad), dw)
    np.testing.assert_array_equal(to_np(layer.bias.grad), db)
    assert dx.shape == x.shape


def small_model(dtype=np.float64):
    return Sequential([Conv2D(1, 4, 3, padding=1, dtype=dtype), BatchNorm2D(4, dtype=dtype),
                       ReLU(), MaxPool2D(2), Conv2D(4, 6, 3, padding=1, dtype=dtype), ReLU(),
                       MaxPool2D(2), Flatten(), Dense(6 * 2 * 2, 5, dtype=dtype)])


@pytest.mark.parametrize("first", ["conv", "dense", "relu"])
def test_sequential_backward_without_input_grad(xp, first):
    """Same parameter gradients; None instead of dx; the first layer's switch restored."""
    minidl.manual_seed(0)
    if first == "conv":
        model, x = small_model(), randn(xp, 3, 1, 8, 8, seed=1)
    elif first == "dense":
        model = Sequential([Dense(6, 4, dtype=np.float64), ReLU(), Dense(4, 5, dtype=np.float64)])
        x = randn(xp, 3, 6, seed=1)
    else:
        model = Sequential([ReLU(), Dense(6, 5, dtype=np.float64)])
        x = randn(xp, 3, 6, seed=1)
    dy = randn(xp, 3, 5, seed=2)
    model.forward(x)
    dx = model.backward(dy)
    assert dx.shape == x.shape
    grads = [to_np(p.grad).copy() for p in model.parameters()]
    model.zero_grad()
    model.forward(x)
    assert model.backward(dy, input_grad=False) is None
    for p, g in zip(model.parameters(), grads):
        np.testing.assert_allclose(to_np(p.grad), g, rtol=0, atol=1e-12)
    assert getattr(model[0], "input_grad", True) is True
    model.zero_grad()
    model.forward(x)
    np.testing.assert_allclose(to_np(model.backward(dy)), to_np(dx), atol=1e-12)


def test_trainer_step_still_trains():
    minidl.manual_seed(0)
    model = small_model(np.float32)
    trainer = minidl.Trainer(model, SoftmaxCrossEntropy(),
                             minidl.SGD(model.parameters(), lr=0.05), verbose=0)
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    y = np.arange(8) % 5
    first, _ = trainer.train_step(x, y)
    for _ in range(20):
        loss, _ = trainer.train_step(x, y)
    assert loss < first


# -- layouts: channels-first views flow through BN, ReLU and pooling ---------------------

@pytest.fixture(params=[1, 3], ids=["serial", "3 threads"])
def threads(request, monkeypatch):
    """Run the memory passes serially, or split three ways however small they are."""
    monkeypatch.setattr(parallel_module, "NUM_THREADS", request.param)
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)
    return request.param


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
        np.testing.assert_allclose(to_np(y), y_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(to_np(dx), dx_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_first"])
def test_batchnorm_matches_reference_in_both_layouts(xp, layout, threads):
    n, c, h, w = 3, 5, 3, 4
    if layout == "nchw":
        x = randn(xp, n, c, h, w, seed=1)
    else:
        x = channels_first_view(xp, n, c, h, w, 1)
    bn = BatchNorm2D(c, dtype=np.float64)
    bn.weight.data = randn(xp, c, seed=3)
    bn.bias.data = randn(xp, c, seed=4)
    dy = randn(xp, n, c, h, w, seed=2)
    y = bn.forward(x)
    dx = bn.backward(dy)
    y_ref, dx_ref, dgamma, dbeta, _, _ = batchnorm_train_forward_backward(
        to_np(x), to_np(bn.weight.data), to_np(bn.bias.data), to_np(dy), bn.eps)
    np.testing.assert_allclose(to_np(y), y_ref, atol=1e-10)
    np.testing.assert_allclose(to_np(dx), dx_ref, atol=1e-10)
    np.testing.assert_allclose(to_np(bn.weight.grad), dgamma, atol=1e-10)
    np.testing.assert_allclose(to_np(bn.bias.grad), dbeta, atol=1e-10)


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_eval_and_affine_false_with_threads(xp, threads, affine):
    bn = BatchNorm2D(5, affine=affine, dtype=np.float64)
    bn.running_mean = randn(xp, 5, seed=5)
    bn.running_var = randn(xp, 5, seed=6) ** 2 + 0.5
    x, dy = channels_first_view(xp, 3, 5, 2, 3, 1), randn(xp, 3, 5, 2, 3, seed=2)
    y, dx = to_np(bn.forward(x, training=False)), to_np(bn.backward(dy))
    s = 1 / np.sqrt(to_np(bn.running_var) + bn.eps).reshape(1, 5, 1, 1)
    gamma = to_np(bn.weight.data).reshape(1, 5, 1, 1) if affine else 1.0
    beta = to_np(bn.bias.data).reshape(1, 5, 1, 1) if affine else 0.0
    np.testing.assert_allclose(y, gamma * (to_np(x) - to_np(bn.running_mean).reshape(1, 5, 1, 1))
                               * s + beta, atol=1e-12)
    np.testing.assert_allclose(dx, gamma * s * to_np(dy), atol=1e-12)


def test_relu_with_threads_and_layouts(xp, threads):
    x = channels_first_view(xp, 3, 5, 2, 3, 1)
    relu = ReLU()
    y = relu.forward(x)
    dy = randn(xp, 3, 5, 2, 3, seed=2)
    dx = relu.backward(dy)
    np.testing.assert_array_equal(to_np(y), np.maximum(to_np(x), 0))
    np.testing.assert_array_equal(to_np(dx), to_np(dy) * (to_np(x) > 0))


def test_float32_end_to_end_in_a_training_step():
    """No silent float64: every activation, gradient and parameter stays float32."""
    minidl.manual_seed(0)
    model = mnist_cnn()
    seen = []
    for layer in model:
        layer.register_hook(lambda l, a, b: seen.extend([a, b]), "forward")
        layer.register_hook(lambda l, a, b: seen.extend([a, b]), "backward")
    trainer = minidl.Trainer(model, SoftmaxCrossEntropy(),
                             minidl.SGD(model.parameters(), lr=0.01, momentum=0.9), verbose=0)
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    trainer.train_step(x, np.arange(4))
    assert all(a.dtype == np.float32 for a in seen if a is not None and a.dtype.kind == "f")
    for p in model.parameters():
        assert p.data.dtype == np.float32
    assert all(p.grad is None for p in model.parameters())     # zero_grad after the step


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_threads_work_in_a_forked_child(monkeypatch):
    """A child process inherits the worker pool but not its threads: the split pass must
    still run there (a new pool) instead of waiting forever."""
    import os
    monkeypatch.setattr(parallel_module, "NUM_THREADS", 2)
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)
    a = np.zeros((1, 8))
    parallel_module.in_pieces(lambda part: part.__iadd__(1), a)       # makes the pool
    pid = os.fork()
    if pid == 0:                                                    # the child
        b = np.zeros((1, 8))
        parallel_module.in_pieces(lambda part: part.__iadd__(1), b)
        os._exit(0 if b.sum() == 8 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0 and a.sum() == 8


@pytest.mark.parametrize("timeout, expected", [(None, 1), ("28", 1), ("junk", 1), ("4", 2)])
def test_threads_only_when_openblas_threads_sleep(monkeypatch, timeout, expected):
    """By default the passes stay on one thread unless OPENBLAS_THREAD_TIMEOUT makes
    OpenBLAS's idle threads sleep (else they spin and take the cores)."""
    monkeypatch.setattr(parallel_module, "NUM_THREADS", None)
    monkeypatch.setattr(parallel_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    if timeout is None:
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", timeout)
    assert parallel_module.num_threads() == expected
    monkeypatch.setattr(parallel_module, "NUM_THREADS", 3)
    assert parallel_module.num_threads() == 3
