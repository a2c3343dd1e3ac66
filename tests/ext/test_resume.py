"""Resumable training (minidl/ext/resume.py, TrainingState): bit for bit on the CPU,
after a stop and after a kill of ``minidl train`` (--resume); a state of another run
or a model checkpoint is refused."""
import json
import os

import numpy as np
import pytest

import minidl
from minidl import (Adam, BatchNorm2D, Callback, Conv2D, DataLoader, Dense, Dropout, Flatten,
                    MaxPool2D, ReLU, Residual, Sequential, SoftmaxCrossEntropy, Trainer, cli)
from minidl.ext.transforms import Compose, RandomHorizontalFlip, RandomShift
from minidl.ext import plots, resume
from minidl.ext.resume import TrainingState
from minidl.schedulers import CosineAnnealingLR, OneCycleLR

from conftest import fails_instead_of_hanging, fake_images, special_files


def to_float(images):
    return images.astype(np.float32) / 255


class StopAfter(Callback):
    """Stand-in for Ctrl-C or a kill: stop once ``epochs`` epochs are done."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch + 1 == self.epochs:
            trainer.stop_training = True


def setup(epochs=2, per_batch=False, batch_size=16):
    """A seeded run with every source of randomness: shuffles, augmentation, dropout,
    batch norm statistics, Adam's moments and a scheduler: (trainer, train, val)."""
    minidl.manual_seed(0)
    model = Sequential(Conv2D(1, 4, 3, padding=1, bias=False), BatchNorm2D(4), ReLU(),
                       Residual(Conv2D(4, 4, 3, padding=1)), MaxPool2D(2), Flatten(),
                       Dropout(0.3), Dense(64, 3))
    x, y = fake_images()
    train = DataLoader(x, y, batch_size, seed=0, transform=Compose(
        [RandomShift(1), RandomHorizontalFlip(), to_float]))
    optimizer = Adam(model.parameters(), lr=1e-2)
    scheduler = (OneCycleLR(optimizer, 1e-2, epochs=epochs, steps_per_epoch=len(train))
                 if per_batch else CosineAnnealingLR(optimizer, T_max=epochs))
    trainer = Trainer(model, SoftmaxCrossEntropy(), optimizer, scheduler=scheduler, verbose=0)
    return trainer, train, DataLoader(x, y, 48, transform=to_float)


def run(state, epochs=2, resume=None, stop_after=None, per_batch=False, callbacks=(),
        reschedule=False):
    trainer, train, val = setup(epochs, per_batch)
    callbacks = list(callbacks) + ([] if stop_after is None else [StopAfter(stop_after)])
    callbacks.append(TrainingState(state, resume=resume, reschedule=reschedule))
    history = trainer.fit(train, epochs=epochs, val=val, callbacks=callbacks)
    return trainer.model, trainer.optimizer, history


