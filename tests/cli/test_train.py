"""``minidl train`` on small generated data: the checkpoint, history, run.json and
plots, a notice without matplotlib, a diverging run as one line, --resume of a folder
without a run, and the global batch split over the ranks; an earlier run kept unless
--overwrite, a resume that refuses options contradicting the run or a bad run.json or
state before anything runs (every earlier file left byte for byte), extends a run or
says it is finished; --quiet, --help, --version, Ctrl-C's resume command and mpiexec
copies. Resuming a killed run: tests/ext/test_resume.py; a run over MPI ranks:
tests/ext/test_distributed.py."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minidl import Trainer, cli
from minidl.cli import train as cli_train
from minidl.ext import plots as viz

# the mpich wheel's mpiexec, beside this python (the dist extra)
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable))

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


# -- an earlier run, resumed, extended, refused: every earlier file left as it was ---------------
COMMON = ["--model", "lenet5", "--limit", "80", "--batch-size", "40", "--quiet"]


def files_of(folder):
    """{name: bytes} of every file in ``folder``."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def finished_run(data_root, tmp_path, monkeypatch, capsys):
    """A finished two-epoch run in tmp_path/run (no plots: faster), and what it printed."""
    monkeypatch.setattr(viz, "available", lambda: False)
    out = tmp_path / "run"
    assert cli.main(["train", *COMMON, "--epochs", "2", "--data-root", str(data_root),
                     "--out", str(out)]) == 0
    return out, capsys.readouterr()


