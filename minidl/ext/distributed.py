"""Data-parallel training: every rank holds the whole model and trains on its shard
(docs/distributed.md: how to run it, and why this design). After each backward the
gradients are averaged over the p ranks in one allreduce of a flat buffer,

    g = (1/p) sum_r g_r,    g_r = dL_r/dtheta, L_r the mean loss of rank r's shard

so with equal shards p ranks with batch B/p take the steps of one process with batch
B. Host arrays travel through MPI, GPU arrays through NCCL (transport.py, where every
MPI collective waits against a deadline). BatchNorm over the global batch:
sync_batchnorm.py.

It plugs into the core from outside, as ChainerMN does: ``DistributedOptimizer`` wraps
the optimizer (the allreduce before each update), ``ShardedLoader`` gives each rank its
share of every epoch, and the callback ``RankSync`` keeps the ranks in step (one
agreed set-up, a random stream per rank, one set of BatchNorm statistics, one set of
logged numbers). The Trainer knows none of it.

    comm = distributed.init()
    broadcast_parameters(model, comm=comm)
    trainer = Trainer(model, loss, DistributedOptimizer(Adam(model.parameters()), comm))
    trainer.fit(ShardedLoader(x, y, 32, comm, seed=0), epochs=5, callbacks=[RankSync(comm)])
"""
import json
import os
from types import SimpleNamespace

from .. import backend
from ..callbacks import Callback
from ..checks import check_int
from ..data import DataLoader
from ..layers import parallel
from ..layers.base import Container, layer_spec
from . import transport
from .resume import _named_layers, generators

_numpy = backend.get_module("cpu")    # host buffers: metric sums, MPI's arrays
_host = None                          # this process's MPIHost, made by the first init()


class Communicator:
    """The job's ranks: ``rank``, ``size`` and the collectives training needs.

    ``host`` (MPI) does barriers, sums of Python numbers and gathers of JSON values;
    ``device`` (NCCL on GPUs; else ``host``) sums and broadcasts the model's arrays.
    Without ``host`` it is one process: rank 0 of 1, and every collective leaves its
    input as it is.
    """

    def __init__(self, host=None, device=None):
        self.host = host
        self.device = device if device is not None else host
        self.rank, self.size = (0, 1) if host is None else (host.rank, host.size)

    def allreduce_(self, a):
        """Sum ``a`` over the ranks, in place; returns ``a``."""
        if self.size > 1:
            self.device.all_reduce(a, a)
        return a

    def broadcast_(self, a, root=0):
        """Overwrite ``a`` with rank ``root``'s ``a``, in place; returns ``a``."""
        if self.size > 1:
            self.device.broadcast(a, root)
        return a

    def sum(self, values):
        """Each of ``values`` (Python numbers) summed over the ranks, as floats."""
        totals = _numpy.array(values, dtype=_numpy.float64)
        if self.size > 1:
            self.host.all_reduce(totals, totals)
        return totals.tolist()

    def allgather(self, value):
        """Every rank's ``value`` (JSON values: numbers, strings, lists, dicts), in rank order."""
        return self.host.allgather_object(value) if self.size > 1 else [value]

    def barrier(self, timeout=None):
        """Wait for every rank (``timeout``: seconds, instead of the job's timeout)."""
        if self.size > 1:
            self.host.barrier(timeout=timeout)

    def __repr__(self):
        return f"Communicator(rank={self.rank}, size={self.size})"


def init(device="cpu", timeout=None, threads=None):
    """The job's Communicator, from MPI when mpi4py is installed, else rank 0 of 1.

    ``device="gpu"``: one GPU per rank (rank i on its node takes GPU i), and the
    model's arrays travel through NCCL. ``timeout``: the seconds an MPI collective
    waits for the slowest rank before CollectiveTimeout names the missing ones (300 by
    default; the first init sets it, a later one may change it). With several ranks,
    each takes ``threads`` threads for BLAS and minidl's memory passes (default: the
    node's usable cores shared out, one per rank on a machine with as many cores as
    ranks), so that ranks do not fight over cores. Start the job with ``mpiexec -n N
    python -m mpi4py ...``, so that an error on one rank aborts all.
    """
    global _host
    if device not in ("cpu", "gpu"):
        raise ValueError(f"distributed.init: device must be 'cpu' or 'gpu', got {device!r}")
    try:
        from mpi4py import MPI
    except ImportError:     # no MPI: a single process is a job of one
        return Communicator()
    first = _host is None
    if first:               # one host per process: making one is itself collective
        _host = transport.MPIHost(MPI.COMM_WORLD, MPI, timeout or transport.DEFAULT_TIMEOUT)
    elif timeout is not None:
        _host.timeout = transport.check_timeout(timeout)
    if _host.size > 1 and (first or threads is not None):
        _share_cores(_host.local_size, threads)
    gpu = device == "gpu" and _host.size > 1
    return Communicator(_host, transport.NCCLDevice(_host, backend.get_module("gpu"))
                        if gpu else None)


