"""Batch normalisation: BatchNorm1D and BatchNorm2D (docs/layers.md, "BatchNorm").

Each channel c is normalised over the m values x_i it has in the batch: the axes
(0,) of an (N, C) input, (0, 2) of (N, C, L), (0, 2, 3) of (N, C, H, W). Per channel:

    mu = 1/m sum_i x_i,   var = 1/m sum_i (x_i - mu)^2          (biased)
    s = 1 / sqrt(var + eps),   x_hat_i = (x_i - mu) s
    y_i = gamma x_hat_i + beta                        (gamma = weight, beta = bias)
    running_mean <- (1 - momentum) running_mean + momentum mu
    running_var  <- (1 - momentum) running_var  + momentum var m / (m - 1)   (unbiased)

Training mode uses the batch's mu and var and updates the running statistics (as
PyTorch); eval mode uses running_mean and running_var instead. Backward, given dy:

    dbeta = sum_i dy_i,   dgamma = sum_i dy_i x_hat_i
    training:  dx_i = gamma s (dy_i - dbeta/m - x_hat_i dgamma/m)   (mu, var depend on x)
    eval:      dx_i = gamma s dy_i                      (running statistics are constants)
"""
from .. import backend
from ..checks import check_allocation, check_bool, check_int, check_real
from .base import Layer, Parameter
from .registry import register_layer
from .parallel import in_pieces


