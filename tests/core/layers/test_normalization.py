"""BatchNorm1D / BatchNorm2D: loop reference, gradcheck, PyTorch (running stats, eval),
errors, layouts and threads."""
import re

import numpy
import pytest

import minidl
from minidl import BatchNorm2D

from conftest import channels_first_view, randn, to_np
from reference_layers import batchnorm_train_forward_backward

F64 = numpy.float64


# (layer class, input shape): 2-D, 1-D over (N, C) and 1-D over (N, C, L)
SHAPES = [
    pytest.param(minidl.BatchNorm2D, (3, 2, 3, 2), id="2d"),
    pytest.param(minidl.BatchNorm1D, (5, 3), id="1d-NC"),
    pytest.param(minidl.BatchNorm1D, (4, 3, 2), id="1d-NCL"),
]


def with_random_affine(layer, xp, seed=7):
    """gamma and beta away from 1 and 0, so a swapped or missing term shows."""
    rng = numpy.random.default_rng(seed)
    c = layer.num_features
    layer.weight.data = xp.asarray(rng.uniform(0.5, 2.0, c))
    layer.bias.data = xp.asarray(rng.standard_normal(c))
    return layer


def with_random_running_stats(layer, xp, seed=8):
    rng = numpy.random.default_rng(seed)
    c = layer.num_features
    layer.running_mean = xp.asarray(rng.standard_normal(c))
    layer.running_var = xp.asarray(rng.uniform(0.5, 2.0, c))
    return layer


# -- against the loop reference (1e-10) ------------------------------------------------

