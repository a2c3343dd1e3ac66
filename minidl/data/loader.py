"""DataLoader: mini-batches of (x, y) on the active backend.

The arrays stay where they are given (usually NumPy, in CPU memory); each batch
is sliced, optionally transformed (e.g. uint8 pixels -> float32 in [0, 1]) and
then moved to the active backend, so a GPU holds one batch at a time.
"""
import numpy

from .. import backend
from ..checks import check_bool, check_int, check_seed
from ..random import new_rng


class DataLoader:
    """Iterate ``(x_batch, y_batch)`` over ``x`` and ``y`` (same length; arrays are used
    as they are, never copied, lists made arrays).

    ``shuffle`` reorders every epoch with a generator seeded by ``seed`` (or drawn from
    ``minidl.manual_seed``'s); ``drop_last`` skips a final short batch; ``transform``
    runs on each x batch on the CPU before it moves. (Each rank's share of a
    data-parallel job: minidl.ext.distributed.ShardedLoader.)
    """

    def __init__(self, x, y, batch_size=64, shuffle=True, drop_last=False, seed=None,
                 transform=None):
        x, y = _as_samples(x, "x"), _as_samples(y, "y")
        if len(x) != len(y):
            raise ValueError(f"DataLoader: x and y must have the same length, "
                             f"got {len(x)} and {len(y)}")
        if len(x) == 0:
            raise ValueError("DataLoader: the dataset is empty")
        if transform is not None and not callable(transform):
            raise TypeError(f"DataLoader: transform must be a function of the x batch or "
                            f"None, got {transform!r}")
        self.x, self.y = x, y
        self.batch_size = check_int(batch_size, "batch_size", "DataLoader", minimum=1)
        self.shuffle = check_bool(shuffle, "shuffle", "DataLoader")
        self.drop_last = check_bool(drop_last, "drop_last", "DataLoader")
        self.transform = transform
        self.seed = check_seed(seed, "seed", "DataLoader")
        self.rng = new_rng(self.seed)

    def __len__(self):
        """The number of batches in one epoch."""
        n = self._epoch_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self):
        """Samples seen in one epoch (fewer than len(x) with drop_last)."""
        return len(self) * self.batch_size if self.drop_last else self._epoch_size()

    def _epoch_size(self):
        """How many samples an epoch's order holds."""
        return len(self.x)

    def _order(self):
        """This epoch's sample indices; None for all, in order."""
        return self.rng.permutation(len(self.x)) if self.shuffle else None

    def __iter__(self):
        order = self._order()
        for b in range(len(self)):
            start, stop = b * self.batch_size, (b + 1) * self.batch_size   # slices clip at the end
            if order is None:
                xb, yb = self.x[start:stop], self.y[start:stop]
            else:
                # Sorted indices read memory in order: same batch, faster gather.
                index = numpy.sort(order[start:stop])
                xb, yb = self.x[index], self.y[index]
            if self.transform is not None:
                xb = self.transform(xb)
            yield backend.to_backend(xb), backend.to_backend(yb)


def _as_samples(a, name):
    """``a`` as an array with a first (sample) axis: shuffled batches index with an
    array of positions, which lists do not support."""
    samples = a if backend.is_array(a) else numpy.asarray(a)
    if samples.ndim == 0:
        raise TypeError(f"DataLoader: {name} must be an array or a list of samples, "
                        f"got {type(a).__name__}")
    return samples

