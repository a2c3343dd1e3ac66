"""Models for the ONNX and PyTorch interop tests: every exportable layer, with odd
kernels, strides, uneven "same" padding, overlapping padded pools, and batch norms
whose statistics are not the initial ones."""
import numpy as np

from minidl import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                    GlobalAvgPool2D, Identity, LeakyReLU, MaxPool2D, ReLU, Sequential,
                    Softmax, Tanh)
from minidl.models import lenet5, mnist_cnn


def every_layer(dtype="float32"):
    """(3, 13, 11) -> 7 classes through every layer type minidl exports."""
    return Sequential([
        # even kernels: "same" pads 0 above, 1 below, 1 left, 2 right
        Conv2D(3, 4, (2, 4), padding="same", activation=LeakyReLU(0.2), dtype=dtype),
        BatchNorm2D(4, dtype=dtype),
        MaxPool2D(3, stride=2, padding=1),                      # overlapping, padded
        Conv2D(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), activation="sigmoid", dtype=dtype),
        AvgPool2D((3, 2), stride=(1, 2), padding=(1, 1)),       # padding in the divisor
        Dropout(0.3), Identity(),
        Conv2D(6, 5, 1, activation="tanh", dtype=dtype), ReLU(), GlobalAvgPool2D(),
        Dense(5, 12, activation="relu", dtype=dtype), BatchNorm1D(12, momentum=None, dtype=dtype),
        Dense(12, 7, bias=False, dtype=dtype), Softmax(),
    ])


def sequence_model():
    """(4, 9) sequences: BatchNorm1D over (N, C, L), Flatten, a non-affine batch norm."""
    return Sequential([BatchNorm1D(4), Tanh(), Flatten(), Dense(36, 10, activation="sigmoid"),
                       BatchNorm1D(10, affine=False, eps=1e-3), Dense(10, 3)])


MODELS = {"cnn": (mnist_cnn, (1, 28, 28)), "lenet5": (lenet5, (1, 28, 28)),
          "every_layer": (every_layer, (3, 13, 11)), "sequence": (sequence_model, (4, 9))}


def build(name, **kwargs):
    """The model ``name`` with random batch-norm statistics, and a batch for it."""
    make, shape = MODELS[name]
    model = make(**kwargs)
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, (BatchNorm1D, BatchNorm2D)):
            c = layer.num_features
            layer.running_mean[...] = rng.normal(size=c)
            layer.running_var[...] = rng.uniform(0.5, 2.0, c)
            layer.num_batches_tracked[...] = 3
            if layer.affine:
                layer.weight.data[...] = rng.normal(size=c)
                layer.bias.data[...] = rng.normal(size=c)
    x = rng.standard_normal((6,) + shape).astype(model.layers[0].dtype or "float32")
    return model, x


def assert_close(actual, expected):
    """Equal within 1e-5 relative, elementwise, or to 1e-5 of the output's scale."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def layer_kinds(model):
    """Each layer's class, with the activation inside a Conv2D or Dense."""
    return [(type(layer).__name__, type(getattr(layer, "activation", None)).__name__)
            for layer in model.layers]
