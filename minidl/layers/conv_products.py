"""Conv2D's three matrix products, done fast (docs/conv2d.md, "Shortcuts the code takes").

conv.py states the products as the equations give them; this module computes them,
with the shortcuts that change how much work is done, never the numbers. Each keeps
its row in docs/performance.md:

* ``Columns`` builds cols into a buffer the layer keeps between calls: a fresh buffer
  of tens of MiB costs page faults on every call, about as much as filling it (the
  conv rows). Built in one piece, cols is kept from forward to backward; past
  ``max_bytes`` it is built in batch chunks, which bounds memory ("C, chunked").
* dcols = W2.T @ dZ2 is written into the used-up cols buffer (the same rows).
* Up to ``SMALL_K`` rows of cols, the backward products run per sample: one product
  over all N*Ho*Wo positions is then thin and memory-bound in OpenBLAS (conv-A and
  the training steps, whose first layer has C*k1*k2 = 9).

The products, with cols (C*k1*k2, N*Ho*Wo) and W2 = W reshaped to (F, C*k1*k2):

    Z2 = W2 @ cols,   dW2 = dZ2 @ cols.T,   dcols = W2.T @ dZ2,   dA_pad = col2im(dcols)
"""
from .. import backend
from .im2col import col2im_add, im2col

# Up to this many rows of cols (C*k1*k2), one product over all positions is thin and
# memory-bound in OpenBLAS: backward runs one small product per sample instead.
SMALL_K = 32


class Columns:
    """The im2col columns of one layer's input: built in batch chunks of at most
    ``max_bytes`` into a buffer kept between calls; the last one built in one piece is
    kept for backward (``kept``)."""

    def __init__(self, kernel, stride, max_bytes):
        self.kernel, self.stride, self.max_bytes = kernel, stride, max_bytes
        self.buffer = None
        self.kept = None        # (x_pad_t, cols) of the last single-chunk build

    def chunks(self, x_pad_t, out_hw):
        """(start, stop) batch ranges whose cols fit in ``max_bytes``."""
        c, n = x_pad_t.shape[:2]
        rows = c * self.kernel[0] * self.kernel[1]
        per_sample = rows * out_hw[0] * out_hw[1] * x_pad_t.dtype.itemsize
        step = max(1, self.max_bytes // max(per_sample, 1))
        return [(n0, min(n0 + step, n)) for n0 in range(0, n, step)]

    def of(self, x_pad_t, n0, n1, out_hw):
        """cols of samples n0..n1: (C*k1*k2, (n1-n0)*Ho*Wo), in the kept buffer."""
        whole = (n0, n1) == (0, x_pad_t.shape[1])
        if whole and self.kept is not None and self.kept[0] is x_pad_t:
            return self.kept[1]
        rows = x_pad_t.shape[0] * self.kernel[0] * self.kernel[1]
        out = self.storage(rows * (n1 - n0) * out_hw[0] * out_hw[1], x_pad_t)
        cols = im2col(x_pad_t[:, n0:n1], self.kernel, self.stride, out_hw, out=out)
        self.kept = (x_pad_t, cols) if whole else None
        return cols

    def storage(self, size, like):
        """The first ``size`` elements of the kept buffer (grown when needed), flat, in
        the dtype and on the device of ``like``."""
        xp, buf = backend.get_array_module(like), self.buffer
        if (buf is None or buf.size < size or buf.dtype != like.dtype
                or backend.get_array_module(buf) is not xp):
            buf = self.buffer = xp.empty(size, dtype=like.dtype)
        return buf[:size]

    def used_up(self):
        """The buffer now holds something else (dcols): cols must be built again."""
        self.kept = None

    def clear(self):
        self.buffer = self.kept = None


def forward(w2, x_pad_t, columns, out_hw):
    """Z2 = W2 @ cols, as (F, N, Ho*Wo): channels first, chunk by chunk."""
    xp = backend.get_array_module(x_pad_t)
    f, n = w2.shape[0], x_pad_t.shape[1]
    z_t = xp.empty((f, n, out_hw[0] * out_hw[1]), dtype=w2.dtype)
    for n0, n1 in columns.chunks(x_pad_t, out_hw):
        xp.matmul(w2, columns.of(x_pad_t, n0, n1, out_hw), out=z_t[:, n0:n1].reshape(f, -1))
    return z_t


def weight_grad(dz, x_pad_t, columns):
    """dW2 = dZ2 @ cols.T, as (F, C*k1*k2), for dZ of shape (N, F, Ho, Wo)."""
    xp = backend.get_array_module(dz)
    n, f, ho, wo = dz.shape
    k = x_pad_t.shape[0] * columns.kernel[0] * columns.kernel[1]
    dw_t = xp.zeros((k, f), dtype=dz.dtype)          # dW2 transposed
    if k <= SMALL_K:
        dz_s = dz.reshape(n, f, ho * wo)             # a view in NCHW or CNHW order
    else:
        dz_t = _channels_first(dz)
    for n0, n1 in columns.chunks(x_pad_t, (ho, wo)):
        cols = columns.of(x_pad_t, n0, n1, (ho, wo))
        if k <= SMALL_K:        # sum over samples of cols_n @ dZ_n.T
            cols_s = cols.reshape(k, n1 - n0, -1).transpose(1, 0, 2)        # (m, k, Ho*Wo)
            dw_t += xp.matmul(cols_s, dz_s[n0:n1].transpose(0, 2, 1)).sum(axis=0)
        else:                   # computed transposed: OpenBLAS runs cols @ dZ2.T faster
            dw_t += cols @ dz_t[:, n0:n1].reshape(f, -1).T
    return dw_t.T


def input_grad(w2, dz, x_pad_t, columns):
    """dA_pad = col2im(W2.T @ dZ2), as (C, N, Hp, Wp), the shape of x_pad_t: Eq. [9]."""
    xp = backend.get_array_module(dz)
    n, f, ho, wo = dz.shape
    k = w2.shape[1]
    dx_pad_t = xp.zeros(x_pad_t.shape, dtype=dz.dtype)
    if k <= SMALL_K:
        dz_s = dz.reshape(n, f, ho * wo)
    else:
        dz_t = _channels_first(dz)
    for n0, n1 in columns.chunks(x_pad_t, (ho, wo)):
        if k <= SMALL_K:        # dcols_n = W2.T @ dZ_n, sample by sample
            dcols = xp.matmul(w2.T, dz_s[n0:n1]).transpose(1, 0, 2)
        else:                   # into the cols buffer: its columns are used up
            columns.used_up()
            out = columns.storage(k * (n1 - n0) * ho * wo, dz).reshape(k, -1)
            dcols = xp.matmul(w2.T, dz_t[:, n0:n1].reshape(f, -1), out=out)
        col2im_add(dcols, dx_pad_t[:, n0:n1], columns.kernel, columns.stride, (ho, wo))
    return dx_pad_t


def _channels_first(dz):
    """dZ (N, F, Ho, Wo) as (F, N, Ho*Wo): a view of a Conv2D output's gradient, else one copy."""
    n, f, ho, wo = dz.shape
    xp = backend.get_array_module(dz)
    return xp.ascontiguousarray(dz.swapaxes(0, 1)).reshape(f, n, ho * wo)
