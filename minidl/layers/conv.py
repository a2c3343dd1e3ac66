"""Conv2D and its transpose, ConvTranspose2D (docs/conv2d.md derives every line here).

Conv2D forward, Eq. [1] (docs/conv2d.md), NCHW, with dilation (d1, d2) and G groups
(filter f reads the C/G input channels of its group, from channel c0(f) = f // (F/G) * C/G):

    Z[n, f, i, j] = b[f] + sum_{c,m,l} W[f, c, m, l] * A_pad[n, c0(f) + c, i*s1 + m*d1, j*s2 + l*d2]
    A = g(Z)

Backward, given dA:

    dZ = dA * g'(Z)                                              Eq. [2]
    dW[f, c, m, l] = sum_{n,i,j} dZ[n, f, i, j] * A_pad[n, c0(f) + c, i*s1 + m*d1, j*s2 + l*d2]
    db[f] = sum_{n,i,j} dZ[n, f, i, j]
    dA_pad = "full" convolution of dZ with W (Eq. [9]);  dA_prev = dA_pad cropped

With the column matrix of im2col.py, cols[(c,m,l), (n,i,j)] = A_pad[n, c, i*s1+m*d1, j*s2+l*d2],
and W2 = W reshaped to (G, F/G, C/G*k1*k2), these become three matrix products (per group):

    Z2 = W2 @ cols,   dW2 = dZ2 @ cols.T,   dcols = W2.T @ dZ2,   dA_pad = col2im(dcols)

ConvTranspose2D swaps them: its forward is Eq. [9] (Y_pad = col2im(W2.T @ X2)), its dX
Eq. [1] on dY_pad, its dW the same correlation with input and output swapped.

conv_products.py computes the products, with the shortcuts that make them fast. The slow,
obvious version, every sum a loop, is tests/reference_conv.py: read it beside this file.
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


class _Convolution(Layer):
    """What Conv2D and ConvTranspose2D share: arguments, He-normal weights (fan_in =
    weight_shape[1]*k1*k2, as PyTorch counts it), the activation, the im2col buffer."""

    input_grad = True
    transposed = False      # ConvTranspose2D: the summary counts s outputs per input

    def __init__(self, in_channels, out_channels, kernel_size, stride, dilation, groups,
                 activation, bias, dtype, max_im2col_bytes):
        super().__init__(backend.float32 if dtype is None else dtype)   # None: as torch
        name = type(self).__name__
        self.in_channels = check_int(in_channels, "in_channels", name, minimum=1)
        self.out_channels = check_int(out_channels, "out_channels", name, minimum=1)
        self.kernel_size = check_pair(kernel_size, "kernel_size", name, minimum=1)
        self.stride = check_pair(stride, "stride", name, minimum=1)
        self.dilation = check_pair(dilation, "dilation", name, minimum=1)
        self.groups = check_int(groups, "groups", name, minimum=1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{name}: in_channels ({self.in_channels}) and out_channels "
                             f"({self.out_channels}) must be divisible by groups ({self.groups})")
        self.max_im2col_bytes = check_int(max_im2col_bytes, "max_im2col_bytes", name, minimum=1)
        self.activation = get_activation(activation, name, self.dtype)
        self.weight = Parameter(self._he_normal(), "weight")
        self.bias = Parameter(backend.zeros((self.out_channels,), self.dtype, self.device),
                              "bias") if check_bool(bias, "bias", name) else None
        self.columns = conv_products.Columns(self.kernel_size, self.stride, self.dilation,
                                             self.groups, self.max_im2col_bytes)

    def _he_normal(self):
        shape = self.weight_shape(self.in_channels, self.out_channels, self.kernel_size,
                                  self.groups)
        check_allocation(shape, "weight", type(self).__name__)
        w = default_rng().standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[1:]))
        return backend.to_device(w.astype(self.dtype), self.device)

    @classmethod
    def state_shapes(cls, config):
        config, name = {"groups": 1, **config}, cls.__name__
        c, f, g = (check_int(config[k], k, name, minimum=1)
                   for k in ("in_channels", "out_channels", "groups"))
        k = check_pair(config["kernel_size"], "kernel_size", name, minimum=1)
        bias = {"bias": (f,)} if config.get("bias", True) else {}
        return {"weight": cls.weight_shape(c, f, k, g)} | bias

    @classmethod
    def weight_shape(cls, c, f, kernel, groups):
        """Conv2D's (F, C/G, k1, k2); ConvTranspose2D's (C_in, C_out/G, k1, k2), as PyTorch."""
        return ((c, f // groups) if cls.transposed else (f, c // groups)) + kernel

    def span(self):
        """(d1*(k1 - 1) + 1, d2*(k2 - 1) + 1): the rows and columns a dilated window covers."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size))

    def w2(self):
        """W2: the weights as (G, filters per group, C/G*k1*k2), one matrix per group."""
        return self.weight.data.reshape(self.groups, -1, math.prod(self.weight.shape[1:]))

    def _checked_channels(self, input_shape):
        name = type(self).__name__
        if len(input_shape) != 4:            # in forward, _as_input has checked this
            raise ValueError(f"{name}: expected a 4-D input (N, C, H, W), "
                             f"got shape {tuple(input_shape)}")
        if input_shape[1] != self.in_channels:
            raise ValueError(f"{name}: expected {self.in_channels} input channels, "
                             f"got input of shape {tuple(input_shape)}")
        return input_shape

    def flops(self, input_shape):
        """2 * C/G*k1*k2 multiply-adds per output of Conv2D (ConvTranspose2D: per input)."""
        output_shape = self.output_shape(input_shape)            # checks the input too
        _, _, h, w = input_shape if self.transposed else output_shape
        return 2 * self.weight.size * h * w

    def _clear_cache(self):
        super()._clear_cache()
        self.columns.clear()

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}")
        for key, default in (("output_padding", (0, 0)), ("dilation", (1, 1)), ("groups", 1)):
            if getattr(self, key, default) != default:
                text += f", {key}={getattr(self, key)}"
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
                "activation": activation_spec(self.activation), "bias": self.bias is not None,
                "dilation": list(self.dilation), "groups": self.groups}


