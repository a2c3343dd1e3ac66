"""Record PyTorch's answers for the torch comparison tests into tests/golden/*.npz.

Rerun from the repository root (needs torch, any CPU build), then commit the files:

    PYTHONPATH=$PWD python tests/golden/make_golden.py

It runs, with torch, every test module under tests/ (tests/core/, tests/ext/, ...)
that uses the ``torch_reference`` fixture of tests/conftest.py. Each such test computes
PyTorch's arrays live from inputs it makes with fixed seeds; here they are also kept,
and written to tests/golden/<module without "test_">.npz (tests/core/layers/test_conv.py:
conv.npz) under the key "<test name>::<array name>". Module names are unique across the
folders, so each file belongs to one module.
Without torch the same tests read those arrays back, so CI compares with PyTorch
without installing it. The files are rewritten whole, in sorted order with fixed zip
timestamps: a rerun with the same torch gives the same bytes.
"""
import io
import pathlib
import sys
import zipfile

import numpy
import pytest

import torch  # noqa: F401  (fail here, clearly, when torch is missing)

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent
TESTS_DIR = GOLDEN_DIR.parent


class Recorder:
    """A pytest plugin: the torch_reference fixture hands it each live answer."""

    def __init__(self):
        self.modules = {}

    def pytest_configure(self, config):
        config.golden_recorder = self

    def record(self, module, case, arrays):
        stored = self.modules.setdefault(module, {})
        for name, value in arrays.items():
            stored[f"{case}::{name}"] = value


def write_npz(path, arrays):
    """np.savez_compressed, but with sorted keys and fixed timestamps (same bytes each run)."""
    with zipfile.ZipFile(path, "w") as archive:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            numpy.lib.format.write_array(buffer, numpy.asarray(arrays[key]), allow_pickle=False)
            entry = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(entry, buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED)


def main():
    modules = sorted(str(path) for path in TESTS_DIR.rglob("test_*.py")
                     if "torch_reference" in path.read_text())
    recorder = Recorder()
    status = pytest.main(["-q", "-p", "no:cacheprovider", *modules], plugins=[recorder])
    for module, arrays in sorted(recorder.modules.items()):
        path = GOLDEN_DIR / f"{module}.npz"
        write_npz(path, arrays)
        print(f"{path.relative_to(TESTS_DIR.parent)}: {len(arrays)} arrays, "
              f"{path.stat().st_size / 1024:.1f} KiB")
    if status != 0:
        print("some tests failed: their answers may be missing from the files", file=sys.stderr)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
