"""The Layer contract shared by every layer (minidl/layers/base.py): modes, gradients,
state, output_shape, hooks.

These are the behaviours a PyTorch or Keras user relies on without thinking about
them: ``eval()`` is honoured when a layer is called, asking for a shape does not
disturb a pending backward, a state dict loads entirely or not at all, a float32
layer keeps float32 gradients, and hooks see each layer's input and output (and dy,
dx) in order."""
import importlib.util
import pathlib

import numpy as np
import pytest

import minidl
from minidl import (BatchNorm2D, Conv2D, Dense, Dropout, Layer, ReLU,
                    Sequential, Sigmoid, SoftmaxCrossEntropy, Tanh)

from conftest import randn, small_batch, small_model, to_np

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "examples"


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
    # the module name tests/test_examples.py gives it: its layer class registers as one
    spec = importlib.util.spec_from_file_location("example_custom_layer",
                                                  EXAMPLES / "custom_layer.py")
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


# -- inputs and dy must be real numbers ----------------------------------------------------
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


# -- hooks ---------------------------------------------------------------------------------
def test_forward_hook_gets_layer_input_and_output_and_can_be_removed():
    layer = Dense(3, 2)
    calls = []
    remove = layer.register_hook(lambda lay, x, y: calls.append((lay, x, y)))
    x = np.ones((4, 3), np.float32)
    y = layer(x)
    assert len(calls) == 1
    assert calls[0][0] is layer and calls[0][1] is x and calls[0][2] is y
    remove()
    layer(x)
    assert len(calls) == 1
    remove()                                   # a second call is harmless
    assert layer.forward_hooks == []


def test_hooks_fire_in_forward_order_then_reverse_with_dy_and_dx():
    model = small_model()
    x, y = small_batch()
    events = []
    for i, layer in enumerate(model):
        layer.register_hook(lambda lay, a, b, i=i: events.append(("fwd", i, a, b)))
        layer.register_hook(lambda lay, dy, dx, i=i: events.append(("bwd", i, dy, dx)),
                            kind="backward")
    logits = model.forward(x)
    loss = SoftmaxCrossEntropy()
    loss(logits, y)
    dlogits = loss.backward()
    dx = model.backward(dlogits)
    n = len(model)
    assert [(kind, i) for kind, i, *_ in events] == (
        [("fwd", i) for i in range(n)] + [("bwd", i) for i in reversed(range(n))])
    fwd, bwd = events[:n], events[n:]
    assert fwd[0][2] is x and fwd[-1][3] is logits
    for (_, _, _, out), (_, _, inp, _) in zip(fwd, fwd[1:]):
        assert inp is out                      # each layer's input is the last one's output
    assert bwd[0][2] is dlogits and bwd[-1][3] is dx
    for (_, _, _, dx_later), (_, _, dy_earlier, _) in zip(bwd, bwd[1:]):
        assert dy_earlier is dx_later          # dL/dx of layer i+1 is dL/dy of layer i
    for _, i, dy, dxi in bwd:                  # shapes: dy like the output, dx like the input
        assert dy.shape == fwd[i][3].shape and dxi.shape == fwd[i][2].shape


def test_backward_hook_dx_is_what_backward_returns():
    layer = ReLU()
    seen = []
    layer.register_hook(lambda lay, dy, dx: seen.append((dy, dx)), kind="backward")
    x = np.array([[-1.0, 2.0, 0.5]], np.float32)
    layer(x)
    dy = np.array([[3.0, 4.0, 5.0]], np.float32)
    dx = layer.backward_with_hooks(dy)
    assert seen[0][0] is dy and seen[0][1] is dx
    np.testing.assert_array_equal(dx, [[0.0, 4.0, 5.0]])


def test_plain_forward_and_backward_bypass_hooks():
    """Hooks belong to __call__ and backward_with_hooks (what Sequential calls)."""
    layer = ReLU()
    calls = []
    layer.register_hook(lambda *a: calls.append(a))
    layer.register_hook(lambda *a: calls.append(a), kind="backward")
    layer.backward(layer.forward(np.ones((1, 2), np.float32)))
    assert calls == []


def test_register_hook_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'forward' or 'backward'"):
        ReLU().register_hook(print, kind="both")
