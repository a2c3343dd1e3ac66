"""Resumable training: everything a run needs to continue, in one pickle-free .npz.

The callback ``TrainingState(path)`` writes it after every epoch (after every other
callback: its priority is the lowest); ``TrainingState(path, resume=True)`` first puts
it back when ``fit`` begins and moves the Trainer's ``start_epoch`` past the saved
epochs, so on the CPU a resumed run ends bit for bit as one that never stopped (as
Keras's BackupAndRestore, or Chainer's snapshot extension).

    trainer.fit(train, epochs=8, callbacks=[TrainingState("runs/state.npz", resume=True)])

Keys: "model/<name>", "optimizer/<name>", "scheduler/<name>", "history/<metric>" (NaN
for an epoch that did not log it), "epoch" and "rng/<owner>": the state, as JSON text,
of each generator the run draws from.
"""
import json
import math

from .. import backend
from .. import random as minidl_random
from ..callbacks import Callback
from ..layers.base import Container
from ..serialization import NpzReader, save_npz
from ..trainer import History

_cpu = backend.get_module("cpu")   # the file holds CPU arrays


class TrainingState(Callback):
    """Save the training state to ``path`` after every epoch (unless ``save`` is False:
    in a data-parallel job one rank writes); with ``resume=True`` restore it first."""

    priority = -100     # last: it saves what every other callback did in the epoch

    def __init__(self, path, resume=False, save=True):
        self.path, self.resume, self.save = path, resume, save

    def on_train_begin(self, trainer):
        if self.resume:
            history = History()
            trainer.start_epoch = load_training_state(self.path, trainer,
                                                      trainer.train_loader, history)
            trainer.history = history

    def on_epoch_end(self, trainer, epoch, logs):
        if self.save:
            history = History(trainer.history.rows() + [logs])
            save_training_state(self.path, trainer, trainer.train_loader, history, epoch + 1)


def save_training_state(path, trainer, train, history, epoch):
    """Write the state of ``trainer`` after ``epoch`` epochs over the DataLoader ``train``."""
    arrays = {"epoch": _cpu.int64(epoch)}
    arrays.update(_prefixed("model/", trainer.model.state_dict()))
    arrays.update(_prefixed("optimizer/", trainer.optimizer.state_dict()))
    if trainer.scheduler is not None:
        arrays.update(_prefixed("scheduler/", trainer.scheduler.state_dict()))
    arrays.update({f"history/{k}": _cpu.asarray(v, dtype=float)
                   for k, v in history.history.items()})
    arrays.update({f"rng/{name}": _cpu.array(json.dumps(gen.bit_generator.state))
                   for name, gen in generators(trainer.model, train).items()})
    save_npz(path, arrays)


def load_training_state(path, trainer, train, history):
    """Restore what ``save_training_state`` wrote into ``trainer``, ``train`` and the
    (empty) ``history``; returns the number of epochs already done. ValueError when
    the file was written for another model, optimizer, scheduler or data pipeline."""
    saved = _read_state(path, trainer.model)
    parts = {prefix: {key[len(prefix):]: value for key, value in saved.items()
                      if key.startswith(prefix)}
             for prefix in ("model/", "optimizer/", "scheduler/", "history/", "rng/")}
    if bool(parts["scheduler/"]) != (trainer.scheduler is not None):
        raise ValueError(f"resume: {path!r} was saved "
                         f"{'with' if parts['scheduler/'] else 'without'} a scheduler, "
                         f"this Trainer has {trainer.scheduler!r}")
    ours = generators(trainer.model, train)
    if set(parts["rng/"]) != set(ours):
        raise ValueError(f"resume: {path!r} holds random generators {sorted(parts['rng/'])}, "
                         f"this run has {sorted(ours)} (another model, loader or transform?)")
    trainer.model.load_state_dict(parts["model/"])
    trainer.optimizer.load_state_dict(parts["optimizer/"])
    if trainer.scheduler is not None:
        trainer.scheduler.load_state_dict(parts["scheduler/"])
    epochs = int(saved["epoch"])
    for i in range(epochs):
        history.append({k: float(v[i]) for k, v in parts["history/"].items()
                        if not math.isnan(v[i])})
    for name, gen in ours.items():
        gen.bit_generator.state = json.loads(str(parts["rng/"][name]))
    return epochs


def _read_state(path, model):
    """The arrays of the state file, each member's header checked before its data is
    read: none may be larger than a training state of ``model`` can hold (optimizer
    moments of every parameter, or a History and generator text of bounded size)."""
    with NpzReader(path) as npz:
        if "epoch" not in npz.headers:
            raise ValueError(f"resume: {path!r} is not a training state written by "
                             f"TrainingState (a model checkpoint has no 'epoch')")
        limit = 4 * sum(p.size for p in model.parameters()) + 2**20
        for name, (shape, _) in npz.headers.items():
            if math.prod(shape) > limit:
                raise npz.error(f"array {name!r} of shape {shape} is larger than any "
                                f"training state of this model")
        return npz.read_all(npz.headers)


def generators(model, train):
    """{owner: numpy Generator} for every generator a training run draws from."""
    found = {"minidl": minidl_random.default_rng(), "loader": train.rng}
    transform = getattr(train, "transform", None)
    for i, t in enumerate(getattr(transform, "transforms", [transform])):
        if hasattr(t, "rng"):
            found[f"transform.{i}"] = t.rng
    for name, layer in _named_layers(model, "model"):
        if hasattr(layer, "rng"):
            found[name] = layer.rng
    return found


def _named_layers(layer, name):
    """(dotted name, layer) for ``layer`` and every layer inside it."""
    yield name, layer
    if isinstance(layer, Container):
        for child_name, child in layer.named_layers():
            yield from _named_layers(child, f"{name}.{child_name}")


def _prefixed(prefix, state):
    return {prefix + key: _cpu.asarray(value) for key, value in state.items()}
