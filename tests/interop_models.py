"""Models for the ONNX and PyTorch interop tests (tests/ext/test_onnx.py,
tests/ext/test_pytorch.py, tests/cli/test_export.py): every exportable layer, with odd
kernels, strides, uneven "same" padding, overlapping padded pools, batch norms whose
statistics are not the initial ones, and the convolution family (dilation, groups,
ConvTranspose2D, ceil_mode, count_include_pad); and ONNX Runtime to run what was exported."""
import importlib.util

import numpy as np
import pytest

from minidl import (AvgPool2D, BatchNorm1D, BatchNorm2D, Concat, Conv2D, ConvTranspose2D, Dense,
                    Dropout, Flatten, GlobalAvgPool2D, Identity, LeakyReLU, MaxPool2D, ReLU,
                    Residual, Sequential, Softmax, Tanh)
from minidl.ext.zoo import lenet5, mnist_cnn, resnet_small


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


def branches_model():
    """(3, 12, 10) -> 5 classes through Concat and Residual nested in each other: branches
    that are one layer (with an activation), a Sequential, a Residual, a pool, an
    Identity; a projection shortcut; a Residual whose block is a Residual (three
    consumers of one tensor); a Concat along the width."""
    return Sequential([
        Conv2D(3, 6, 3, padding=1, activation="relu"),
        Concat([Conv2D(6, 4, 1, activation="relu"),
                Sequential([Conv2D(6, 4, 1, bias=False), BatchNorm2D(4), ReLU(),
                            Conv2D(4, 4, (2, 4), padding="same")]),
                Residual(Sequential([Conv2D(6, 6, 3, padding=1), BatchNorm2D(6)])),
                MaxPool2D(3, stride=1, padding=1)]),                       # 4 + 4 + 6 + 6
        Residual(Concat([Conv2D(20, 8, 3, padding=1), Identity()]),
                 shortcut=Conv2D(20, 28, 1, bias=False)),
        ReLU(),
        Residual(Residual(Sequential([Conv2D(28, 28, 1), Tanh()]))),
        Concat([AvgPool2D(2), MaxPool2D(2)], axis=-1),                     # (28, 6, 10)
        BatchNorm2D(28), GlobalAvgPool2D(), Dense(28, 5),
    ])


def conv_family(dtype="float32"):
    """(4, 13, 12) -> 5 classes through every case of the convolution family: dilation
    (with "same"), groups, depthwise with and without bias, ConvTranspose2D (stride 2,
    padding 1, output_padding 1, dilation 2, groups 2), pools with ceil_mode whose last
    window reaches past the input and the padding, count_include_pad False and True."""
    return Sequential([
        Conv2D(4, 8, 3, padding=2, dilation=2, activation="relu", dtype=dtype),  # (8, 13, 12)
        Conv2D(8, 8, 3, stride=2, padding=1, groups=8, dtype=dtype),            # (8, 7, 6)
        Conv2D(8, 8, 3, padding=1, groups=8, bias=False, dtype=dtype),
        Conv2D(8, 6, 3, padding="same", dilation=(2, 1), groups=2, dtype=dtype),  # (6, 7, 6)
        ConvTranspose2D(6, 4, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2,
                        activation="tanh", dtype=dtype),                        # (4, 16, 14)
        MaxPool2D(3, 2, ceil_mode=True),                                        # (4, 8, 7)
        AvgPool2D(2, 2, 1, ceil_mode=True, count_include_pad=False),            # (4, 5, 4)
        AvgPool2D(3, 2, 1, ceil_mode=True),                                     # (4, 3, 3)
        Flatten(), Dense(4 * 3 * 3, 5, dtype=dtype),
    ])


MODELS = {"cnn": (mnist_cnn, (1, 28, 28)), "lenet5": (lenet5, (1, 28, 28)),
          "every_layer": (every_layer, (3, 13, 11)), "sequence": (sequence_model, (4, 9)),
          "resnet": (resnet_small, (1, 28, 28)), "branches": (branches_model, (3, 12, 10)),
          "conv_family": (conv_family, (4, 13, 12))}


def build(name, **kwargs):
    """The model ``name`` with random batch-norm statistics, and a batch for it."""
    make, shape = MODELS[name]
    model = make(**kwargs)
    rng = np.random.default_rng(7)
    for layer in inner_layers(model):
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


def inner_layers(layer):
    """``layer`` and every layer inside it, depth first."""
    inner = getattr(layer, "layers", None) or getattr(layer, "branches", [])
    return [layer] + [x for child in inner for x in inner_layers(child)]


def assert_close(actual, expected):
    """Equal within 1e-5 relative, elementwise, or to 1e-5 of the output's scale."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def layer_kinds(model):
    """Each layer's class, with the activation inside a Conv2D or Dense, or with the
    kinds of its branches; a list for a Sequential."""
    if isinstance(model, Sequential):
        return [layer_kinds(layer) for layer in model.layers]
    if isinstance(model, (Residual, Concat)):
        return (type(model).__name__, [layer_kinds(branch) for branch in model.branches])
    return (type(model).__name__, type(getattr(model, "activation", None)).__name__)


HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx or onnxruntime is not installed: "
                                "pip install 'minidl[onnx]'")


def run_onnx(path, x):
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(np.float32)})[0]
