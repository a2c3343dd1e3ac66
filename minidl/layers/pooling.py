"""Pooling layers: MaxPool2D, AvgPool2D, GlobalAvgPool2D (docs/layers.md, "Pooling").

A k1 x k2 pool with stride (s1, s2) and padding (p1, p2) over x (N, C, H, W) reads,
for output (i, j), the window x_pad[n, c, i*s1 + m, j*s2 + l], 0 <= m < k1, 0 <= l < k2,
where x_pad has p1 rows above and below x and p2 columns left and right:

    Ho = floor((H + 2 p1 - k1) / s1) + 1,   Wo = floor((W + 2 p2 - k2) / s2) + 1

With ``ceil_mode`` the floor is a ceiling, less one where the last window would start
past the input and its left padding (PyTorch's rule); x_pad then gets the rows and
columns that a last window reaching past the padding needs.

MaxPool2D (x_pad padded with -inf, so padding never wins, as PyTorch):

    y[n, c, i, j] = max_{m, l} x_pad[n, c, i*s1 + m, j*s2 + l]
    dx_pad[n, c, i*s1 + m*, j*s2 + l*] += dy[n, c, i, j]
        for ONE (m*, l*) per window: the first maximum in row-major (m, l) order,
        among the real (not padding) elements; a window holding NaN has y = NaN and
        (m*, l*) its LAST NaN, as PyTorch, whose argmax moves on `val > max or isnan`

AvgPool2D (x_pad padded with zeros), D[i, j] the elements window (i, j) covers within
the padding (``count_include_pad``, k1 k2 but for ceil_mode's last windows) or the input:

    y[n, c, i, j] = 1/D[i, j] sum_{m, l} x_pad[n, c, i*s1 + m, j*s2 + l]
    dx_pad[n, c, i*s1 + m, j*s2 + l] += dy[n, c, i, j] / D[i, j]

dx is dx_pad with the padding cropped off. Both loop over the offsets (m, l) that read
the input: the slab x_pad[:, :, m::s1, l::s2] (cut to Ho x Wo, ``im2col.slab``) holds element
(m, l) of every window. On the CPU, channels are split between threads
(``parallel.in_pieces``); y and dx keep the input's memory order (channels first after
a Conv2D). docs/performance.md says what each of these choices buys.
"""
from .. import backend
from ..checks import check_allocation, check_bool, check_pair
from .base import Layer
from .registry import register_layer
from .im2col import conv_output_size, slab
from .parallel import in_pieces


