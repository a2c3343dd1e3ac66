"""The Layer contract shared by every layer: modes, gradients, state, output_shape.

These are the behaviours a PyTorch or Keras user relies on without thinking about
them: ``eval()`` is honoured when a layer is called, asking for a shape does not
disturb a pending backward, a state dict loads entirely or not at all, and a
float32 layer keeps float32 gradients.
"""
import importlib.util
import pathlib

import numpy as np
import pytest

import minidl
from minidl import (BatchNorm2D, Conv2D, Dense, Dropout, Layer, ReLU, Sequential, Sigmoid,
                    Tanh)

from conftest import randn, to_np

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


# -- train() / eval() -------------------------------------------------------------------

def test_calling_a_layer_honours_eval(xp):
    bn = BatchNorm2D(3).eval()
    before = to_np(bn.running_mean).copy()
    bn(randn(xp, 4, 3, 2, 2, seed=1).astype(np.float32) + 5)
    assert not bn.training
    np.testing.assert_array_equal(to_np(bn.running_mean), before)      # no update in eval

    drop = Dropout(0.5).eval()
    x = xp.ones((2, 10), dtype=np.float32)
    np.testing.assert_array_equal(to_np(drop(x)), to_np(x))


def test_a_model_in_eval_mode_runs_in_eval_mode(xp):
    model = Sequential(Dense(4, 8, activation="relu"), Dropout(0.5), Dense(8, 2))
    x = randn(xp, 16, 4, seed=1).astype(np.float32)
    model.eval()
    np.testing.assert_array_equal(to_np(model(x)), to_np(model(x)))    # no dropout noise
    np.testing.assert_array_equal(to_np(model.forward(x)), to_np(model(x)))
    model.train()
    assert not np.array_equal(to_np(model(x)), to_np(model(x)))        # dropout is on again


def test_an_explicit_training_flag_overrides_the_mode(xp):
    drop = Dropout(0.5).eval()
    y = drop(xp.ones((4, 50), dtype=np.float32), training=True)
    assert (to_np(y) == 0).any()


def test_a_training_flag_applies_to_that_call_only(xp):
    model = Sequential(Dense(4, 8), Dropout(0.5), Dense(8, 2))
    seen = []
    model.layers[1].register_hook(lambda layer, x, y: seen.append(layer.training))
    model.predict(xp.ones((3, 4), dtype=np.float32))
    assert seen == [False]                                 # the hook saw the call's flag
    assert model.training and all(layer.training for layer in model)
    drop = Dropout(0.5).eval()
    drop(xp.ones((2, 3), dtype=np.float32), training=True)
    assert not drop.training


# -- output_shape never disturbs a pending backward ---------------------------------------

@pytest.mark.parametrize("make", [ReLU, Sigmoid, Tanh, lambda: minidl.LeakyReLU(0.1)])
def test_output_shape_between_forward_and_backward(xp, make):
    layer, reference = make(), make()
    x = randn(xp, 2, 5, seed=1)
    dy = randn(xp, 2, 5, seed=2)
    layer.forward(x)
    reference.forward(x)
    assert layer.output_shape((7, 3)) == (7, 3)
    np.testing.assert_array_equal(to_np(layer.backward(dy)), to_np(reference.backward(dy)))


class Doubler(Layer):
    """A user layer that keeps the default output_shape (a forward pass on zeros)."""

    def __init__(self):
        super().__init__(dtype=None)
        self.x = None

    def forward(self, x, training=True):
        self.x = self._as_input(x)
        return 2 * self.x

    def backward(self, dy):
        return 2 * dy + 0 * self.x


def test_default_output_shape_leaves_the_cache_alone(xp):
    layer = Doubler()
    x = randn(xp, 2, 3, seed=1)
    layer.forward(x)
    assert layer.output_shape((4, 3)) == (4, 3)
    assert layer.x is not None and layer.x.shape == (2, 3)