@register_layer
class Conv2D(_Convolution):
    """2-D convolution over NCHW input with F = ``out_channels`` filters.

    ``kernel_size``, ``stride``, ``dilation``: int or (h, w). ``padding``: int, (h, w),
    "valid" or "same" (stride 1). ``groups`` G: G independent blocks of channels (G =
    in_channels = out_channels: depthwise). ``activation``: None, "relu", "sigmoid",
    "tanh", ... or a Layer, applied inside the layer. Weights ``weight`` (F, C/G, k1, k2)
    start He-normal (std sqrt(2 / (C/G*k1*k2))), biases ``bias`` (F,) at zero; seed with
    ``minidl.manual_seed``. The im2col buffer is built in batch chunks of at most
    ``max_im2col_bytes`` and kept between calls.

    ``input_grad = False`` (set by ``Sequential.backward(dy, input_grad=False)`` on its
    first layer, whose input is data) makes ``backward`` compute only dW and db.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, activation=None, bias=True, dtype=backend.float32,
                 max_im2col_bytes=DEFAULT_IM2COL_BYTES):
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups,
                         activation, bias, dtype, max_im2col_bytes)
        self.padding = padding
        self.pads = check_padding(padding, self.span(), self.stride, type(self).__name__)

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
        w2 = self.w2()                                        # W2: (G, F/G, C/G*k1*k2)
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
        dx_pad_t = conv_products.input_grad(self.w2(), dz, x_pad_t.shape, self.columns)  # [9]
        (top, _), (left, _) = self.pads                           # crop the padding
        return dx_pad_t[:, :, top:top + h, left:left + w].transpose(1, 0, 2, 3)

    def output_shape(self, input_shape):
        n, c, h, w = self._checked_channels(input_shape)
        (top, bottom), (left, right) = self.pads
        (k1, k2), hp, wp = self.span(), h + top + bottom, w + left + right
        if k1 > hp or k2 > wp:
            dilated = f", dilation {self.dilation}: spans {(k1, k2)}" if self.dilation != (1, 1) \
                else ""
            raise ValueError(f"{type(self).__name__}: kernel {self.kernel_size} is larger than "
                             f"the padded input ({hp}, {wp}) (input {h}x{w}, padding "
                             f"{self.pads}{dilated})")
        return (n, self.out_channels, conv_output_size(h, k1, self.stride[0], top, bottom),
                conv_output_size(w, k2, self.stride[1], left, right))


@register_layer
class ConvTranspose2D(_Convolution):
    """The transpose of Conv2D, for decoders and upsampling: its forward is Conv2D's dx
    pass, its dx Conv2D's forward (docs/conv2d.md, "ConvTranspose2D is Conv2D's backward").

    Arguments as PyTorch's ``ConvTranspose2d``: ``padding`` (int or (h, w)) crops the
    output; ``output_padding`` (< stride or < dilation) adds to its bottom and right:
    Ho = (H - 1)*s - 2p + d*(k - 1) + output_padding + 1. ``weight`` is (in_channels,
    out_channels // groups, k1, k2); the rest as Conv2D's.
    """

    transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, dilation=1, groups=1, activation=None, bias=True,
                 dtype=backend.float32, max_im2col_bytes=DEFAULT_IM2COL_BYTES):
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups,
                         activation, bias, dtype, max_im2col_bytes)
        name = type(self).__name__
        self.padding = check_pair(padding, "padding", name, minimum=0)
        self.pads = tuple((p, p) for p in self.padding)
        self.output_padding = check_pair(output_padding, "output_padding", name, minimum=0)
        if any(o >= max(s, d) for o, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(f"{name}: output_padding must be smaller than the stride or the "
                             f"dilation, got output_padding={self.output_padding} for "
                             f"stride={self.stride}, dilation={self.dilation}")

    # -- forward: Conv2D's Eq. [9], the input in the place of dZ ------------------
    def forward(self, x, training=True):
        x = self._as_input(x, ndim=4)
        n, f, ho, wo = self.output_shape(x.shape)
        (top, bottom), (left, right) = self.pads
        y_pad_shape = (f, n, ho + top + bottom, wo + left + right)    # Y_pad, channels first
        cols = (f * math.prod(self.kernel_size), x.shape[2] * x.shape[3])   # of one sample
        for what, shape in (("padded output", y_pad_shape), ("im2col columns", cols)):
            check_allocation(shape, f"its {what}", type(self).__name__, x.dtype.itemsize)
        y_pad_t = conv_products.input_grad(self.w2(), x, y_pad_shape, self.columns)
        y_t = y_pad_t[:, :, top:top + ho, left:left + wo]             # crop the padding
        if self.bias is not None:
            y_t += self.bias.data[:, None, None, None]                # + b
        a = self.activation.forward(y_t.transpose(1, 0, 2, 3), training=training)
        self.cache = {"x": x, "y_shape": a.shape}
        return a

    # -- backward: dX is Conv2D's Eq. [1] on dY_pad; dW the correlation, swapped ----
    def backward(self, da):
        """Returns dX, or None when ``input_grad`` is False (the input is data)."""
        x = self._checked_cache(da)["x"]
        n, c, h, w = x.shape
        dy = self.activation.backward(da)
        if self.bias is not None:
            self.bias.accumulate_grad(dy.sum(axis=(0, 2, 3)))                 # db
        dy_pad_t = pad_channels_first(dy, self.pads)                # dY_pad, as (F, N, Hp, Wp)
        dx = None
        if self.input_grad:                                          # dX2 = W2 @ cols(dY_pad)
            dx_t = conv_products.forward(self.w2(), dy_pad_t, self.columns, (h, w))
            dx = dx_t.reshape(c, n, h, w).transpose(1, 0, 2, 3)
        dw2 = conv_products.weight_grad(x, dy_pad_t, self.columns)     # X2 @ cols(dY_pad).T
        self.weight.accumulate_grad(dw2.reshape(self.weight.shape))
        return dx

    def output_shape(self, input_shape):
        n, c, h, w = self._checked_channels(input_shape)
        size = [(i - 1) * s - 2 * p + k + o for i, s, p, k, o in zip(
            (h, w), self.stride, self.padding, self.span(), self.output_padding)]
        if min(h, w) < 1 or min(size) < 1:
            raise ValueError(f"{type(self).__name__}: input {h}x{w} gives an output of "
                             f"{size[0]}x{size[1]} (padding {self.padding}); expected "
                             f"H, W >= 1 for both, got input of shape {tuple(input_shape)}")
        return (n, self.out_channels, size[0], size[1])

    def get_config(self):
        return {**super().get_config(), "output_padding": list(self.output_padding)}
