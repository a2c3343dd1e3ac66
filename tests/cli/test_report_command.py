"""``minidl report``: train writes RUN_DIR/report.html at the end of a run and of a
resume, ``minidl report RUN_DIR`` writes it again from the folder alone, the learning
rate of every step is the run's schedule; a missing or crafted folder, settings file,
history or checkpoint is one line on stderr, exit 1, and nothing written. What the
page holds and how a browser shows it: tests/ext/test_report.py (minidl.ext.report).
"""
import json
import os
import re
import shutil

import pytest

from minidl import Conv2D, Sequential
from minidl import cli
from minidl.cli import report as cli_report
from minidl.data import datasets
from minidl.ext import plots
from minidl.ext.report import SECTIONS

from conftest import write_fake_dataset


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch run on 256 fake MNIST images (231 to train, 25 to validate): its folder,
    and what train printed. The tests that read its data take ``data_root`` too, which
    accepts the same fake files (write_fake_dataset makes the same ones every time)."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(datasets.CHECKSUMS, "mnist",
                      write_fake_dataset(root / "data", "mnist", n_train=600))
        code = cli.main(["train", "--limit", "256", "--epochs", "2", "--quiet",
                         "--data-root", str(root / "data"), "--out", str(root / "run")])
    assert code == 0
    return root / "run"


def sections(path):
    return re.findall(r'<section id="([\w-]+)">', path.read_text())


@pytest.mark.slow
def test_train_writes_the_report_and_minidl_report_writes_it_again(finished_run, data_root,
                                                                   tmp_path, capsys):
    page = finished_run / "report.html"
    assert sections(page) == [key for key, _ in SECTIONS]
    assert page.stat().st_size < 3 * 2**20
    run = shutil.copytree(finished_run, tmp_path / "run")
    os.remove(run / "report.html")
    assert cli.main(["report", str(run)]) == 0
    assert re.fullmatch(rf"report written to {re.escape(str(run / 'report.html'))} "
                        rf"\(\d+ KiB\)\n", capsys.readouterr().out)
    assert (run / "report.html").read_text().replace(str(run), str(finished_run)) \
        == page.read_text()                         # the same page, but for its title
    assert cli.main(["report", str(run), "--out", str(tmp_path / "elsewhere.html")]) == 0
    assert sections(tmp_path / "elsewhere.html") == sections(page)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:No artists with labels")   # gradients.png: no new epoch
def test_a_resumed_run_writes_its_report_again(finished_run, data_root, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    os.remove(run / "report.html")
    # a finished run says so and trains nothing: `minidl report` writes the page again
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    assert f"minidl report {run}" in capsys.readouterr().out
    assert not (run / "report.html").exists()
    # extended by an epoch, it ends with its report, of all three epochs
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-3].startswith(f"report in {run / 'report.html'} (")
    assert printed[-1].startswith("test accuracy: ")    # still the last line
    assert sections(run / "report.html") == [key for key, _ in SECTIONS]
    settings = cli_report.read_settings(run / "run.json")
    lrs, steps = cli_report.learning_rates(settings, 3, settings["data_root"])
    assert settings["schedule_legs"] == [[0, 2], [2, 3]] and steps == 4
    assert lrs[:8] == cli_report.learning_rates({**settings, "epochs": 2,
                                                 "schedule_legs": None}, 2,
                                                settings["data_root"])[0]


@pytest.mark.parametrize("schedule, expected", [
    ("cosine", [4e-3] * 4 + [2e-3] * 4),               # per epoch: lr (1 + cos(pi e / 2)) / 2
    ("onecycle", None),
])
def test_the_learning_rate_of_every_step_is_the_runs_schedule(data_root, schedule, expected):
    settings = {"dataset": "mnist", "limit": 256, "batch_size": 64, "lr": 4e-3, "epochs": 2,
                "schedule": schedule, "optimizer": "adam"}
    lrs, steps = cli_report.learning_rates(settings, 2, str(data_root))
    assert steps == 4                                   # 231 training images in batches of 64
    if expected:
        assert lrs == pytest.approx(expected)
    else:   # warm-up from lr / 25 to the peak lr, then down to lr / 25e4
        assert len(lrs) == 8 and lrs[0] == pytest.approx(4e-3 / 25)
        assert max(lrs) <= 4e-3 and lrs[-1] == pytest.approx(4e-3 / 25e4)


# -- damaged or crafted runs: one line, nothing written -------------------------------------------
def _json(**changes):
    def damage(run):
        settings = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**settings, **changes}))
    return damage


def _replace(name, text):
    return lambda run: (run / name).write_text(text)


def _history_cell(old, new):
    def damage(run):
        path = run / "history.csv"
        path.write_text(path.read_text().replace(old, new, 1))
    return damage


def _fifo(name):
    def damage(run):
        os.remove(run / name)
        os.mkfifo(run / name)
    return damage


@pytest.mark.parametrize("damage, message", [
    (lambda run: shutil.rmtree(run), "RUN_DIR '.*run' is not a folder"),
    (lambda run: os.remove(run / "run.json"), "run.json: no run.json there"),
    (_fifo("run.json"), "run.json: the run.json is not a regular file"),
    (_replace("run.json", "{" * 10), "run.json is not valid JSON"),
    (_replace("run.json", " " * (2**20 + 1)), "run.json: the run.json is 1048577 bytes, more"),
    (_json(dataset="imagenet"), "run.json: dataset must be one of .* got 'imagenet'"),
    (_json(epochs="8"), "run.json: epochs must be an int, got '8'"),
    (_json(lr=-1), "run.json: lr must be a finite number > 0, got -1"),
    (_json(limit=1), "run.json: limit must be >= 2"),
    (_json(data_root=["/"]), r"run.json: data_root must be a folder name or null"),
    (lambda run: os.remove(run / "history.csv"), "history.csv: no history.csv there"),
    (_fifo("history.csv"), "history.csv: the history.csv is not a regular file"),
    (_history_cell("\n1,", "\n1,x"), "history.csv: line 2, column 'loss': 'x.*' is not a number"),
    (_history_cell("\n2,", "\n3,"), r"history.csv: the epoch column should count 1, 2, \.\.\. 2"),
    (_history_cell("\n2,", "\n2,1,"), "history.csv: line 3 has .* values for .* columns"),
    (_replace("history.csv", ""), "history.csv: expected a header with 'epoch'"),
    (lambda run: os.remove(run / "model.npz"), "model.npz: no checkpoint there"),
    (_fifo("model.npz"), "model.npz: the checkpoint is not a regular file"),
    (_replace("model.npz", "PK"), "checkpoint '.*model.npz': it is corrupt, truncated"),
    (lambda run: Sequential(Conv2D(1, 2, 3)).save(run / "model.npz"),
     r"report: the model gives outputs of shape \(100, 2, 26, 26\), not class scores"),
])
def test_a_damaged_run_is_one_line_and_nothing_written(finished_run, data_root, tmp_path,
                                                       capsys, damage, message):
    run = shutil.copytree(finished_run, tmp_path / "run")
    os.remove(run / "report.html")
    damage(run)
    before = sorted(os.listdir(run)) if run.exists() else None
    code = cli.main(["report", str(run)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("minidl report: error: ") and re.search(message, err), err
    assert (sorted(os.listdir(run)) if run.exists() else None) == before


def test_without_matplotlib_it_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "the report needs matplotlib: pip install 'minidl[viz]'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
