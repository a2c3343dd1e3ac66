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

Its speed paths (the kept cols buffer, dcols written into it, SMALL_K) are listed in
docs/conv2d.md, "Shortcuts the code takes", and measured in docs/performance.md.
"""
import math

from .. import backend
from ..checks import check_allocation, check_bool, check_int, check_padding, check_pair
from ..random import default_rng
from .activations import Identity, activation_spec, get_activation
from .base import Layer, Parameter
from .im2col import col2im_add, conv_output_size, im2col, pad_channels_first

DEFAULT_IM2COL_BYTES = 256 * 2**20
# Up to this many rows of cols (C*k1*k2), one product over all positions is thin and
# memory-bound in OpenBLAS: backward runs one small product per sample instead.
SMALL_K = 32


class Conv2D(Layer):
    """2-D convolution over NCHW input with F = ``out_channels`` filters.

    ``kernel_size``, ``stride``: int or (h, w). ``padding``: int, (h, w), "valid" or
    "same" (stride 1). ``activation``: None, "relu", "sigmoid", "tanh", ... or a Layer,
    applied inside the layer. Weights ``weight`` (F, C, k1, k2) start He-normal
    (std sqrt(2 / (C*k1*k2))), biases ``bias`` (F,) at zero; seed with
    ``minidl.manual_seed``. The im2col buffer is built in batch chunks of at most
    ``max_im2col_bytes`` and kept between calls.

    ``input_grad = False`` (set by ``Sequential.backward(dy, input_grad=False)`` on its
    first layer, whose input is data) makes ``backward`` compute only dW and db.
    """

    input_grad = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 activation=None, bias=True, dtype=backend.float32,
                 max_im2col_bytes=DEFAULT_IM2COL_BYTES):
        super().__init__(dtype)
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
        self._buffer = None           # reused storage for cols (and dcols); see _columns

    def _he_normal(self):
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        check_allocation(shape, "weight", type(self).__name__)
        w = default_rng().standard_normal(shape) * math.sqrt(2.0 / fan_in)
        return backend.to_device(w.astype(self.dtype), self.device)

    # -- forward: Eq. [1] -----------------------------------------------------
    def forward(self, x, training=True):
        x = self._as_input(x, ndim=4)
        xp = backend.get_array_module(x)
        n, f, ho, wo = self.output_shape(x.shape)            # checks C and the kernel fit
        z_t = xp.empty((f, n, ho * wo), dtype=self.dtype)     # Z, channels first
        x_pad_t = pad_channels_first(x, self.pads)
        w2 = self.weight.data.reshape(f, -1)
        chunks = self._batch_chunks(n, ho * wo)
        for n0, n1 in chunks:
            cols = self._columns(x_pad_t, n0, n1, (ho, wo))
            xp.matmul(w2, cols, out=z_t[:, n0:n1].reshape(f, -1))    # Z2 = W2 @ cols
        if self.bias is not None:
            z_t += self.bias.data[:, None, None]                     # + b
        # Keep cols for backward when it was built in one piece; else rebuild per chunk
        # (no chunk at all for an empty batch, N = 0).
        self.cache = {"x_shape": x.shape, "x_pad_t": x_pad_t,
                      "cols": cols if len(chunks) == 1 else None}
        z = z_t.reshape(f, n, ho, wo).transpose(1, 0, 2, 3)   # a view in NCHW order
        a = self.activation.forward(z, training=training)
        self.cache["y_shape"] = a.shape                       # backward checks dA against it
        return a

    # -- backward: Eq. [2], dW, db, Eq. [9] -----------------------------------
    def backward(self, da):
        """Returns dA_prev, or None when ``input_grad`` is False (the input is data)."""
        self._checked_cache(da)
        dz = self.activation.backward(da)                        # Eq. [2]
        n, c, h, w = self.cache["x_shape"]
        x_pad_t, cols = self.cache["x_pad_t"], self.cache["cols"]
        xp = backend.get_array_module(dz)
        f, ho, wo = dz.shape[1:]
        k = c * self.kernel_size[0] * self.kernel_size[1]        # rows of cols
        if self.bias is not None:
            self.bias.accumulate_grad(dz.sum(axis=(0, 2, 3)))             # db
        per_sample = k <= SMALL_K                                # few rows: see SMALL_K
        if per_sample:
            dz_s = dz.reshape(n, f, ho * wo)                     # a view in NCHW or CNHW order
        else:
            # (F, N, Ho*Wo): a view of a Conv2D output's gradient, else one copy
            dz_t = xp.ascontiguousarray(dz.swapaxes(0, 1)).reshape(f, n, ho * wo)
        dw_t = xp.zeros((k, f), dtype=self.dtype)                 # dW2 transposed
        dx_pad_t = xp.zeros((c,) + x_pad_t.shape[1:], dtype=self.dtype) if self.input_grad else None
        w2 = self.weight.data.reshape(f, k)
        chunks = self._batch_chunks(n, ho * wo)
        for n0, n1 in chunks:
            if cols is None or len(chunks) > 1:
                cols = self._columns(x_pad_t, n0, n1, (ho, wo))
            if per_sample:
                m = n1 - n0
                cols_s = cols.reshape(k, m, -1).transpose(1, 0, 2)          # (m, k, Ho*Wo)
                dz_m = dz_s[n0:n1]
                dw_t += xp.matmul(cols_s, dz_m.transpose(0, 2, 1)).sum(axis=0)
                if self.input_grad:
                    dcols = xp.matmul(w2.T, dz_m).transpose(1, 0, 2)
            else:
                dz2 = dz_t[:, n0:n1].reshape(f, -1)
                # dW2 = dZ2 @ cols.T, computed transposed: OpenBLAS runs cols @ dZ2.T faster
                dw_t += cols @ dz2.T
                if self.input_grad:                                          # Eq. [9]
                    dcols = xp.matmul(w2.T, dz2, out=cols)   # cols is used up
            if self.input_grad:
                col2im_add(dcols, dx_pad_t[:, n0:n1], self.kernel_size, self.stride, (ho, wo))
        self.weight.accumulate_grad(dw_t.T.reshape(self.weight.shape))       # dW
        if not self.input_grad:
            return None
        self.cache["cols"] = None                                # its buffer may hold dcols now
        (top, _), (left, _) = self.pads                           # crop the padding
        return dx_pad_t[:, :, top:top + h, left:left + w].transpose(1, 0, 2, 3)

    def _columns(self, x_pad_t, n0, n1, out_hw):
        """cols of samples n0..n1: (C*k1*k2, (n1-n0)*Ho*Wo).

        It is written into a buffer the layer keeps between calls: a fresh buffer of
        tens of MiB costs page faults on every call, about as much as filling it."""
        xp = backend.get_array_module(x_pad_t)
        rows = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        size = rows * (n1 - n0) * out_hw[0] * out_hw[1]
        buf = self._buffer
        if (buf is None or buf.size < size or buf.dtype != self.dtype
                or backend.get_array_module(buf) is not xp):
            buf = self._buffer = xp.empty(size, dtype=self.dtype)
        return im2col(x_pad_t[:, n0:n1], self.kernel_size, self.stride, out_hw, out=buf[:size])

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

    def _batch_chunks(self, n, positions):
        """(start, stop) batch ranges whose im2col buffer fits in max_im2col_bytes."""
        c = self.in_channels
        per_sample = c * self.kernel_size[0] * self.kernel_size[1] * positions * self.dtype.itemsize
        step = max(1, self.max_im2col_bytes // max(per_sample, 1))
        return [(n0, min(n0 + step, n)) for n0 in range(0, n, step)]

    def _clear_cache(self):
        super()._clear_cache()
        self._buffer = None

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
