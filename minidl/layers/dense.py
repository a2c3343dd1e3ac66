"""Dense: the fully connected layer (docs/layers.md, "Dense").

Forward, for a batch x (N, in) with weights W (in, out) and biases b (out,):

    z = x @ W + b
    y = g(z)

Backward, given dy = dL/dy:

    dz = dy * g'(z)          (the activation layer's backward)
    dW = x.T @ dz            (sum over the batch of outer products x[n] dz[n])
    db = sum_n dz[n]
    dx = dz @ W.T
"""
import math

from .. import backend
from ..checks import check_allocation, check_bool, check_int
from ..random import default_rng
from .activations import LeakyReLU, ReLU, activation_spec, get_activation
from .base import Layer, Parameter


class Dense(Layer):
    """y = g(x @ W + b) for x of shape (N, in_features).

    ``activation``: None, "relu", "sigmoid", "tanh", ... or a Layer, applied inside
    the layer. ``weight`` (in_features, out_features) starts He-normal (std
    sqrt(2 / in)) before a ReLU or LeakyReLU, Glorot-uniform (limit sqrt(6 / (in +
    out))) otherwise; ``bias`` (out_features,) starts at zero. Seed with
    ``minidl.manual_seed``.

    ``input_grad``: when False, ``backward`` computes only dW and db and returns None
    (``Sequential.backward(dy, input_grad=False)`` sets it on its first layer).
    """

    input_grad = True
    sees_whole_input = True

    def __init__(self, in_features, out_features, activation=None, bias=True,
                 dtype=backend.float32):
        super().__init__(dtype)
        name = type(self).__name__
        self.in_features = check_int(in_features, "in_features", name, minimum=1)
        self.out_features = check_int(out_features, "out_features", name, minimum=1)
        self.activation = get_activation(activation, name, self.dtype)
        self.weight = Parameter(self._initial_weight(), "weight")
        self.bias = Parameter(backend.zeros((self.out_features,), self.dtype, self.device),
                              "bias") if check_bool(bias, "bias", name) else None

    def _initial_weight(self):
        """Drawn on the CPU in float64, then cast and moved: same seed, same weights anywhere."""
        fan_in, fan_out = self.in_features, self.out_features
        shape = (fan_in, fan_out)
        check_allocation(shape, "weight", type(self).__name__)
        if isinstance(self.activation, (ReLU, LeakyReLU)):   # He-normal keeps ReLU variance
            w = default_rng().standard_normal(shape) * math.sqrt(2.0 / fan_in)
        else:                                                # Glorot-uniform
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            w = default_rng().uniform(-limit, limit, shape)
        return backend.to_device(w.astype(self.dtype), self.device)

    # -- forward: z = x @ W + b, y = g(z) --------------------------------------
    def forward(self, x, training=True):
        x = self._as_input(x, ndim=2)
        self._check_features(x.shape)
        z = x @ self.weight.data
        if self.bias is not None:
            z += self.bias.data
        y = self.activation.forward(z, training=training)
        self.cache = {"x": x, "y_shape": y.shape}     # backward checks dy against it
        return y

    # -- backward: dz, dW, db, dx ----------------------------------------------
    def backward(self, dy):
        """``dy`` must have the shape of the last forward's output, (N, out_features)."""
        x = self._checked_cache(dy)["x"]
        dz = self.activation.backward(dy)
        self.weight.accumulate_grad(x.T @ dz)
        if self.bias is not None:
            self.bias.accumulate_grad(dz.sum(axis=0))
        if not self.input_grad:
            return None
        return dz @ self.weight.data.T

    # -- shapes ----------------------------------------------------------------
    def _check_features(self, x_shape):
        if len(x_shape) != 2 or x_shape[1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: expected input of shape "
                             f"(N, {self.in_features}), got {tuple(x_shape)}")

    def output_shape(self, input_shape):
        self._check_features(input_shape)
        return (input_shape[0], self.out_features)

    def flops(self, input_shape):
        """2 * in_features multiply-adds for each of the out_features outputs of one sample."""
        return 2 * self.in_features * self.out_features

    def extra_repr(self):
        text = f"{self.in_features}, {self.out_features}"
        act = type(self.activation).__name__
        if act != "Identity":
            text += f", activation={act}"
        if self.bias is None:
            text += ", bias=False"
        return text

    def get_config(self):
        return {**super().get_config(), "in_features": self.in_features,
                "out_features": self.out_features,
                "activation": activation_spec(self.activation), "bias": self.bias is not None}
