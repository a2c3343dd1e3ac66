"""im2col / col2im: turn a sliding-window operation into one matrix product.

Layout (see docs/conv2d.md, "Layout"): the column matrix of an input x (N, C, H, W)
is ``cols`` of shape (C*k1*k2, N*Ho*Wo), row (c, m, l), column (n, i, j):

    cols[(c, m, l), (n, i, j)] = x_pad[n, c, i*s1 + m, j*s2 + l]

Channels-first ("CNHW") ordering makes both big products of Conv2D run on
contiguous operands: Z = W2 @ cols and dcols = W2.T @ dZ2. Both functions loop
only over the k1*k2 kernel offsets, copying (or adding) one strided slab each.

Threads: these copies and adds are memory passes that numpy runs on one core, while
the matrix products around them already use every core. Slabs of different channels
(or, for a single channel, of different samples) touch disjoint memory, so on the CPU
a big pass can be split into one piece per core, the pieces running in threads (numpy
releases the GIL inside a copy or an add); ``in_pieces`` does this, for pooling,
ReLU and batch norm too. It pays only while OpenBLAS's own threads sleep between
products: by default they spin for ~0.1 s after each one and take the cores our
threads need. So by default (``NUM_THREADS = None``) passes are split only when
OPENBLAS_THREAD_TIMEOUT was set to 16 or less before numpy was imported (4 is what
docs/performance.md recommends); otherwise they run on one thread, as numpy would.
Set ``NUM_THREADS`` to force a count. A pass smaller than ``MIN_PARALLEL_ELEMENTS``
stays on one thread, where the hand-off would cost more than it saves. On the GPU
(cupy) nothing is split.
"""
import os
from concurrent.futures import ThreadPoolExecutor

from .. import backend

NUM_THREADS = None                  # None: all usable cores if OpenBLAS threads sleep, else 1
MIN_PARALLEL_ELEMENTS = 1 << 19     # 2 MiB of float32: below that a hand-off costs more

_executor = None                    # (ThreadPoolExecutor, its workers, the pid that made it)


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

    def copy_interior(x_pad_t, x_t):
        x_pad_t[:, :, top:top + h, left:left + w] = x_t
    in_pieces(copy_interior, x_pad_t, x_t, axis=_split_axis(c))
    return x_pad_t


def channels_first(a):
    """a (N, C, ...) as a C-contiguous (C, N, ...) array: a view when a is stored channels
    first already (a Conv2D output, or what BatchNorm, ReLU and pooling make of one),
    else one copy, split over threads."""
    a_t = a.swapaxes(0, 1)
    if a_t.flags.c_contiguous:
        return a_t
    xp = backend.get_array_module(a)
    out = xp.empty(a_t.shape, dtype=a.dtype)

    def copy(out, a_t):
        out[...] = a_t
    in_pieces(copy, out, a_t, axis=_split_axis(a_t.shape[0]))
    return out


def im2col(x_pad_t, kernel, stride, out_hw, out=None):
    """Column matrix (C*k1*k2, N*Ho*Wo) of a padded, channels-first input (C, N, Hp, Wp).

    ``out`` may be a reusable contiguous buffer of C*k1*k2*N*Ho*Wo elements, of any
    shape (e.g. (C, k1, k2, N, Ho, Wo) or (C*k1*k2, N*Ho*Wo)); the result is a view of it.
    """
    xp = backend.get_array_module(x_pad_t)
    c, n = x_pad_t.shape[:2]
    (k1, k2), (s1, s2), (ho, wo) = kernel, stride, out_hw
    if out is None:
        out = xp.empty((c, k1, k2, n, ho, wo), dtype=x_pad_t.dtype)
    out6 = out.reshape(c, k1, k2, n, ho, wo)

    def copy_slabs(x_pad_t, out):
        for m in range(k1):
            for l in range(k2):
                out[:, m, l] = x_pad_t[:, :, m:m + s1 * (ho - 1) + 1:s1, l:l + s2 * (wo - 1) + 1:s2]
    # (C, N, ...) and (C, k1, k2, N, ...): split both over channels, or both over samples
    axis = _split_axis(c)
    in_pieces(copy_slabs, x_pad_t, out6, axis=(axis, 0 if axis == 0 else 3))
    return out6.reshape(c * k1 * k2, n * ho * wo)


