"""What the MPI tests (tests/ext/test_distributed.py, test_sync_batchnorm.py) run under
``mpiexec -n 2 python -m mpi4py``, and ``run_job``, which starts it.

    distributed_job.py train OUT_PREFIX     train a small CNN, save weights and history
    distributed_job.py syncbn OUT_PREFIX    mnist_cnn with SyncBatchNorm and Dropout, 20
                                            steps in float32 and float64, and the state
                                            before every step
    distributed_job.py dropout OUT          hash every rank's dropout masks, for two
                                            orders of building, seeding and broadcasting
    distributed_job.py resume OUT_PREFIX STATE straight|killed|resumed
                                            a resumable run: whole, SIGKILLed in epoch 2,
                                            or resumed from STATE
    distributed_job.py fail                 rank 1 raises in the middle of an epoch
    distributed_job.py kill                 rank 1 is SIGKILLed in the middle of an epoch
    distributed_job.py differ OUT           ranks given other epochs, seeds, optimizers,
                                            models: each refusal's message, into OUT
    distributed_job.py other-epochs         the same, not caught: the job ends
    distributed_job.py leave-early          rank 1 leaves fit after epoch 1 (timeout 2 s)
    distributed_job.py stopped              rank 1 stops itself (SIGSTOP; timeout 2 s)
    distributed_job.py cli CHECKSUMS ARGS   ``minidl ARGS`` on a generated dataset
    distributed_job.py cli-no-data-on-rank-1 CHECKSUMS ARGS    the same, rank 1 fails to load
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from types import SimpleNamespace

import numpy

import minidl
from minidl.checkpoint import build_layer
from minidl.ext import distributed
from minidl.ext.resume import TrainingState
from minidl.ext.sync_batchnorm import convert_sync_batchnorm
from minidl.ext.transforms import Compose, RandomHorizontalFlip, RandomShift
from minidl.ext.zoo import mnist_cnn
from minidl.layers.base import layer_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
GLOBAL_BATCH = 64
EPOCHS, STEPS_PER_EPOCH = 4, 5      # 20 steps


def _mpiexec():
    """The mpiexec of the mpich wheel: in the scripts folder of this python (or of
    its user site), where pip puts it; None without mpi4py or that wheel."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    folders = [os.path.dirname(sys.executable), sysconfig.get_path("scripts"),
               sysconfig.get_path("scripts", f"{os.name}_user")]
    found = [os.path.join(f, "mpiexec") for f in folders
             if os.path.exists(os.path.join(f, "mpiexec"))]
    return found[0] if found else None


MPIEXEC = _mpiexec()


