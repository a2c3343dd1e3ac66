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
    runs on each x batch on the CPU before it moves. ``rank``/``world_size``: this rank's
    shard of each epoch's order, as many batches on every rank (docs/distributed.md#sharding).
    """

    def __init__(self, x, y, batch_size=64, shuffle=True, drop_last=False, seed=None,
                 transform=None, rank=0, world_size=1):
        x, y = _as_samples(x, "x"), _as_samples(y, "y")
        if len(x) != len(y):
            raise ValueError(f"DataLoader: x and y must have the same length, "
                             f"got {len(x)} and {len(y)}")
        if len(x) == 0:
            raise ValueError("DataLoader: the dataset is empty")
        if transform is not None and not callable(transform):
            raise TypeError(f"DataLoader: transform must be a function of the x batch or "
                            f"None, got {transform!r}")
        self.rank = check_int(rank, "rank", "DataLoader", minimum=0)
        self.world_size = check_int(world_size, "world_size", "DataLoader", minimum=1)
        if self.rank >= self.world_size:
            raise ValueError(f"DataLoader: need 0 <= rank < world_size, "
                             f"got rank={rank!r}, world_size={world_size!r}")
        if drop_last and len(x) < self.world_size:
            raise ValueError(f"DataLoader: drop_last with {len(x)} samples leaves nothing "
                             f"for {self.world_size} ranks")
        if shuffle and self.world_size > 1 and seed is None:    # each rank would draw its own
            raise ValueError("DataLoader: with world_size > 1 and shuffle=True, pass the "
                             "same seed= on every rank, so that all ranks shard one order")
        self.x, self.y = x, y
        self.batch_size = check_int(batch_size, "batch_size", "DataLoader", minimum=1)
        self.shuffle = check_bool(shuffle, "shuffle", "DataLoader")
        self.drop_last = check_bool(drop_last, "drop_last", "DataLoader")
        self.transform = transform
        self.rng = new_rng(check_seed(seed, "seed", "DataLoader"))

    def __len__(self):
        """The number of batches in one epoch (on this rank)."""
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self):
        """Samples seen in one epoch on this rank (less than len(x) with drop_last)."""
        return len(self) * self.batch_size if self.drop_last else self._shard_size()

    def _shard_size(self):
        n, p = len(self.x), self.world_size
        return n // p if self.drop_last else -(-n // p)

    def _order(self):
        """This epoch's sample indices for this rank; None for all, in order."""
        n, p = len(self.x), self.world_size
        order = self.rng.permutation(n) if self.shuffle else None
        if p == 1:
            return order
        order = numpy.arange(n) if order is None else order
        return numpy.resize(order, self._shard_size() * p)[self.rank::p]

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