class _BatchNorm(Layer):
    """Batch norm over every axis but 1; subclasses say which input ranks they take
    (``input_ranks``, described by ``input_layout``)."""

    buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features, momentum=0.1, eps=1e-5, affine=True,
                 dtype=backend.float32):
        super().__init__(backend.float32 if dtype is None else dtype)   # None: as torch
        name = type(self).__name__
        self.num_features = check_int(num_features, "num_features", name, minimum=1)
        self.momentum = (None if momentum is None
                         else check_real(momentum, "momentum", name, minimum=0, maximum=1))
        self.eps = check_real(eps, "eps", name, above=0)
        self.affine = check_bool(affine, "affine", name)
        check_allocation((4, num_features), "its 4 per-channel arrays", name)
        c, xp = self.num_features, backend.get_module(self.device)
        self.weight = Parameter(xp.ones((c,), dtype=self.dtype), "weight") if affine else None
        self.bias = Parameter(xp.zeros((c,), dtype=self.dtype), "bias") if affine else None
        self.running_mean = xp.zeros((c,), dtype=self.dtype)
        self.running_var = xp.ones((c,), dtype=self.dtype)
        self.num_batches_tracked = xp.zeros((), dtype="int64")

    @classmethod
    def state_shapes(cls, config):
        c = (check_int(config["num_features"], "num_features", cls.__name__, minimum=1),)
        return ({"weight": c, "bias": c} if config.get("affine", True) else {}) | {
            "running_mean": c, "running_var": c, "num_batches_tracked": ()}

    # -- forward: x_hat = (x - mu) s,  y = gamma x_hat + beta -----------------------
    def forward(self, x, training=True):
        x = self._as_input(x)
        self.output_shape(x.shape)                       # checks rank and C
        xp, (axes, shape) = backend.get_array_module(x), self._per_channel(x.ndim)
        m = x.size // self.num_features
        if training and m < 2:        # also an empty batch (N = 0): no statistics at all
            raise ValueError(f"{type(self).__name__}: training needs more than one value per "
                             f"channel, got {m} per channel (input of shape {tuple(x.shape)}); "
                             f"use eval mode, or a bigger batch")
        if training:
            mu, var = xp.empty(shape, dtype=x.dtype), xp.empty(shape, dtype=x.dtype)
        else:
            mu, var = self.running_mean.reshape(shape), self.running_var.reshape(shape)
        gamma, beta = self._affine(shape, xp)
        # Cache xc = x - mu rather than x_hat = xc * s: backward only needs x_hat folded
        # into per-channel factors, so x_hat is never stored, which saves a full pass.
        xc, y = xp.empty_like(x), xp.empty_like(x)

        def normalise(x, xc, y, mu, var, gamma, beta):   # for a slice of the channels
            if training:
                mu[...] = x.mean(axis=axes, keepdims=True)
            xp.subtract(x, mu, out=xc)
            if training:
                var[...] = _channel_dot(xc, xc).reshape(mu.shape) * (1.0 / m)
            xp.multiply(xc, gamma / xp.sqrt(var + self.eps), out=y)   # gamma x_hat ...
            y += beta                                                  # ... + beta
        # Every channel is independent: slices of channels run in parallel threads.
        in_pieces(normalise, x, xc, y, mu, var, gamma, beta, axis=1)
        if training:
            self._update_running_stats(mu, var, m)
        s = 1.0 / xp.sqrt(var + self.eps)
        self.cache = {"xc": xc, "s": s, "training": training, "y_shape": y.shape}
        return y

    # -- backward: dbeta, dgamma, dx (compact in training, simple in eval) -----------
    def backward(self, dy):
        """With x_hat = xc s, the training formula regrouped per channel:

            dx = gamma s dy - (gamma s dbeta / m) - xc (gamma s^3 sum(dy xc) / m)

        so each full-size array is touched by one multiply and two in-place updates."""
        cache = self._checked_cache(dy)
        xc, s, training = cache["xc"], cache["s"], cache["training"]
        xp, (axes, shape) = backend.get_array_module(dy), self._per_channel(dy.ndim)
        m = dy.size // self.num_features
        gamma, _ = self._affine(shape, xp)
        dbeta, dgamma = xp.empty(shape, dtype=s.dtype), xp.empty(shape, dtype=s.dtype)
        dx = xp.empty_like(dy)

        def gradients(dy, xc, s, gamma, dbeta, dgamma, dx):   # for a slice of the channels
            dbeta[...] = dy.sum(axis=axes, keepdims=True)
            dgamma[...] = _channel_dot(dy, xc).reshape(s.shape) * s       # sum dy x_hat
            gamma_s = gamma * s
            xp.multiply(dy, gamma_s, out=dx)                              # eval: all of dx
            if training:
                dx -= xc * (gamma_s * s * dgamma * (1.0 / m))   # - gamma s x_hat dgamma/m
                dx -= gamma_s * dbeta * (1.0 / m)                # - gamma s dbeta/m
        in_pieces(gradients, dy, xc, s, gamma, dbeta, dgamma, dx, axis=1)
        if self.affine:
            self.weight.accumulate_grad(dgamma.reshape(-1))
            self.bias.accumulate_grad(dbeta.reshape(-1))
        return dx

    def _affine(self, shape, xp):
        """gamma and beta shaped to broadcast; 1 and 0 without affine parameters."""
        if self.affine:
            return self.weight.data.reshape(shape), self.bias.data.reshape(shape)
        return xp.ones(shape, dtype=self.dtype), xp.zeros(shape, dtype=self.dtype)

    def _update_running_stats(self, mu, var, m):
        """PyTorch's update: the unbiased variance goes into running_var."""
        self.num_batches_tracked += 1
        # momentum None: the cumulative moving average
        factor = 1.0 / int(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean *= 1.0 - factor
        self.running_mean += factor * mu.reshape(-1)
        self.running_var *= 1.0 - factor
        self.running_var += (factor * m / (m - 1)) * var.reshape(-1)

    def _per_channel(self, ndim):
        """The axes a channel's statistics run over (all but axis 1), and (1, C, 1, ...),
        the shape of per-channel vectors that broadcast against the input."""
        return (0,) + tuple(range(2, ndim)), (1, self.num_features) + (1,) * (ndim - 2)

    def output_shape(self, input_shape):
        if len(input_shape) not in self.input_ranks or input_shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: expected input of shape {self.input_layout} "
                             f"with C={self.num_features}, got shape {tuple(input_shape)}")
        return tuple(input_shape)

    def extra_repr(self):
        text = f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"
        return text + ("" if self.affine else ", affine=False")

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features,
                "momentum": self.momentum, "eps": self.eps, "affine": self.affine}


@register_layer
class BatchNorm1D(_BatchNorm):
    """Batch norm of (N, C) or (N, C, L) input, per feature C (as torch.nn.BatchNorm1d)."""

    input_ranks = (2, 3)
    input_layout = "(N, C) or (N, C, L)"


@register_layer
class BatchNorm2D(_BatchNorm):
    """Batch norm of (N, C, H, W) input, per channel C (as torch.nn.BatchNorm2d)."""

    input_ranks = (4,)
    input_layout = "(N, C, H, W)"


def _channel_dot(a, b):
    """sum over every axis but 1 of a * b, per channel, without a temporary the size of a
    (einsum reduces as it multiplies: about 3x faster than (a * b).sum here)."""
    letters = "abcdefgh"[:a.ndim]
    return backend.get_array_module(a).einsum(f"{letters},{letters}->b", a, b)

