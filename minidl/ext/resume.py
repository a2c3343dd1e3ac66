"""Resumable training: everything a run needs to continue, in one pickle-free .npz.

The callback ``TrainingState(path)`` writes it after every epoch (after every other
callback: its priority is the lowest); ``TrainingState(path, resume=True)`` first puts
it back when ``fit`` begins and moves the Trainer's ``start_epoch`` past the saved
epochs, so on the CPU a resumed run ends bit for bit as one that never stopped (as
Keras's BackupAndRestore, or Chainer's snapshot extension).

    trainer.fit(train, epochs=8, callbacks=[TrainingState("runs/state.npz", resume=True)])

Keys: "model/<name>", "optimizer/<name>", "scheduler/<name>", "history/<metric>" (NaN
for an epoch that did not log it), "epoch", "loader" (the training loader's batches per
epoch and training samples) and "rng/<owner>": the state, as JSON text, of each
generator the run draws from. A data-parallel job (``comm``) of N ranks adds "ranks"
(N) and keeps one text per rank in each "rng/<owner>": every rank's streams are
gathered into the one file, and each rank gets its own back. A resume is all or
nothing: every member's header is checked against what this run can hold before its
data is read, then every value, on copies; only then do the model, optimizer,
scheduler, generators and History change.
"""
import copy
import json
import math

from .. import backend
from .. import random as minidl_random
from ..callbacks import Callback
from ..layers.base import Container
from ..serialization import NpzReader, save_npz
from ..trainer import History

_cpu = backend.get_module("cpu")   # the file holds CPU arrays
MAX_RNG_CHARS = 4096               # a generator's state as JSON (PCG64's: about 150)
MAX_HISTORY_VALUES = 2**24         # epochs x logged numbers (128 MB of float64)


class TrainingState(Callback):
    """Save the training state to ``path`` after every epoch (unless ``save`` is False);
    with ``resume=True`` restore it first. ``reschedule=True``: the scheduler keeps the
    hyper-parameters this run made it with (a longer T_max or total_steps, to extend a
    run) and takes only its position from the file. In a data-parallel job pass ``comm``
    (the job's Communicator) on every rank: each epoch gathers every rank's generators,
    rank 0 writes (``save`` defaults to ``comm.rank == 0``), and a resume gives each rank
    its own."""

    priority = -100     # last: it saves what every other callback did in the epoch

    def __init__(self, path, resume=False, save=None, reschedule=False, comm=None):
        self.path, self.resume, self.reschedule, self.comm = path, resume, reschedule, comm
        self.save = (comm is None or comm.rank == 0) if save is None else save

    def on_train_begin(self, trainer):
        if self.resume:
            history = History()
            trainer.start_epoch = load_training_state(self.path, trainer, trainer.train_loader,
                                                      history, self.reschedule, self.comm)
            trainer.history = history

    def on_epoch_end(self, trainer, epoch, logs):
        rng = generator_states(trainer.model, trainer.train_loader, self.comm)  # every rank
        if self.save:
            history = History(trainer.history.rows() + [logs])
            save_training_state(self.path, trainer, trainer.train_loader, history, epoch + 1,
                                rng)


def save_training_state(path, trainer, train, history, epoch, rng=None):
    """Write the state of ``trainer`` after ``epoch`` epochs over the DataLoader ``train``
    (``rng``: what ``generator_states`` gathered; None: this process's generators)."""
    arrays = {"epoch": _cpu.int64(epoch), "loader": _cpu.array(_loader_size(train))}
    arrays.update(_prefixed("model/", trainer.model.state_dict()))
    arrays.update(_prefixed("optimizer/", trainer.optimizer.state_dict()))
    if trainer.scheduler is not None:
        arrays.update(_prefixed("scheduler/", trainer.scheduler.state_dict()))
    arrays.update({f"history/{k}": _cpu.asarray(v, dtype=float)
                   for k, v in history.history.items()})
    arrays.update(generator_states(trainer.model, train) if rng is None else rng)
    save_npz(path, arrays)


def load_training_state(path, trainer, train, history, reschedule=False, comm=None):
    """Restore what ``save_training_state`` wrote into ``trainer``, ``train`` and the
    (empty) ``history`` (this rank's generators with ``comm``); returns the number of
    epochs already done. All or nothing: ValueError, with nothing changed, when the file
    was written for another model, optimizer, scheduler or data pipeline, or by another
    number of ranks than ``comm``'s, or holds a value this run cannot take."""
    rank, size = _rank_and_size(train, comm, "resume")
    epochs, parts = _read_state(path, trainer, train, size)
    scheduler, optimizer = trainer.scheduler, _inner(trainer.optimizer)
    if scheduler is not None and reschedule:
        parts["scheduler/"].update(scheduler.hyperparameters())
    # Everything is loaded into copies first (the model checks all before it sets
    # anything); a copy of the scheduler sets the rate of the optimizer's copy.
    try:
        trainer.model.check_state_dict(parts["model/"])
        staged = copy.copy(optimizer)
        staged.load_state_dict(parts["optimizer/"])
        _check_optimizer_state(staged)
        if scheduler is not None:
            probe = copy.deepcopy(scheduler, {id(optimizer): staged})
            probe.load_state_dict(parts["scheduler/"])
        rows = [{k: float(v[i]) for k, v in parts["history/"].items() if not math.isnan(v[i])}
                for i in range(epochs)]
        states = {name: _generator_state(name, gen, _this_ranks(parts["rng/"][name], rank))
                  for name, gen in generators(trainer.model, train).items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"resume: {path!r}: {exc}") from None
    trainer.model.load_state_dict(parts["model/"])
    vars(optimizer).update(vars(staged))
    if scheduler is not None:       # as its copy did: it sets the optimizer's rate
        scheduler.load_state_dict(parts["scheduler/"])
    for name, gen in generators(trainer.model, train).items():
        gen.bit_generator.state = states[name]
    for row in rows:
        history.append(row)
    return epochs