def _share_cores(ranks_here, threads=None):
    """Give this rank ``threads`` threads (default: its share of the node's cores) for
    OpenBLAS (through threadpoolctl, of the dist extra) and minidl's memory passes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = (max(1, (cores or 1) // ranks_here) if threads is None
               else check_int(threads, "threads", "distributed.init", minimum=1))
    parallel.NUM_THREADS = threads
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:     # BLAS keeps its threads; the memory passes are shared out
        return
    threadpool_limits(threads, user_api="blas")


def check_same_on_all_ranks(value, comm, what):
    """ValueError on every rank unless the number ``value`` is the same on all ranks.

    All equal exactly when p * sum(v^2) == (sum v)^2 (Cauchy-Schwarz), a test that
    gives every rank the same verdict, so that all of them stop, none waits.
    """
    if comm.size == 1:
        return
    total, squares = comm.sum([value, value * value])
    if comm.size * squares != total * total:
        raise ValueError(f"{what} differ between the ranks (here {value}, mean "
                         f"{total / comm.size:g}): a rank with fewer would leave the "
                         f"others waiting; shard with ShardedLoader(..., comm)")


# -- the ranks agree before they train ------------------------------------------------
def check_same_training(trainer, comm):
    """ValueError on every rank unless all ranks train alike: the same model structure,
    parameter shapes and dtypes, optimizer and its settings, scheduler, loss, metrics,
    epochs, batch size, batches per epoch and loader seed. One allgather of these few
    values; the message names each difference and the ranks on each side."""
    if comm.size > 1:
        _agree(_training(trainer), comm, "RankSync")


def _training(trainer):
    """What every rank of a job must share to take the same steps, as JSON values."""
    loader = trainer.train_loader
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrapped
    loss = trainer.loss
    data = getattr(loader, "x", None)
    return {**_structure(trainer.model),
            "optimizer": {"class": type(optimizer).__name__,
                          "settings": optimizer.hyperparameters()},
            "scheduler": None if trainer.scheduler is None else type(trainer.scheduler).__name__,
            "loss": {"class": type(loss).__name__, "settings": {
                k: v for k, v in vars(loss).items() if isinstance(v, (bool, int, float, str))}},
            "metrics": list(trainer.metrics), "clip_grad_norm": trainer.clip_grad_norm,
            "epochs": trainer.epochs, "batches per epoch": len(loader),
            **{what: getattr(loader, name, None) for what, name in (
                ("batch size", "batch_size"), ("loader seed", "seed"),
                ("shuffle", "shuffle"), ("drop_last", "drop_last"))},
            "data": None if data is None else [len(data), data.shape[1:], str(data.dtype)]}


def _structure(model):
    """The model's layers (classes and settings, Dropout seeds aside) and arrays."""
    arrays = [(n, p.data) for n, p in model.named_parameters()] + model.named_buffers()
    layers = _named_layers(model, "model")
    return {"model": {"layers": [f"{name} ({type(layer).__name__})" for name, layer in layers],
                      "config": _without_seeds(layer_spec(model)),
                      "arrays": [f"{name} {tuple(a.shape)} {a.dtype}" for name, a in arrays]}}


def _without_seeds(spec):
    if isinstance(spec, dict):
        return {k: _without_seeds(v) for k, v in spec.items() if k != "seed"}
    return [_without_seeds(v) for v in spec] if isinstance(spec, list) else spec


def _agree(fields, comm, who):
    """ValueError on every rank (all see every rank's ``fields``) unless all are equal."""
    mine = json.loads(json.dumps(fields, default=str))   # as the others' arrive: JSON
    every = comm.allgather(mine)
    differences = []
    for key in mine:
        path, values = _first_difference([theirs.get(key) for theirs in every], key)
        if path is not None:
            groups = {}
            for rank, value in enumerate(values):
                groups.setdefault(json.dumps(value), []).append(str(rank))
            differences.append(f"{path} (" + "; ".join(
                f"rank {', '.join(ranks)}: {_short(text)}" for text, ranks in groups.items())
                + ")")
    if differences:
        raise ValueError(f"{who}: the ranks must train alike, but they differ in "
                         f"{', and in '.join(differences)}; every rank stops here rather than "
                         f"wait for the others at a step that one of them never takes")


