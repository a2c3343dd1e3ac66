"""Seeding: one generator for parameter initialisation and data shuffling.

Initial weights are always drawn on the CPU with NumPy and then moved to the
active backend, so the same seed gives the same network on numpy and cupy.
"""
from . import backend
from .checks import check_seed

_numpy = backend.get_module("cpu")   # initial weights are drawn on the CPU, then moved
_rng = _numpy.random.default_rng()


def manual_seed(seed):
    """Reseed minidl's generator: same seed, same weights and same shuffles.
    ``seed`` is a non-negative int (TypeError or ValueError otherwise)."""
    global _rng
    _rng = _numpy.random.default_rng(check_seed(seed, "seed", "manual_seed"))


def default_rng():
    """The generator behind initialisers, Dropout and DataLoader shuffles."""
    return _rng


def new_rng(seed=None):
    """A generator of one's own: from ``seed`` if given, else drawn from minidl's."""
    if seed is None:
        seed = int(_rng.integers(2**63))
    return _numpy.random.default_rng(seed)
