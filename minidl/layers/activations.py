"""Activation functions as layers (docs/layers.md, "Activations"): elementwise, no
parameters, each caching only what its derivative needs. ``Dense`` and ``Conv2D``
apply the same classes inside themselves (``get_activation``).
"""
import copy

from .. import backend
from ..checks import check_int, check_real
from .base import Layer, layer_spec
from .registry import register_layer
from .parallel import in_pieces


class Activation(Layer):
    """A layer without parameters, hence no dtype of its own: keeps a float input's."""

    def __init__(self, dtype=None):
        super().__init__(dtype)

    def output_shape(self, input_shape):
        return tuple(input_shape)


@register_layer
class ReLU(Activation):
    """y = max(x, 0);  dx = dy * [x > 0].

    Both passes are memory-bound, so on the CPU they run over slices of axis 1 in
    threads (parallel.in_pieces). The output keeps the input's memory order."""

    def forward(self, x, training=True):
        x = self._as_input(x)
        xp = backend.get_array_module(x)
        y, mask = xp.empty_like(x), xp.empty_like(x, dtype=bool)

        def relu(x, y, mask):
            xp.greater(x, 0, out=mask)
            xp.maximum(x, 0, out=y)
        in_pieces(relu, x, y, mask)
        self.cache = {"mask": mask, "y_shape": y.shape}
        return y

    def backward(self, dy):
        mask = self._checked_cache(dy)["mask"]
        xp = backend.get_array_module(dy)
        dx = xp.empty_like(dy)                       # dy * mask keeps dy's dtype
        in_pieces(lambda dy, mask, dx: xp.multiply(dy, mask, out=dx), dy, mask, dx)
        return dx


@register_layer
class LeakyReLU(Activation):
    """y = x if x > 0 else a*x;  dx = dy * (1 if x > 0 else a)."""

    def __init__(self, negative_slope=0.01, dtype=None):
        super().__init__(dtype)
        self.negative_slope = check_real(negative_slope, "negative_slope", "LeakyReLU")

    def forward(self, x, training=True):
        x = self._as_input(x)
        mask = x > 0
        self.cache = {"mask": mask, "y_shape": x.shape}
        return backend.get_array_module(x).where(mask, x, x * x.dtype.type(self.negative_slope))

    def backward(self, dy):
        mask = self._checked_cache(dy)["mask"]
        return backend.get_array_module(dy).where(mask, dy, dy * dy.dtype.type(self.negative_slope))

    def get_config(self):
        return {**super().get_config(), "negative_slope": self.negative_slope}


@register_layer
class Sigmoid(Activation):
    """y = 1 / (1 + exp(-x)), computed without overflow;  dx = dy * y * (1 - y)."""

    def forward(self, x, training=True):
        x = self._as_input(x)
        xp = backend.get_array_module(x)
        e = xp.exp(-xp.abs(x))          # exp of a non-positive number never overflows
        y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
        self.cache = {"y": y, "y_shape": y.shape}
        return y

    def backward(self, dy):
        y = self._checked_cache(dy)["y"]
        return dy * y * (1 - y)


@register_layer
class Tanh(Activation):
    """y = tanh(x);  dx = dy * (1 - y^2)."""

    def forward(self, x, training=True):
        x = self._as_input(x)
        y = backend.get_array_module(x).tanh(x)
        self.cache = {"y": y, "y_shape": y.shape}
        return y

    def backward(self, dy):
        y = self._checked_cache(dy)["y"]
        return dy * (1 - y * y)


@register_layer
class Softmax(Activation):
    """y = exp(x - max) / sum(exp(x - max)) along ``axis``;
    dx = y * (dy - sum(dy * y, axis))."""

    def __init__(self, axis=1, dtype=None):
        super().__init__(dtype)
        self.axis = check_int(axis, "axis", "Softmax")

    def forward(self, x, training=True):
        x = self._as_input(x)
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"Softmax: axis {self.axis} is out of range for a "
                             f"{x.ndim}-D input of shape {tuple(x.shape)}")
        if x.size == 0:               # nothing to normalise (max has no identity): as torch
            y = x.copy()
        else:
            e = backend.get_array_module(x).exp(x - x.max(axis=self.axis, keepdims=True))
            y = e / e.sum(axis=self.axis, keepdims=True)
        self.cache = {"y": y, "y_shape": y.shape}
        return y

    def backward(self, dy):
        y = self._checked_cache(dy)["y"]
        return y * (dy - (dy * y).sum(axis=self.axis, keepdims=True))

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


@register_layer
class Identity(Activation):
    """y = x;  dx = dy: the activation of a layer built with ``activation=None``."""

    def forward(self, x, training=True):
        x = self._as_input(x)
        # Not y itself: holding it would keep a big array alive between steps.
        self.cache = {"y_shape": x.shape}
        return x

    def backward(self, dy):
        self._checked_cache(dy)
        return dy


ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "sigmoid": Sigmoid,
               "tanh": Tanh, "softmax": Softmax, "identity": Identity, "linear": Identity}


def get_activation(activation, owner, dtype):
    """The activation layer for ``activation``: None, a name, or a Layer instance,
    which is copied (two layers given one instance must not share its cache)."""
    if activation is None:
        return Identity(dtype=dtype)
    if isinstance(activation, Layer):
        return copy.deepcopy(activation)
    if isinstance(activation, str) and activation.lower() in ACTIVATIONS:
        return ACTIVATIONS[activation.lower()](dtype=dtype)
    raise ValueError(f"{owner}: activation must be None, a Layer or one of "
                     f"{sorted(ACTIVATIONS)}, got {activation!r}")


def activation_spec(activation):
    """A layer's activation in its config: None for Identity, else the layer's spec."""
    return None if isinstance(activation, Identity) else layer_spec(activation)