def test_default_output_shape_keeps_the_caches_of_layers_it_holds(xp):
    """A layer holding docs/extending.md's layer and a ReLU, with the default
    output_shape: asking for a shape must not replace their caches."""
    spec = importlib.util.spec_from_file_location("custom_layer", EXAMPLES / "custom_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class DepthwiseReLU(Layer):
        def __init__(self):
            super().__init__(dtype=np.float64)
            self.conv = module.DepthwiseConv2D(2, 3, padding=1, dtype=np.float64)
            self.relu = ReLU()

        def forward(self, x, training=True):
            return self.relu.forward(self.conv.forward(x, training))

        def backward(self, dy):
            return self.conv.backward(self.relu.backward(dy))

    layer = DepthwiseReLU()
    x, dy = randn(xp, 2, 2, 5, 5, seed=1), randn(xp, 2, 2, 5, 5, seed=2)
    layer.forward(x)
    dx = layer.backward(dy)
    layer.forward(x)
    assert layer.output_shape((1, 2, 4, 4)) == (1, 2, 4, 4)
    np.testing.assert_array_equal(to_np(layer.backward(dy)), to_np(dx))


def test_summary_between_forward_and_backward_keeps_gradients(xp):
    def build():
        minidl.manual_seed(0)
        return Sequential(Dense(3, 4, activation="sigmoid", dtype=np.float64), Tanh(),
                          Dense(4, 2, dtype=np.float64))
    model, reference = build(), build()
    x, dy = randn(xp, 5, 3, seed=1), randn(xp, 5, 2, seed=2)
    model.forward(x)
    reference.forward(x)
    model.summary((3,), print_fn=None)
    np.testing.assert_allclose(to_np(model.backward(dy)), to_np(reference.backward(dy)))


# -- activations --------------------------------------------------------------------------

def test_one_activation_instance_given_to_two_layers(xp):
    """Each layer gets its own copy, so their caches do not overwrite each other."""
    shared = ReLU()
    minidl.manual_seed(0)
    a = Sequential(Dense(3, 4, activation=shared, dtype=np.float64),
                   Dense(4, 2, activation=shared, dtype=np.float64))
    minidl.manual_seed(0)
    b = Sequential(Dense(3, 4, activation="relu", dtype=np.float64),
                   Dense(4, 2, activation="relu", dtype=np.float64))
    x, dy = randn(xp, 5, 3, seed=1), randn(xp, 5, 2, seed=2)
    a.forward(x)
    b.forward(x)
    np.testing.assert_allclose(to_np(a.backward(dy)), to_np(b.backward(dy)))


@pytest.mark.parametrize("make", [ReLU, Sigmoid, Tanh, minidl.Softmax, minidl.Identity,
                                  lambda: minidl.LeakyReLU(0.1)])
def test_activation_backward_checks_dy(xp, make):
    layer = make()
    name = type(layer).__name__
    with pytest.raises(RuntimeError, match=f"{name}.backward called before forward"):
        layer.backward(xp.ones((2, 3)))
    layer.forward(xp.ones((2, 3)))
    with pytest.raises(ValueError, match=rf"{name}.backward: expected dy of shape \(2, 3\).*"
                                         rf"got \(1, 3\)"):
        layer.backward(xp.ones((1, 3)))
    with pytest.raises(TypeError, match=f"{name}.backward: expected a numpy or cupy array"):
        layer.backward([[1.0, 2.0, 3.0]] * 2)


@pytest.mark.parametrize("make", [ReLU, Sigmoid, minidl.Identity, minidl.Flatten,
                                  lambda: Dense(3, 2), lambda: Dropout(0.5)])
@pytest.mark.parametrize("dtype", [np.int64, np.complex128, bool])
def test_backward_refuses_a_dy_that_is_not_float(xp, make, dtype):
    layer = make()
    name = type(layer).__name__
    y = layer.forward(xp.ones((2, 3)))
    with pytest.raises(TypeError, match=f"{name}.backward: .*dtype"):
        layer.backward(xp.ones(y.shape, dtype=dtype))


@pytest.mark.parametrize("make", [ReLU, minidl.Identity, minidl.Flatten, Sigmoid,
                                  lambda: Dense(3, 2), lambda: Dropout(0.5),
                                  lambda: minidl.Softmax()])
@pytest.mark.parametrize("x", [
    np.ones((2, 3), np.complex64),
    np.array([[1.0, None, 3.0]] * 2, dtype=object),
    np.array([["1", "2", "3"]] * 2),
    np.ones((2, 3), bool),
    np.zeros((2, 3), "datetime64[s]"),
    np.zeros((2, 3), "timedelta64[s]"),
], ids=["complex", "object", "str", "bool", "datetime", "timedelta"])
def test_inputs_that_are_not_real_numbers_are_refused(make, x):
    layer = make()
    with pytest.raises(TypeError, match=f"{type(layer).__name__}: expected an array of real"):
        layer.forward(x)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.float16])
