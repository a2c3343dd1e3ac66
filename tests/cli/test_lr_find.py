"""``minidl lr-find``, after ``minidl train --schedule onecycle``: the loss plot
(lr_find.png) and the suggestion, and the one-cycle rate plot (lr.png)."""
import pytest

from minidl import cli
from minidl.cli import train as cli_train
from minidl.data import datasets
from minidl.ext.recorder import GradientRecorder

from conftest import write_fake_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist", write_fake_dataset(root, "mnist", n_train=200))
    monkeypatch.setattr(cli_train, "GradientRecorder", _QuietRecorder)
    return root


class _QuietRecorder(GradientRecorder):
    """The CLI's recorder, sampling activations rarely (faster tests, same code)."""

    def __init__(self, model):
        super().__init__(model, every=1000)


@pytest.mark.slow
def test_cli_onecycle_plots_the_rate_and_lr_find_plots_the_loss(data_root, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setattr(cli_train, "write_plots", lambda *args: None)   # test_train.py's job
    out = tmp_path / "run"
    assert cli.main(["train", "--limit", "80", "--epochs", "1", "--batch-size", "40",
                     "--schedule", "onecycle", "--data-root", str(data_root), "--out", str(out),
                     "--quiet"]) == 0
    assert (out / "lr.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    assert cli.main(["lr-find", "--limit", "80", "--steps", "12", "--batch-size", "16",
                     "--data-root", str(data_root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "steps from lr 1e-07 to" in printed and "the loss fell fastest at lr" in printed
    assert (out / "lr_find.png").read_bytes().startswith(PNG_MAGIC)
