"""Conv2D: the 2-D convolution layer (docs/conv2d.md derives every line here).

Forward, Eq. [1] (docs/conv2d.md), NCHW:

    Z[n, f, i, j] = b[f] + sum_{c,m,l} W[f, c, m, l] * A_pad[n, c, i*s1 + m, j*s2 + l]
    A = g(Z)

Backward, given dA:

    dZ = dA * g'(Z)                                              Eq. [2]
    dW[f, c, m, l] = sum_{n,i,j} dZ[n, f, i, j] * A_pad[n, c, i*s1 + m, j*s2 + l]
    db[f] = sum_{n,i,j} dZ[n, f, i, j]
    dA_pad = "full" convolution of dZ with W (Eq. [9]);  dA_prev = dA_pad cropped

With the column matrix of im2col.py, cols[(c,m,l), (n,i,j)] = A_pad[n, c, i*s1+m, j*s2+l],
and W2 = W reshaped to (F, C*k1*k2), these become three matrix products:

    Z2 = W2 @ cols,   dW2 = dZ2 @ cols.T,   dcols = W2.T @ dZ2,   dA_pad = col2im(dcols)

conv_products.py computes them, with the shortcuts that make them fast (the kept cols
buffer, batch chunks, one product per sample for few rows). The slow, obvious version,
every sum a loop, is tests/reference_conv.py: read it beside this file.
"""
import math

from .. import backend
from ..checks import check_allocation, check_bool, check_int, check_padding, check_pair
from ..random import default_rng
from . import conv_products
from .activations import Identity, activation_spec, get_activation
from .base import Layer, Parameter
from .im2col import conv_output_size, pad_channels_first
from .registry import register_layer

DEFAULT_IM2COL_BYTES = 256 * 2**20


