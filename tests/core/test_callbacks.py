"""Callbacks: EarlyStopping, ModelCheckpoint and CSVLogger in a fit, across fits, and
without validation data; a SIGKILL while CSVLogger writes keeps the previous file; the
metadata a ModelCheckpoint saves."""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minidl.checkpoint
from minidl import (SGD, Callback, CSVLogger, DataLoader, Dense, EarlyStopping, ModelCheckpoint,
                    Sequential, SoftmaxCrossEntropy, Trainer)

from conftest import bar_model, make_trainer, oriented_bars, tiny, tiny_trainer


def test_early_stopping_and_restore_best():
    x, y = oriented_bars(64)
    model = bar_model()
    trainer = make_trainer(model, lr=0.0)  # nothing improves
    stop = EarlyStopping(monitor="loss", patience=2, restore_best_weights=True)
    history = trainer.fit(DataLoader(x, y, 32, shuffle=False), epochs=10, callbacks=[stop])
    assert history.epochs == 3 and stop.stopped_epoch == 2
    with pytest.raises(ValueError, match="'val_loss' is not logged"):
        trainer.fit(DataLoader(x, y, 32), epochs=1, callbacks=[EarlyStopping()])


def test_model_checkpoint_saves_best_only(tmp_path):
    x, y = oriented_bars(64)
    model = bar_model()
    saves = []
    real_save = model.save
    model.save = lambda path: saves.append(path) or real_save(path)
    # lr=0 and the same batches in the same order: every epoch's loss is the same
    # number, so only epoch 1 is a new best. (With shuffling, float32 sums of other
    # batches differ in the last bits, and such a "better" loss is saved again.)
    frozen = make_trainer(model, lr=0.0)
    frozen.fit(DataLoader(x, y, 32, shuffle=False), epochs=3,
               callbacks=[ModelCheckpoint(tmp_path / "m.npz", monitor="loss")])
    assert len(saves) == 1
    every = ModelCheckpoint(tmp_path / "m.npz", monitor="loss", save_best_only=False)
    frozen.fit(DataLoader(x, y, 32, shuffle=False), epochs=2, callbacks=[every])
    assert len(saves) == 3
    restored = bar_model().load(tmp_path / "m.npz")
    np.testing.assert_array_equal(restored.predict(x), model.predict(x))


def test_model_checkpoint_saves_on_each_new_best(tmp_path):
    """Saves follow the monitored number: better, worse, equal, better (min and max)."""
    x, y = tiny(8)
    for mode, scores, saved_epochs in (("min", [3.0, 4.0, 3.0, 2.0], [1, 4]),
                                       ("max", [0.5, 0.4, 0.5, 0.7], [1, 4])):
        trainer = tiny_trainer()
        saves = []
        trainer.model.save = lambda path: saves.append(trainer.epoch + 1)

        class Score(Callback):
            def on_epoch_end(self, trainer, epoch, logs):
                logs["score"] = scores[epoch]

        trainer.fit(DataLoader(x, y, 4), epochs=4,
                    callbacks=[Score(), ModelCheckpoint(tmp_path / "m.npz", "score", mode)])
        assert saves == saved_epochs, mode


def test_csv_logger(tmp_path):
    x, y = oriented_bars(64)
    path = tmp_path / "logs" / "history.csv"
    make_trainer(bar_model()).fit(DataLoader(x, y, 32), epochs=2, callbacks=[CSVLogger(path)])
    rows = list(csv.DictReader(path.open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "accuracy", "lr", "time"} <= set(rows[0])


# -- across fits, without validation data --------------------------------------------------
def frozen_trainer(seed=0, scale=1.0):
    """A trainer with lr=0: the loss is the same every epoch, so nothing improves."""
    model = Sequential([Dense(4, 3)])
    for p in model.parameters():
        p.data *= scale
    return Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.0), verbose=0)


