"""What tests/ext/test_distributed.py runs under ``mpiexec -n 2 python -m mpi4py``.

    distributed_job.py train OUT_PREFIX     train a small CNN, save weights and history
    distributed_job.py fail                 rank 1 raises in the middle of an epoch
    distributed_job.py cli CHECKSUMS ARGS   ``minidl ARGS`` on a generated dataset
    distributed_job.py cli-no-data-on-rank-1 CHECKSUMS ARGS    the same, rank 1 fails to load
"""
import json
import sys

import numpy

import minidl
from minidl.ext import distributed

GLOBAL_BATCH = 64
EPOCHS, STEPS_PER_EPOCH = 4, 5      # 20 steps


def data():
    rng = numpy.random.default_rng(0)
    n = GLOBAL_BATCH * STEPS_PER_EPOCH
    x = rng.standard_normal((n, 1, 8, 8)).astype(numpy.float32)
    y = rng.integers(0, 3, n)
    x[numpy.arange(n), 0, y, :] += 2.0      # learnable: the class is a bright row
    return x, y


def train(comm, metrics=("accuracy",)):
    """20 SGD steps with global batch 64 split over the ranks; (model, history)."""
    minidl.manual_seed(100 + comm.rank)   # a different start per rank: broadcast fixes it
    model = minidl.Sequential(
        minidl.Conv2D(1, 4, 3, padding=1), minidl.ReLU(), minidl.MaxPool2D(2),
        minidl.Flatten(), minidl.Dense(64, 3))
    distributed.broadcast_parameters(model, comm=comm)
    x, y = data()
    optimizer = minidl.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                             distributed.DistributedOptimizer(optimizer, comm),
                             metrics=metrics, verbose=0)
    history = trainer.fit(
        distributed.ShardedLoader(x, y, GLOBAL_BATCH // comm.size, comm, seed=7), epochs=EPOCHS,
        val=distributed.ShardedLoader(x[:100], y[:100], 16, comm, shuffle=False),
        callbacks=[distributed.RankSync(comm)])
    return model, history


def fail_on_rank_1(logits, labels):
    """A metric that raises on rank 1 at its third batch, as a bug there would."""
    fail_on_rank_1.calls = getattr(fail_on_rank_1, "calls", 0) + 1
    if distributed.init().rank == 1 and fail_on_rank_1.calls == 3:
        raise RuntimeError("rank 1 failed on purpose")
    return 0.0


def no_data(*args):
    raise OSError("no data here")


def main(argv):
    command = argv[0]
    if command == "train":
        comm = distributed.init()
        # the MPI calls that only the NCCL set-up uses (no GPU here)
        assert comm.host.local_rank() == comm.rank      # one node: the same numbering
        assert comm.host.bcast_object("id" if comm.rank == 0 else None) == "id"
        model, history = train(comm)
        numpy.savez(f"{argv[1]}{comm.rank}.npz", **model.state_dict(),
                    **{f"history.{k}": numpy.array(v) for k, v in history.history.items()})
        return 0
    if command == "fail":
        train(distributed.init(), metrics={"fail": fail_on_rank_1})
        return 0
    if command.startswith("cli"):
        from minidl import cli
        from minidl.cli import recipe
        from minidl.data import datasets
        with open(argv[1]) as f:
            datasets.CHECKSUMS["mnist"] = json.load(f)
        if command == "cli-no-data-on-rank-1" and distributed.init().rank == 1:
            recipe.load_split = no_data
        return cli.main(argv[2:])
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
