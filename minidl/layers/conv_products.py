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
* A depthwise layer (G = C = F) builds no cols: it adds up W[c, m, l] times the slabs
  of its input, channel by channel ("depthwise").

The products, with cols (C*k1*k2, N*Ho*Wo), rows (c, m, l), seen as (G, C/G*k1*k2, ...)
(each group's rows), and W2 = W as (G, F/G, C/G*k1*k2), one batched product over groups:

    Z2 = W2 @ cols,   dW2 = dZ2 @ cols.T,   dcols = W2.T @ dZ2,   dA_pad = col2im(dcols)
"""
from .. import backend
from .im2col import col2im_add, im2col, slab, window_offsets
from .parallel import in_pieces

# Up to this many rows of cols (C*k1*k2), one product over all positions is thin and
# memory-bound in OpenBLAS: backward runs one small product per sample instead.
SMALL_K = 32
BLOCK_BYTES = 2**20   # a depthwise layer works on blocks of samples of this size (per thread)


class Columns:
    """The im2col columns of one layer's input: built in batch chunks of at most
    ``max_bytes`` into a buffer kept between calls; the last one built in one piece is
    kept for backward (``kept``)."""

    def __init__(self, kernel, stride, dilation, groups, max_bytes):
        self.kernel, self.stride, self.dilation = kernel, stride, dilation
        self.groups, self.max_bytes = groups, max_bytes
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
        cols = im2col(x_pad_t[:, n0:n1], self.kernel, self.stride, out_hw, self.dilation, out)
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
    g, fg = w2.shape[:2]
    if columns.groups == g * fg == x_pad_t.shape[0]:         # depthwise: G = F = C
        return _depthwise_forward(w2, x_pad_t, columns, out_hw)
    z_t = xp.empty((g * fg, x_pad_t.shape[1], out_hw[0] * out_hw[1]), dtype=w2.dtype)
    for n0, n1 in columns.chunks(x_pad_t, out_hw):
        cols = columns.of(x_pad_t, n0, n1, out_hw)
        xp.matmul(w2, cols.reshape(g, -1, cols.shape[1]), out=z_t[:, n0:n1].reshape(g, fg, -1))
    return z_t


def weight_grad(dz, x_pad_t, columns):
    """dW2 = dZ2 @ cols.T, as (G, F/G, C/G*k1*k2), for dZ of shape (N, F, Ho, Wo)."""
    xp = backend.get_array_module(dz)
    n, f, ho, wo = dz.shape
    g, k = columns.groups, x_pad_t.shape[0] * columns.kernel[0] * columns.kernel[1]
    if g == f == x_pad_t.shape[0]:                             # depthwise: G = F = C
        return _depthwise_weight_grad(dz, x_pad_t, columns)
    dw_t = xp.zeros((g, k // g, f // g), dtype=dz.dtype)       # dW2 transposed
    if k <= SMALL_K:
        dz_s = dz.reshape(n, g, f // g, ho * wo)     # a view in NCHW or CNHW order
    else:
        dz_t = _channels_first(dz)
    for n0, n1 in columns.chunks(x_pad_t, (ho, wo)):
        cols = columns.of(x_pad_t, n0, n1, (ho, wo)).reshape(g, k // g, -1)
        if k <= SMALL_K:        # sum over samples of cols_n @ dZ_n.T
            cols_s = cols.reshape(g, k // g, n1 - n0, -1).transpose(2, 0, 1, 3)  # (m, G, ., P)
            dw_t += xp.matmul(cols_s, dz_s[n0:n1].transpose(0, 1, 3, 2)).sum(axis=0)
        else:                   # computed transposed: OpenBLAS runs cols @ dZ2.T faster
            dw_t += xp.matmul(cols, dz_t[:, n0:n1].reshape(g, f // g, -1).transpose(0, 2, 1))
    return dw_t.transpose(0, 2, 1)


def input_grad(w2, dz, pad_shape, columns):
    """dA_pad = col2im(W2.T @ dZ2), as (C, N, Hp, Wp) = ``pad_shape``: Eq. [9]."""
    xp = backend.get_array_module(dz)
    n, f, ho, wo = dz.shape
    dx_pad_t = xp.zeros(pad_shape, dtype=dz.dtype)
    if columns.groups == f == pad_shape[0]:                    # depthwise: G = F = C
        return _depthwise_input_grad(w2, dz, dx_pad_t, columns)
    g, fg, kg = w2.shape
    w2_t = w2.transpose(0, 2, 1)                    # W2.T of each group
    if g * kg <= SMALL_K:
        dz_s = dz.reshape(n, g, fg, ho * wo)
    else:
        dz_t = _channels_first(dz)
    for n0, n1 in columns.chunks(dx_pad_t, (ho, wo)):
        if g * kg <= SMALL_K:   # dcols_n = W2.T @ dZ_n, sample by sample
            dcols = xp.matmul(w2_t, dz_s[n0:n1]).transpose(1, 2, 0, 3)
        else:                   # into the cols buffer: its columns are used up
            columns.used_up()
            out = columns.storage(g * kg * (n1 - n0) * ho * wo, dz).reshape(g, kg, -1)
            dcols = xp.matmul(w2_t, dz_t[:, n0:n1].reshape(g, fg, -1), out=out)
        col2im_add(dcols, dx_pad_t[:, n0:n1], columns.kernel, columns.stride, (ho, wo),
                   columns.dilation)
    return dx_pad_t


# -- depthwise: G = C = F, every sum over channels has one term --------------------------

def _in_blocks(fn, n, *arrays):
    """fn(samples, *arrays) for blocks of the n samples (axis 1), BLOCK_BYTES of the largest
    array each: a block's slabs stay in cache. Each thread takes a share of the channels."""
    def run(*parts):
        step = max(1, BLOCK_BYTES * n // max(max(a.nbytes for a in parts), 1))
        for n0 in range(0, n, step):
            fn(slice(n0, n0 + step), *parts)
    in_pieces(run, *arrays, axis=0)


def _depthwise_forward(w2, x_pad_t, columns, out_hw):
    """Z[c] = sum_{m,l} W[c, m, l] * (slab (m, l) of A_pad[c]), as (C, N, Ho*Wo)."""
    xp = backend.get_array_module(x_pad_t)
    z_t = xp.zeros(x_pad_t.shape[:2] + tuple(out_hw), dtype=w2.dtype)
    w = w2.reshape(len(w2), -1, 1, 1, 1)          # W[c, (m, l)], broadcast over (N, Ho, Wo)

    def add_slabs(b, w, x_pad_t, z_t):
        for k, (m, l) in enumerate(window_offsets(columns.kernel)):
            a_slab = slab(x_pad_t[:, b], m, l, columns.stride, out_hw, columns.dilation)
            z_t[:, b] += w[:, k] * a_slab
    _in_blocks(add_slabs, x_pad_t.shape[1], w, x_pad_t, z_t)
    return z_t.reshape(len(z_t), z_t.shape[1], out_hw[0] * out_hw[1])


def _depthwise_weight_grad(dz, x_pad_t, columns):
    """dW[c, m, l] = sum_{n,i,j} dZ[n, c, i, j] * (slab (m, l) of A_pad[c])."""
    xp = backend.get_array_module(dz)
    dz_t = dz.swapaxes(0, 1)
    dw = xp.zeros((len(dz_t), 1, len(window_offsets(columns.kernel))), dtype=dz.dtype)

    def correlate(b, dz_t, x_pad_t, dw):
        for k, (m, l) in enumerate(window_offsets(columns.kernel)):
            a_slab = slab(x_pad_t[:, b], m, l, columns.stride, dz.shape[2:], columns.dilation)
            dw[:, 0, k] += xp.einsum("cnij,cnij->c", dz_t[:, b], a_slab)
    _in_blocks(correlate, len(dz), dz_t, x_pad_t, dw)
    return dw


def _depthwise_input_grad(w2, dz, dx_pad_t, columns):
    """slab (m, l) of dA_pad[c] += W[c, m, l] * dZ[:, c]: Eq. [9] with one channel."""
    dz_t, w = dz.swapaxes(0, 1), w2.reshape(len(w2), -1, 1, 1, 1)

    def scatter(b, w, dz_t, dx_pad_t):
        for k, (m, l) in enumerate(window_offsets(columns.kernel)):
            dx_slab = slab(dx_pad_t[:, b], m, l, columns.stride, dz.shape[2:], columns.dilation)
            dx_slab += w[:, k] * dz_t[:, b]
    _in_blocks(scatter, len(dz), w, dz_t, dx_pad_t)
    return dx_pad_t


def _channels_first(dz):
    """dZ (N, F, Ho, Wo) as (F, N, Ho*Wo): a view of a Conv2D output's gradient, else one copy."""
    n, f, ho, wo = dz.shape
    xp = backend.get_array_module(dz)
    return xp.ascontiguousarray(dz.swapaxes(0, 1)).reshape(f, n, ho * wo)
