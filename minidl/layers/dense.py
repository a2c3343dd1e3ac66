"""Dense: the fully connected layer (docs/layers.md, "Dense").

For a batch x (N, in), weights W (in, out), biases b (out,) and activation g:

    forward:   z = x @ W + b,   y = g(z)
    backward:  dz = dy * g'(z),   dW = x.T @ dz,   db = sum_n dz[n],   dx = dz @ W.T
"""
import math

from .. import backend
from ..checks import check_allocation, check_bool, check_int
from ..random import default_rng
from .activations import Identity, LeakyReLU, ReLU, activation_spec, get_activation
from .base import Layer, Parameter
from .registry import register_layer


@register_layer
class Dense(Layer):
    """y = g(x @ W + b) for x of shape (N, in_features); ``activation`` g is None, a
    name ("relu", "tanh", ...) or a Layer. ``W`` starts He-normal before a (Leaky)ReLU,
    Glorot-uniform otherwise (seed with ``minidl.manual_seed``), ``b`` at zero.

    ``input_grad = False`` (set by ``Sequential.backward(dy, input_grad=False)`` on its
    first layer, whose input is data) makes ``backward`` compute only dW and db.
    """

    input_grad = True
    sees_whole_input = True

    def __init__(self, in_features, out_features, activation=None, bias=True,
                 dtype=backend.float32):
        super().__init__(backend.float32 if dtype is None else dtype)   # None: as torch
        name = type(self).__name__
        self.in_features = check_int(in_features, "in_features", name, minimum=1)
        self.out_features = check_int(out_features, "out_features", name, minimum=1)
        self.activation = get_activation(activation, name, self.dtype)
        self.weight = Parameter(self._initial_weight(), "weight")
        self.bias = Parameter(backend.zeros((self.out_features,), self.dtype, self.device),
                              "bias") if check_bool(bias, "bias", name) else None

    def _initial_weight(self):
        """Drawn on the CPU in float64, then cast and moved: same seed, same weights anywhere."""
        fan_in, fan_out = shape = (self.in_features, self.out_features)
        check_allocation(shape, "weight", type(self).__name__)
        if isinstance(self.activation, (ReLU, LeakyReLU)):   # He-normal keeps ReLU variance
            w = default_rng().standard_normal(shape) * math.sqrt(2.0 / fan_in)
        else:                                                # Glorot-uniform
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            w = default_rng().uniform(-limit, limit, shape)
        return backend.to_device(w.astype(self.dtype), self.device)

    @classmethod
    def state_shapes(cls, config):
        n_in, n_out = (check_int(config[k], k, cls.__name__, minimum=1)
                       for k in ("in_features", "out_features"))
        return {"weight": (n_in, n_out)} | ({"bias": (n_out,)} if config.get("bias", True) else {})

    def forward(self, x, training=True):
        x = self._as_input(x, ndim=2)
        self.output_shape(x.shape)                       # checks in_features
        z = x @ self.weight.data
        if self.bias is not None:
            z += self.bias.data
        y = self.activation.forward(z, training=training)
        self.cache = {"x": x, "y_shape": y.shape}
        return y

    def backward(self, dy):
        x = self._checked_cache(dy)["x"]
        dz = self.activation.backward(dy)
        self.weight.accumulate_grad(x.T @ dz)
        if self.bias is not None:
            self.bias.accumulate_grad(dz.sum(axis=0))
        return dz @ self.weight.data.T if self.input_grad else None

    def output_shape(self, input_shape):
        if len(input_shape) != 2 or input_shape[1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: expected input of shape "
                             f"(N, {self.in_features}), got {tuple(input_shape)}")
        return (input_shape[0], self.out_features)

    def flops(self, input_shape):
        """2 * in_features multiply-adds for each of the out_features outputs of one sample."""
        return 2 * self.in_features * self.out_features

    def extra_repr(self):
        text = f"{self.in_features}, {self.out_features}"
        if not isinstance(self.activation, Identity):
            text += f", activation={type(self.activation).__name__}"
        return text + (", bias=False" if self.bias is None else "")

    def get_config(self):
        return {**super().get_config(), "in_features": self.in_features,
                "out_features": self.out_features,
                "activation": activation_spec(self.activation), "bias": self.bias is not None}
