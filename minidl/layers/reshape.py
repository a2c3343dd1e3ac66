"""Flatten: (N, d1, d2, ...) -> (N, d1*d2*...) (docs/layers.md, "Flatten").

    y = x.reshape(N, d1*d2*...);  dx = dy.reshape(x.shape)

The bridge from convolutional feature maps to Dense layers. The reshape is a view
when x is contiguous and a copy otherwise (e.g. Conv2D's NCHW output view).
"""
import math

from .base import Layer
from .registry import register_layer


@register_layer
class Flatten(Layer):
    """Keep the batch axis, flatten the rest (C, H, W order, as PyTorch's Flatten)."""

    def __init__(self, dtype=None):
        super().__init__(dtype)     # None: no parameters, so no dtype of its own

    def forward(self, x, training=True):
        x = self._as_input(x)
        y_shape = self.output_shape(x.shape)     # checks the rank; not (N, -1): N may be 0
        self.cache = {"x_shape": x.shape, "y_shape": y_shape}
        return x.reshape(y_shape)

    def backward(self, dy):
        x_shape = self._checked_cache(dy)["x_shape"]
        return dy.reshape(x_shape)

    def output_shape(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"Flatten: expected an input of shape (N, ...) with at least "
                             f"2 dimensions, got shape {tuple(input_shape)}")
        return (input_shape[0], math.prod(input_shape[1:]))