def run_job(*args, ranks=2, timeout=120):
    """``mpiexec -n ranks python -m mpi4py tests/distributed_job.py args``: (the finished
    process, its seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py",
                           os.path.abspath(__file__), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    return done, time.perf_counter() - start


def data(n=GLOBAL_BATCH * STEPS_PER_EPOCH):
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((n, 1, 8, 8)).astype(numpy.float32)
    y = rng.integers(0, 3, n)
    x[numpy.arange(n), 0, y, :] += 2.0      # learnable: the class is a bright row
    return x, y


def digits(n=GLOBAL_BATCH * STEPS_PER_EPOCH):
    """28x28 images of 10 classes: noise in [0, 0.5), and the class as a bright row. (A
    gentle problem: ties in max pooling, frequent with sparse images, would let float32
    rounding pick other maxima on 2 ranks than in one process.)"""
    rng = numpy.random.default_rng(0)
    x = rng.random((n, 1, 28, 28), dtype=numpy.float32) * 0.5
    y = rng.integers(0, 10, n)
    x[numpy.arange(n), 0, 2 * y + 4, :] += 1.0
    return x, y


def train(comm, metrics=("accuracy",), build=None, dtype=numpy.float32, images=data,
          callbacks=(), epochs=EPOCHS, seed=7, optimizer=None):
    """20 SGD steps with global batch 64 split over the ranks; (model, history).
    ``optimizer``: a class to build with the model's parameters instead."""
    minidl.manual_seed(100 + comm.rank)   # a different start per rank: broadcast fixes it
    model = (build or small_cnn)()
    distributed.broadcast_parameters(model, comm=comm)
    x, y = images()
    x = x.astype(dtype)
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                             distributed.DistributedOptimizer(
                                 optimizer(model.parameters()) if optimizer else minidl.SGD(
                                     model.parameters(), lr=0.05, momentum=0.9), comm),
                             metrics=metrics, verbose=0)
    history = trainer.fit(
        distributed.ShardedLoader(x, y, GLOBAL_BATCH // comm.size, comm, seed=seed),
        epochs=epochs, callbacks=[distributed.RankSync(comm), *callbacks],
        val=distributed.ShardedLoader(x[:100], y[:100], 16, comm, shuffle=False))
    return model, history


def small_cnn():
    return minidl.Sequential(
        minidl.Conv2D(1, 4, 3, padding=1), minidl.ReLU(), minidl.MaxPool2D(2),
        minidl.Flatten(), minidl.Dense(64, 3))


def in_dtype(build, dtype):
    """``build`` made again with every layer in ``dtype`` (through its config)."""
    text = json.dumps(layer_spec(build())).replace('"float32"', json.dumps(numpy.dtype(dtype).name))
    return lambda: build_layer(json.loads(text))


# -- SyncBatchNorm: 2 ranks x 32 against one process at 64, Dropout included ----------------
def syncbn_model(comm, dtype):
    """mnist_cnn in ``dtype``, its BatchNorms synchronised over ``comm``."""
    return convert_sync_batchnorm(in_dtype(mnist_cnn, dtype)(), comm)


class DropoutOfTheRanks:
    """What one process's Dropout draws so that every sample of its batch keeps the draw
    its rank made: the ranks' generators (as RankSync left them) dealt out by the same
    sample order as ShardedLoader's."""

    def __init__(self, rngs, n, seed):
        self.rngs, self.n, self.step = rngs, n, 0
        self.order_rng = numpy.random.default_rng(seed)    # the loader's: the same orders

    def __call__(self, shape, device):
        batch = self.step % STEPS_PER_EPOCH
        if batch == 0:
            self.order = self.order_rng.permutation(self.n)
        self.step += 1
        rows = self.order[batch * GLOBAL_BATCH:(batch + 1) * GLOBAL_BATCH]
        where = {sample: k for k, sample in enumerate(numpy.sort(rows))}
        u = numpy.empty(shape, numpy.float32)
        for rank, rng in enumerate(self.rngs):
            mine = numpy.sort(rows[rank::len(self.rngs)])
            u[[where[s] for s in mine]] = rng.random((len(mine),) + shape[1:], numpy.float32)
        return u


def one_process_syncbn_reference(dtype, snapshots=None, ranks=2):
    """One process at batch 64 with plain BatchNorm, whose Dropout draws what the ranks
    of ``syncbn`` drew for each sample; (model, history). With ``snapshots`` (what
    ``Snapshots`` saved of the ranks' run) every step starts from the ranks' state
    before it, and ``history.step_errors`` holds how far each step's result is from
    theirs: |theta_one - theta_ranks| / |theta_ranks| over all weights and statistics."""
    rngs = []
    for rank in range(ranks):
        minidl.manual_seed(100 + rank)      # as train() builds each rank's model
        model = in_dtype(mnist_cnn, dtype)()
        distributed.seed_per_rank(model, minidl.DataLoader([0], [0]),
                                  SimpleNamespace(rank=rank, size=ranks))
        rngs.append(model.layers[-2].rng)
    model = None

    def build():
        nonlocal model
        model = in_dtype(mnist_cnn, dtype)()
        model.layers[-2]._uniform = DropoutOfTheRanks(rngs, GLOBAL_BATCH * STEPS_PER_EPOCH, 7)
        return model
    forced = [] if snapshots is None else [FromSnapshots(snapshots)]
    model, history = train(distributed.Communicator(), build=build, dtype=dtype, images=digits,
                           optimizer=gentle_sgd, callbacks=forced)
    history.step_errors = forced[0].errors if forced else None
    return model, history


class Snapshots(minidl.Callback):
    """The model's and the optimizer's state before every step and at the end, as
    "<step>/model/<name>" and "<step>/optimizer/<name>" (written to ``path`` at the end)."""

    def __init__(self, path):
        self.path, self.arrays, self.steps = path, {}, 0

    def on_batch_begin(self, trainer, batch):
        optimizer = trainer.optimizer.optimizer     # inside the DistributedOptimizer
        for part, state in (("model", trainer.model.state_dict()),
                            ("optimizer", optimizer.state_dict())):
            self.arrays.update({f"{self.steps}/{part}/{k}": v for k, v in state.items()})
        self.steps += 1

    def on_train_end(self, trainer):
        self.on_batch_begin(trainer, None)
        numpy.savez(self.path, **self.arrays)


class FromSnapshots(minidl.Callback):
    """Start every step from the state ``Snapshots`` saved; after it, note its distance
    from the state the ranks reached (``errors``)."""

    def __init__(self, path):
        saved = numpy.load(path)
        self.states = [{part: {k.split("/", 2)[2]: saved[k] for k in saved.files
                               if k.startswith(f"{step}/{part}/")}
                        for part in ("model", "optimizer")}
                       for step in range(len({k.split("/")[0] for k in saved.files}))]
        self.step, self.errors = 0, []

    def on_batch_begin(self, trainer, batch):
        trainer.model.load_state_dict(self.states[self.step]["model"])
        trainer.optimizer.optimizer.load_state_dict(self.states[self.step]["optimizer"])

    def on_batch_end(self, trainer, batch, logs):
        self.step += 1
        theirs = self.states[self.step]["model"]
        ours = trainer.model.state_dict()
        flat = [numpy.concatenate([s[k].ravel() for k in ours if ours[k].dtype.kind == "f"])
                for s in (ours, theirs)]
        self.errors.append(float(numpy.linalg.norm(flat[0] - flat[1]) / numpy.linalg.norm(flat[1])))


def gentle_sgd(parameters):
    return minidl.SGD(parameters, lr=0.02, momentum=0.9)


# -- random streams per rank -----------------------------------------------------------------
class MaskHashes(minidl.Callback):
    """Every training batch's Dropout mask, hashed."""

    def __init__(self, dropout):
        self.hashes = []
        dropout.register_hook(lambda layer, x, y: self.hashes.append(
            digest(layer.cache["mask"])) if layer.training else None)


def dropout_masks(comm, order):
    """Train a CNN with Dropout, built, seeded and broadcast in ``order``: each rank's
    mask hashes, and whether the weights are bit-identical across ranks."""
    minidl.manual_seed(0)                       # the same streams on every rank, unless...
    model = dropout_cnn()
    if order == "build, seed, broadcast":       # ... reseeded per rank, too late for Dropout
        minidl.manual_seed(comm.rank)           # (the recipe's old order)
        distributed.broadcast_parameters(model, comm=comm)
    masks = MaskHashes(model.layers[-2])
    x, y = data()
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(), distributed.DistributedOptimizer(
        minidl.Adam(model.parameters()), comm), verbose=0)
    trainer.fit(distributed.ShardedLoader(x, y, 32, comm, seed=1, transform=RandomShift(1)),
                epochs=2, callbacks=[distributed.RankSync(comm), masks])
    weights = [digest(a) for a in model.state_dict().values()]
    return {"masks": comm.allgather(masks.hashes), "weights": comm.allgather(weights)}


