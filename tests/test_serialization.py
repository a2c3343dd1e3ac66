"""minidl.serialization: atomic .npz checkpoints."""
import os
import stat

import numpy as np
import pytest

from minidl.serialization import load_npz, save_npz


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_gets_the_usual_permissions_for_the_umask(tmp_path, umask):
    # not mkstemp's 0600: a checkpoint is shared like any file the user writes
    path = tmp_path / "model.npz"
    previous = os.umask(umask)
    try:
        save_npz(path, {"w": np.arange(3)})
        save_npz(path, {"w": np.arange(4)})  # replacing an existing file, too
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    np.testing.assert_array_equal(load_npz(path)["w"], np.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left


def test_failed_save_leaves_no_file(tmp_path):
    class Unsaveable:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_npz(tmp_path / "model.npz", {"w": Unsaveable()})
    assert list(tmp_path.iterdir()) == []