def test_integer_and_half_inputs_are_still_cast(dtype):
    y = Dense(3, 2).forward(np.ones((2, 3), dtype))
    assert y.dtype == np.float32


@pytest.mark.parametrize("make, message", [
    (lambda: Conv2D(10**12, 4, 3), r"Conv2D: weight of shape \(4, 1000000000000, 3, 3\)"),
    (lambda: Dense(10**7, 10**7), r"Dense: weight of shape .* more than this machine"),
    (lambda: BatchNorm2D(10**13), "BatchNorm2D: .* more than this machine"),
])
def test_absurd_sizes_are_refused_before_allocating(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: minidl.LeakyReLU("a"), "LeakyReLU: negative_slope must be a real number"),
    (lambda: minidl.Softmax(axis=None), "Softmax: axis must be an int"),
    (lambda: minidl.Softmax(axis="1"), "Softmax: axis must be an int"),
    (lambda: minidl.Softmax(axis=1.0), "Softmax: axis must be an int"),
    (lambda: Dense(3, 2, bias="False"), "Dense: bias must be True or False"),
    (lambda: Conv2D(1, 2, 3, bias=0), "Conv2D: bias must be True or False"),
])
def test_activation_arguments_are_checked(make, message):
    with pytest.raises(TypeError, match=message):
        make()


# -- gradients keep the parameters' dtype ---------------------------------------------------

@pytest.mark.parametrize("make, shape", [
    (lambda: Conv2D(2, 3, 3, padding=1), (2, 2, 5, 5)),
    (lambda: Dense(4, 3), (2, 4)),
])
def test_float64_dy_gives_float32_parameter_grads(xp, make, shape):
    layer = make()
    y = layer.forward(randn(xp, *shape, seed=1).astype(np.float32))
    layer.backward(randn(xp, *y.shape, seed=2))               # float64 dy
    layer.backward(randn(xp, *y.shape, seed=3))               # accumulates
    for p in layer.parameters():
        assert p.grad.dtype == np.float32


FLOAT32_LAYERS = [   # (make the layer, input shape, training)
    pytest.param(lambda: Conv2D(3, 4, 3, padding=1), (2, 3, 6, 6), True, id="conv"),
    pytest.param(lambda: Dense(4, 3), (2, 4), True, id="dense"),
    pytest.param(lambda: Dense(4, 3, activation="relu"), (2, 4), True, id="dense-relu"),
    pytest.param(lambda: Dense(4, 3, activation="sigmoid"), (2, 4), True, id="dense-sigmoid"),
    pytest.param(lambda: minidl.MaxPool2D(2), (2, 3, 8, 8), True, id="maxpool"),
    pytest.param(lambda: minidl.MaxPool2D(3, 2, 1), (2, 3, 8, 8), True, id="maxpool-padded"),
    pytest.param(lambda: minidl.AvgPool2D(2), (2, 3, 8, 8), True, id="avgpool"),
    pytest.param(lambda: minidl.AvgPool2D(3, 1, 1), (2, 3, 8, 8), True, id="avgpool-padded"),
    pytest.param(minidl.GlobalAvgPool2D, (2, 3, 8, 8), True, id="global-avgpool"),
    pytest.param(ReLU, (2, 3, 4), True, id="relu"),
    pytest.param(lambda: minidl.LeakyReLU(0.1), (2, 3, 4), True, id="leaky_relu"),
    pytest.param(Sigmoid, (2, 3, 4), True, id="sigmoid"),
    pytest.param(Tanh, (2, 3, 4), True, id="tanh"),
    pytest.param(minidl.Softmax, (2, 3, 4), True, id="softmax"),
    pytest.param(lambda: minidl.Softmax(axis=-1), (2, 3, 4), True, id="softmax-last-axis"),
    pytest.param(minidl.Identity, (2, 3, 4), True, id="identity"),
    pytest.param(lambda: BatchNorm2D(2), (3, 2, 3, 2), True, id="batchnorm2d-train"),
    pytest.param(lambda: BatchNorm2D(2), (3, 2, 3, 2), False, id="batchnorm2d-eval"),
    pytest.param(lambda: minidl.BatchNorm1D(3), (5, 3), True, id="batchnorm1d-NC-train"),
    pytest.param(lambda: minidl.BatchNorm1D(3), (4, 3, 2), False, id="batchnorm1d-NCL-eval"),
    pytest.param(lambda: Dropout(0.3), (8, 9), True, id="dropout"),
    pytest.param(minidl.Flatten, (2, 3, 4), True, id="flatten"),
]


