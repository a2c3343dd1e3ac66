"""Data-parallel training: every rank holds the whole model and trains on its shard
(docs/distributed.md: how to run it, and why this design). After each backward the
gradients are averaged over the p ranks in one allreduce of a flat buffer,

    g = (1/p) sum_r g_r,    g_r = dL_r/dtheta, L_r the mean loss of rank r's shard

so with equal shards p ranks with batch B/p take the steps of one process with batch
B. Host arrays travel through MPI, GPU arrays through NCCL.

It plugs into the core from outside, as ChainerMN does: ``DistributedOptimizer`` wraps
the optimizer (the allreduce before each update), ``ShardedLoader`` gives each rank its
share of every epoch, and the callback ``RankSync`` keeps the ranks in step (one
batch count, one set of BatchNorm statistics, one set of logged numbers). The
Trainer knows none of it.

    comm = distributed.init()
    broadcast_parameters(model, comm=comm)
    trainer = Trainer(model, loss, DistributedOptimizer(Adam(model.parameters()), comm))
    trainer.fit(ShardedLoader(x, y, 32, comm, seed=0), epochs=5, callbacks=[RankSync(comm)])
"""
from .. import backend
from ..callbacks import Callback
from ..checks import check_int
from ..data import DataLoader

_numpy = backend.get_module("cpu")    # host buffers: metric sums, MPI's arrays


class Communicator:
    """The job's ranks: ``rank``, ``size`` and the collectives training needs.

    ``host`` (MPI) does barriers and sums of Python numbers; ``device`` (NCCL on
    GPUs; else ``host``) sums and broadcasts the model's arrays. Without ``host``
    it is one process: rank 0 of 1, and every collective leaves its input as it is.
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

    def barrier(self):
        if self.size > 1:
            self.host.barrier()

    def __repr__(self):
        return f"Communicator(rank={self.rank}, size={self.size})"


def init(device="cpu"):
    """The job's Communicator, from MPI when mpi4py is installed, else rank 0 of 1.

    ``device="gpu"``: one GPU per rank (rank i on its node takes GPU i), and the
    model's arrays travel through NCCL. Start the job with ``mpiexec -n N python
    -m mpi4py ...``, so that an error on one rank aborts all (none waits forever).
    """
    if device not in ("cpu", "gpu"):
        raise ValueError(f"distributed.init: device must be 'cpu' or 'gpu', got {device!r}")
    try:
        from mpi4py import MPI
    except ImportError:     # no MPI: a single process is a job of one
        return Communicator()
    host = _MPI(MPI.COMM_WORLD, MPI)
    gpu = device == "gpu" and host.size > 1
    return Communicator(host, _NCCL(host, backend.get_module("gpu")) if gpu else None)


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
    """Give every rank rank ``root``'s parameters and buffers (BatchNorm statistics)."""
    comm = init() if comm is None else comm
    if not 0 <= root < comm.size:
        raise ValueError(f"broadcast_parameters: root must be a rank in [0, {comm.size}), "
                         f"got {root!r}")
    arrays = [p.data for p in model.parameters()] + [v for _, v in model.named_buffers()]
    for value in arrays:
        comm.broadcast_(value, root)


def average_buffers(model, comm):
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks;
    integer buffers (batch counts) are equal on all ranks and stay as they are."""
    buffers = [value for _, value in model.named_buffers() if value.dtype.kind == "f"]
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
    """Keeps the ranks of a job in step during ``fit``: every rank must have as many
    batches per epoch (a rank with fewer would leave the others waiting); after each
    epoch's last batch the BatchNorm statistics are averaged, so every rank evaluates
    the same model; and the epoch's logged numbers become their mean over the ranks
    (each rank's share is equally large). Progress bars only on rank 0."""

    priority = 90       # after the scheduler, before the callbacks that read the logs

    def __init__(self, comm):
        self.comm = comm

    def on_train_begin(self, trainer):
        check_same_on_all_ranks(len(trainer.train_loader), self.comm,
                                "Trainer.fit: batches per epoch")
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


class _MPI:
    """MPI's buffer-form collectives on host arrays (named as cupyx.distributed's)."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def all_reduce(self, a, out):
        _check_host(a)
        self.comm.Allreduce(self.MPI.IN_PLACE if a is out else a, out, op=self.MPI.SUM)

    def broadcast(self, a, root):
        _check_host(a)
        self.comm.Bcast(a, root=root)

    def barrier(self):
        self.comm.Barrier()

    def local_rank(self):
        """This rank's index among the ranks on its node (which GPU it takes)."""
        return self.comm.Split_type(self.MPI.COMM_TYPE_SHARED).Get_rank()

    def bcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)


def _check_host(a):
    if not isinstance(a, _numpy.ndarray):
        raise TypeError(f"distributed: MPI sums host (numpy) arrays, got "
                        f"{type(a).__module__}.{type(a).__name__}; for a model on the GPU "
                        f"use distributed.init(device='gpu'), which sums them with NCCL")


class _NCCL:
    """NCCL collectives on GPU arrays (``cupy.cuda.nccl``), one GPU per rank.

    Rank 0 makes the communicator's id; MPI carries it to the others once.
    """

    def __init__(self, host, cupy):
        cuda = cupy.cuda
        cuda.Device(host.local_rank() % cuda.runtime.getDeviceCount()).use()
        self.nccl, self.cuda = cuda.nccl, cuda
        uid = self.nccl.get_unique_id() if host.rank == 0 else None
        self.comm = self.nccl.NcclCommunicator(host.size, host.bcast_object(uid), host.rank)
        self.types = {_numpy.dtype(name): getattr(self.nccl, f"NCCL_{name.upper()}")
                      for name in ("float16", "float32", "float64", "int64")}

    def all_reduce(self, a, out):
        self.comm.allReduce(_device_pointer(a), _device_pointer(out), a.size, self._type(a),
                            self.nccl.NCCL_SUM, self.cuda.get_current_stream().ptr)

    def broadcast(self, a, root):
        self.comm.bcast(_device_pointer(a), a.size, self._type(a), root,
                        self.cuda.get_current_stream().ptr)

    def _type(self, a):
        if a.dtype not in self.types:
            raise TypeError(f"distributed: NCCL sums {sorted(map(str, self.types))} arrays, "
                            f"got {a.dtype}")
        return self.types[a.dtype]


def _device_pointer(a):
    """The address of a cupy array's first element (what NCCL calls take)."""
    return a.data.ptr
