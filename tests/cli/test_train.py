"""``minidl train`` on small generated data: the checkpoint, history, run.json and
plots, a notice without matplotlib, a diverging run as one line, --resume of a folder
without a run, and the global batch split over the ranks. Resuming a killed run:
tests/ext/test_resume.py; a run over MPI ranks: tests/ext/test_distributed.py."""
import json
import re

import pytest

from minidl import cli
from minidl.cli import train as cli_train
from minidl.ext import plots as viz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def test_cli_resume_of_a_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path)]) == 1
    assert "no run.json and state.npz there" in capsys.readouterr().err


def test_global_batch_must_split_over_ranks():
    with pytest.raises(ValueError, match="--batch-size 63 does not split evenly over 2"):
        cli_train.batch_per_rank(63, 2)
