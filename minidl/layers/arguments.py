"""Checking and normalising constructor arguments shared by layers."""
import numbers


def as_pair(value, name, owner, minimum):
    """An int or an (h, w) pair of ints, each >= ``minimum``, as a tuple (h, w)."""
    pair = (value, value) if _is_int(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(_is_int, pair))):
        raise TypeError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def as_positive_int(value, name, owner):
    if not _is_int(value):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value!r}")
    return int(value)


def padding_pairs(padding, kernel, stride, owner):
    """((top, bottom), (left, right)) from an int, an (h, w) pair, "valid" or "same".

    "same" keeps H and W at stride 1; an even kernel puts the extra row/column at the
    bottom/right, as PyTorch does.
    """
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
    p1, p2 = as_pair(padding, "padding", owner, minimum=0)
    return (p1, p1), (p2, p2)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