def _first_difference(values, path):
    """(where, the values there) of the first place the JSON ``values`` differ, going
    into dicts with the same keys and into lists; (None, None) if they are equal."""
    first = values[0]
    if all(v == first for v in values):
        return None, None
    if all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
        inner = [(f"{path}.{k}", [v[k] for v in values]) for k in first]
    elif all(isinstance(v, list) for v in values):     # the first item that differs
        inner = [(f"{path}[{i}]", [v[i] for v in values])
                 for i in range(min(map(len, values)))]
    else:
        inner = []
    return next((_first_difference(vs, p) for p, vs in inner if any(v != vs[0] for v in vs)),
                (path, values))


def _short(text, limit=120):
    return text if len(text) <= limit else text[:limit] + " ..."


# -- a random stream per rank ---------------------------------------------------------
def seed_per_rank(model, loader, comm):
    """Give every random generator the run draws from (resume.generators: minidl's, the
    transforms', each Dropout's), except the loader's shuffle that the ranks share, a
    stream of this rank's own: seeded by a draw from the generator and the rank (the
    spawn key of numpy's SeedSequence). So the ranks draw different masks and shifts
    whatever order a script built, seeded and broadcast in, and the same ones in every
    run. One process keeps its streams untouched."""
    if comm.size == 1:
        return
    if not hasattr(loader, "rng"):      # an iterable of batches of one's own: no shuffle
        loader = SimpleNamespace(rng=None)
    for name, rng in generators(model, loader).items():
        if name != "loader":
            seed = _numpy.random.SeedSequence(int(rng.integers(2**63)), spawn_key=(comm.rank,))
            rng.bit_generator.state = type(rng.bit_generator)(seed).state
    for _, layer in _named_layers(model, "model"):
        if getattr(layer, "gpu_rng", None) is not None:
            layer.gpu_rng = None        # a GPU stream is made again from the new one


# -- averaging ------------------------------------------------------------------------
def average_gradients(parameters, comm):
    """Replace each ``p.grad`` by its mean over the ranks: one allreduce of a flat buffer.

    A parameter without a gradient adds zeros and keeps ``grad = None``, so optimizers
    skip it as in one process. The new grads are views of the summed buffer.
    """
    parameters = list(parameters)
    if comm.size == 1 or not parameters:
        return
    means = _mean_over_ranks([p.grad for p in parameters], [p.data for p in parameters],
                             comm, "average_gradients")
    for p, g in zip(parameters, means):
        if p.grad is not None:
            p.grad = g


def broadcast_parameters(model, root=0, comm=None):
    """Give every rank rank ``root``'s parameters and buffers (BatchNorm statistics),
    once the ranks have agreed on the model's structure (ValueError naming the
    difference, rather than MPI's error about a message of the wrong size)."""
    comm = init() if comm is None else comm
    if not 0 <= root < comm.size:
        raise ValueError(f"broadcast_parameters: root must be a rank in [0, {comm.size}), "
                         f"got {root!r}")
    if comm.size > 1:
        _agree(_structure(model), comm, "broadcast_parameters")
    arrays = [p.data for p in model.parameters()] + [v for _, v in model.named_buffers()]
    for value in arrays:
        comm.broadcast_(value, root)


