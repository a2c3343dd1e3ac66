"""``minidl evaluate``: the model rebuilt from the checkpoint alone (or --model loaded
into), and a damaged checkpoint reported in one line naming the file."""
import io
import os
import re
import zipfile

import numpy as np
import pytest

from minidl import cli

from conftest import fails_instead_of_hanging, special_files


def test_evaluate_rebuilds_the_model_from_the_checkpoint(data_root, tmp_path, capsys):
    from minidl.ext.zoo import lenet5
    lenet5().save(tmp_path / "model.npz")  # no run.json, no --model: not the default cnn
    code = cli.main(["evaluate", "--checkpoint", str(tmp_path / "model.npz"),
                     "--data-root", str(data_root)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0] == "model on mnist (100 test images)"
    assert re.fullmatch(r"test accuracy: [01]\.\d{4}", lines[1])
    code = cli.main(["evaluate", "--checkpoint", str(tmp_path / "model.npz"), "--model", "cnn",
                     "--data-root", str(data_root)])
    assert code == 1 and "different model structure" in capsys.readouterr().err


# -- evaluate on damaged checkpoints and settings: one line naming the file ------------
def _small_checkpoint(path):
    from minidl import Dense, Flatten, Sequential
    Sequential(Flatten(), Dense(784, 10)).save(path)
    return path


def _npy_renamed(path):
    np.save(path.with_suffix(".npy"), np.zeros(3))
    path.with_suffix(".npy").rename(path)


def _zero_d_config(path):
    with np.load(_small_checkpoint(path)) as data:
        state = {**data, "__model__": np.array(str(data["__model__"][0]))}
    np.savez(path, **state)


def _member_without_suffix(path):
    with np.load(_small_checkpoint(path)) as data:
        state = dict(data)
    with zipfile.ZipFile(path, "w") as z:
        for key, value in state.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            z.writestr(key if key == "1.weight" else f"{key}.npy", buffer.getvalue())


def _encrypted_member(path):
    # zipfile cannot encrypt; set the "encrypted" flag on the member (local and central)
    _small_checkpoint(path)
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        data[at + offset] |= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (_npy_renamed, "corrupt, truncated or not an .npz"),
    (_zero_d_config, r"'__model__' is <U\d+ of shape \(\)"),
    (_member_without_suffix, "member '1.weight' is not an .npy array"),
    (_encrypted_member, "is encrypted"),
])
def test_evaluate_on_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, capsys, damage,
                                                                message):
    path = tmp_path / "model.npz"
    damage(path)
    code = cli.main(["evaluate", "--checkpoint", str(path), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"minidl evaluate: error: checkpoint {str(path)!r}: ")
    assert re.search(message, err) and "allow_pickle" not in err


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and /dev/zero are POSIX")
def test_evaluate_refuses_a_fifo_or_a_device_in_one_line(tmp_path, capsys):
    for path in special_files(tmp_path, "model.npz"):
        with fails_instead_of_hanging():
            code = cli.main(["evaluate", "--checkpoint", str(path)])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"minidl evaluate: error: checkpoint {str(path)!r} is a ")
    # run.json beside the checkpoint is read too, before the checkpoint
    _small_checkpoint(tmp_path / "model.npz")
    os.mkfifo(tmp_path / "run.json")
    with fails_instead_of_hanging():
        code = cli.main(["evaluate", "--checkpoint", str(tmp_path / "model.npz")])
    err = capsys.readouterr().err
    assert code == 1 and err == (f"minidl evaluate: error: {str(tmp_path / 'run.json')!r} is "
                                 f"a FIFO, not a regular file\n")
