"""Flatten: (N, d1, d2, ...) -> (N, d1*d2*...) (docs/layers.md, "Flatten").

    y = x.reshape(N, -1);  dx = dy.reshape(x.shape)

The bridge from convolutional feature maps to Dense layers. The reshape is a view
when x is contiguous and a copy otherwise (e.g. Conv2D's NCHW output view).
"""
import math

from .base import Layer


class Flatten(Layer):
    """Keep the batch axis, flatten the rest (C, H, W order, as PyTorch's Flatten)."""

    def __init__(self, dtype=None):
        super().__init__(dtype)
        self.cache = None

    def forward(self, x, training=True):
        x = self._as_input(x)
        self._check_rank(x.shape)
        self.cache = {"x_shape": x.shape}
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("Flatten.backward called before forward")
        return dy.reshape(self.cache["x_shape"])

    def _check_rank(self, x_shape):
        if len(x_shape) < 2:
            raise ValueError(f"Flatten: expected an input of shape (N, ...) with at least "
                             f"2 dimensions, got shape {tuple(x_shape)}")

    def output_shape(self, input_shape):
        self._check_rank(input_shape)
        return (input_shape[0], math.prod(input_shape[1:]))

    def _clear_cache(self):
        self.cache = None