def saved_epochs(path):
    """The number of epochs done in the training state at ``path`` (its "epoch" member,
    read alone): FileNotFoundError, or ValueError for a file that is no training state."""
    with NpzReader(path) as npz:
        _require_epoch(npz, path)
        return _epoch_count(npz)


def _read_state(path, trainer, train, ranks=1):
    """(epochs, {part: {key: array}}) from the file, each member's header checked against
    what this run of ``ranks`` ranks can hold before any data is read; the model and
    optimizer finite."""
    with NpzReader(path) as npz:
        _require_epoch(npz, path)
        epochs = _epoch_count(npz)
        _check_ranks(npz, path, ranks)
        if epochs > getattr(trainer, "epochs", epochs):     # the epochs of this fit
            raise npz.error(f"it holds {epochs} epochs done, more than this fit's "
                            f"epochs={trainer.epochs}")
        history = [name for name in npz.headers if name.startswith("history/")]
        if epochs * len(history) > MAX_HISTORY_VALUES:
            raise npz.error(f"its history of {epochs} epochs x {len(history)} numbers is "
                            f"larger than any run's")
        saved = {prefix: sorted(name[len(prefix):] for name in npz.headers
                                if name.startswith(prefix)) for prefix in ("scheduler/", "rng/")}
        if bool(saved["scheduler/"]) != (trainer.scheduler is not None):
            raise ValueError(f"resume: {path!r} was saved "
                             f"{'with' if saved['scheduler/'] else 'without'} a scheduler, "
                             f"this Trainer has {trainer.scheduler!r}")
        ours = sorted(generators(trainer.model, train))
        if saved["rng/"] != ours:
            raise ValueError(f"resume: {path!r} holds random generators {saved['rng/']}, "
                             f"this run has {ours} (another model, loader or transform?)")
        required, optional = _expected(trainer, train, epochs, history, ranks)
        unexpected = sorted(set(npz.headers) - set(required) - set(optional))
        missing = sorted(set(required) - set(npz.headers))
        if unexpected or missing:
            raise npz.error(f"it was not saved by this run (another model, optimizer or "
                            f"scheduler?): missing arrays {_few(missing)}, unexpected arrays "
                            f"{_few(unexpected)}")
        arrays = npz.read_all({**required, **{name: spec for name, spec in optional.items()
                                              if name in npz.headers}})
        for name, a in arrays.items():      # never saved: the Trainer stops first
            if name.startswith(("model/", "optimizer/")) and not _cpu.isfinite(a).all():
                raise npz.error(f"array {name!r} holds inf or NaN")
        (batches, samples), mine = arrays.get("loader", [0, 0]), _loader_size(train)
        if "loader" in arrays and [batches, samples] != mine:
            raise npz.error(f"it was saved by a run of {batches} batches per epoch over "
                            f"{samples} training samples; this one has {mine[0]} over "
                            f"{mine[1]}: another data set size, limit or batch size?")
    return epochs, {prefix: {key[len(prefix):]: value for key, value in arrays.items()
                             if key.startswith(prefix)}
                    for prefix in ("model/", "optimizer/", "scheduler/", "history/", "rng/")}


def _expected(trainer, train, epochs, history, ranks=1):
    """({name: (shape, dtype)} of the members a state of this run (of ``ranks`` ranks)
    must hold, and of those it may hold: optimizer buffers appear with their first
    update, and the states of older minidl versions have no "loader")."""
    required = {"epoch": ((), _cpu.int64)}
    required.update(_specs("model/", trainer.model.state_dict()))
    optimizer = _inner(trainer.optimizer)
    required.update(_specs("optimizer/", {k: v for k, v in optimizer.state_dict().items()
                                          if not k.startswith("state.")}))
    if trainer.scheduler is not None:
        required.update(_specs("scheduler/", trainer.scheduler.state_dict()))
    required.update({name: ((epochs,), _cpu.float64) for name in history})
    required.update({f"rng/{name}": (() if ranks == 1 else (ranks,), f"<U{MAX_RNG_CHARS}")
                     for name in generators(trainer.model, train)})
    if ranks > 1:
        required["ranks"] = ((), _cpu.int64)
    optional = {"loader": ((2,), _cpu.int64)}
    for i, p in enumerate(optimizer.params):
        optional[f"optimizer/state.{i}.t"] = ((), _cpu.int64)
        optional.update({f"optimizer/state.{i}.{name}": (tuple(p.data.shape), p.data.dtype)
                         for name in optimizer.buffer_names})
    return required, optional


