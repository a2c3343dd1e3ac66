"""DataLoader: batches, shuffling and seeds, transforms, lists and arrays kept as
given, and the checks of its arguments (each error names the call and the value)."""
import numpy as np
import pytest

from minidl.data import DataLoader


def test_dataloader_batches_shuffle_and_errors():
    x, y = np.arange(10).reshape(10, 1), np.arange(10)
    loader = DataLoader(x, y, batch_size=4, shuffle=False)
    assert len(loader) == 3
    assert [len(b) for b, _ in loader] == [4, 4, 2]
    assert len(DataLoader(x, y, 4, drop_last=True)) == 2
    seen = np.concatenate([yb for _, yb in DataLoader(x, y, 4, seed=1)])
    assert sorted(seen) == list(range(10)) and list(seen) != list(range(10))
    for xb, yb in DataLoader(x, y, 3, seed=2):
        np.testing.assert_array_equal(xb[:, 0], yb)  # pairs stay together
    a = [yb.tolist() for _, yb in DataLoader(x, y, 4, seed=3)]
    b = [yb.tolist() for _, yb in DataLoader(x, y, 4, seed=3)]
    assert a == b
    scaled = next(iter(DataLoader(x, y, 4, shuffle=False, transform=lambda v: v / 10)))[0]
    np.testing.assert_allclose(scaled[:, 0], [0, 0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same length, got 10 and 9"):
        DataLoader(x, y[:9])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        DataLoader(x, y, 0)


def test_dataloader_accepts_lists_and_shuffles_them():
    x, y = [[float(i), -float(i)] for i in range(10)], list(range(10))
    batches = list(DataLoader(x, y, batch_size=4, shuffle=True, seed=0))
    xs = np.concatenate([xb for xb, _ in batches])
    ys = np.concatenate([yb for _, yb in batches])
    assert [len(yb) for _, yb in batches] == [4, 4, 2]
    assert sorted(ys) == y and np.array_equal(xs[:, 0], ys)  # pairs stay together


def test_dataloader_keeps_arrays_as_given():
    x, y = np.zeros((5, 2, 2), np.uint8), np.arange(5, dtype=np.uint8)
    loader = DataLoader(x, y, batch_size=2)
    assert loader.x is x and loader.y is y  # no copy of a big uint8 set


@pytest.mark.parametrize("batch_size", [np.int64(4), np.uint8(4)])
def test_dataloader_accepts_numpy_integer_batch_size(batch_size):
    loader = DataLoader(np.zeros((10, 2)), np.zeros(10), batch_size=batch_size)
    assert len(loader) == 3 and type(loader.batch_size) is int


@pytest.mark.parametrize("batch_size", [True, np.bool_(True), 2.0, 0, np.int64(-1)])
def test_dataloader_refuses_bad_batch_size(batch_size):
    with pytest.raises((TypeError, ValueError), match="batch_size"):
        DataLoader(np.zeros((10, 2)), np.zeros(10), batch_size=batch_size)


X, Y = np.zeros((10, 2)), np.zeros(10)


@pytest.mark.parametrize("make, error, message", [
    (lambda: DataLoader(None, None), TypeError, "DataLoader: x must be an array or a list"),
    (lambda: DataLoader(X, 3), TypeError, "DataLoader: y must be an array or a list"),
    (lambda: DataLoader(X, Y, transform=5), TypeError, "DataLoader: transform must be a"),
    (lambda: DataLoader(X, Y, seed="abc"), TypeError, "DataLoader: seed must be an int"),
    (lambda: DataLoader(X, Y, seed=-1), ValueError, "DataLoader: seed must be >= 0"),
    (lambda: DataLoader(X, Y, shuffle="no"), TypeError, "DataLoader: shuffle must be True"),
    (lambda: DataLoader(X, Y, drop_last=1), TypeError, "DataLoader: drop_last must be True"),
])
def test_dataloader_fails_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()
