"""Shared fixtures: the numpy backend, a fixed seed, and PyTorch's answers (live or recorded).

GPU runs of the layers live in tests/test_gpu.py (marker ``gpu``); every other test runs
on numpy, so a machine without a GPU or torch still runs them all.
"""
import functools
import gzip
import hashlib
import pathlib

import numpy
import pytest

import minidl

try:
    import torch
except ImportError:         # then the torch comparisons read tests/golden/*.npz
    torch = None

GPU = minidl.gpu_available()
NO_GPU_REASON = "cupy backend: no CUDA device (or CuPy not installed); pip install 'minidl[gpu]'"
GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"


@pytest.fixture
def xp():
    """The array module the test builds its data with: numpy (GPU tests: test_gpu.py)."""
    with minidl.set_backend("numpy") as module:
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


# -- PyTorch's answers: live when torch imports, else recorded in tests/golden/ -------------

@functools.lru_cache(maxsize=None)
def golden_file(module):
    path = GOLDEN_DIR / f"{module}.npz"
    if not path.exists():
        return {}
    with numpy.load(path) as stored:
        return {key: stored[key] for key in stored.files}


def golden_case(module, case):
    """The arrays recorded for one test, by name; a clear failure when there are none."""
    prefix = case + "::"
    stored = golden_file(module)
    arrays = {key[len(prefix):]: value for key, value in stored.items() if key.startswith(prefix)}
    if not arrays:
        pytest.fail(f"no PyTorch answers recorded for {case} in tests/golden/{module}.npz: "
                    "run `PYTHONPATH=$PWD python tests/golden/make_golden.py` (needs torch)")
    return arrays


STALE = "stale golden file: rerun `PYTHONPATH=$PWD python tests/golden/make_golden.py`"


def assert_same_answer(live, stored, where):
    assert set(live) == set(stored), f"{where}: recorded {sorted(stored)}, live {sorted(live)}"
    for key, value in live.items():
        if value.dtype.kind == "f":
            numpy.testing.assert_allclose(value, stored[key], rtol=1e-7, atol=1e-12,
                                          err_msg=f"{where}::{key}: {STALE}")
        else:
            numpy.testing.assert_array_equal(value, stored[key], err_msg=f"{where}::{key}: {STALE}")


@pytest.fixture
def torch_reference(request):
    """``torch_reference(compute)`` gives PyTorch's answer for this test: the dict of numpy
    arrays ``compute(torch)`` returns. With torch importable it runs live (and must agree
    with the recorded answer, so a stale file shows); without torch the answer comes
    from tests/golden/<test module without "test_">.npz, written by make_golden.py.
    One call per test: the answer is stored under the test's name."""
    module = request.module.__name__.removeprefix("test_")
    case = request.node.name
    recorder = getattr(request.config, "golden_recorder", None)

    def reference(compute):
        if torch is None:
            return golden_case(module, case)
        live = {key: numpy.asarray(value) for key, value in compute(torch).items()}
        if recorder is not None:
            recorder.record(module, case, live)
        else:
            assert_same_answer(live, golden_case(module, case), f"{module}.npz {case}")
        return live

    return reference
