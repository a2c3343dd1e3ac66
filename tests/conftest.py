"""Shared fixtures: run backend-sensitive tests on numpy and, when a GPU exists, cupy."""
import gzip
import hashlib

import numpy
import pytest

import minidl

GPU = minidl.gpu_available()
NO_GPU_REASON = "cupy backend: no CUDA device (or CuPy not installed); pip install 'minidl[gpu]'"


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module of the backend under test; layers built inside use it."""
    if request.param == "cupy" and not GPU:
        pytest.skip(NO_GPU_REASON)
    with minidl.set_backend(request.param) as module:
        yield module


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same seed, so failures reproduce."""
    minidl.manual_seed(1234)
    yield


def to_np(a):
    return minidl.to_numpy(a)


def randn(xp, *shape, seed=0, dtype=numpy.float64):
    """Standard-normal data made with numpy (same numbers on both backends)."""
    data = numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return xp.asarray(data)


def write_fake_dataset(root, dataset, n_train=256, n_test=100):
    """MNIST-format files under root/dataset: 28x28 images whose class is the row of
    one bright stripe. Returns their (MD5, .gz size), to stand in for the official ones."""
    from minidl.data import datasets, write_idx
    rng = numpy.random.default_rng(0)
    folder = root / dataset
    folder.mkdir(parents=True)
    checksums = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(numpy.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(numpy.uint8)
        for image, label in zip(images, labels):
            image[2 * label + 4:2 * label + 6, 4:24] = 255
        for name, array in zip(datasets.SPLITS[split], (images, labels)):
            path = folder / f"{name}.gz"
            write_idx(path, array)
            data = path.read_bytes()
            checksums[name] = (hashlib.md5(gzip.decompress(data)).hexdigest(), len(data))
    return checksums