def test_quiet_keeps_one_line_per_epoch_and_no_bars(finished_run):
    """--quiet used to hide the epoch lines too."""
    _, printed = finished_run
    assert [line.split(":")[0] for line in printed.out.splitlines()
            if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert "batch/s" not in printed.err and "Epoch 1/2" not in printed.err


def test_a_new_run_does_not_overwrite_an_earlier_one(finished_run, data_root, capsys):
    out, _ = finished_run
    before = files_of(out)
    again = ["train", *COMMON, "--epochs", "1", "--seed", "1", "--data-root", str(data_root),
             "--out", str(out)]
    assert cli.main(again) == 1
    err = capsys.readouterr().err
    assert err == (f"minidl train: error: --out '{out}' holds an earlier run (state.npz, "
                   f"model.npz, history.csv): continue it with --resume {out}, replace it with "
                   f"--overwrite, or pass another --out\n")
    assert files_of(out) == before
    assert cli.main(again + ["--overwrite"]) == 0
    after = files_of(out)
    assert after["model.npz"] != before["model.npz"]
    assert [row.split(",")[0] for row in after["history.csv"].decode().splitlines()] == [
        "epoch", "1"]
    assert json.loads(after["run.json"])["seed"] == 1


@pytest.mark.parametrize("option, message", [
    (["--lr", "0.1"], "--lr 0.1 (the run's: 0.004)"),
    (["--model", "cnn", "--seed", "3"], "--model cnn (the run's: lenet5), --seed 3 (the run's: 0)"),
    (["--no-augment"], "--augment False (the run's: True)"),
    (["--out", "elsewhere"], "--out elsewhere (the run's: "),
    (["--overwrite"], "--overwrite (a resumed run continues its files)"),
])
def test_resume_refuses_options_that_contradict_the_run(finished_run, capsys, option, message):
    """--resume used to ignore --lr, --model, --out... without a word."""
    out, _ = finished_run
    before = files_of(out)
    assert cli.main(["train", "--resume", str(out), *option]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"minidl train: error: --resume '{out}' continues the run with its "
                          f"own settings (run.json); refusing ") and message in err, err
    assert err.count("\n") == 1 and files_of(out) == before


def test_resume_of_a_finished_run_says_so_and_changes_nothing(finished_run, data_root, capsys):
    out, _ = finished_run
    before = files_of(out)
    # options equal to the run's, and where to run, are not conflicts
    assert cli.main(["train", "--resume", str(out), "--lr", "0.004", "--epochs", "2",
                     "--data-root", str(data_root)]) == 0
    printed = capsys.readouterr()
    assert printed.out == (f"the run in {out} is finished (2 of 2 epochs; model.npz, "
                           f"history.csv and the plots are there, `minidl report {out}` "
                           f"writes its report again); pass --epochs N with N > 2 to train "
                           f"it further\n")
    assert printed.err == "" and files_of(out) == before
    assert cli.main(["train", "--resume", str(out), "--epochs", "1"]) == 1
    assert "--epochs 1 is fewer than the run's 2 epochs" in capsys.readouterr().err
    assert files_of(out) == before


def test_an_empty_folder_option_is_refused(capsys):
    """--resume "" used to start a fresh run."""
    for option in ("--resume", "--out"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", option, ""])
        assert exit_info.value.code == 2
        assert f"argument {option}: must be a folder, got ''" in capsys.readouterr().err


def test_resume_with_more_epochs_extends_the_run(finished_run, monkeypatch, capsys):
    out, _ = finished_run
    drawn = {}
    monkeypatch.setattr(viz, "available", lambda: True)
    for name in ("plot_history", "plot_gradient_norms", "plot_lr"):
        monkeypatch.setattr(viz, name, lambda data, path, *args, name=name, **kwargs:
                            drawn.setdefault(name, data))
    for name in ("plot_filters", "plot_feature_maps", "plot_confusion_matrix"):
        monkeypatch.setattr(viz, name, lambda *args, **kwargs: None)
    assert cli.main(["train", "--resume", str(out), "--epochs", "3"]) == 0
    printed = capsys.readouterr().out
    assert (f"extending the run in {out} from 2 to 3 epochs: its onecycle schedule is "
            f"recomputed for 3 epochs from epoch 3 on") in printed
    assert printed.strip().splitlines()[-1].startswith("test accuracy: ")
    run = json.loads((out / "run.json").read_text())
    assert run["epochs"] == 3 and run["schedule_legs"] == [[0, 2], [2, 3]]
    rows = (out / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "2", "3"]
    # the plots come from the whole history, not from the resumed epoch alone
    assert drawn["plot_history"].epochs == 3
    assert {len(norms) for norms in drawn["plot_gradient_norms"].values()} == {3}
    # lr.png: two epochs of 2 steps on the first schedule, then the recomputed one
    rates = drawn["plot_lr"]
    assert len(rates) == 6 and rates[:4] == pytest.approx(_onecycle(4)[:4])
    assert rates[4:] == pytest.approx(_onecycle(6)[4:])


def _onecycle(total_steps):
    from minidl import Adam, Parameter
    from minidl.schedulers import OneCycleLR
    sched = OneCycleLR(Adam([Parameter(np.zeros(1))], lr=4e-3), 4e-3, total_steps=total_steps)
    return [sched.lr_at(t) for t in range(total_steps)]


def _edit_run_json(out, **changes):
    run = json.loads((out / "run.json").read_text())
    run.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del run[key]
    (out / "run.json").write_text(json.dumps(run))


_DROP = object()


@pytest.mark.parametrize("changes, message", [
    ({"augment": "false"}, "'augment' is 'false', which --augment does not take (true or false)"),
    ({"epochs": _DROP}, "lacks the settings ['epochs']: was it written by minidl train?"),
    ({"epochs": "2"}, "'epochs' is '2', which --epochs does not take (a number)"),
    ({"batch_size": 0}, "'batch_size' is 0, which --batch-size does not take (must be a "
                        "positive integer, got 0)"),
    ({"model": "vgg"}, "'model' is 'vgg', which --model does not take (one of cnn, lenet5, "
                       "mobilenet, resnet)"),
    ({"lr": float("nan")}, "'lr' is nan, which --lr does not take"),
    ({"limit": 60}, "saved by a run of 2 batches per epoch over 72 training samples; this one "
                    "has 2 over 54"),
    ({"schedule_legs": [[0, 5]]}, "'schedule_legs' must be [first epoch, epochs] pairs"),
])
def test_a_bad_run_json_is_refused_before_anything_runs(finished_run, capsys, monkeypatch,
                                                        changes, message):
    """"augment": "false" used to be truthy, a missing key a KeyError, and a changed limit
    was caught only after an epoch."""
    out, _ = finished_run
    _edit_run_json(out, **changes)
    before = files_of(out)
    steps = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, x, y: steps.append(1))
    assert cli.main(["train", "--resume", str(out), "--epochs", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minidl train: error: ") and message in err and err.count("\n") == 1
    assert files_of(out) == before and steps == []


def test_a_damaged_state_is_refused_and_every_file_kept(finished_run, capsys):
    out, _ = finished_run
    with np.load(out / "state.npz") as data:
        arrays = dict(data)
    arrays["rng/loader"] = np.array('{"bit_generator": "PCG64", "state": 5}')
    np.savez(out / "state.npz", **arrays)
    before = files_of(out)
    assert cli.main(["train", "--resume", str(out), "--epochs", "3"]) == 1
    err = capsys.readouterr().err
    assert "'rng/loader' is not a state of its PCG64 generator" in err and err.count("\n") == 1
    assert files_of(out) == before


def test_ctrl_c_says_how_to_resume_and_that_command_does(data_root, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setattr(viz, "available", lambda: False)
    real_step = Trainer.train_step

    def interrupt(self, x, y):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", interrupt)
    out = tmp_path / "my run"
    assert cli.main(["train", *COMMON, "--epochs", "2", "--data-root", str(data_root),
                     "--out", str(out)]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    command = last.split("; continue with: ")[1]
    assert command == f"minidl train --resume '{out}'"
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert cli.main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test accuracy: ")


def test_mpiexec_copies_without_distributed_are_refused(tmp_path, capsys, monkeypatch):
    """mpiexec -n 2 without --distributed used to run two trainings into one folder."""
    monkeypatch.setenv("PMI_SIZE", "2")
    for command, fix in (("train", "add --distributed to train over them"),
                         ("lr-find", "run it as one process")):
        assert cli.main([command, "--out", str(tmp_path / "run")]) == 1
        assert capsys.readouterr().err == (
            f"minidl {command}: error: mpiexec started 2 copies of 'minidl {command}' "
            f"(PMI_SIZE=2); each would run alone, into the same --out: {fix}\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(MPIEXEC is None, reason="the 'dist' extra is not installed")
def test_mpiexec_copies_are_refused_for_real(tmp_path):
    done = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, "-c", "import sys; from minidl import cli; "
         f"sys.exit(cli.main(['train', '--out', {str(tmp_path / 'run')!r}]))"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert done.returncode != 0
    assert done.stderr.count("mpiexec started 2 copies of 'minidl train' (PMI_SIZE=2)") == 2
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_help_shows_every_default_and_there_is_a_version(capsys):
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help" and action.required is False \
                    and action.const is None:
                assert "default" in (action.help or ""), (name, action.option_strings)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--epochs EPOCHS       epochs in all" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == "minidl 0.1.0\n"
