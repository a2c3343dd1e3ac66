"""Trainer: the training loop, with progress bars, metrics, callbacks and History.

One step (``train_step``) is the whole data flow of minidl: forward, loss, backward
(filling every Parameter.grad), optimizer step; docs/architecture.md draws it.
"""
import math
import time

from tqdm.auto import tqdm

from . import backend
from .callbacks import Callback, not_finite
from .checks import check_int, check_real
from .model import Sequential
from .optim import clip_grad_norm_


class History:
    """Per-epoch records of ``fit``: ``history["loss"]``, ``["val_accuracy"]``, ...;
    ``history.history`` is the dict of lists (as in Keras; NaN for an epoch that did
    not log the key), ``rows()`` the epochs' logs, ``epochs`` their number."""

    def __init__(self, rows=()):
        self._rows = [dict(row) for row in rows]

    def append(self, logs):
        self._rows.append(dict(logs))

    def rows(self):
        """One dict of logged numbers per epoch (copies)."""
        return [dict(row) for row in self._rows]

    @property
    def history(self):
        keys = dict.fromkeys(key for row in self._rows for key in row)
        return {key: [row.get(key, math.nan) for row in self._rows] for key in keys}

    @property
    def epochs(self):
        return len(self._rows)

    def __getitem__(self, key):
        return self.history[key]

    def __contains__(self, key):
        return any(key in row for row in self._rows)

    def __repr__(self):
        return f"History(epochs={self.epochs}, keys={sorted(self.history)})"