def digest(a):
    return hashlib.sha1(a.tobytes()).hexdigest()


def dropout_cnn():
    return minidl.Sequential(minidl.Conv2D(1, 4, 3, padding=1, activation="relu"),
                             minidl.MaxPool2D(2), minidl.Flatten(), minidl.Dense(64, 16),
                             minidl.Dropout(0.5), minidl.Dense(16, 3))


# -- resume ----------------------------------------------------------------------------------
class KillIn(minidl.Callback):
    """SIGKILL this rank at ``batch`` of ``epoch`` (from 0)."""

    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def on_batch_begin(self, trainer, batch):
        if (trainer.epoch, batch) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)


def resumable(comm, state, mode):
    """Three epochs with every per-rank stream (augmentation, Dropout, minidl's), SyncBatchNorm
    and a per-batch schedule; "killed": rank 1 dies in epoch 2; "resumed": from ``state``."""
    minidl.manual_seed(comm.rank)
    model = minidl.Sequential(
        minidl.Conv2D(1, 4, 3, padding=1, bias=False), minidl.BatchNorm2D(4), minidl.ReLU(),
        minidl.MaxPool2D(2), minidl.Flatten(), minidl.Dropout(0.3), minidl.Dense(64, 3))
    distributed.broadcast_parameters(model, comm=comm)
    model = convert_sync_batchnorm(model, comm)
    x, y = data()
    optimizer = minidl.Adam(model.parameters(), lr=1e-2)
    loader = distributed.ShardedLoader(x[:192], y[:192], 16, comm, seed=3, transform=Compose(
        [RandomShift(1), RandomHorizontalFlip()]))
    scheduler = minidl.OneCycleLR(optimizer, 1e-2, epochs=3, steps_per_epoch=len(loader))
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                             distributed.DistributedOptimizer(optimizer, comm),
                             scheduler=scheduler, verbose=0)
    callbacks = [distributed.RankSync(comm), TrainingState(state, resume=mode == "resumed",
                                                           comm=comm)]
    if mode == "killed" and comm.rank == 1:
        callbacks.append(KillIn(epoch=1, batch=2))
    history = trainer.fit(loader, epochs=3, callbacks=callbacks,
                          val=distributed.ShardedLoader(x[192:], y[192:], 32, comm,
                                                        shuffle=False))
    return {**{f"model/{k}": v for k, v in model.state_dict().items()},
            **{f"optimizer/{k}": numpy.asarray(v) for k, v in optimizer.state_dict().items()},
            **{f"history/{k}": numpy.array(v) for k, v in history.history.items() if k != "time"}}


