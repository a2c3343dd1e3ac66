"""minidl.checks: the argument checks of the public calls (each error names the call
and the value), and the size check that refuses an absurd layer before allocating it.
Its uses by manual_seed and DataLoader: test_random.py, data/test_loader.py."""
import math

import numpy as np
import pytest

from minidl import BatchNorm2D, Conv2D, Dense, checks


@pytest.mark.parametrize("value, kwargs, expected", [
    (0.5, dict(minimum=0, below=1), 0.5),
    (np.float32(0.25), dict(minimum=0), 0.25),
    (np.int64(3), dict(above=0), 3.0),
    (math.inf, dict(minimum=0, finite=False), math.inf),
])
def test_check_real_accepts(value, kwargs, expected):
    result = checks.check_real(value, "x", "Owner", **kwargs)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value, kwargs, error, message", [
    ("0.1", {}, TypeError, "Owner: x must be a real number, got '0.1'"),
    (True, {}, TypeError, "Owner: x must be a real number, got True"),
    (1 + 2j, {}, TypeError, "real number"),
    (None, {}, TypeError, "real number"),
    (math.nan, {}, ValueError, "Owner: x must be a finite number, got nan"),
    (math.inf, {}, ValueError, "Owner: x must be a finite number, got inf"),
    (math.nan, dict(finite=False), ValueError, "x must be a number, got nan"),
    (1.0, dict(minimum=0, below=1), ValueError, r"x must be a finite number >= 0 and < 1, got 1.0"),
    (0.0, dict(above=0), ValueError, r"x must be a finite number > 0, got 0.0"),
    (2.0, dict(maximum=1), ValueError, r"x must be a finite number <= 1, got 2.0"),
])
def test_check_real_refuses(value, kwargs, error, message):
    with pytest.raises(error, match=message):
        checks.check_real(value, "x", "Owner", **kwargs)


def test_check_int_bool_and_pair():
    assert checks.check_int(np.uint8(3), "n", "Owner", minimum=1) == 3
    for bad in (3.0, "3", True, None):
        with pytest.raises(TypeError, match="Owner: n must be an int"):
            checks.check_int(bad, "n", "Owner")
    with pytest.raises(ValueError, match="Owner: n must be >= 1, got 0"):
        checks.check_int(0, "n", "Owner", minimum=1)
    assert checks.check_bool(np.bool_(False), "flag", "Owner") is False
    for bad in ("False", 0, 1, None):
        with pytest.raises(TypeError, match="Owner: flag must be True or False"):
            checks.check_bool(bad, "flag", "Owner")
    assert checks.check_pair(np.int64(2), "k", "Owner", minimum=1) == (2, 2)
    assert checks.check_pair([1, 3], "k", "Owner", minimum=1) == (1, 3)
    with pytest.raises(TypeError, match="an int or a pair of ints"):
        checks.check_pair((1, 2, 3), "k", "Owner", minimum=1)


def test_check_real_pair():
    assert checks.check_real_pair([0.5, np.float32(0.75)], "betas", "Owner") == (0.5, 0.75)
    for bad in ({0.9, 0.999}, 0.9, "ab"):
        with pytest.raises(TypeError, match="Owner: betas must be a tuple of two numbers"):
            checks.check_real_pair(bad, "betas", "Owner")
    with pytest.raises(ValueError, match="betas must be two numbers, got 3"):
        checks.check_real_pair((0.1, 0.2, 0.3), "betas", "Owner")


# -- absurd sizes --------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: Conv2D(10**12, 4, 3), r"Conv2D: weight of shape \(4, 1000000000000, 3, 3\)"),
    (lambda: Dense(10**7, 10**7), r"Dense: weight of shape .* more than this machine"),
    (lambda: BatchNorm2D(10**13), "BatchNorm2D: .* more than this machine"),
])
def test_absurd_sizes_are_refused_before_allocating(make, message):
    with pytest.raises(ValueError, match=message):
        make()
