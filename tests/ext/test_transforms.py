"""Augmentation transforms: each against a per-sample loop, seeding, errors."""
import numpy as np
import pytest

import minidl
from minidl.data import DataLoader
from minidl.ext.transforms import (Compose, Normalize, RandomCrop, RandomHorizontalFlip,
                                   RandomShift)


def images(shape=(16, 2, 7, 9), dtype=np.uint8):
    return np.random.default_rng(0).integers(1, 255, shape).astype(dtype)


def test_random_crop_equals_a_loop_over_samples():
    x = images()
    crop = RandomCrop(size=(5, 6), padding=2, fill=7, seed=3)
    y = crop(x)
    # the same draws, replayed: top for every sample, then left for every sample
    rng = minidl.random.new_rng(3)
    top, left = rng.integers(0, 11 - 5 + 1, 16), rng.integers(0, 13 - 6 + 1, 16)
    for n in range(16):
        x_pad = np.full((2, 11, 13), 7, np.uint8)
        x_pad[:, 2:9, 2:11] = x[n]
        np.testing.assert_array_equal(y[n], x_pad[:, top[n]:top[n] + 5, left[n]:left[n] + 6])
    assert y.dtype == np.uint8 and len({(t, l) for t, l in zip(top, left)}) > 1


def test_random_shift_moves_each_image_within_the_range():
    x = np.zeros((200, 9, 9), np.uint8)
    x[:, 4, 4] = 255                                  # one bright pixel in the middle
    y = RandomShift(2, seed=0)(x)
    assert y.shape == x.shape
    rows, cols = np.nonzero(y.reshape(200, 9, 9))[1:]
    assert len(rows) == 200                           # the pixel never falls off
    assert set(rows) == set(cols) == {2, 3, 4, 5, 6}  # every shift in -2..2 occurs


def test_flip_mirrors_about_half_and_keeps_the_input():
    x = images((400, 1, 3, 4))
    before = x.copy()
    y = RandomHorizontalFlip(0.5, seed=1)(x)
    flipped = np.array([np.array_equal(y[n], x[n, :, :, ::-1]) for n in range(400)])
    kept = np.array([np.array_equal(y[n], x[n]) for n in range(400)])
    assert (flipped | kept).all() and 150 < flipped.sum() < 250
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(RandomHorizontalFlip(0.0)(x), x)


def test_normalize_per_channel_and_compose():
    x = images((4, 2, 3, 3))
    y = Normalize(mean=[10, 20], std=[2, 4])(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[:, 1], (x[:, 1] - 20.0) / 4, rtol=1e-6)
    pipeline = Compose([RandomShift(1, seed=0), lambda b: b.astype(np.float32) / 255,
                        Normalize(0.5, 0.25)])
    out = pipeline(images((4, 28, 28)))
    assert out.shape == (4, 28, 28) and out.dtype == np.float32


def test_seeded_and_repeatable_through_the_data_loader():
    x, y = images((32, 1, 8, 8)), np.arange(32)
    minidl.manual_seed(5)
    first = [xb for xb, _ in DataLoader(x, y, 8, shuffle=False, transform=RandomShift(2))]
    minidl.manual_seed(5)
    second = [xb for xb, _ in DataLoader(x, y, 8, shuffle=False, transform=RandomShift(2))]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, x[i * 8:(i + 1) * 8]) for i, a in enumerate(first))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="RandomCrop: padding must be >= 0"):
        RandomCrop(padding=-1)
    with pytest.raises(TypeError, match="RandomShift: max_shift must be an int"):
        RandomShift(1.5)
    with pytest.raises(ValueError, match=r"RandomCrop: crop size \(9, 9\) is larger"):
        RandomCrop(9)(images((2, 7, 7)))
    with pytest.raises(ValueError, match=r"RandomHorizontalFlip: p must be .* got 2"):
        RandomHorizontalFlip(2)
    with pytest.raises(ValueError, match="Normalize: std must be > 0"):
        Normalize(0, [1, 0])
    with pytest.raises(ValueError, match=r"Normalize: 3 values of mean .* \(2 channels\)"):
        Normalize([1, 2, 3], 1)(images((2, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"RandomShift: expected a batch of shape"):
        RandomShift(1)(np.zeros((3, 3)))
    with pytest.raises(TypeError, match="Compose: transforms\\[1\\] is a int"):
        Compose([RandomShift(1), 3])
