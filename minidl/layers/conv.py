"""Conv2D: the 2-D convolution layer (docs/conv2d.md derives every line here).

Forward, Eq. [1] of the seed (shared/seed/equations.md, outside this repository;
docs/conv2d.md restates it), NCHW:

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

How they are computed (measured choices, docs/performance.md): cols is written into a
buffer the layer keeps between calls, and backward reuses it for dcols; a row of ones
at the end of cols carries the bias, so [W2 | b] @ [cols; 1] adds it and
[cols; 1] @ dZ2.T gives [dW2 | db] transposed in one product each; when cols has few
rows (a first layer on gray or RGB images), backward runs these products one sample at
a time instead; 1x1 convolutions (stride 1, no padding) use the input itself as cols
and need no col2im.
"""
import math

from .. import backend
from ..checks import check_allocation, check_bool, check_int, check_padding, check_pair
from ..random import default_rng
from .activations import activation_spec, get_activation
from .base import Layer, Parameter
from .im2col import channels_first, col2im_add, conv_output_size, im2col, pad_channels_first

DEFAULT_IM2COL_BYTES = 256 * 2**20
SMALL_K = 32    # up to this many rows of cols, backward runs one product per sample


class Conv2D(Layer):
    """2-D convolution over NCHW input with F = ``out_channels`` filters.

    ``kernel_size``, ``stride``: int or (h, w). ``padding``: int, (h, w), "valid" or
    "same" (stride 1). ``activation``: None, "relu", "sigmoid", "tanh", ... or a Layer,
    applied inside the layer. Weights ``weight`` (F, C, k1, k2) start He-normal
    (std sqrt(2 / (C*k1*k2))), biases ``bias`` (F,) at zero; seed with
    ``minidl.manual_seed``. The im2col buffer is built in batch chunks of at most
    ``max_im2col_bytes`` (plus one row of ones for the bias) and kept between calls.

    ``input_grad``: when False, ``backward`` computes only dW and db and returns None
    (``Sequential.backward(dy, input_grad=False)`` sets it on its first layer, whose
    input is data).
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
        n = x.shape[0]
        ho, wo = self._check_and_output_hw(x.shape)
        f = self.out_channels
        z_t = xp.empty((f, n, ho * wo), dtype=self.dtype)     # Z, channels first
        if self._pointwise():
            # 1x1 kernel, stride 1, no padding: cols is the input itself, (C, N*H*W).
            cols = channels_first(x).reshape(self.in_channels, n * ho * wo)   # N may be 0
            xp.matmul(self.weight.data.reshape(f, -1), cols, out=z_t.reshape(f, -1))
            if self.bias is not None:
                z_t += self.bias.data[:, None, None]
            self.cache = {"x_shape": x.shape, "cols": cols}
        else:
            x_pad_t = pad_channels_first(x, self.pads)
            w2b = self._weight_matrix()                     # [W2 | b]: (F, C*k1*k2 + 1)
            chunks = self._batch_chunks(n, ho * wo)
            for n0, n1 in chunks:
                cols = self._columns(x_pad_t, n0, n1, (ho, wo))
                xp.matmul(w2b, cols, out=z_t[:, n0:n1].reshape(f, -1))   # Z2 = W2 @ cols + b
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
        """Returns dA_prev, or None when ``input_grad`` is False (the input is data).
        ``da`` must have the shape of the last forward's output (ValueError otherwise)."""
        self._checked_cache(da)
        dz = self.activation.backward(da)                        # Eq. [2]
        if self._pointwise():
            return self._pointwise_backward(dz)
        n, c, h, w = self.cache["x_shape"]
        x_pad_t, cols = self.cache["x_pad_t"], self.cache["cols"]
        xp = backend.get_array_module(dz)
        f = self.out_channels
        ho, wo = dz.shape[2:]
        per_sample = self._per_sample_products()
        if per_sample:
            dz_s = dz.reshape(n, f, ho * wo)                     # a view in NCHW or CNHW order
        else:
            dz_t = channels_first(dz).reshape(f, n, ho * wo)    # copies only if needed

        dwb_t = None                  # [dW2 | db] transposed, (C*k1*k2 + 1, F), summed over chunks
        dx_pad_t = xp.zeros((c,) + x_pad_t.shape[1:], dtype=self.dtype) if self.input_grad else None
        chunks = self._batch_chunks(n, ho * wo)
        for n0, n1 in chunks:
            if cols is None or len(chunks) > 1:
                cols = self._columns(x_pad_t, n0, n1, (ho, wo))
            if per_sample:
                part, dcols = self._grad_products_per_sample(cols, dz_s[n0:n1])
            else:
                part, dcols = self._grad_products(cols, dz_t[:, n0:n1].reshape(f, -1))
            if dwb_t is None:
                dwb_t = part
            else:
                dwb_t += part
            if self.input_grad:
                col2im_add(dcols, dx_pad_t[:, n0:n1], self.kernel_size, self.stride, (ho, wo))
        if self.input_grad:
            self.cache["cols"] = None                            # its buffer holds dcols now
        k = c * self.kernel_size[0] * self.kernel_size[1]        # rows of cols without the ones
        if dwb_t is None:             # an empty batch (N = 0) has no chunk: dW and db are 0
            dwb_t = xp.zeros((k + (self.bias is not None), f), dtype=self.dtype)
        self.weight.accumulate_grad(dwb_t[:k].T.reshape(self.weight.shape))       # dW
        if self.bias is not None:
            self.bias.accumulate_grad(dwb_t[k])                                    # db
        if not self.input_grad:
            return None
        (top, _), (left, _) = self.pads                           # crop the padding
        return dx_pad_t[:, :, top:top + h, left:left + w].transpose(1, 0, 2, 3)

    def _grad_products(self, cols, dz2):
        """[dW2 | db] transposed and dcols (or None) for one chunk, cols (C*k1*k2 [+ 1], P)
        and dZ2 (F, P) channels first, each as one product over all P positions."""
        xp = backend.get_array_module(cols)
        k = cols.shape[0] - (self.bias is not None)
        # dW2 = dZ2 @ cols.T and db = dZ2 @ ones, computed transposed as cols @ dZ2.T:
        # the same numbers, and OpenBLAS runs this orientation 10-40% faster.
        part = cols @ dz2.T
        if not self.input_grad:
            return part, None
        w2 = self.weight.data.reshape(self.out_channels, -1)
        # cols is used up: its buffer takes dcols = W2.T @ dZ2 (Eq. [9]).
        dcols = xp.matmul(w2.T, dz2, out=cols[:k])
        return part, dcols

    def _grad_products_per_sample(self, cols, dz_s):
        """The same as _grad_products with one product per sample: dz_s is (m, F, Ho*Wo),
        dZ in whatever memory order it came, so no channels-first copy is needed."""
        xp = backend.get_array_module(cols)
        k = cols.shape[0] - (self.bias is not None)
        m, f, positions = dz_s.shape
        cols_s = cols.reshape(-1, m, positions).transpose(1, 0, 2)     # (m, rows, Ho*Wo)
        part = xp.matmul(cols_s, dz_s.transpose(0, 2, 1)).sum(axis=0)  # sum_n cols_n @ dZ_n.T
        if not self.input_grad:
            return part, None
        w2 = self.weight.data.reshape(f, -1)
        # dcols_n = W2.T @ dZ_n into cols's used-up buffer, laid out (m, k, Ho*Wo);
        # col2im reads it through the (k, m, Ho*Wo) view.
        dcols_s = cols.reshape(-1)[:m * k * positions].reshape(m, k, positions)
        xp.matmul(w2.T, dz_s, out=dcols_s)
        return part, dcols_s.transpose(1, 0, 2)

    def _pointwise_backward(self, dz):
        """The 1x1 / stride 1 / no padding case: three plain products, no col2im."""
        n, c, h, w = self.cache["x_shape"]
        cols = self.cache["cols"]                                 # x as (C, N*H*W)
        f = self.out_channels
        dz2 = channels_first(dz).reshape(f, n * h * w)            # copies only if needed
        self.weight.accumulate_grad((cols @ dz2.T).T.reshape(self.weight.shape))  # dW
        if self.bias is not None:
            self.bias.accumulate_grad(dz2.sum(axis=1))                               # db
        if not self.input_grad:
            return None
        dx_t = self.weight.data.reshape(f, c).T @ dz2             # Eq. [9]: dx = W2.T @ dZ2
        return dx_t.reshape(c, n, h, w).transpose(1, 0, 2, 3)

    # -- the column matrix and its buffer -------------------------------------
    def _per_sample_products(self):
        """True when cols has few rows (C*k1*k2 <= SMALL_K, e.g. a first layer on gray or
        RGB images). One product over all positions is then memory-bound and runs slowly
        in OpenBLAS; one small product per sample runs about 2x faster, straight on dZ
        in NCHW order (docs/performance.md)."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1] <= SMALL_K

    def _pointwise(self):
        return (self.kernel_size == (1, 1) and self.stride == (1, 1)
                and self.pads == ((0, 0), (0, 0)))

    def _weight_matrix(self):
        """W2 = W reshaped to (F, C*k1*k2), with b appended as a last column when there
        is a bias: cols then ends in a row of ones, so one product adds the bias too."""
        w2 = self.weight.data.reshape(self.out_channels, -1)
        if self.bias is None:
            return w2
        xp = backend.get_array_module(w2)
        return xp.concatenate([w2, self.bias.data[:, None]], axis=1)

    def _columns(self, x_pad_t, n0, n1, out_hw):
        """cols of samples n0..n1: (C*k1*k2 [+ 1 row of ones with a bias], (n1-n0)*Ho*Wo).

        It is written into a buffer the layer keeps between calls: a fresh buffer of
        tens of MiB costs page faults on every call, about as much as filling it.
        Backward reuses the same buffer for dcols once cols is used up."""
        xp = backend.get_array_module(x_pad_t)
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        rows = k + (self.bias is not None)
        positions = (n1 - n0) * out_hw[0] * out_hw[1]
        buf = self._buffer
        if (buf is None or buf.size < rows * positions or buf.dtype != self.dtype
                or backend.get_array_module(buf) is not xp):
            buf = self._buffer = xp.empty(rows * positions, dtype=self.dtype)
        cols = buf[:rows * positions].reshape(rows, positions)
        im2col(x_pad_t[:, n0:n1], self.kernel_size, self.stride, out_hw, out=cols[:k])
        if rows > k:
            cols[k] = 1
        return cols

    # -- shapes ---------------------------------------------------------------
    def _check_and_output_hw(self, x_shape):
        name = type(self).__name__
        _, c, h, w = x_shape
        if c != self.in_channels:
            raise ValueError(f"{name}: expected {self.in_channels} input channels, "
                             f"got input of shape {tuple(x_shape)}")
        (top, bottom), (left, right) = self.pads
        k1, k2 = self.kernel_size
        hp, wp = h + top + bottom, w + left + right
        if k1 > hp or k2 > wp:
            raise ValueError(f"{name}: kernel {self.kernel_size} is larger than the padded "
                             f"input ({hp}, {wp}) (input {h}x{w}, padding {self.pads})")
        return (conv_output_size(h, k1, self.stride[0], top, bottom),
                conv_output_size(w, k2, self.stride[1], left, right))

    def output_shape(self, input_shape):
        if len(input_shape) != 4:            # forward checks this in _as_input
            raise ValueError(f"{type(self).__name__}: expected a 4-D input (N, C, H, W), "
                             f"got shape {tuple(input_shape)}")
        ho, wo = self._check_and_output_hw(input_shape)
        return (input_shape[0], self.out_channels, ho, wo)

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
        act = type(self.activation).__name__
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}")
        if act != "Identity":
            text += f", activation={act}"
        if self.bias is None:
            text += ", bias=False"
        return text

    def get_config(self):
        # Not max_im2col_bytes: a memory budget of this machine, not part of the model.
        padding = self.padding.lower() if isinstance(self.padding, str) \
            else [p for p, _ in self.pads]
        return {**super().get_config(), "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": padding,
                "activation": activation_spec(self.activation), "bias": self.bias is not None}