def data(n=40, seed=0, nan=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    if nan:
        x[0] = np.nan   # the first batch's loss is nan
    return DataLoader(x, rng.integers(0, 3, n), 8, shuffle=False)


def test_early_stopping_starts_afresh_in_each_fit():
    stop = EarlyStopping(monitor="loss", patience=2, restore_best_weights=True)
    first = frozen_trainer().fit(data(), epochs=10, callbacks=[stop])
    assert first.epochs == 3 and stop.stopped_epoch == 2
    # Another model, reusing the callback (as in a hyper-parameter loop): its loss is
    # worse than the first model's best, yet it gets its own patience.
    second = frozen_trainer(scale=20.0)
    assert second.fit(data(), epochs=10, callbacks=[stop]).epochs == 3
    second.fit(data(), epochs=1, callbacks=[stop])
    assert stop.stopped_epoch is None and stop.wait == 0
    # A fit that fails in its first epoch has no best weights: the ones of the
    # earlier fit (another model) must not be put back.
    third = frozen_trainer(scale=3.0)
    weights = third.model.state_dict()
    with pytest.raises(FloatingPointError):
        third.fit(data(nan=True), epochs=2, callbacks=[stop])
    for key, value in third.model.state_dict().items():
        np.testing.assert_array_equal(value, weights[key])


def test_checkpoint_every_epoch_needs_no_monitored_metric(tmp_path):
    path = tmp_path / "every.npz"
    trainer = frozen_trainer()
    # monitor defaults to val_accuracy, which is not logged without val=
    every = ModelCheckpoint(path, save_best_only=False)
    history = trainer.fit(data(), epochs=2, callbacks=[every])
    assert history.epochs == 2 and path.exists()


def test_checkpoint_never_writes_a_model_holding_inf_or_nan(tmp_path):
    from types import SimpleNamespace

    from minidl import BatchNorm1D
    path = tmp_path / "m.npz"
    model = Sequential([Dense(4, 3), BatchNorm1D(3)])
    trainer = SimpleNamespace(model=model)
    every = ModelCheckpoint(path, save_best_only=False)
    every.on_epoch_end(trainer, 0, {})
    good = path.read_bytes()
    model.layers[0].weight.data[1, 2] = np.inf      # the last update overflowed
    with pytest.raises(FloatingPointError, match=r"not saving .*m.npz.*: 0.weight hold inf"):
        every.on_epoch_end(trainer, 1, {})
    model.layers[0].weight.data[1, 2] = 0.0
    model.layers[1].running_var[0] = np.nan         # buffers too
    with pytest.raises(FloatingPointError, match="1.running_var hold inf or NaN"):
        every.on_epoch_end(trainer, 2, {})
    assert path.read_bytes() == good


def test_csv_logger_adds_columns_for_keys_that_appear_later(tmp_path):
    import csv

    from minidl import Callback, CSVLogger

    class LateKey(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch >= 1:
                logs["late"] = 10.0 * epoch

    path = tmp_path / "history.csv"
    frozen_trainer().fit(data(), epochs=3, callbacks=[LateKey(), CSVLogger(path)])
    rows = list(csv.DictReader(path.open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["late"] for r in rows] == ["", "10.0", "20.0"]
    assert all(r["loss"] for r in rows)
    # A new fit starts the file afresh.
    frozen_trainer().fit(data(), epochs=1, callbacks=[CSVLogger(path)])
    assert "late" not in path.read_text() and len(path.read_text().splitlines()) == 2


KILLED_IN_THE_SECOND_WRITE = """
import csv, os, shutil, signal, sys
sys.path.insert(0, sys.argv[2])
from minidl import Callback, CSVLogger, DataLoader
from conftest import bar_model, make_trainer, oriented_bars

path = sys.argv[1]
real_writerows, calls = csv.DictWriter.writerows, []


def die_in_the_second_write(self, rows):
    calls.append(1)
    if len(calls) == 2:            # epoch 2: half the rows written, then SIGKILL
        real_writerows(self, rows[:1])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_writerows(self, rows)


class KeepACopy(Callback):
    priority = -1                  # after CSVLogger

    def on_epoch_end(self, trainer, epoch, logs):
        shutil.copy(path, path + ".after-epoch-1")


csv.DictWriter.writerows = die_in_the_second_write
x, y = oriented_bars(32)
make_trainer(bar_model()).fit(DataLoader(x, y, 16), epochs=3,
                              callbacks=[CSVLogger(path), KeepACopy()])
"""


def test_a_kill_while_csv_logger_writes_leaves_the_previous_file(tmp_path):
    """history.csv is written whole to a temporary file, then renamed over the old one:
    a SIGKILL in the middle of that write leaves the previous epoch's file intact."""
    path = tmp_path / "history.csv"
    tests = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", KILLED_IN_THE_SECOND_WRITE, str(path),
                           str(tests)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(tests.parent)))
    assert done.returncode == -signal.SIGKILL, done.stderr
    after_epoch_1 = (tmp_path / "history.csv.after-epoch-1").read_bytes()
    assert path.read_bytes() == after_epoch_1
    assert [row[0] for row in csv.reader(after_epoch_1.decode().splitlines())] == ["epoch", "1"]
    # the half-written temporary file is swept by the next write in the folder
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1
    CSVLogger(path).on_epoch_end(frozen_trainer(), 0, {"loss": 1.0})
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_model_checkpoint_saves_metadata_with_the_model(tmp_path):
    x, y = oriented_bars(32)
    metadata = {"class_names": ["vertical", "horizontal"], "preprocessing": {"scale": 1.0}}
    saver = ModelCheckpoint(tmp_path / "m.npz", monitor="loss", metadata=metadata)
    make_trainer(bar_model()).fit(DataLoader(x, y, 16), epochs=1, callbacks=[saver])
    assert minidl.checkpoint.load_metadata(tmp_path / "m.npz") == metadata
