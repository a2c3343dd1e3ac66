"""im2col / col2im: turn a sliding-window operation into one matrix product.

Layout (see docs/conv2d.md, "Layout"): the column matrix of an input x (N, C, H, W)
is ``cols`` of shape (C*k1*k2, N*Ho*Wo), row (c, m, l), column (n, i, j):

    cols[(c, m, l), (n, i, j)] = x_pad[n, c, i*s1 + m, j*s2 + l]

Channels-first ("CNHW") ordering makes both big products of Conv2D run on
contiguous operands: Z = W2 @ cols and dcols = W2.T @ dZ2. Both functions loop
only over the k1*k2 kernel offsets, copying (or adding) one strided slab each.
"""
from .. import backend


def conv_output_size(size, k, s, pad_before, pad_after):
    """floor((size + pads - k) / s) + 1: the number of window positions."""
    return (size + pad_before + pad_after - k) // s + 1


def pad_channels_first(x, pads):
    """x (N, C, H, W) -> zero-padded x_pad_t (C, N, H + top + bottom, W + left + right).

    ``pads`` is ((top, bottom), (left, right)). With no padding this is a transposed
    view (no copy); slices of it are all im2col needs.
    """
    (top, bottom), (left, right) = pads
    n, c, h, w = x.shape
    x_t = x.transpose(1, 0, 2, 3)
    if top == bottom == left == right == 0:
        return x_t
    xp = backend.get_array_module(x)
    x_pad_t = xp.zeros((c, n, h + top + bottom, w + left + right), dtype=x.dtype)
    x_pad_t[:, :, top:top + h, left:left + w] = x_t
    return x_pad_t


def im2col(x_pad_t, kernel, stride, out_hw, out=None):
    """Column matrix (C*k1*k2, N*Ho*Wo) of a padded, channels-first input (C, N, Hp, Wp).

    ``out`` may be a reusable buffer of shape (C, k1, k2, N, Ho, Wo).
    """
    xp = backend.get_array_module(x_pad_t)
    c, n = x_pad_t.shape[:2]
    (k1, k2), (s1, s2), (ho, wo) = kernel, stride, out_hw
    if out is None:
        out = xp.empty((c, k1, k2, n, ho, wo), dtype=x_pad_t.dtype)
    for m in range(k1):
        for l in range(k2):
            out[:, m, l] = x_pad_t[:, :, m:m + s1 * (ho - 1) + 1:s1, l:l + s2 * (wo - 1) + 1:s2]
    return out.reshape(c * k1 * k2, n * ho * wo)


def col2im_add(dcols, dx_pad_t, kernel, stride, out_hw):
    """The adjoint of im2col: add each column entry back where it was read from.

    dcols (C*k1*k2, N*Ho*Wo) is scattered into dx_pad_t (C, N, Hp, Wp) in place; windows
    that overlap (stride < kernel) add up, which is Eq. [9] of the seed.
    """
    c, n = dx_pad_t.shape[:2]
    (k1, k2), (s1, s2), (ho, wo) = kernel, stride, out_hw
    dcols = dcols.reshape(c, k1, k2, n, ho, wo)
    for m in range(k1):
        for l in range(k2):
            dx_pad_t[:, :, m:m + s1 * (ho - 1) + 1:s1, l:l + s2 * (wo - 1) + 1:s2] += dcols[:, m, l]
    return dx_pad_t