# -- ranks that disagree, or do not come --------------------------------------------------
def differing(comm, what):
    """Train with rank 1 given another ``what``; the error's message."""
    other = comm.rank == 1
    options = {"epochs": dict(epochs=3 if other else 2), "seed": dict(seed=8 if other else 7),
               "optimizer": dict(optimizer=minidl.Adam if other else None),
               "model": dict(build=dropout_cnn if other else small_cnn)}[what]
    try:
        train(comm, **options)
    except ValueError as error:
        return str(error)
    return None


class LeaveAfter(minidl.Callback):
    """Rank ``rank`` stops training after ``epochs`` epochs; the others go on."""

    def __init__(self, rank, epochs):
        self.rank, self.epochs = rank, epochs

    def on_epoch_end(self, trainer, epoch, logs):
        if distributed.init().rank == self.rank and epoch + 1 == self.epochs:
            trainer.stop_training = True


def fail_on_rank_1(logits, labels):
    """A metric that raises on rank 1 at its third batch, as a bug there would."""
    fail_on_rank_1.calls = getattr(fail_on_rank_1, "calls", 0) + 1
    if distributed.init().rank == 1 and fail_on_rank_1.calls == 3:
        raise RuntimeError("rank 1 failed on purpose")
    return 0.0


def kill_rank_1(logits, labels):
    """A metric that SIGKILLs rank 1 at its third batch, as the kernel's OOM killer would."""
    kill_rank_1.calls = getattr(kill_rank_1, "calls", 0) + 1
    if distributed.init().rank == 1 and kill_rank_1.calls == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return 0.0


def no_data(*args):
    raise OSError("no data here")


def main(argv):
    command = argv[0]
    comm = distributed.init(timeout=2 if command in ("leave-early", "stopped") else None)
    if command == "train":
        # the MPI calls that only the NCCL set-up uses (no GPU here)
        assert comm.host.local_rank == comm.rank      # one node: the same numbering
        assert comm.host.bcast_object("id" if comm.rank == 0 else None) == "id"
        model, history = train(comm)
        save(f"{argv[1]}{comm.rank}.npz", model, history)
    elif command == "syncbn":
        for dtype in (numpy.float32, numpy.float64):
            name = f"{argv[1]}{numpy.dtype(dtype).name}"
            first = comm.rank == 0 and dtype == numpy.float32     # the ranks are equal
            snapshots = [Snapshots(f"{name}-steps.npz")] if first else []
            model, history = train(comm, build=lambda: syncbn_model(comm, dtype), dtype=dtype,
                                   images=digits, optimizer=gentle_sgd, callbacks=snapshots)
            save(f"{name}-{comm.rank}.npz", model, history)
    elif command == "dropout":
        found = {order: dropout_masks(comm, order)
                 for order in ("build, seed, broadcast", "seed, build")}
        write_json(comm, argv[1], found)
    elif command == "resume":
        numpy.savez(f"{argv[1]}{comm.rank}.npz", **resumable(comm, argv[2], argv[3]))
    elif command == "differ":
        write_json(comm, argv[1], {what: differing(comm, what)
                                   for what in ("epochs", "seed", "optimizer", "model")})
    elif command == "other-epochs":
        train(comm, epochs=2 + comm.rank)
    elif command == "leave-early":
        train(comm, callbacks=[LeaveAfter(rank=1, epochs=1)])
        comm.barrier()      # where the CLI waits once training is over
    elif command == "stopped":
        if comm.rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        train(comm)
    elif command in ("fail", "kill"):
        train(comm, metrics={command: fail_on_rank_1 if command == "fail" else kill_rank_1})
    elif command.startswith("cli"):
        from minidl import cli
        from minidl.cli import recipe
        from minidl.data import datasets
        with open(argv[1]) as f:
            datasets.CHECKSUMS["mnist"] = json.load(f)
        if command == "cli-no-data-on-rank-1" and comm.rank == 1:
            recipe.load_split = no_data
        return cli.main(argv[2:])
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


def save(path, model, history):
    numpy.savez(path, **model.state_dict(),
                **{f"history.{k}": numpy.array(v) for k, v in history.history.items()})


def write_json(comm, path, value):
    if comm.rank == 0:
        with open(path, "w") as f:
            json.dump(value, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
