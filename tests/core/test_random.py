"""minidl.random: manual_seed takes a non-negative int (numpy's too) and seeds the
layers' initialisers; anything else is refused naming the call."""
import numpy as np
import pytest

import minidl


@pytest.mark.parametrize("seed, error", [(-1, ValueError), ("abc", TypeError),
                                         (1.5, TypeError), (True, TypeError)])
def test_manual_seed_refuses_bad_seeds(seed, error):
    with pytest.raises(error, match="manual_seed: seed must be"):
        minidl.manual_seed(seed)


def test_manual_seed_takes_numpy_integers():
    minidl.manual_seed(np.int64(7))
    a = minidl.Dense(3, 2).weight.data.copy()
    minidl.manual_seed(7)
    np.testing.assert_array_equal(minidl.Dense(3, 2).weight.data, a)