@pytest.mark.parametrize("make, shape, training", FLOAT32_LAYERS)
def test_float32_stays_float32(xp, make, shape, training):
    """Outputs, input gradients, parameters, their gradients and buffers: all float32."""
    layer = make()
    x = randn(xp, *shape, dtype=np.float32)
    y = layer.forward(x, training=training)
    dx = layer.backward(xp.ones_like(y))
    assert y.shape == layer.output_shape(shape) and dx.shape == shape
    arrays = [y, dx] + [p.grad for p in layer.parameters()] + list(layer.state_dict().values())
    assert all(a.dtype == np.float32 for a in arrays if a.dtype.kind == "f")
    assert all(p.grad is not None for p in layer.parameters())


# -- state dicts load entirely or not at all -------------------------------------------------

def test_a_bad_entry_leaves_the_layer_untouched():
    bn = BatchNorm2D(3)
    state = bn.state_dict()
    state["weight"] = np.full(3, 7, np.float32)                # fine on its own
    state["running_var"] = np.array(["a", "b", "c"])           # not numbers
    with pytest.raises(ValueError, match=r"'running_var' has dtype <U1"):
        bn.load_state_dict(state)
    np.testing.assert_array_equal(to_np(bn.weight.data), np.ones(3, np.float32))


def test_state_entries_must_be_arrays_of_a_loadable_kind():
    bn = BatchNorm2D(3)
    state = bn.state_dict()
    state["num_batches_tracked"] = 5
    with pytest.raises(TypeError, match="'num_batches_tracked' must be a numpy or cupy array"):
        bn.load_state_dict(state)
    state["num_batches_tracked"] = np.array(2.7)               # a float into an int buffer
    with pytest.raises(ValueError, match="'num_batches_tracked' has dtype float64"):
        bn.load_state_dict(state)
    state["num_batches_tracked"] = np.array(3)
    state["weight"] = np.ones(3, np.complex64)
    with pytest.raises(ValueError, match="'weight' has dtype complex64"):
        bn.load_state_dict(state)


def test_a_model_with_one_bad_layer_is_untouched():
    model = Sequential(Dense(2, 3), Dense(3, 1))
    state = model.state_dict()
    state["0.weight"] = np.zeros((2, 3), np.float32)
    state["1.bias"] = [0.5]
    before = to_np(model.layers[0].weight.data).copy()
    with pytest.raises(TypeError, match=r"layer 1 \(Dense\).*'bias' must be a numpy"):
        model.load_state_dict(state)
    np.testing.assert_array_equal(to_np(model.layers[0].weight.data), before)


def test_loaded_arrays_are_c_contiguous_copies():
    layer = Dense(3, 2)
    weight = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(3, 2))
    layer.load_state_dict({"weight": weight, "bias": np.zeros(2)})
    assert layer.weight.data.flags.c_contiguous and layer.weight.data.dtype == np.float32
    np.testing.assert_array_equal(layer.weight.data, weight)
    weight[0, 0] = 100
    assert layer.weight.data[0, 0] == 0