class _Pool2D(Layer):
    """What MaxPool2D and AvgPool2D share: arguments, output size and slabs."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, dtype=None):
        super().__init__(dtype)
        name = type(self).__name__
        self.kernel_size = check_pair(kernel_size, "kernel_size", name, minimum=1)
        self.stride = (self.kernel_size if stride is None
                       else check_pair(stride, "stride", name, minimum=1))
        self.padding = check_pair(padding, "padding", name, minimum=0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{name}: padding must be at most half the kernel size, got "
                             f"padding={self.padding} for kernel_size={self.kernel_size}")
        self.ceil_mode = check_bool(ceil_mode, "ceil_mode", name)

    def _offsets(self, in_hw, out_hw):
        """The offsets (m, l), row-major, that read the input in some window: one that reads
        only padding adds nothing (-inf to a max, 0 to a sum) and takes no gradient."""
        live = [[m for m in range(k) if any(p <= i * s + m < p + n for i in range(o))]
                for n, o, k, s, p in zip(in_hw, out_hw, self.kernel_size, self.stride,
                                         self.padding)]
        return [(m, l) for m in live[0] for l in live[1]]

    def _write_grad(self, dx_pad, m, l, out_hw, grad):
        """Put ``grad`` into the slab (m, l) of dx_pad: added when an input element can sit
        in two windows, assigned when windows do not overlap (each is written once)."""
        dx_slab = slab(dx_pad, m, l, self.stride, out_hw)
        if any(s < k for s, k in zip(self.stride, self.kernel_size)):
            dx_slab += grad
        else:
            dx_slab[...] = grad

    def _pad(self, x, out_hw, value):
        """x padded: p on each side, more at the bottom and right where a ceil_mode window
        reaches past the padding."""
        pads = tuple((p, max(p, (o - 1) * s + k - size - p)) for size, o, k, s, p in zip(
            x.shape[2:], out_hw, self.kernel_size, self.stride, self.padding))
        if pads == ((0, 0), (0, 0)):
            return x
        check_allocation(x.shape[:2] + tuple(n + sum(p) for n, p in zip(x.shape[2:], pads)),
                         "its padded input", type(self).__name__, x.dtype.itemsize)
        return backend.get_array_module(x).pad(x, ((0, 0), (0, 0)) + pads, constant_values=value)

    def _new_dx_pad(self, like, x_pad_shape, out_hw):
        """Zeros shaped like x_pad, in the memory order of ``like``; uninitialised when the
        windows tile x_pad exactly, as every element is then written once."""
        dx_pad = _empty_in_layout_of(like, x_pad_shape)
        hp, wp = x_pad_shape[2:]
        if not (self.stride == self.kernel_size
                and out_hw[0] * self.stride[0] == hp and out_hw[1] * self.stride[1] == wp):
            dx_pad[...] = 0
        return dx_pad

    def _crop(self, dx_pad, x_shape):
        (p1, p2), (h, w) = self.padding, x_shape[2:]
        return dx_pad[:, :, p1:p1 + h, p2:p2 + w]

    def output_shape(self, input_shape):
        name = type(self).__name__
        if len(input_shape) != 4:
            raise ValueError(f"{name}: expected a 4-D input (N, C, H, W), "
                             f"got shape {tuple(input_shape)}")
        n, c, h, w = input_shape
        (k1, k2), (p1, p2) = self.kernel_size, self.padding
        if h + 2 * p1 < k1 or w + 2 * p2 < k2:
            raise ValueError(f"{name}: the {k1}x{k2} window is larger than the input {h}x{w} "
                             f"(padding {self.padding}); got input of shape {tuple(input_shape)}")
        return (n, c) + tuple(self._output_size(*a) for a in zip(
            (h, w), self.kernel_size, self.stride, self.padding))

    def _output_size(self, size, k, s, p):
        if not self.ceil_mode:
            return conv_output_size(size, k, s, p, p)
        o = -(-(size + 2 * p - k) // s) + 1                # the ceiling
        return o - 1 if (o - 1) * s >= size + p else o     # no window starts past the input

    def extra_repr(self):
        text = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        return text + (", ceil_mode=True" if self.ceil_mode else "")

    def get_config(self):
        return {**super().get_config(), "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": list(self.padding),
                "ceil_mode": self.ceil_mode}


@register_layer
class MaxPool2D(_Pool2D):
    """Max over each k1 x k2 window; ``stride`` defaults to ``kernel_size``; int or pair.

    Padding is -inf and at most half the kernel. A window's gradient goes to one element,
    by PyTorch's rules for ties and NaN (the module docstring states them).
    """

    # -- forward: y = max over the window -----------------------------------------
    def forward(self, x, training=True):
        x = self._as_input(x, ndim=4)
        xp = backend.get_array_module(x)
        out_hw = self.output_shape(x.shape)[2:]
        x_pad = self._pad(x, out_hw, float("-inf"))
        offsets = self._offsets(x.shape[2:], out_hw)
        y = _empty_in_layout_of(x, x.shape[:2] + out_hw)

        def max_over_windows(x_pad, y):
            y[...] = slab(x_pad, *offsets[0], self.stride, out_hw)
            for m, l in offsets[1:]:
                xp.maximum(y, slab(x_pad, m, l, self.stride, out_hw), out=y)
        in_pieces(max_over_windows, x_pad, y)                 # channels split over threads
        if x_pad is not x:
            # Backward finds each window's max by `slab == y`. With y = -inf (all real
            # elements -inf) a -inf padding element would claim the gradient and lose it to
            # the crop; as NaN, which equals nothing, the padding never claims (as PyTorch).
            (top, left), (h, w) = self.padding, x.shape[2:]
            x_pad[:, :, :top] = x_pad[:, :, top + h:] = float("nan")
            x_pad[:, :, :, :left] = x_pad[:, :, :, left + w:] = float("nan")
        self.cache = {"x_pad": x_pad, "y": y, "out_hw": out_hw, "x_shape": x.shape,
                      "y_shape": y.shape}
        return y

    # -- backward: dy to the first max of each window ------------------------------
    def backward(self, dy):
        cache = self._checked_cache(dy)
        x_pad, y, out_hw = cache["x_pad"], cache["y"], cache["out_hw"]
        xp = backend.get_array_module(dy)
        dx_pad = self._new_dx_pad(x_pad, x_pad.shape, out_hw)
        offsets = self._offsets(cache["x_shape"][2:], out_hw)

        def route_to_first_max(x_pad, y, dy, dx_pad):
            unclaimed = None                         # windows whose max is not found yet
            for k, (m, l) in enumerate(offsets):
                first_max = slab(x_pad, m, l, self.stride, out_hw) == y
                if unclaimed is None:                # the first offset: every window open
                    unclaimed = ~first_max
                else:
                    first_max &= unclaimed
                    if k < len(offsets) - 1:
                        unclaimed ^= first_max       # first_max is a subset of unclaimed
                # dy * first_max is contiguous; then it goes into the strided slab
                self._write_grad(dx_pad, m, l, out_hw, dy * first_max)
        in_pieces(route_to_first_max, x_pad, y, dy, dx_pad)   # channels split over threads
        # A window holding NaN has y = NaN, which `slab == y` never matches, so the loop
        # above gave it no gradient. One reduction finds out whether there is any (min
        # propagates NaN; about 0.5% of this backward on the CPU, one device sync on
        # the GPU); only then does the slower exact path run.
        if y.size and xp.isnan(y.min()):
            self._route_nan_windows(x_pad, y, dy, dx_pad, cache["x_shape"])
        return self._crop(dx_pad, cache["x_shape"])

    def _route_nan_windows(self, x_pad, y, dy, dx_pad, x_shape):
        """Add the gradient of each NaN window to its last NaN in row-major order (PyTorch's
        rule, see the module docstring), by index on the NaN windows only; padding, NaN in
        the cached x_pad, is excluded by position."""
        xp = backend.get_array_module(y)
        n, c, i, j = xp.nonzero(xp.isnan(y))
        (s1, s2), (p1, p2), (h, w) = self.stride, self.padding, x_shape[2:]
        offsets = self._offsets((h, w), y.shape[2:])
        last_nan = xp.zeros(n.shape, dtype=n.dtype)         # index into offsets
        for k, (m, l) in enumerate(offsets):
            r, q = i * s1 + m, j * s2 + l
            real = (r >= p1) & (r < p1 + h) & (q >= p2) & (q < p2 + w)
            hit = real & xp.isnan(x_pad[n, c, r, q])
            last_nan[hit] = k                                 # later offsets win
        grads = dy[n, c, i, j]
        for k, (m, l) in enumerate(offsets):
            sel = last_nan == k
            # For one offset, different windows are different elements: no index
            # repeats, so a fancy-indexed += adds every gradient.
            dx_pad[n[sel], c[sel], i[sel] * s1 + m, j[sel] * s2 + l] += grads[sel]


def _empty_in_layout_of(a, shape):
    """An uninitialised (N, C, ...) array of ``shape`` stored in a's order: channels first
    when a is (a Conv2D output is an NCHW view of channels-first memory), else NCHW.
    Keeping that order lets the layers after this one run on contiguous memory."""
    xp = backend.get_array_module(a)
    if a.strides[1] > a.strides[0]:
        return xp.empty((shape[1], shape[0]) + tuple(shape[2:]), dtype=a.dtype).swapaxes(0, 1)
    return xp.empty(shape, dtype=a.dtype)


@register_layer
class AvgPool2D(_Pool2D):
    """Mean over each k1 x k2 window; ``stride`` defaults to ``kernel_size``; int or pair.

    Padding, at most half the kernel, is zeros, counted in the divisor with
    ``count_include_pad`` (as PyTorch); what a ceil_mode window covers past it never is.
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, dtype=None):
        super().__init__(kernel_size, stride, padding, ceil_mode, dtype)
        self.count_include_pad = check_bool(count_include_pad, "count_include_pad",
                                            type(self).__name__)

    # -- forward: y = window sum / D -----------------------------------------------
    def forward(self, x, training=True):
        x = self._as_input(x, ndim=4)
        out_hw = self.output_shape(x.shape)[2:]
        x_pad = self._pad(x, out_hw, 0.0)
        offsets = self._offsets(x.shape[2:], out_hw)
        y = slab(x_pad, *offsets[0], self.stride, out_hw).copy()
        for m, l in offsets[1:]:
            y += slab(x_pad, m, l, self.stride, out_hw)
        scale = self._reciprocal_divisor(x, out_hw)
        y *= scale
        self.cache = {"x_pad_shape": x_pad.shape, "x_shape": x.shape, "out_hw": out_hw,
                      "scale": scale, "y_shape": y.shape}
        return y

    # -- backward: every window element gets dy / D ------------------------------------
    def backward(self, dy):
        cache = self._checked_cache(dy)
        out_hw = cache["out_hw"]
        share = dy * cache["scale"]
        dx_pad = self._new_dx_pad(dy, cache["x_pad_shape"], out_hw)
        for m, l in self._offsets(cache["x_shape"][2:], out_hw):
            self._write_grad(dx_pad, m, l, out_hw, share)
        return self._crop(dx_pad, cache["x_shape"])

    def _reciprocal_divisor(self, x, out_hw):
        """1 / D: a number when every window divides by k1*k2, else an (Ho, Wo) array
        (D = the rows a window covers times its columns)."""
        cpu, counts = backend.get_module("cpu"), []
        for size, o, k, s, p in zip(x.shape[2:], out_hw, self.kernel_size, self.stride,
                                    self.padding):
            start = cpu.arange(o) * s - p
            end = cpu.minimum(start + k, size + p)           # past the padding: never
            if not self.count_include_pad:
                start, end = cpu.maximum(start, 0), cpu.minimum(end, size)
            counts.append(end - start)
        divisor = cpu.outer(*counts)
        k1, k2 = self.kernel_size
        if (divisor == k1 * k2).all():
            return 1.0 / (k1 * k2)
        return backend.to_device((1.0 / divisor).astype(x.dtype), backend.device_of(x))

    def extra_repr(self):
        return super().extra_repr() + ("" if self.count_include_pad
                                       else ", count_include_pad=False")

    def get_config(self):
        return {**super().get_config(), "count_include_pad": self.count_include_pad}


@register_layer
class GlobalAvgPool2D(Layer):
    """(N, C, H, W) -> (N, C): y[n, c] = mean_{h, w} x[n, c, h, w];  dx = dy / (H W)."""

    sees_whole_input = True

    def __init__(self, dtype=None):
        super().__init__(dtype)     # None: no parameters, so no dtype of its own

    def forward(self, x, training=True):
        x = self._as_input(x, ndim=4)
        y_shape = self.output_shape(x.shape)
        self.cache = {"x_shape": x.shape, "y_shape": y_shape}
        return x.mean(axis=(2, 3))

    def backward(self, dy):
        n, c, h, w = self._checked_cache(dy)["x_shape"]
        share = (dy * (1.0 / (h * w)))[:, :, None, None]
        return backend.get_array_module(dy).broadcast_to(share, (n, c, h, w)).copy()

    def output_shape(self, input_shape):
        if len(input_shape) != 4 or 0 in input_shape[2:]:
            raise ValueError(f"GlobalAvgPool2D: expected a 4-D input (N, C, H, W) with "
                             f"H, W >= 1, got shape {tuple(input_shape)}")
        return tuple(input_shape[:2])