def col2im_add(dcols, dx_pad_t, kernel, stride, out_hw):
    """The adjoint of im2col: add each column entry back where it was read from.

    dcols (C*k1*k2, N*Ho*Wo) is scattered into dx_pad_t (C, N, Hp, Wp) in place; windows
    that overlap (stride < kernel) add up, which is Eq. [9] of the seed.
    """
    c, n = dx_pad_t.shape[:2]
    (k1, k2), (s1, s2), (ho, wo) = kernel, stride, out_hw
    dcols6 = dcols.reshape(c, k1, k2, n, ho, wo)

    def add_slabs(dx_pad_t, dcols):
        for m in range(k1):
            for l in range(k2):
                dx_pad_t[:, :, m:m + s1 * (ho - 1) + 1:s1, l:l + s2 * (wo - 1) + 1:s2] += dcols[:, m, l]
    axis = _split_axis(c)
    in_pieces(add_slabs, dx_pad_t, dcols6, axis=(axis, 0 if axis == 0 else 3))
    return dx_pad_t


# -- splitting a memory pass between threads ------------------------------------------

def num_threads():
    """How many threads a big copy or add is split into (see NUM_THREADS)."""
    if NUM_THREADS is not None:
        return max(1, int(NUM_THREADS))
    if not _blas_threads_sleep():
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                       # not Linux
        return os.cpu_count() or 1


def _blas_threads_sleep():
    """True when OPENBLAS_THREAD_TIMEOUT (read by OpenBLAS when numpy loads it) makes
    its idle threads sleep within 2**16 cycles instead of spinning for 2**28."""
    try:
        return int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", "")) <= 16
    except ValueError:
        return False


def _split_axis(channels):
    """Split (C, N, ...) arrays over channels (axis 0) when there are enough, else samples."""
    return 0 if channels >= num_threads() else 1


def in_pieces(fn, *arrays, axis=1):
    """fn(*parts) for the parts of ``arrays`` cut into one slice per thread along ``axis``
    (an int, or one axis per array; every array must have the same length there), the
    parts running in parallel on the CPU. One call with the whole arrays on the GPU,
    with one thread, or when the largest array has fewer than MIN_PARALLEL_ELEMENTS
    elements. fn must write only into its own parts."""
    axes = (axis,) * len(arrays) if isinstance(axis, int) else tuple(axis)
    length = arrays[0].shape[axes[0]]
    size = max(a.size for a in arrays)
    # no more pieces than threads, than slices, or than halves of the minimum size
    pieces = min(num_threads(), length, size // max(1, MIN_PARALLEL_ELEMENTS // 2))
    if pieces < 2 or size < MIN_PARALLEL_ELEMENTS or backend.device_of(arrays[0]) != "cpu":
        fn(*arrays)
        return
    step = -(-length // pieces)
    parts = []
    for start in range(0, length, step):
        cut = slice(start, min(start + step, length))
        parts.append([a[(slice(None),) * ax + (cut,)] for a, ax in zip(arrays, axes)])
    global _executor
    workers = len(parts) - 1
    # A forked child inherits the executor but not its threads: make a new one there.
    if _executor is None or _executor[1] < workers or _executor[2] != os.getpid():
        _executor = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minidl"),
                     workers, os.getpid())
    futures = [_executor[0].submit(fn, *part) for part in parts[:-1]]
    fn(*parts[-1])                               # the last part in this thread
    for future in futures:
        future.result()                          # waits, and re-raises a worker's error