class Trainer:
    """Trains ``model`` with ``loss`` and ``optimizer``; see ``fit`` and ``evaluate``.

    ``metrics``: names ("accuracy"), callables ``f(logits, labels)`` averaged over
    samples, or a dict ``{name: metric}``. ``clip_grad_norm``: the global gradient norm's
    limit before each step; ``verbose``: 1 progress bars and a line per epoch, 2 that
    line only (as Keras), 0 nothing. A batch loss that is not finite, or above
    ``max_loss_ratio`` times the fit's first one (or 1), stops ``fit``. Every option and
    error: docs/api.md.

    What ``fit`` is doing, for callbacks to read: ``epoch``, ``batch``, ``epochs``,
    ``history`` (the epochs done), ``train_loader`` and ``start_epoch`` (where it starts: a
    callback's ``on_train_begin`` may move it to continue a run, minidl/ext/resume.py).
    """

    def __init__(self, model, loss, optimizer, scheduler=None, metrics=("accuracy",),
                 clip_grad_norm=None, verbose=1, max_loss_ratio=1e4):
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        if scheduler is not None and not isinstance(scheduler, Callback):
            raise TypeError(f"Trainer: scheduler must be a minidl LRScheduler (which the "
                            f"Trainer calls back), got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.metrics = _build_metrics(metrics)
        self.clip_grad_norm = clip_grad_norm
        self.verbose = verbose
        self.max_loss_ratio = (None if max_loss_ratio is None else
                               check_real(max_loss_ratio, "max_loss_ratio", "Trainer", above=1))
        self.stop_training = False
        self.epoch = self.batch = self.start_epoch = 0   # where fit is (the CLI reports it)
        self.history, self.train_loader = History(), None
        self.batch_logs = {}
        self._start_loss = None

    # -- one step ---------------------------------------------------------------
    def train_step(self, x, y):
        """Forward, loss, backward and update on one batch; returns (loss, logits).

        The batch's loss and metrics (kept as ``self.batch_logs``) are read from the
        device in one copy, before the update: a loss that is not finite or diverged
        raises FloatingPointError with the parameters of the step before."""
        logits = self.model.forward(x, training=True)
        values = self._batch_values(logits, y)      # on the device, not yet read
        dlogits = self.loss.backward()
        if isinstance(self.model, Sequential):
            self.model.backward(dlogits, input_grad=False)   # x is data: no dL/dx needed
        else:
            self.model.backward(dlogits)
        self.batch_logs = _read(values)             # the step's one wait for the device
        loss = self.batch_logs["loss"]
        where = f"the loss became {loss:.4g} at epoch {self.epoch + 1}, batch {self.batch + 1}"
        if not math.isfinite(loss):
            self._explain_bad_labels(loss, logits, y)
            self._stop(where)
        if self._start_loss is None:
            self._start_loss = loss
        ratio = self.max_loss_ratio
        if ratio is not None and loss > ratio * max(self._start_loss, 1.0):
            self._stop(f"{where}, over {ratio:g} times its start ({self._start_loss:.4g}): "
                       f"it diverged")
        self.optimizer.synchronize()    # a DistributedOptimizer averages over the ranks
        if self.clip_grad_norm is not None:
            clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return self.batch_logs["loss"], logits

    def _batch_values(self, logits, y):
        """{"loss": ..., metric: ...} as 0-d device arrays (or floats)."""
        return {"loss": self.loss.value(logits, y),
                **{name: fn(logits, y) for name, fn in self.metrics.items()}}

    def _explain_bad_labels(self, loss, logits, y):
        """After a loss that is not finite: the loss's own ValueError when it is NaN
        from finite logits (so the labels are at fault; inf is an overflow)."""
        if math.isnan(loss) and bool(backend.get_array_module(logits).isfinite(logits).all()):
            self.loss.forward(logits, y)

    @staticmethod
    def _stop(what):
        raise FloatingPointError(f"Trainer: {what}; training stopped (any checkpoint "
                                 f"already written is kept). Try a lower learning rate "
                                 f"or gradient clipping.")

    # -- loops -----------------------------------------------------------------
    def fit(self, train, epochs=1, val=None, callbacks=(), verbose=None):
        """Train for ``epochs`` over the DataLoader ``train``; returns the History.

        Each epoch: the steps, a check that every parameter and buffer is finite, the
        evaluation on ``val``, then the callbacks' ``on_epoch_end`` (by priority: the
        scheduler first), and the epoch's logs join ``self.history``. Callbacks'
        ``on_train_end`` runs even when training fails; the error then carries the
        History as ``error.history``. Errors: docs/api.md.
        """
        for name, data in (("train", train), ("val", val)):
            if data is not None:
                self._check_data(data, "Trainer.fit", name)
        epochs = check_int(epochs, "epochs", "Trainer.fit", minimum=1)
        self.history, self.train_loader, self.start_epoch, self.epochs = History(), train, 0, epochs
        self.stop_training, self._start_loss = False, None
        callbacks = _by_priority(([] if self.scheduler is None else [self.scheduler])
                                 + list(callbacks))
        begun = []      # on_train_end goes to the callbacks whose on_train_begin ran
        try:
            for cb in callbacks:        # a resumed run's snapshot restores here (last)
                cb.on_train_begin(self)
                begun.append(cb)
            verbose = self.verbose if verbose is None else verbose
            for self.epoch in range(self.start_epoch, epochs):
                start = time.perf_counter()
                logs = self._train_epoch(train, epochs, verbose, callbacks)
                bad = not_finite(self.model)    # before evaluation and checkpoints see them
                if bad:
                    self._stop(f"{', '.join(bad)} became inf or nan in epoch {self.epoch + 1}")
                if val is not None:
                    logs.update({f"val_{k}": v for k, v in self.evaluate(val).items()})
                logs["lr"] = self.optimizer.lr
                logs["time"] = time.perf_counter() - start
                for cb in callbacks:    # the scheduler steps; GradientRecorder adds to logs
                    cb.on_epoch_end(self, self.epoch, logs)
                self.history.append(logs)
                if verbose:
                    print(_format_logs(self.epoch, epochs, logs), flush=True)
                if self.stop_training:
                    break
        except BaseException as error:
            error.history = self.history
            raise
        finally:    # remove hooks, restore best weights... whatever happened
            for cb in begun:
                cb.on_train_end(self)
        return self.history

    def _train_epoch(self, train, epochs, verbose, callbacks):
        self.model.train()
        totals = _Totals(self.metrics, "Trainer.fit")
        start = time.perf_counter()
        # `with`: the bar ends its line even when a step fails or Ctrl-C stops it
        with tqdm(train, total=len(train), desc=f"Epoch {self.epoch + 1}/{epochs}", unit="batch",
                  disable=verbose != 1, leave=True, dynamic_ncols=True) as bar:
            for self.batch, (x, y) in enumerate(bar):
                for cb in callbacks:
                    cb.on_batch_begin(self, self.batch)
                self.train_step(x, y)
                totals.add(self.batch_logs, len(y))
                for cb in callbacks:    # a per-batch scheduler steps here
                    cb.on_batch_end(self, self.batch, self.batch_logs)
                if verbose and (self.batch % 10 == 0 or self.batch == len(train) - 1):
                    speed = totals.count / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in totals.means_as_floats().items()},
                                    img_s=f"{speed:.0f}", refresh=False)
        return totals.means_as_floats()

    def evaluate(self, data):
        """Mean loss and metrics over a DataLoader, in eval mode (no updates);
        FloatingPointError when a batch's loss is not finite."""
        self._check_data(data, "Trainer.evaluate", "data")
        totals = _Totals(self.metrics, "Trainer.evaluate")
        for batch, (x, y) in enumerate(data):
            logits = self.model.forward(x, training=False)
            logs = _read(self._batch_values(logits, y))
            if not math.isfinite(logs["loss"]):
                self._explain_bad_labels(logs["loss"], logits, y)
                raise FloatingPointError(f"Trainer.evaluate: the loss became {logs['loss']} at "
                                         f"batch {batch + 1} (a diverged model or inf/NaN inputs?)")
            totals.add(logs, len(y))
        return totals.means_as_floats()

    def _check_data(self, data, caller, name):
        """TypeError unless ``data`` iterates over (x, y) batches and has a len;
        ValueError unless the model is on the device batches come on."""
        arrays = backend.is_array(data) or (isinstance(data, tuple)
                                            and any(map(backend.is_array, data)))
        if arrays or not (hasattr(data, "__iter__") and hasattr(data, "__len__")):
            raise TypeError(f"{caller}: {name} must be a DataLoader (or an iterable of (x, "
                            f"y) batches with a len), got {type(data).__name__}; wrap arrays "
                            f"as DataLoader(x, y, batch_size)")
        device = backend.default_device()
        if self.model.device != device:
            raise ValueError(f"Trainer: the model is on the {self.model.device} but batches "
                             f"come on the {device} (the active backend); call "
                             f"model.to('{device}') or minidl.set_backend(...) to match")


