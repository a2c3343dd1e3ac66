"""Callbacks that ``Trainer.fit`` calls around each batch and at the end of each epoch."""
import csv
import math
import os

from . import backend
from .layers.base import Layer
from .serialization import atomic_write


class Callback:
    """Override any of the hooks; when each runs and what its ``logs`` hold: docs/api.md.

    ``trainer.history`` holds the epochs before this one, those of a resumed run's
    earlier fits included (minidl/ext/resume.py), so a callback that needs the past
    reads it there. Callbacks run in decreasing ``priority``, ties in the order given:
    a scheduler (100) sets the next rate before the others read it; the training-state
    snapshot (-100) saves after all of them.
    """

    priority = 0

    def on_train_begin(self, trainer):
        pass

    def on_batch_begin(self, trainer, batch):
        pass

    def on_batch_end(self, trainer, batch, logs):
        pass

    def on_epoch_end(self, trainer, epoch, logs):
        pass

    def on_train_end(self, trainer):
        pass


class _Monitor:
    """Finds the best value of one logged metric ("min" or "max" is better), tracking
    the values in order: a value is a new best when it beats the best so far by more
    than ``min_delta``."""

    def __init__(self, monitor, mode, min_delta=0.0):
        if mode == "auto":
            mode = "max" if ("acc" in monitor) else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
        self.monitor, self.mode, self.min_delta = monitor, mode, abs(min_delta)

    def value(self, logs, owner):
        if self.monitor not in logs:
            raise ValueError(f"{owner}: the metric {self.monitor!r} is not logged; "
                             f"available: {sorted(logs)} (pass val= to fit for val_*)")
        return logs[self.monitor]

    def best_epoch(self, trainer, logs, owner):
        """The index of the best epoch among the earlier ones (``trainer.history``) and
        this one (``logs``): the last index when this epoch is a new best, -1 when no
        value is better than the start (NaN all along)."""
        values = list(trainer.history.history.get(self.monitor, []))
        values.append(self.value(logs, owner))
        best, index = math.inf if self.mode == "min" else -math.inf, -1
        for i, value in enumerate(values):
            if (value < best - self.min_delta if self.mode == "min"
                    else value > best + self.min_delta):
                best, index = value, i
        return index


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs; optionally put
    back the best weights seen."""

    def __init__(self, monitor="val_loss", patience=3, min_delta=0.0, mode="auto",
                 restore_best_weights=False):
        self.tracker = _Monitor(monitor, mode, min_delta)
        self.patience = patience
        self.restore_best_weights = restore_best_weights
        self.on_train_begin(None)

    def on_train_begin(self, trainer):
        # Each fit starts afresh (as in Keras): weights left from an earlier fit, maybe
        # of another model, must not undo this one.
        self.wait = 0
        self.best_state = None
        self.stopped_epoch = None

    def on_epoch_end(self, trainer, epoch, logs):
        # epochs since the best (a resumed run counts its earlier epochs, as if unbroken)
        self.wait = trainer.history.epochs - self.tracker.best_epoch(trainer, logs,
                                                                     "EarlyStopping")
        if self.wait == 0:
            if self.restore_best_weights:
                self.best_state = trainer.model.state_dict()
        elif self.wait >= self.patience:
            trainer.stop_training = True
            self.stopped_epoch = epoch

    def on_train_end(self, trainer):
        if self.restore_best_weights and self.best_state is not None:
            trainer.model.load_state_dict(self.best_state)


class ModelCheckpoint(Callback):
    """Save the model to ``path`` (.npz) after an epoch: every epoch, or only when
    ``monitor`` reached a new best (``save_best_only``). Writes are atomic; a model
    holding inf or NaN is never saved (FloatingPointError). Errors: docs/api.md.
    ``saved_epoch``: the epoch (from 1) whose model the file holds, once an epoch of
    this fit has ended (a resumed run's earlier epochs count), else None. ``metadata``:
    what ``model.save`` stores beside the weights (the preprocessing, class names...)."""

    def __init__(self, path, monitor="val_accuracy", mode="auto", save_best_only=True,
                 metadata=None):
        self.path, self.metadata = os.fspath(path), metadata
        self.tracker = _Monitor(monitor, mode)
        self.save_best_only = save_best_only
        self.saved_epoch = None

    def on_train_begin(self, trainer):
        self.saved_epoch = None

    def on_epoch_end(self, trainer, epoch, logs):
        if not isinstance(trainer.model, Layer) or not hasattr(trainer.model, "save"):
            raise TypeError("ModelCheckpoint: the model has no save(path) method")
        if self.save_best_only:   # only then is the monitored metric needed (and read)
            best = self.tracker.best_epoch(trainer, logs, "ModelCheckpoint")
            if best != trainer.history.epochs:      # the file keeps the best epoch's model
                self.saved_epoch = best + 1 if best >= 0 else None
                return
        bad = not_finite(trainer.model)
        if bad:
            raise FloatingPointError(f"ModelCheckpoint: not saving {self.path!r}: "
                                     f"{', '.join(bad)} hold inf or NaN (the file keeps its "
                                     f"last good save)")
        trainer.model.save(self.path, **({} if self.metadata is None else
                                         {"metadata": self.metadata}))
        self.saved_epoch = epoch + 1


def not_finite(model):
    """The names of ``model``'s parameters and buffers that hold inf or NaN (read
    from the device in one copy)."""
    named = [(name, p.data) for name, p in model.named_parameters()]
    named += list(model.named_buffers())
    finite = backend.to_floats([backend.get_array_module(a).isfinite(a).all()
                                for _, a in named])
    return [name for (name, _), ok in zip(named, finite) if not ok]


class CSVLogger(Callback):
    """Write one row per epoch (epoch, then every logged number) to ``path``: after each
    epoch the whole file, from ``trainer.history`` and this epoch's logs, atomically (a
    kill never leaves it half written). A key first logged in a later epoch gets a
    column, earlier rows leaving that cell empty."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def on_epoch_end(self, trainer, epoch, logs):
        rows = [{"epoch": i + 1, **row} for i, row in enumerate(trainer.history.rows())]
        rows.append({"epoch": epoch + 1, **logs})
        keys = list(dict.fromkeys(key for row in rows for key in row))
        with atomic_write(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, keys, restval="")
            writer.writeheader()
            writer.writerows(rows)


class LearningRateMonitor(Callback):
    """Record the learning rate of every optimizer step in ``lrs`` (one list over the
    whole fit), e.g. to plot a per-batch schedule with ``minidl.ext.plots.plot_lr``."""

    def __init__(self):
        self.lrs = []

    def on_train_begin(self, trainer):
        self.lrs = []

    def on_batch_begin(self, trainer, batch):
        self.lrs.append(trainer.optimizer.lr)