def _check_optimizer_state(optimizer):
    """A run updates every parameter at every step: the same buffers and a step count t
    of at least 1 for each, or no state at all (no step yet)."""
    entries = {i: (tuple(sorted(state)), state["t"]) for i, state in optimizer.state.items()}
    if entries and (len(entries) != len(optimizer.params) or len(set(entries.values())) > 1
                    or min(t for _, t in entries.values()) < 1):
        raise ValueError(f"the optimizer's state is not one of a training run: parameter -> "
                         f"(entries, step count) {entries}, for {len(optimizer.params)} "
                         f"parameters")


def _generator_state(name, gen, text):
    """The generator state in ``text`` (JSON), once a fresh generator of ``gen``'s kind
    takes it unchanged."""
    try:
        state = json.loads(str(text))
        probe = type(gen.bit_generator)()
        probe.state = state
        if probe.state == state:
            return state
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError):
        pass
    raise ValueError(f"'rng/{name}' is not a state of its {type(gen.bit_generator).__name__} "
                     f"generator: {str(text)[:200]!r}")


# -- every rank's generators in one file ---------------------------------------------
def generator_states(model, train, comm=None):
    """{"rng/<owner>": the state of each generator the run draws from, as JSON text}. In
    a job of several ranks (``comm``: a collective, every rank calls it) every rank's,
    gathered: one text per rank, in rank order, and "ranks"."""
    rank, size = _rank_and_size(train, comm, "TrainingState")
    mine = {name: json.dumps(gen.bit_generator.state)
            for name, gen in generators(model, train).items()}
    if size == 1:
        return {f"rng/{name}": _cpu.array(text) for name, text in mine.items()}
    every = comm.allgather(mine)
    if any(set(theirs) != set(mine) for theirs in every):
        raise ValueError(f"TrainingState: the ranks draw from different generators "
                         f"({[sorted(theirs) for theirs in every]}); give every rank the "
                         f"same model, loader and transforms")
    return {"ranks": _cpu.int64(size),
            **{f"rng/{name}": _cpu.array([theirs[name] for theirs in every]) for name in mine}}


def _check_ranks(npz, path, ranks):
    """ValueError unless the state was written by ``ranks`` ranks (no "ranks": one): a
    rank's streams cannot be dealt to another number of ranks."""
    saved = npz.read("ranks", (), _cpu.int64).item() if "ranks" in npz.headers else 1
    if saved != ranks:
        raise ValueError(f"resume: {path!r} was written by a job of {saved} rank(s), this one "
                         f"has {ranks}: each rank's random streams (dropout masks, "
                         f"augmentation) belong to its rank; resume it on {saved} rank(s)")


def _this_ranks(text, rank):
    """This rank's text of an "rng/<owner>" member (one process's: the only one)."""
    return text if text.ndim == 0 else text[rank]


def _rank_and_size(train, comm, who):
    """(rank, size) of ``comm`` (one process without it); ValueError for the shard of a
    job of several ranks without ``comm``: its other ranks' streams would be lost."""
    shards = getattr(train, "world_size", 1)
    if comm is None and shards > 1:
        raise ValueError(f"{who}: the loader is one shard of a job of {shards} ranks: pass "
                         f"TrainingState(..., comm=comm) on every rank, so that each rank's "
                         f"random streams are saved and restored")
    return (0, 1) if comm is None else (comm.rank, comm.size)


def _require_epoch(npz, path):
    if "epoch" not in npz.headers:
        raise ValueError(f"resume: {path!r} is not a training state written by "
                         f"TrainingState (a model checkpoint has no 'epoch')")


def _epoch_count(npz):
    epochs = npz.read("epoch", (), _cpu.int64).item()
    if epochs < 0:
        raise npz.error(f"its epoch count is {epochs}")
    return epochs


def _loader_size(train):
    """[batches per epoch, training samples] of the DataLoader ``train`` (all of them,
    whichever share a data-parallel rank takes)."""
    return [len(train), len(train.x) if hasattr(train, "x") else -1]


def _inner(optimizer):
    """The optimizer that holds the state (a DistributedOptimizer wraps one)."""
    return getattr(optimizer, "optimizer", optimizer)


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


def _few(names, shown=8):
    """A list of names as text, cut after ``shown``."""
    return f"{names[:shown]}{f' and {len(names) - shown} more' * (len(names) > shown)}"


def _prefixed(prefix, state):
    return {prefix + key: _cpu.asarray(value) for key, value in state.items()}


def _specs(prefix, state):
    """{prefix + key: (shape, dtype)} of a state dict's values; text may be longer."""
    specs = {}
    for key, value in state.items():
        a = _cpu.asarray(value)
        specs[prefix + key] = (a.shape, "<U1024" if a.dtype.kind == "U" else a.dtype)
    return specs