@register_layer
class Conv2D(Layer):
    """2-D convolution over NCHW input with F = ``out_channels`` filters.

    ``kernel_size``, ``stride``: int or (h, w). ``padding``: int, (h, w), "valid" or
    "same" (stride 1). ``activation``: None, "relu", "sigmoid", "tanh", ... or a Layer,
    applied inside the layer. Weights ``weight`` (F, C, k1, k2) start He-normal
    (std sqrt(2 / (C*k1*k2))), biases ``bias`` (F,) at zero; seed with
    ``minidl.manual_seed``. The im2col buffer is built in batch chunks of at most
    ``max_im2col_bytes`` and kept between calls. Every sum as a plain loop:
    tests/reference_conv.py.

    ``input_grad = False`` (set by ``Sequential.backward(dy, input_grad=False)`` on its
    first layer, whose input is data) makes ``backward`` compute only dW and db.
    """

    input_grad = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 activation=None, bias=True, dtype=backend.float32,
                 max_im2col_bytes=DEFAULT_IM2COL_BYTES):
        super().__init__(backend.float32 if dtype is None else dtype)   # None: as torch
        name = type(self).__name__
        self.in_channels = check_int(in_channels, "in_channels", name, minimum=1)
        self.out_channels = check_int(out_channels, "out_channels", name, minimum=1)
        self.kernel_size = check_pair(kernel_size, "kernel_size", name, minimum=1)
        self.stride = check_pair(stride, "stride", name, minimum=1)
        self.padding = padding
        self.pads = check_padding(padding, self.kernel_size, self.stride, name)
        self.max_im2col_bytes = check_int(max_im2col_bytes, "max_im2col_bytes", name, minimum=1)
        self.activation = get_activation(activation, name, self.dtype)
        self.weight = Parameter(self._he_normal(), "weight")
        self.bias = Parameter(backend.zeros((self.out_channels,), self.dtype, self.device),
                              "bias") if check_bool(bias, "bias", name) else None
        self.columns = conv_products.Columns(self.kernel_size, self.stride,
                                             self.max_im2col_bytes)   # im2col's buffer

    def _he_normal(self):
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        check_allocation(shape, "weight", type(self).__name__)
        w = default_rng().standard_normal(shape) * math.sqrt(2.0 / fan_in)
        return backend.to_device(w.astype(self.dtype), self.device)

    @classmethod
    def state_shapes(cls, config):
        c, f = (check_int(config[k], k, cls.__name__, minimum=1)
                for k in ("in_channels", "out_channels"))
        k = check_pair(config["kernel_size"], "kernel_size", cls.__name__, minimum=1)
        return {"weight": (f, c) + k} | ({"bias": (f,)} if config.get("bias", True) else {})

    # -- forward: Eq. [1] -----------------------------------------------------
    def forward(self, x, training=True):
        x = self._as_input(x, ndim=4)
        n, f, ho, wo = self.output_shape(x.shape)            # checks C and the kernel fit
        hp, wp = (size + sum(pad) for size, pad in zip(x.shape[2:], self.pads))
        rows = self.in_channels * self.kernel_size[0] * self.kernel_size[1]   # of cols
        chunk = min(n, max(1, self.max_im2col_bytes // (rows * ho * wo * x.dtype.itemsize or 1)))
        for what, shape in (("output", (n, f, ho, wo)), ("padded input", (n, x.shape[1], hp, wp)),
                            ("im2col columns", (rows, chunk * ho * wo))):   # of one chunk
            check_allocation(shape, f"its {what}", "Conv2D", x.dtype.itemsize)
        x_pad_t = pad_channels_first(x, self.pads)            # A_pad, as (C, N, Hp, Wp)
        w2 = self.weight.data.reshape(f, -1)                  # W2: (F, C*k1*k2)
        z_t = conv_products.forward(w2, x_pad_t, self.columns, (ho, wo))   # Z2 = W2 @ cols
        if self.bias is not None:
            z_t += self.bias.data[:, None, None]                         # + b
        z = z_t.reshape(f, n, ho, wo).transpose(1, 0, 2, 3)  # a view in NCHW order
        a = self.activation.forward(z, training=training)    # A = g(Z)
        self.cache = {"x_shape": x.shape, "x_pad_t": x_pad_t, "y_shape": a.shape}
        return a

    # -- backward: Eq. [2], dW, db, Eq. [9] -----------------------------------
    def backward(self, da):
        """Returns dA_prev, or None when ``input_grad`` is False (the input is data)."""
        cache = self._checked_cache(da)
        x_pad_t, (n, c, h, w) = cache["x_pad_t"], cache["x_shape"]
        dz = self.activation.backward(da)                                   # Eq. [2]
        if self.bias is not None:
            self.bias.accumulate_grad(dz.sum(axis=(0, 2, 3)))               # db
        dw2 = conv_products.weight_grad(dz, x_pad_t, self.columns)       # dZ2 @ cols.T
        self.weight.accumulate_grad(dw2.reshape(self.weight.shape))         # dW
        if not self.input_grad:
            return None
        w2 = self.weight.data.reshape(dz.shape[1], -1)
        dx_pad_t = conv_products.input_grad(w2, dz, x_pad_t, self.columns)  # Eq. [9]
        (top, _), (left, _) = self.pads                           # crop the padding
        return dx_pad_t[:, :, top:top + h, left:left + w].transpose(1, 0, 2, 3)

    def output_shape(self, input_shape):
        name = type(self).__name__
        if len(input_shape) != 4:            # in forward, _as_input has checked this
            raise ValueError(f"{name}: expected a 4-D input (N, C, H, W), "
                             f"got shape {tuple(input_shape)}")
        n, c, h, w = input_shape
        if c != self.in_channels:
            raise ValueError(f"{name}: expected {self.in_channels} input channels, "
                             f"got input of shape {tuple(input_shape)}")
        (top, bottom), (left, right) = self.pads
        k1, k2 = self.kernel_size
        hp, wp = h + top + bottom, w + left + right
        if k1 > hp or k2 > wp:
            raise ValueError(f"{name}: kernel {self.kernel_size} is larger than the padded "
                             f"input ({hp}, {wp}) (input {h}x{w}, padding {self.pads})")
        return (n, self.out_channels, conv_output_size(h, k1, self.stride[0], top, bottom),
                conv_output_size(w, k2, self.stride[1], left, right))

    def flops(self, input_shape):
        """2 * C*k1*k2 multiply-adds for each of the F*Ho*Wo outputs of one sample."""
        _, f, ho, wo = self.output_shape(input_shape)
        return 2 * self.in_channels * self.kernel_size[0] * self.kernel_size[1] * f * ho * wo

    def _clear_cache(self):
        super()._clear_cache()
        self.columns.clear()

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}")
        if not isinstance(self.activation, Identity):
            text += f", activation={type(self.activation).__name__}"
        return text + (", bias=False" if self.bias is None else "")

    def get_config(self):
        # Not max_im2col_bytes: a memory budget of this machine, not part of the model.
        padding = self.padding.lower() if isinstance(self.padding, str) \
            else [p for p, _ in self.pads]
        return {**super().get_config(), "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": padding,
                "activation": activation_spec(self.activation), "bias": self.bias is not None}
