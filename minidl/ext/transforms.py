"""Data augmentation for batches of images, as a DataLoader ``transform``.

    augment = Compose([RandomShift(2), to_float])       # to_float: any callable
    train = DataLoader(x, y, 64, transform=augment)

A transform takes a CPU batch of shape (N, H, W) or (N, C, H, W), in any dtype, and
returns the new batch. Each sample's draw (offset, flip) comes from the transform's
``minidl.random.new_rng(seed)``, all at once, applied with one indexing operation.

    RandomCrop:  y[n, c, i, j] = x_pad[n, c, i + t_n, j + l_n],  x_pad = x padded by
                 ``padding`` pixels of ``fill``; t_n, l_n uniform in 0..Hp-h, 0..Wp-w
    RandomShift: RandomCrop of the input's own size with padding = max_shift, i.e. the
                 image moved by up to max_shift pixels each way, the gap filled
    RandomHorizontalFlip: y[n] = x[n, ..., ::-1] with probability p, else x[n]
    Normalize:   y = (x - mean) / std in float32, per channel when given per channel
"""
import numbers

import numpy
from numpy.lib.stride_tricks import sliding_window_view

from ..checks import check_pair
from ..random import new_rng


class Compose:
    """Apply ``transforms`` (callables) in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        for i, t in enumerate(self.transforms):
            if not callable(t):
                raise TypeError(f"Compose: transforms[{i}] is a {type(t).__name__}, not callable")

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self):
        return f"Compose({self.transforms!r})"


class RandomCrop:
    """Pad every image by ``padding`` pixels of ``fill``, then cut a ``size`` window
    (an int, an (h, w) pair, or None: the input's own size) at a random place per sample."""

    def __init__(self, size=None, padding=0, fill=0, seed=None):
        owner = type(self).__name__
        self.size = None if size is None else check_pair(size, "size", owner, minimum=1)
        self.padding = check_pair(padding, "padding", owner, minimum=0)
        if isinstance(fill, bool) or not isinstance(fill, numbers.Real):
            raise TypeError(f"{owner}: fill must be a number, got {fill!r}")
        self.fill = fill
        self.rng = new_rng(seed)

    def __call__(self, x):
        x4 = _as_batch_of_images(type(self).__name__, x)
        n, c, h, w = x4.shape
        size = self.size or (h, w)
        (ph, pw) = self.padding
        hp, wp = h + 2 * ph, w + 2 * pw
        if size[0] > hp or size[1] > wp:
            raise ValueError(f"{type(self).__name__}: crop size {size} is larger than the "
                             f"padded image ({hp}, {wp})")
        x_pad = numpy.full((n, c, hp, wp), self.fill, dtype=x.dtype)   # numpy.pad is 5x slower
        x_pad[:, :, ph:ph + h, pw:pw + w] = x4
        top = self.rng.integers(0, hp - size[0] + 1, n)
        left = self.rng.integers(0, wp - size[1] + 1, n)
        # windows[n, c, t, l] is the (h, w) window at (t, l): a view, nothing is copied
        # until each sample picks its own window.
        windows = sliding_window_view(x_pad, size, axis=(2, 3))
        y = windows[numpy.arange(n), :, top, left]                   # (N, C, h, w)
        return y.reshape(x.shape[:-2] + size)

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size}, padding={self.padding}, fill={self.fill})"


class RandomShift(RandomCrop):
    """Move every image by a random whole number of pixels in [-max_shift, max_shift]
    along each axis (independently per sample), filling the uncovered border with ``fill``."""

    def __init__(self, max_shift=2, fill=0, seed=None):
        check_pair(max_shift, "max_shift", "RandomShift", minimum=0)   # named as the user knows it
        super().__init__(size=None, padding=max_shift, fill=fill, seed=seed)

    def __repr__(self):
        return f"RandomShift(max_shift={self.padding}, fill={self.fill})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p`` (off for digits: a mirrored
    2 is no digit)."""

    def __init__(self, p=0.5, seed=None):
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
            raise ValueError(f"RandomHorizontalFlip: p must be a number in [0, 1], got {p!r}")
        self.p = float(p)
        self.rng = new_rng(seed)

    def __call__(self, x):
        _as_batch_of_images(type(self).__name__, x)
        flip = self.rng.random(len(x)) < self.p
        y = numpy.array(x, copy=True)
        y[flip] = y[flip][..., ::-1]
        return y

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """``(x - mean) / std`` in float32; ``mean`` and ``std`` are numbers, or one per
    channel (axis 1 of an (N, C, H, W) batch)."""

    def __init__(self, mean, std):
        self.mean = numpy.asarray(mean, dtype=numpy.float32)
        self.std = numpy.asarray(std, dtype=numpy.float32)
        for name, value in (("mean", self.mean), ("std", self.std)):
            if value.ndim > 1 or not numpy.isfinite(value).all():
                raise ValueError(f"Normalize: {name} must be a finite number or one per "
                                 f"channel, got {value.tolist()!r}")
        if (self.std <= 0).any():
            raise ValueError(f"Normalize: std must be > 0, got {self.std.tolist()!r}")

    def __call__(self, x):
        x4 = _as_batch_of_images("Normalize", x)
        for name, value in (("mean", self.mean), ("std", self.std)):
            if value.ndim and value.size != x4.shape[1]:
                raise ValueError(f"Normalize: {value.size} values of {name} for a batch of "
                                 f"shape {tuple(x.shape)} ({x4.shape[1]} channels)")
        shape = (1, -1, 1, 1)
        y = (x4.astype(numpy.float32) - self.mean.reshape(shape)) / self.std.reshape(shape)
        return y.reshape(x.shape)

    def __repr__(self):
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


def _as_batch_of_images(owner, x):
    """``x`` viewed as (N, C, H, W); TypeError or ValueError for anything else."""
    if not isinstance(x, numpy.ndarray):
        raise TypeError(f"{owner}: expected a numpy array of images (transforms run on the "
                        f"CPU, before the batch moves), got {type(x).__name__}")
    if x.ndim not in (3, 4):
        raise ValueError(f"{owner}: expected a batch of shape (N, H, W) or (N, C, H, W), "
                         f"got {tuple(x.shape)}")
    return x if x.ndim == 4 else x[:, None]