class InterruptIn(Callback):
    """Ctrl-C at the first batch of ``epoch`` (from 0)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_batch_begin(self, trainer, batch):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def test_a_resumed_run_stopped_again_keeps_the_earlier_epochs(tmp_path):
    """history.csv used to lose the epochs before the resume when the resumed run was
    stopped again, and ModelCheckpoint forgot which epoch its file held."""
    state, csv_path = tmp_path / "state.npz", tmp_path / "history.csv"
    run(state, epochs=4, stop_after=2, callbacks=[minidl.CSVLogger(csv_path)])
    saver = minidl.ModelCheckpoint(tmp_path / "model.npz")
    with pytest.raises(KeyboardInterrupt) as info:
        run(state, epochs=4, resume=True,
            callbacks=[saver, minidl.CSVLogger(csv_path), InterruptIn(3)])
    assert [row.split(",")[0] for row in csv_path.read_text().splitlines()] == [
        "epoch", "1", "2", "3"]
    accuracies = info.value.history["val_accuracy"]
    assert len(accuracies) == 3 and saver.saved_epoch == accuracies.index(max(accuracies)) + 1


@pytest.mark.parametrize("per_batch", [False, True], ids=["cosine", "onecycle"])
def test_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, per_batch):
    model, optimizer, history = run(tmp_path / "full.npz", per_batch=per_batch)
    run(tmp_path / "part.npz", stop_after=1, per_batch=per_batch)
    # a fresh process would start from other weights: the state must replace them all
    minidl.manual_seed(123)
    resumed, resumed_opt, resumed_history = run(tmp_path / "part.npz", per_batch=per_batch,
                                                resume=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert resumed_opt.lr == optimizer.lr
    for name, value in optimizer.state_dict().items():
        np.testing.assert_array_equal(resumed_opt.state_dict()[name], value, err_msg=name)
    assert resumed_history.epochs == history.epochs == 2
    for key in history.history:
        if key != "time":
            assert resumed_history[key] == history[key], key


def test_resume_refuses_another_run_and_model_checkpoints(tmp_path):
    run(tmp_path / "state.npz", epochs=1)
    minidl.manual_seed(0)
    model = Sequential(Flatten(), Dense(64, 3))
    x, y = fake_images()
    trainer = Trainer(model, SoftmaxCrossEntropy(), Adam(model.parameters()), verbose=0)
    def resume_from(path):
        trainer.fit(DataLoader(x, y, 16, transform=to_float),
                    callbacks=[TrainingState(path, resume=True)])

    with pytest.raises(ValueError, match="saved with a scheduler"):
        resume_from(tmp_path / "state.npz")
    model.save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match="not a training state"):
        resume_from(tmp_path / "model.npz")
    with pytest.raises(FileNotFoundError):
        resume_from(tmp_path / "none.npz")
    # a crafted state: a tiny file whose history member inflates to 40 MB
    np.savez_compressed(tmp_path / "big.npz", **{"epoch": np.int64(1),
                                                 "history/loss": np.zeros(5 * 10**6)})
    assert (tmp_path / "big.npz").stat().st_size < 10**6
    with pytest.raises(ValueError, match="holds random generators"):
        resume_from(tmp_path / "big.npz")


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and /dev/zero are POSIX")
def test_resume_refuses_a_fifo_or_a_device_as_its_state(tmp_path):
    for path in special_files(tmp_path, "state.npz"):
        with fails_instead_of_hanging(), pytest.raises(ValueError, match="not a regular file"):
            run(path, epochs=1, resume=True)


@pytest.mark.slow
def test_cli_resume_continues_a_killed_run(quiet_data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "available", lambda: False)
    common = ["train", "--limit", "120", "--epochs", "2", "--batch-size", "40", "--data-root",
              str(quiet_data_root), "--quiet", "--schedule", "onecycle"]
    assert cli.main(common + ["--out", str(tmp_path / "full")]) == 0
    full = capsys.readouterr().out.strip().splitlines()[-1]

    real_save = resume.save_training_state

    def save_then_die(path, trainer, *args):
        real_save(path, trainer, *args)
        if trainer.epoch == 0:
            raise KeyboardInterrupt        # killed right after epoch 1 was saved
    monkeypatch.setattr(resume, "save_training_state", save_then_die)
    assert cli.main(common + ["--out", str(tmp_path / "part")]) == 130   # as Ctrl-C
    monkeypatch.setattr(resume, "save_training_state", real_save)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "part"), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == full
    a, b = np.load(tmp_path / "full" / "model.npz"), np.load(tmp_path / "part" / "model.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows = (tmp_path / "part" / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2"]
    assert json.loads((tmp_path / "part" / "run.json").read_text())["schedule"] == "onecycle"


# -- crafted and damaged states: a clear ValueError, and nothing changes ---------------------
def snapshot(trainer, train):
    """Everything a resume may change, as plain values."""
    return (trainer.model.state_dict(), trainer.optimizer.state_dict(),
            trainer.optimizer.lr, trainer.scheduler.state_dict(), trainer.history.rows(),
            {name: gen.bit_generator.state for name, gen in resume.generators(
                trainer.model, train).items()})


def assert_same(a, b):
    for x, y in zip(a, b):
        if isinstance(x, dict) and x and all(isinstance(v, np.ndarray) for v in x.values()):
            assert x.keys() == y.keys()
            for key in x:
                np.testing.assert_array_equal(x[key], y[key], err_msg=key)
        else:
            assert str(x) == str(y)


BAD_RNG = json.dumps({"bit_generator": "PCG64", "state": {"state": -1, "inc": 1},
                      "has_uint32": 0, "uinteger": 0})


def _rename(arrays, old, new):
    arrays[new] = arrays.pop(old)


@pytest.mark.parametrize("craft, message", [
    (lambda a: a.update({"optimizer/state.0.m": a["optimizer/state.0.m"].astype(complex)}),
     r"array 'optimizer/state.0.m' is complex128 of shape \(4, 1, 3, 3\), expected float32"),
    (lambda a: a.update({"epoch": np.int64(10**6)}),
     r"it holds 1000000 epochs done, more than this fit's epochs=2"),
    (lambda a: a.update({"epoch": np.int64(-1)}), r"its epoch count is -1"),
    (lambda a: a.pop("optimizer/state.1.m"), r"the optimizer's state is not one of a training run"),
    (lambda a: a.update({f"optimizer/state.{i}.t": np.int64(0) for i in range(7)}),
     r"the optimizer's state is not one of a training run"),
    (lambda a: _rename(a, "optimizer/state.1.m", "optimizer/state.01.m"),
     r"unexpected arrays \['optimizer/state.01.m'\]"),
    (lambda a: a.update({"rng/loader": np.array(BAD_RNG)}),
     r"resume: .*'rng/loader' is not a state of its PCG64 generator"),
    (lambda a: a.update({"rng/minidl": np.array("{")}),
     r"'rng/minidl' is not a state of its PCG64 generator: '\{'"),
    (lambda a: a.update({"rng/minidl": np.array("x" * 10**5)}),
     r"array 'rng/minidl' is <U100000 of shape \(\), expected <U4096"),
    (lambda a: a["model/7.weight"].__setitem__((0, 0), np.nan),
     r"array 'model/7.weight' holds inf or NaN"),
    (lambda a: a.update({"optimizer/lr": np.float64(np.inf)}),
     r"array 'optimizer/lr' holds inf or NaN"),
    (lambda a: a.update({"history/loss": np.zeros(5)}),
     r"array 'history/loss' is float64 of shape \(5,\), expected float64 of shape \(1,\)"),
    (lambda a: a.update({"scheduler/last_epoch": np.int64(-3)}),
     r"last_epoch must be >= 0, got -3"),
    (lambda a: a.update({"loader": np.array([7, 100])}),
     r"saved by a run of 7 batches per epoch over 100 training samples; this one has 3 "
     r"over 48"),
    (lambda a: a.update({"model/1.running_var": a["model/1.running_var"][:2]}),
     r"'model/1.running_var' is float32 of shape \(2,\), expected float32 of shape \(4,\)"),
], ids=["complex moment", "epoch 10**6", "epoch -1", "dropped moment", "step count 0",
        "aliased moment", "bad generator state", "generator not JSON", "huge generator text",
        "NaN weight", "inf lr", "history too long", "negative scheduler epoch",
        "other loader", "misshapen buffer"])
def test_a_crafted_state_is_refused_and_changes_nothing(tmp_path, craft, message):
    run(tmp_path / "state.npz", epochs=2, stop_after=1)
    with np.load(tmp_path / "state.npz") as data:
        arrays = dict(data)
    craft(arrays)
    np.savez(tmp_path / "crafted.npz", **arrays)
    trainer, train, val = setup()
    before = snapshot(trainer, train)
    with pytest.raises(ValueError, match=message):
        trainer.fit(train, epochs=2, val=val,
                    callbacks=[TrainingState(tmp_path / "crafted.npz", resume=True)])
    assert_same(snapshot(trainer, train), before)


def test_resume_reschedules_when_asked(tmp_path):
    """An extended run: the cosine over 4 epochs, not the 2 the file was saved with."""
    run(tmp_path / "state.npz", epochs=2)
    assert resume.saved_epochs(tmp_path / "state.npz") == 2
    _, optimizer, history = run(tmp_path / "state.npz", epochs=4, resume=True,
                                reschedule=True)
    assert history.epochs == 4
    assert history["lr"][2:] == pytest.approx([1e-2 * (1 + np.cos(np.pi * t / 4)) / 2
                                               for t in (2, 3)])
    Sequential(Dense(2, 2)).save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="not a training state"):
        resume.saved_epochs(tmp_path / "m.npz")
