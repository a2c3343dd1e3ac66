"""Argument checks for the whole package: one clear error for each bad value.

Every check takes the value, its ``name`` and its ``owner`` (the class or function the
message names) and returns the value normalised (a Python int, float, bool or tuple), or
raises TypeError (the wrong kind: ``"0.1"``, ``True`` as a number, ``"False"`` as a flag)
or ValueError (out of range). numpy scalars pass wherever Python numbers do.
"""
import math
import numbers
import operator
import os

from . import backend

_numpy = backend.get_module("cpu")   # dtypes and numpy scalars, on the host


def is_int(value):
    """True for Python and numpy integers; bools are flags, not numbers."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value, name, owner, minimum=None):
    """``value`` as an int >= ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_real(value, name, owner, minimum=None, above=None, maximum=None, below=None,
               finite=True):
    """``value`` as a float in range: ``minimum <= value``, ``above < value``,
    ``value <= maximum``, ``value < below`` (each bound only when given). NaN is
    refused always, +-inf unless ``finite`` is False."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    value = float(value)
    ok = not math.isnan(value) and not (finite and math.isinf(value))
    rules = []
    for bound, rule, holds in ((minimum, ">=", operator.ge), (above, ">", operator.gt),
                               (maximum, "<=", operator.le), (below, "<", operator.lt)):
        if bound is not None:
            ok = ok and holds(value, bound)
            rules.append(f"{rule} {bound:g}")
    if not ok:
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"{owner}: {name} must be {kind} {' and '.join(rules)}".rstrip()
                         + f", got {value!r}")
    return value


def check_bool(value, name, owner):
    """``value`` as a bool: True, False or a numpy bool; not ``"False"`` or 1."""
    if not isinstance(value, (bool, _numpy.bool_)):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    return bool(value)


def check_pair(value, name, owner, minimum):
    """An int or an (h, w) pair of ints, each >= ``minimum``, as a tuple (h, w)."""
    pair = (value, value) if is_int(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(is_int, pair))):
        raise TypeError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_padding(padding, kernel, stride, owner):
    """((top, bottom), (left, right)) from an int, an (h, w) pair, "valid" or "same"
    (H and W kept at stride 1; an even kernel pads one more at the bottom/right, as
    PyTorch)."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0), (0, 0)
        if mode == "same":
            if stride != (1, 1):
                raise ValueError(f"{owner}: padding='same' needs stride 1, got stride {stride}")
            return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel)
        raise ValueError(f"{owner}: padding must be an int, a pair, 'valid' or 'same', "
                         f"got {padding!r}")
    p1, p2 = check_pair(padding, "padding", owner, minimum=0)
    return (p1, p1), (p2, p2)


def check_real_pair(value, name, owner, **bounds):
    """A list or tuple of two real numbers (Adam's betas), each checked by check_real
    with ``bounds``, as a tuple; a set or a single number is a TypeError."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{owner}: {name} must be a tuple of two numbers, got {value!r}")
    if len(value) != 2:
        raise ValueError(f"{owner}: {name} must be two numbers, got {len(value)}: {value!r}")
    return tuple(check_real(v, f"{name}[{i}]", owner, **bounds) for i, v in enumerate(value))


def check_seed(seed, name, owner):
    """None (a fresh seed) or a non-negative int."""
    return None if seed is None else check_int(seed, name, owner, minimum=0)


def check_float_dtype(dtype, owner):
    """``dtype`` as a numpy dtype object; ValueError unless it is a float type."""
    try:
        dtype = _numpy.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{owner}: {dtype!r} is not a dtype") from exc
    if dtype.kind != "f":
        raise ValueError(f"{owner}: dtype must be a float type, got {dtype}")
    return dtype


def check_allocation(shape, name, owner, itemsize=8):
    """ValueError when an array of ``shape`` (``itemsize`` bytes per value: initial
    weights are drawn in float64) would not fit in this machine's RAM, so that an absurd
    size is refused before numpy tries to allocate it."""
    memory, count = machine_memory(), math.prod(shape)
    if memory is not None and count * itemsize > memory:    # None: the OS does not say
        raise ValueError(f"{owner}: {name} of shape {tuple(shape)} would hold {count:.3g} "
                         f"values ({count * itemsize / 2**30:.3g} GiB), more than this "
                         f"machine's memory ({memory / 2**30:.3g} GiB)")


def machine_memory():
    """This machine's RAM in bytes, or None when the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None
