"""Sliding windows as strided views: the output size, the slab of one window offset,
and im2col / col2im, which turn a convolution into one matrix product.

The column matrix of an input x (N, C, H, W) is ``cols`` of shape (C*k1*k2, N*Ho*Wo),
row (c, m, l), column (n, i, j), with dilation (d1, d2) (1: a dense window):

    cols[(c, m, l), (n, i, j)] = x_pad[n, c, i*s1 + m*d1, j*s2 + l*d2]

x_pad is kept channels first, (C, N, Hp, Wp), so that both big products of Conv2D run
on contiguous operands (docs/conv2d.md, "Layout"). im2col and col2im_add loop only over
the k1*k2 kernel offsets, copying (or adding) one slab each, in threads on the CPU.
"""
from .. import backend
from .parallel import in_pieces, num_threads


def conv_output_size(size, k, s, pad_before, pad_after):
    """floor((size + pads - k) / s) + 1 window positions (k: a dilated window's span)."""
    return (size + pad_before + pad_after - k) // s + 1


def window_offsets(kernel):
    """The kernel offsets (m, l) in row-major order (the order pooling breaks ties in)."""
    return [(m, l) for m in range(kernel[0]) for l in range(kernel[1])]


def slab(a, m, l, stride, out_hw, dilation=(1, 1)):
    """a[..., i*s1 + m*d1, j*s2 + l*d2] for every output position (i, j): a strided view
    holding element (m, l) of every window at once (windows run over a's last two axes)."""
    (s1, s2), (ho, wo), (r, q) = stride, out_hw, (m * dilation[0], l * dilation[1])
    return a[..., r:r + s1 * (ho - 1) + 1:s1, q:q + s2 * (wo - 1) + 1:s2]


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
    x_pad_t = backend.get_array_module(x).zeros((c, n, h + top + bottom, w + left + right), x.dtype)
    x_pad_t[:, :, top:top + h, left:left + w] = x_t      # (xp.pad is ~30% slower here)
    return x_pad_t


def im2col(x_pad_t, kernel, stride, out_hw, dilation=(1, 1), out=None):
    """Column matrix (C*k1*k2, N*Ho*Wo) of a padded, channels-first input (C, N, Hp, Wp).

    ``out`` may be a reusable contiguous buffer of C*k1*k2*N*Ho*Wo elements, of any
    shape; the result is a view of it.
    """
    xp = backend.get_array_module(x_pad_t)
    c, n = x_pad_t.shape[:2]
    (k1, k2), (ho, wo) = kernel, out_hw
    if out is None:
        out = xp.empty((c, k1, k2, n, ho, wo), dtype=x_pad_t.dtype)
    out6 = out.reshape(c, k1, k2, n, ho, wo)

    def copy_slabs(x_pad_t, out):
        for m, l in window_offsets(kernel):
            out[:, m, l] = slab(x_pad_t, m, l, stride, out_hw, dilation)
    in_pieces(copy_slabs, x_pad_t, out6, axis=_split_axes(c))
    return out6.reshape(c * k1 * k2, n * ho * wo)


def col2im_add(dcols, dx_pad_t, kernel, stride, out_hw, dilation=(1, 1)):
    """The adjoint of im2col: add each column entry back where it was read from.

    dcols (C*k1*k2, N*Ho*Wo) is scattered into dx_pad_t (C, N, Hp, Wp) in place; windows
    that overlap (stride < kernel) add up, which is Eq. [9] (docs/conv2d.md).
    """
    c, n = dx_pad_t.shape[:2]
    (k1, k2), (ho, wo) = kernel, out_hw
    dcols6 = dcols.reshape(c, k1, k2, n, ho, wo)

    def add_slabs(dx_pad_t, dcols):
        for m, l in window_offsets(kernel):
            dx_slab = slab(dx_pad_t, m, l, stride, out_hw, dilation)   # a view: += in place
            dx_slab += dcols[:, m, l]
    in_pieces(add_slabs, dx_pad_t, dcols6, axis=_split_axes(c))
    return dx_pad_t


def _split_axes(channels):
    """Axes to split (C, N, ...) and (C, k1, k2, N, ...) along: channels if enough, else samples."""
    return (0, 0) if channels >= num_threads() else (1, 3)
