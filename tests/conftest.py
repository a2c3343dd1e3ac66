"""Shared fixtures: run backend-sensitive tests on numpy and, when a GPU exists, cupy."""
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