class _Totals:
    """Sample-weighted running sums of the loss and each metric."""

    def __init__(self, metrics, caller):
        self.caller = caller    # who to name in the error of an empty loader
        self.count = 0
        self.sums = {"loss": 0.0, **{name: 0.0 for name in metrics}}

    def add(self, logs, n):
        """Add one batch of ``n`` samples: ``logs`` holds its loss and metrics."""
        self.count += n
        for name in self.sums:
            self.sums[name] += logs[name] * n

    def means_as_floats(self):
        if self.count == 0:     # a mean of nothing: 0.0 would look like a real result
            raise ValueError(f"{self.caller}: the DataLoader yields no samples (is it "
                             f"empty, or drop_last=True with fewer samples than "
                             f"batch_size?)")
        return {k: v / self.count for k, v in self.sums.items()}


def accuracy(logits, labels):
    """Fraction of rows whose largest logit is at the label, as a 0-d array on the
    logits' device (a numpy float on the CPU; ``float()`` reads it). ``labels`` are
    class indices (N,) or one-hot / probability rows (N, classes), as MSE takes."""
    if labels.ndim == 2 and labels.shape == logits.shape:
        labels = labels.argmax(axis=1)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"accuracy: labels of shape {labels.shape} do not match logits "
                         f"of shape {logits.shape}; expected class indices (N,) or "
                         f"one-hot rows (N, classes)")
    return (logits.argmax(axis=1) == labels).mean()


_METRICS = {"accuracy": accuracy, "acc": accuracy}
_RESERVED = ("loss", "lr", "time")     # keys the Trainer itself logs


def _build_metrics(metrics):
    """{name: fn} from a list of names / callables, or from a dict {name: metric}."""
    pairs = (metrics.items() if isinstance(metrics, dict) else
             [(m if isinstance(m, str) else getattr(m, "__name__", "metric"), m) for m in metrics])
    built = {}
    for name, metric in pairs:
        # A repeated name would overwrite a metric; a reserved one, a logged number.
        if name in built:
            raise ValueError(f"Trainer: two metrics named {name!r}; pass a dict "
                             f"{{name: metric}} to name them apart")
        if name in _RESERVED or name.startswith("val_"):
            raise ValueError(f"Trainer: the metric name {name!r} is reserved (for loss, lr, "
                             f"time and val_*); pass a dict {{name: metric}} to rename it")
        if not callable(metric) and metric not in _METRICS:
            raise ValueError(f"Trainer: unknown metric {metric!r}; known: {sorted(_METRICS)} "
                             f"or a callable f(logits, labels)")
        built[name] = metric if callable(metric) else _METRICS[metric]
    return built


def _by_priority(callbacks):
    """Callbacks in decreasing ``priority`` (a stable sort: ties keep their order)."""
    return sorted(callbacks, key=lambda cb: -getattr(cb, "priority", 0))


def _read(values):
    """{name: float} from {name: 0-d device array or float}, in one device->host copy."""
    return dict(zip(values, backend.to_floats(list(values.values()))))


def _format_logs(epoch, epochs, logs):
    parts = [f"{k}={v:.4f}" for k, v in logs.items() if k not in ("time", "lr") and "/" not in k]
    return f"epoch {epoch + 1}/{epochs}: " + " ".join(parts) + f" ({logs['time']:.1f} s)"