@pytest.mark.parametrize("cls, shape", SHAPES)
def test_training_matches_loop_reference(xp, cls, shape):
    bn = with_random_affine(cls(shape[1], dtype=F64), xp)
    x, dy = randn(xp, *shape) * 3 + 1, randn(xp, *shape, seed=1)
    y = bn.forward(x, training=True)
    dx = bn.backward(dy)
    y_ref, dx_ref, dgamma, dbeta, mean, var = batchnorm_train_forward_backward(
        to_np(x), to_np(bn.weight.data), to_np(bn.bias.data), to_np(dy), bn.eps)
    for got, want in [(y, y_ref), (dx, dx_ref), (bn.weight.grad, dgamma), (bn.bias.grad, dbeta)]:
        numpy.testing.assert_allclose(to_np(got), want, rtol=0, atol=1e-10)
    m = x.size // shape[1]                               # running stats after one step
    numpy.testing.assert_allclose(to_np(bn.running_mean), 0.1 * mean, rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(to_np(bn.running_var), 0.9 + 0.1 * var * m / (m - 1),
                                  rtol=0, atol=1e-12)


def test_eval_uses_running_statistics(xp):
    bn = with_random_running_stats(with_random_affine(minidl.BatchNorm2D(2, dtype=F64), xp), xp)
    x, dy = randn(xp, 3, 2, 2, 2), randn(xp, 3, 2, 2, 2, seed=1)
    y, dx = bn.forward(x, training=False), bn.backward(dy)

    def per_channel(a):
        return to_np(a).reshape(1, 2, 1, 1)

    s = 1 / numpy.sqrt(per_channel(bn.running_var) + bn.eps)
    gamma, beta = per_channel(bn.weight.data), per_channel(bn.bias.data)
    expected = gamma * (to_np(x) - per_channel(bn.running_mean)) * s + beta
    numpy.testing.assert_allclose(to_np(y), expected, rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(to_np(dx), gamma * s * to_np(dy), rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == 0                 # eval leaves the stats alone


# -- finite differences ------------------------------------------------------------------

@pytest.mark.parametrize("cls, shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(xp, cls, shape, training):
    bn = with_random_running_stats(with_random_affine(cls(shape[1], dtype=F64), xp), xp)
    # seed=3: gradcheck draws its dy from seed 0, and dy = (x - 0.5)/2 would make dx = 0
    x = randn(xp, *shape, seed=3) * 2 + 0.5
    assert minidl.gradcheck(bn, x, training=training) < 1e-6


def test_gradcheck_without_affine(xp):
    bn = minidl.BatchNorm2D(3, affine=False, dtype=F64)
    assert bn.parameters() == []
    assert minidl.gradcheck(bn, randn(xp, 2, 3, 2, 3, seed=3)) < 1e-6


# -- against PyTorch -----------------------------------------------------------------------

def torch_batchnorm(shape, state, momentum, eps, steps):
    """PyTorch's answers over the steps (x, dy, training) of one BatchNorm layer starting
    from `state`: y, dx, the gradients and the running statistics, stacked over the steps."""
    def compute(torch):
        cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
        layer = cls(shape[1], momentum=momentum, eps=eps).double()
        with torch.no_grad():
            for name, value in state.items():
                getattr(layer, name).copy_(torch.tensor(value))
        answer = {}
        for x, dy, training in steps:
            layer.zero_grad()
            layer.train(training)
            xt = torch.tensor(x, requires_grad=True)
            yt = layer(xt)
            yt.backward(torch.tensor(dy))
            for name, value in [("y", yt), ("dx", xt.grad), ("dweight", layer.weight.grad),
                                ("dbias", layer.bias.grad), ("running_mean", layer.running_mean),
                                ("running_var", layer.running_var),
                                ("num_batches_tracked", layer.num_batches_tracked)]:
                answer.setdefault(name, []).append(value.detach().numpy().copy())
        return {name: numpy.stack(values) for name, values in answer.items()}
    return compute


def state_of(bn):
    """gamma, beta and the running statistics, under torch's names."""
    return {"weight": to_np(bn.weight.data), "bias": to_np(bn.bias.data),
            "running_mean": to_np(bn.running_mean), "running_var": to_np(bn.running_var)}


@pytest.mark.parametrize("cls, shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_matches_torch_over_several_steps_then_eval(xp, cls, shape, momentum, torch_reference):
    ours = with_random_affine(cls(shape[1], momentum=momentum, eps=1e-3, dtype=F64), xp)
    steps = [(randn(xp, *shape, seed=k) * (k + 1) + k, randn(xp, *shape, seed=10 + k), True)
             for k in range(4)]
    steps.append((randn(xp, *shape, seed=20), randn(xp, *shape, seed=21), False))
    theirs = torch_reference(torch_batchnorm(shape, state_of(ours), momentum, 1e-3,
                                             [(to_np(x), to_np(dy), t) for x, dy, t in steps]))
    for k, (x, dy, training) in enumerate(steps):
        ours.zero_grad()
        y, dx = ours.forward(x, training=training), ours.backward(dy)
        pairs = [(y, "y"), (dx, "dx"), (ours.weight.grad, "dweight"), (ours.bias.grad, "dbias"),
                 (ours.running_mean, "running_mean"), (ours.running_var, "running_var")]
        for got, name in pairs:
            numpy.testing.assert_allclose(to_np(got), theirs[name][k], rtol=1e-10,
                                          atol=1e-10, err_msg=f"{name} at step {k}")
        assert int(ours.num_batches_tracked) == int(theirs["num_batches_tracked"][k])


def test_state_dict_has_torch_keys_and_round_trips(xp, torch_reference):
    bn = minidl.BatchNorm2D(3)
    bn.forward(randn(xp, 4, 3, 2, 2, dtype=numpy.float32))
    state = bn.state_dict()
    theirs = torch_reference(
        lambda torch: {"keys": numpy.array(sorted(torch.nn.BatchNorm2d(3).state_dict()))})
    assert sorted(state) == list(theirs["keys"])
    fresh = minidl.BatchNorm2D(3)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        numpy.testing.assert_array_equal(value, state[key])


# -- dtype, shapes, errors --------------------------------------------------------------------

def test_bad_input_is_rejected(xp):
    bn2, bn1 = minidl.BatchNorm2D(3), minidl.BatchNorm1D(4)
    with pytest.raises(ValueError, match=r"BatchNorm2D.*\(N, C, H, W\).*C=3.*\(2, 4, 5, 5\)"):
        bn2.forward(xp.zeros((2, 4, 5, 5), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"BatchNorm2D.*C=3.*\(2, 3\)"):
        bn2.forward(xp.zeros((2, 3), dtype=numpy.float32))
    with pytest.raises(ValueError,
                       match=r"BatchNorm1D.*\(N, C\) or \(N, C, L\).*C=4.*\(2, 4, 1, 1\)"):
        bn1.forward(xp.zeros((2, 4, 1, 1), dtype=numpy.float32))
    with pytest.raises(ValueError, match=r"BatchNorm1D.*more than one value per channel.*\(1, 4\)"):
        bn1.forward(xp.zeros((1, 4), dtype=numpy.float32))
    bn1.forward(xp.zeros((1, 4), dtype=numpy.float32), training=False)   # fine in eval
    with pytest.raises(RuntimeError, match="before forward"):
        minidl.BatchNorm1D(4).backward(xp.zeros((2, 4), dtype=numpy.float32))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="BatchNorm2D.*momentum.*1.5"):
        minidl.BatchNorm2D(3, momentum=1.5)
    with pytest.raises(ValueError, match="BatchNorm1D.*eps"):
        minidl.BatchNorm1D(3, eps=0)
    with pytest.raises(ValueError, match="BatchNorm1D.*num_features"):
        minidl.BatchNorm1D(0)
    assert repr(minidl.BatchNorm2D(3)) == "BatchNorm2D(3, momentum=0.1, eps=1e-05)"


# -- dy is checked; empty batches; constructor arguments ---------------------------------------

@pytest.mark.parametrize("cls, shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_backward_rejects_dy_of_the_wrong_shape(xp, cls, shape, training):
    """A (1, ...) dy failed deep inside numpy ("non-broadcastable output operand")."""
    bn = cls(shape[1])
    bn.forward(randn(xp, *shape, dtype=numpy.float32), training=training)
    name = cls.__name__
    for bad in [(1,) + shape[1:], shape + (1,), shape[:1] + (shape[1] + 1,) + shape[2:]]:
        with pytest.raises(ValueError, match=rf"{name}\.backward: expected dy of shape "
                                             rf"{re.escape(str(shape))}"):
            bn.backward(xp.zeros(bad, dtype=numpy.float32))
    with pytest.raises(TypeError, match=rf"{name}\.backward"):
        bn.backward(to_np(xp.zeros(shape)).tolist())
    assert bn.weight.grad is None
    assert bn.backward(xp.ones(shape, dtype=numpy.float32)).shape == shape


@pytest.mark.parametrize("cls, shape", [(minidl.BatchNorm2D, (0, 3, 4, 4)),
                                        (minidl.BatchNorm1D, (0, 3)),
                                        (minidl.BatchNorm1D, (2, 3, 0))])
def test_no_values_per_channel(xp, cls, shape):
    """Training on no values per channel has no statistics: a ValueError naming the layer,
    the stats untouched. Eval passes the empty batch through, as torch does."""
    bn = with_random_running_stats(with_random_affine(cls(3, dtype=F64), xp), xp)
    before = to_np(bn.running_mean).copy()
    with pytest.raises(ValueError, match=rf"{cls.__name__}: training needs more than one "
                                         r"value per channel, got 0 per channel"):
        bn.forward(xp.zeros(shape), training=True)
    numpy.testing.assert_array_equal(to_np(bn.running_mean), before)
    assert int(bn.num_batches_tracked) == 0
    y = bn.forward(xp.zeros(shape), training=False)
    dx = bn.backward(xp.zeros(shape))
    assert y.shape == dx.shape == shape
    numpy.testing.assert_array_equal(to_np(bn.weight.grad), numpy.zeros(3))
    numpy.testing.assert_array_equal(to_np(bn.bias.grad), numpy.zeros(3))


def test_empty_batch_in_eval_matches_torch(xp, torch_reference):
    bn = with_random_running_stats(with_random_affine(minidl.BatchNorm2D(3, dtype=F64), xp), xp)
    empty = numpy.zeros((0, 3, 2, 2))
    theirs = torch_reference(torch_batchnorm(empty.shape, state_of(bn), 0.1, bn.eps,
                                             [(empty, empty, False)]))
    y = bn.forward(xp.zeros((0, 3, 2, 2)), training=False)
    dx = bn.backward(xp.zeros((0, 3, 2, 2)))
    assert y.shape == theirs["y"][0].shape and dx.shape == theirs["dx"][0].shape
    numpy.testing.assert_array_equal(to_np(bn.weight.grad), theirs["dweight"][0])
    numpy.testing.assert_array_equal(to_np(bn.bias.grad), theirs["dbias"][0])


@pytest.mark.parametrize("cls", [minidl.BatchNorm1D, minidl.BatchNorm2D])
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(eps="abc"), TypeError, r"eps must be a real number, got 'abc'"),
    (dict(eps=None), TypeError, r"eps must be a real number, got None"),
    (dict(eps=True), TypeError, r"eps must be a real number, got True"),
    (dict(eps=0.0), ValueError, r"eps must be a finite number > 0, got 0.0"),
    (dict(eps=-1e-5), ValueError, r"eps must be a finite number > 0"),
    (dict(eps=float("nan")), ValueError, r"eps must be a finite number > 0, got nan"),
    (dict(eps=float("inf")), ValueError, r"eps must be a finite number > 0, got inf"),
    (dict(momentum="0.1"), TypeError, r"momentum must be a real number, got '0.1'"),
    (dict(momentum=False), TypeError, r"momentum must be a real number, got False"),
    (dict(momentum=-0.1), ValueError, r"momentum must be .* >= 0 and <= 1, got -0.1"),
    (dict(momentum=float("nan")), ValueError, r"momentum must be .* <= 1, got nan"),
    (dict(affine="no"), TypeError, r"affine must be True or False, got 'no'"),
    (dict(num_features=10**12), ValueError, r"its 4 per-channel arrays .* more than this machine"),
    (dict(num_features="3"), TypeError, r"num_features must be an int, got '3'"),
    (dict(num_features=3.0), TypeError, r"num_features must be an int, got 3.0"),
    (dict(num_features=-2), ValueError, r"num_features must be >= 1, got -2"),
])
def test_constructor_arguments_are_checked(cls, kwargs, error, message):
    arguments = dict(num_features=3)
    arguments.update(kwargs)
    with pytest.raises(error, match=rf"{cls.__name__}: {message}"):
        cls(**arguments)


def test_good_constructor_arguments_are_kept():
    bn = minidl.BatchNorm1D(numpy.int64(4), momentum=numpy.float32(0.5), eps=1)
    assert (bn.num_features, bn.momentum, bn.eps) == (4, 0.5, 1.0)
    assert type(bn.eps) is float and type(bn.momentum) is float
    assert minidl.BatchNorm2D(2, momentum=None).momentum is None


# -- layouts: channels-first views, serial or in threads -----------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels_first"])
def test_batchnorm_matches_reference_in_both_layouts(xp, layout, threads):
    n, c, h, w = 3, 5, 3, 4
    if layout == "nchw":
        x = randn(xp, n, c, h, w, seed=1)
    else:
        x = channels_first_view(xp, n, c, h, w, 1)
    bn = BatchNorm2D(c, dtype=numpy.float64)
    bn.weight.data = randn(xp, c, seed=3)
    bn.bias.data = randn(xp, c, seed=4)
    dy = randn(xp, n, c, h, w, seed=2)
    y = bn.forward(x)
    dx = bn.backward(dy)
    y_ref, dx_ref, dgamma, dbeta, _, _ = batchnorm_train_forward_backward(
        to_np(x), to_np(bn.weight.data), to_np(bn.bias.data), to_np(dy), bn.eps)
    numpy.testing.assert_allclose(to_np(y), y_ref, atol=1e-10)
    numpy.testing.assert_allclose(to_np(dx), dx_ref, atol=1e-10)
    numpy.testing.assert_allclose(to_np(bn.weight.grad), dgamma, atol=1e-10)
    numpy.testing.assert_allclose(to_np(bn.bias.grad), dbeta, atol=1e-10)


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_eval_and_affine_false_with_threads(xp, threads, affine):
    bn = BatchNorm2D(5, affine=affine, dtype=numpy.float64)
    bn.running_mean = randn(xp, 5, seed=5)
    bn.running_var = randn(xp, 5, seed=6) ** 2 + 0.5
    x, dy = channels_first_view(xp, 3, 5, 2, 3, 1), randn(xp, 3, 5, 2, 3, seed=2)
    y, dx = to_np(bn.forward(x, training=False)), to_np(bn.backward(dy))
    s = 1 / numpy.sqrt(to_np(bn.running_var) + bn.eps).reshape(1, 5, 1, 1)
    gamma = to_np(bn.weight.data).reshape(1, 5, 1, 1) if affine else 1.0
    beta = to_np(bn.bias.data).reshape(1, 5, 1, 1) if affine else 0.0
    numpy.testing.assert_allclose(y, gamma * (to_np(x) - to_np(bn.running_mean).reshape(1, 5, 1, 1))
                               * s + beta, atol=1e-12)
    numpy.testing.assert_allclose(dx, gamma * s * to_np(dy), atol=1e-12)
