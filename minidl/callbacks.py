"""Callbacks that ``Trainer.fit`` calls around each batch and at the end of each epoch."""
import csv
import math
import os

from . import backend
from .layers.base import Layer


class Callback:
    """Override any of the hooks; when each runs and what its ``logs`` hold: docs/api.md.
    ``on_resume`` gets the History of the epochs run before ``fit(resume=...)``."""

    def on_train_begin(self, trainer):
        pass

    def on_resume(self, trainer, history):
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
    """Tracks the best value of one logged metric ("min" or "max" is better)."""

    def __init__(self, monitor, mode, min_delta=0.0):
        if mode == "auto":
            mode = "max" if ("acc" in monitor) else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
        self.monitor, self.mode, self.min_delta = monitor, mode, abs(min_delta)
        self.reset()

    def reset(self):
        self.best = math.inf if self.mode == "min" else -math.inf

    def value(self, logs, owner):
        if self.monitor not in logs:
            raise ValueError(f"{owner}: the metric {self.monitor!r} is not logged; "
                             f"available: {sorted(logs)} (pass val= to fit for val_*)")
        return logs[self.monitor]

    def replay(self, history):
        """Track the values ``history`` holds; returns the epoch (from 1) of the best."""
        best_epoch = None
        for epoch, value in enumerate(history.history.get(self.monitor, [])):
            if self.improved(value):
                best_epoch = epoch + 1
        return best_epoch

    def improved(self, value):
        better = (value < self.best - self.min_delta if self.mode == "min"
                  else value > self.best + self.min_delta)
        if better:
            self.best = value
        return better


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
        # Each fit starts afresh (as in Keras): a best, a patience count or weights
        # left from an earlier fit, maybe of another model, must not stop or undo this one.
        self.tracker.reset()
        self.wait = 0
        self.best_state = None
        self.stopped_epoch = None

    def on_resume(self, trainer, history):
        self.tracker.replay(history)    # the same best (the patience count restarts)

    def on_epoch_end(self, trainer, epoch, logs):
        if self.tracker.improved(self.tracker.value(logs, "EarlyStopping")):
            self.wait = 0
            if self.restore_best_weights:
                self.best_state = trainer.model.state_dict()
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.stop_training = True
            self.stopped_epoch = epoch

    def on_train_end(self, trainer):
        if self.restore_best_weights and self.best_state is not None:
            trainer.model.load_state_dict(self.best_state)


class ModelCheckpoint(Callback):
    """Save the model to ``path`` (.npz) after an epoch: every epoch, or only when
    ``monitor`` reached a new best (``save_best_only``). Writes are atomic; a model
    holding inf or NaN is never saved (FloatingPointError). Errors: docs/api.md."""

    def __init__(self, path, monitor="val_accuracy", mode="auto", save_best_only=True):
        self.path = os.fspath(path)
        self.tracker = _Monitor(monitor, mode)
        self.save_best_only = save_best_only
        self.saved_epoch = None     # the epoch (from 1) of this fit's last save

    def on_train_begin(self, trainer):
        self.saved_epoch = None

    def on_resume(self, trainer, history):
        best = self.tracker.replay(history)     # the epoch the file at ``path`` holds
        self.saved_epoch = best if self.save_best_only else history.epochs or None

    def on_epoch_end(self, trainer, epoch, logs):
        if not isinstance(trainer.model, Layer) or not hasattr(trainer.model, "save"):
            raise TypeError("ModelCheckpoint: the model has no save(path) method")
        if self.save_best_only:   # only then is the monitored metric needed (and read)
            if not self.tracker.improved(self.tracker.value(logs, "ModelCheckpoint")):
                return
        bad = not_finite(trainer.model)
        if bad:
            raise FloatingPointError(f"ModelCheckpoint: not saving {self.path!r}: "
                                     f"{', '.join(bad)} hold inf or NaN (the file keeps its "
                                     f"last good save)")
        trainer.model.save(self.path)
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
    """Write one row per epoch (epoch, then every logged number) to ``path``; each fit
    starts the file afresh. A key first logged in a later epoch gets a column: the
    file is rewritten with it, earlier rows leaving that cell empty."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.keys, self.rows = [], []

    def on_train_begin(self, trainer):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.keys, self.rows = [], []

    def on_resume(self, trainer, history):
        for epoch in range(history.epochs):     # the file holds the earlier epochs too
            self.on_epoch_end(trainer, epoch, {k: v[epoch] for k, v in history.history.items()})

    def on_epoch_end(self, trainer, epoch, logs):
        self.rows.append({"epoch": epoch + 1, **logs})
        new = [k for k in logs if k not in self.keys]
        self.keys += new
        # A new key changes the header: write every row again; else append this one.
        with open(self.path, "w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, ["epoch"] + self.keys, restval="")
            if new:
                writer.writeheader()
            writer.writerows(self.rows if new else self.rows[-1:])


class LearningRateMonitor(Callback):
    """Record the learning rate of every optimizer step in ``lrs`` (one list over the
    whole fit), e.g. to plot a per-batch schedule with ``viz.plot_lr``."""

    def __init__(self):
        self.lrs = []

    def on_train_begin(self, trainer):
        self.lrs = []

    def on_batch_begin(self, trainer, batch):
        self.lrs.append(trainer.optimizer.lr)