def average_buffers(model, comm):
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks;
    integer buffers (batch counts) are equal on all ranks and stay as they are, as do
    the buffers of layers that keep them equal themselves (``synchronized``:
    SyncBatchNorm)."""
    buffers = [value for _, layer in _named_layers(model, "model")
               if not isinstance(layer, Container) and not getattr(layer, "synchronized", False)
               for _, value in layer.named_buffers() if value.dtype.kind == "f"]
    if comm.size == 1 or not buffers:
        return
    for value, mean in zip(buffers, _mean_over_ranks(buffers, buffers, comm,
                                                     "average_buffers")):
        value[...] = mean


def _mean_over_ranks(arrays, like, comm, caller):
    """The mean over the ranks of each of ``arrays`` (None: zeros), as views shaped like
    ``like`` of one flat buffer: pack, one allreduce, divide by the number of ranks."""
    dtypes = {a.dtype for a in like}
    if len(dtypes) > 1:     # one buffer, one allreduce: mixed dtypes would be cast
        raise ValueError(f"distributed.{caller}: all arrays must share one dtype for the flat "
                         f"buffer, got {sorted(map(str, dtypes))}; move the model to one dtype")
    xp = backend.get_array_module(like[0])
    flat = xp.concatenate([(xp.zeros(t.size, t.dtype) if a is None else a.reshape(-1))
                           .astype(t.dtype, copy=False) for a, t in zip(arrays, like)])
    comm.allreduce_(flat)
    flat /= comm.size
    ends = _numpy.cumsum([t.size for t in like]).tolist()
    return [flat[end - t.size:end].reshape(t.shape) for t, end in zip(like, ends)]


class DistributedOptimizer:
    """``optimizer`` whose update uses the gradients averaged over the ranks of ``comm``:
    ``synchronize()`` averages them (one allreduce; the Trainer calls it before
    clipping), ``step()`` synchronizes if that has not happened since the last step,
    then updates. Everything else (``lr``, ``state_dict``, ...) is the optimizer's;
    schedulers take the wrapped ``optimizer``."""

    def __init__(self, optimizer, comm):
        if not hasattr(optimizer, "step") or not hasattr(optimizer, "params"):
            raise TypeError(f"DistributedOptimizer: expected a minidl Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer, self.comm = optimizer, comm
        self._synchronized = False

    def synchronize(self):
        if not self._synchronized:
            average_gradients(self.optimizer.params, self.comm)
            self._synchronized = True

    def step(self):
        self.synchronize()
        self.optimizer.step()
        self._synchronized = False

    def zero_grad(self):
        self.optimizer.zero_grad()

    @property
    def lr(self):
        return self.optimizer.lr

    @lr.setter
    def lr(self, value):
        self.optimizer.lr = value

    @property
    def params(self):
        return self.optimizer.params

    def hyperparameters(self):
        return self.optimizer.hyperparameters()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)

    def __repr__(self):
        return f"DistributedOptimizer({self.optimizer!r}, {self.comm!r})"


class ShardedLoader(DataLoader):
    """This rank's share of every epoch: the epoch's order (shuffled with ``seed``, the
    same on every rank) dealt round-robin over the ``comm.size`` ranks, as many samples
    to each (docs/distributed.md#sharding): padded by wrapping around, or cut to a
    multiple of the ranks with ``drop_last``. Other arguments: ``DataLoader``'s."""

    def __init__(self, x, y, batch_size, comm, shuffle=True, drop_last=False, seed=None,
                 transform=None):
        super().__init__(x, y, batch_size, shuffle, drop_last, seed, transform)
        self.rank = check_int(comm.rank, "rank", "ShardedLoader", minimum=0)
        self.world_size = check_int(comm.size, "world_size", "ShardedLoader", minimum=1)
        if self.rank >= self.world_size:
            raise ValueError(f"ShardedLoader: need 0 <= rank < world_size, "
                             f"got rank={comm.rank!r}, world_size={comm.size!r}")
        if drop_last and len(self.x) < self.world_size:
            raise ValueError(f"ShardedLoader: drop_last with {len(self.x)} samples leaves "
                             f"nothing for {self.world_size} ranks")
        if shuffle and self.world_size > 1 and seed is None:    # each rank would draw its own
            raise ValueError("ShardedLoader: with more than one rank and shuffle=True, pass "
                             "the same seed= on every rank, so that all ranks shard one order")

    def _epoch_size(self):
        n, p = len(self.x), self.world_size
        return n // p if self.drop_last else -(-n // p)

    def _order(self):
        order = super()._order()
        if self.world_size == 1:
            return order
        order = _numpy.arange(len(self.x)) if order is None else order
        padded = _numpy.resize(order, self._epoch_size() * self.world_size)   # wraps around
        return padded[self.rank::self.world_size]


class RankSync(Callback):
    """Keeps the ranks of a job in step during ``fit``. When it begins, the ranks check
    that they train alike (``check_same_training``: a rank with other epochs or fewer
    batches would leave the others waiting) and each takes a random stream of its own
    (``seed_per_rank``); after each epoch's last batch the BatchNorm statistics are
    averaged, so every rank evaluates the same model; and the epoch's logged numbers
    become their mean over the ranks (each rank's share is equally large). Progress
    bars only on rank 0."""

    priority = 90       # after the scheduler, before the callbacks that read the logs

    def __init__(self, comm):
        self.comm = comm

    def on_train_begin(self, trainer):
        check_same_training(trainer, self.comm)
        seed_per_rank(trainer.model, trainer.train_loader, self.comm)
        if self.comm.rank != 0:
            trainer.verbose = 0

    def on_batch_end(self, trainer, batch, logs):
        if batch == len(trainer.train_loader) - 1:
            average_buffers(trainer.model, self.comm)

    def on_epoch_end(self, trainer, epoch, logs):
        # the Trainer's own numbers (callbacks on some ranks only may log others)
        names = ["loss", *trainer.metrics]
        keys = [k for k in names + [f"val_{name}" for name in names] if k in logs]
        means = self.comm.sum([logs[k] for k in keys])
        logs.update({k: total / self.comm.size for k, total in zip(keys, means)})
