"""Data-parallel training (minidl/ext/distributed.py): real 2-rank MPI jobs (also of
``minidl train --distributed``), and the pieces with fake communicators."""
import ctypes
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest

import minidl
from minidl.cli import train as cli_train
from minidl.data import DataLoader
from minidl.ext import distributed
from minidl.ext.distributed import Communicator, DistributedOptimizer, RankSync, ShardedLoader

import distributed_job
from conftest import write_fake_dataset

ROOT = str(Path(__file__).resolve().parents[2])  # the repository

JOB = os.path.join(ROOT, "tests", "distributed_job.py")


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

needs_mpi = pytest.mark.skipif(
    MPIEXEC is None, reason="the 'dist' extra is not installed (mpi4py, and the mpich wheel's "
                            "mpiexec beside python): pip install -e '.[dist]'")


def run_job(*args, ranks=2, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    return done, time.perf_counter() - start


# -- real jobs ------------------------------------------------------------------
@needs_mpi
def test_two_ranks_of_32_equal_one_process_of_64(tmp_path):
    done, _ = run_job(JOB, "train", str(tmp_path / "rank"))
    assert done.returncode == 0, done.stderr
    model, history = distributed_job.train(Communicator())   # one process, batch 64
    one = model.state_dict()
    for rank in (0, 1):
        two = numpy.load(tmp_path / f"rank{rank}.npz")
        for key, value in one.items():      # 20 SGD steps: float32 rounding only
            numpy.testing.assert_allclose(two[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        for key, values in history.history.items():
            if key != "time":
                numpy.testing.assert_allclose(two[f"history.{key}"], values, rtol=1e-5,
                                              err_msg=key)
    assert history.epochs == distributed_job.EPOCHS
    assert history["loss"][-1] < 0.5 * history["loss"][0]     # it did learn


@needs_mpi
def test_an_error_on_one_rank_aborts_the_job_quickly():
    done, seconds = run_job(JOB, "fail", timeout=60)    # a hang would time out
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stderr
    assert seconds < 30


@needs_mpi
@pytest.mark.slow
def test_cli_train_distributed(tmp_path):
    checksums = tmp_path / "checksums.json"
    checksums.write_text(json.dumps(write_fake_dataset(tmp_path / "data", "mnist", 300)))
    out = tmp_path / "run"
    done, _ = run_job(JOB, "cli", str(checksums), "train", "--distributed", "--limit", "256",
                      "--epochs", "1", "--batch-size", "32", "--data-root",
                      str(tmp_path / "data"), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test accuracy:") == 1       # printed by rank 0 only
    assert done.stdout.count("Total params") == 1
    assert "2 ranks" in done.stdout
    for name in ("model.npz", "history.csv", "run.json"):
        assert (out / name).exists(), name
    assert len((out / "history.csv").read_text().strip().splitlines()) == 2   # one writer


@needs_mpi
def test_cli_error_on_one_rank_aborts_the_job(tmp_path):
    # rank 1 finds no data; rank 0, which has it, would wait for rank 1 forever
    checksums = tmp_path / "checksums.json"
    checksums.write_text(json.dumps(write_fake_dataset(tmp_path / "data", "mnist", 300)))
    done, seconds = run_job(JOB, "cli-no-data-on-rank-1", str(checksums), "train",
                            "--distributed", "--limit", "256", "--data-root",
                            str(tmp_path / "data"), "--out", str(tmp_path / "o"), timeout=60)
    assert done.returncode != 0
    assert "minidl train: error:" in done.stderr and "no data here" in done.stderr
    assert seconds < 30


# -- fakes: the collectives of a job of two, seen from one rank ---------------------
class FakeHost:
    """Rank 0 of 2; the other rank's arrays are ``other``, consumed in call order."""

    def __init__(self, *other, rank=0, size=2):
        self.rank, self.size = rank, size
        self.other = list(other)
        self.calls = []

    def all_reduce(self, a, out):
        self.calls.append(("all_reduce", a.shape))
        out[...] = a + self.other.pop(0)

    def broadcast(self, a, root):
        self.calls.append(("broadcast", a.shape, root))
        a[...] = self.other.pop(0)

    def barrier(self):
        self.calls.append(("barrier",))


class MirrorHost(FakeHost):
    """Rank 1 of 2 whose partner always holds the same arrays: sums are doubles."""

    def __init__(self):
        super().__init__(rank=1)

    def all_reduce(self, a, out):
        self.calls.append(("all_reduce", a.shape))
        out[...] = 2 * a


def test_trainer_with_a_communicator(capsys):
    # Ranks that agree on everything must train exactly like one process; rank 1 is silent.
    x = numpy.random.default_rng(0).standard_normal((96, 5)).astype(numpy.float32)
    y = (x[:, 0] > 0).astype(numpy.int64)
    runs = []
    for comm in (None, Communicator(MirrorHost())):
        minidl.manual_seed(0)
        model = minidl.Sequential(minidl.Dense(5, 8), minidl.BatchNorm1D(8), minidl.ReLU(),
                                  minidl.Dense(8, 2))
        optimizer = minidl.SGD(model.parameters(), lr=0.1)
        trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                                 optimizer if comm is None else
                                 DistributedOptimizer(optimizer, comm), verbose=1)
        history = trainer.fit(DataLoader(x, y, 32, seed=1), epochs=2,
                              val=DataLoader(x, y, 50, shuffle=False),
                              callbacks=[] if comm is None else [RankSync(comm)])
        runs.append((model.state_dict(), history, capsys.readouterr()))
    (one, h1, out1), (two, h2, out2) = runs
    for key in one:
        numpy.testing.assert_allclose(two[key], one[key], rtol=1e-6, err_msg=key)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        numpy.testing.assert_allclose(h2[key], h1[key], rtol=1e-12, err_msg=key)
    assert "epoch 2/2" in out1.out and out2.out == "" and out2.err == ""
    steps = 2 * 3   # one gradient allreduce per step; BatchNorm and the logs per epoch
    assert len(comm.host.calls) == 1 + steps + 2 * 2    # 1: the check of len(train)


def test_ranks_with_different_numbers_of_batches_all_stop():
    model = two_layer_model()
    x, y = numpy.zeros((64, 3), numpy.float32), numpy.zeros(64, numpy.int64)
    for mine, other in ((2, 4), (4, 2)):    # 2 batches here, 4 there; and the other way
        host = FakeHost(numpy.array([other, other ** 2], numpy.float64))
        comm = Communicator(host)
        trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(), DistributedOptimizer(
            minidl.SGD(model.parameters(), lr=0.1), comm), verbose=0)
        with pytest.raises(ValueError, match=f"batches per epoch differ between the ranks "
                                             f"\\(here {mine}, mean 3\\)"):
            trainer.fit(DataLoader(x, y, 64 // mine, seed=0), epochs=1,
                        callbacks=[RankSync(comm)])
        assert host.calls == [("all_reduce", (2,))]     # stopped before any step


def two_layer_model():
    return minidl.Sequential(minidl.Dense(3, 4), minidl.ReLU(), minidl.Dense(4, 2))


def test_check_same_on_all_ranks():
    distributed.check_same_on_all_ranks(5, Communicator(FakeHost(numpy.array([5.0, 25.0]))),
                                        "steps")
    with pytest.raises(ValueError, match="steps differ between the ranks"):
        distributed.check_same_on_all_ranks(
            5, Communicator(FakeHost(numpy.array([6.0, 36.0]))), "steps")


def test_average_gradients_is_one_allreduce_of_a_flat_buffer():
    model = two_layer_model()
    params = model.parameters()
    for i, p in enumerate(params):
        p.grad = numpy.full(p.shape, i, numpy.float32)
    params[3].grad = None       # unused on this step: stays None, sends zeros
    n = sum(p.size for p in params)
    host = FakeHost(numpy.full(n, 10.0, numpy.float32))
    distributed.average_gradients(params, Communicator(host))
    assert host.calls == [("all_reduce", (n,))]
    for i, p in enumerate(params):
        if i == 3:
            assert p.grad is None
        else:
            assert p.grad.shape == p.shape and p.grad.dtype == numpy.float32
            numpy.testing.assert_array_equal(p.grad, (i + 10) / 2)


def test_flat_buffer_needs_one_dtype():
    model = two_layer_model()
    model.layers[2].weight.data = model.layers[2].weight.data.astype(numpy.float64)
    for p in model.parameters():
        p.grad = numpy.zeros_like(p.data)
    with pytest.raises(ValueError, match="average_gradients: all arrays must share one dtype"):
        distributed.average_gradients(model.parameters(), Communicator(FakeHost()))


def test_broadcast_parameters_and_buffers_in_place():
    model = minidl.Sequential(minidl.Dense(3, 2), minidl.BatchNorm1D(2))
    arrays = [p.data for p in model.parameters()] + [v for _, v in model.named_buffers()]
    host = FakeHost(*[numpy.full(a.shape, 7, a.dtype) for a in arrays], rank=1)
    distributed.broadcast_parameters(model, root=0, comm=Communicator(host))
    assert len(host.calls) == len(arrays) and all(c[2] == 0 for c in host.calls)
    for a in [p.data for p in model.parameters()] + [v for _, v in model.named_buffers()]:
        assert (a == 7).all()
    with pytest.raises(ValueError, match="root must be a rank in"):
        distributed.broadcast_parameters(model, root=2, comm=Communicator(host))


def test_average_buffers_averages_batchnorm_statistics_only():
    bn = minidl.BatchNorm1D(2)
    bn.running_mean[...] = [1, 2]
    bn.running_var[...] = [4, 4]
    bn.num_batches_tracked[...] = 5
    host = FakeHost(numpy.array([3, 4, 2, 2], numpy.float32))
    distributed.average_buffers(minidl.Sequential(bn), Communicator(host))
    numpy.testing.assert_array_equal(bn.running_mean, [2, 3])
    numpy.testing.assert_array_equal(bn.running_var, [3, 3])
    assert int(bn.num_batches_tracked) == 5


def test_rank_sync_averages_the_trainers_numbers_over_the_ranks():
    # Every rank's share is equally large (ShardedLoader), so the job's mean is the
    # mean of the ranks' means; numbers that only some ranks log are left alone.
    host = FakeHost(numpy.array([3.0, 0.5, 2.0]))   # the other rank's loss, accuracy, val_loss
    trainer = SimpleNamespace(metrics={"accuracy": None})
    logs = {"loss": 1.0, "accuracy": 0.25, "val_loss": 4.0, "lr": 0.1, "time": 2.0,
            "grad_norm/0.weight": 7.0}
    RankSync(Communicator(host)).on_epoch_end(trainer, 0, logs)
    assert logs == {"loss": 2.0, "accuracy": 0.375, "val_loss": 3.0, "lr": 0.1, "time": 2.0,
                    "grad_norm/0.weight": 7.0}
    assert host.calls == [("all_reduce", (3,))]


def test_distributed_optimizer_averages_once_per_step():
    model = two_layer_model()
    params = model.parameters()
    n = sum(p.size for p in params)
    host = FakeHost(*[numpy.zeros(n, numpy.float32)] * 2)
    optimizer = DistributedOptimizer(minidl.SGD(params, lr=1.0), Communicator(host))
    for p in params:
        p.grad = numpy.full(p.shape, 2.0, numpy.float32)
    before = [p.data.copy() for p in params]
    optimizer.synchronize()                 # what the Trainer calls before clipping
    optimizer.step()                        # no second allreduce
    assert host.calls == [("all_reduce", (n,))]
    for p, b in zip(params, before):        # the mean of 2 (here) and 0 (there)
        numpy.testing.assert_allclose(p.data, b - 1.0)
    optimizer.lr = 0.5
    assert optimizer.optimizer.lr == 0.5 and optimizer.state_dict()["lr"] == 0.5
    optimizer.step()                        # a new step: averaged again
    assert len(host.calls) == 2


def test_one_process_without_mpi(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)    # import mpi4py -> ImportError
    comm = distributed.init()
    assert (comm.rank, comm.size) == (0, 1)
    model = two_layer_model()
    for p in model.parameters():
        p.grad = numpy.ones_like(p.data)
    grads = [p.grad for p in model.parameters()]
    distributed.average_gradients(model.parameters(), comm)
    distributed.broadcast_parameters(model, comm=comm)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert comm.sum([1, 2]) == [1.0, 2.0]
    comm.barrier()
    with pytest.raises(ValueError, match="--distributed needs MPI"):
        cli_train.communicator(SimpleNamespace(distributed=True, device="cpu"))


def test_mpi_sums_host_arrays_only():
    fake_mpi = SimpleNamespace(IN_PLACE="in place", SUM="sum")
    calls = []
    comm = SimpleNamespace(Get_rank=lambda: 0, Get_size=lambda: 2,
                           Allreduce=lambda send, recv, op: calls.append((send, op)))
    host = distributed._MPI(comm, fake_mpi)
    a = numpy.zeros(3)
    host.all_reduce(a, a)
    assert calls == [("in place", "sum")]     # the buffer form, in place
    with pytest.raises(TypeError, match="init\\(device='gpu'\\)"):
        host.all_reduce([1.0], [1.0])


# -- NCCL through a fake cupy: pointers, counts, types, device choice ----------------
class FakeNcclCommunicator:
    def __init__(self, ndev, uid, rank):
        self.args, self.calls = (ndev, uid, rank), []

    @staticmethod
    def view(ptr, count, dtype):
        ctype = {1: ctypes.c_float, 2: ctypes.c_double}[dtype]
        return numpy.ctypeslib.as_array((ctype * count).from_address(ptr))

    def allReduce(self, send, recv, count, dtype, op, stream):
        self.calls.append(("allReduce", count, dtype, op, stream))
        self.view(recv, count, dtype)[...] = 2 * self.view(send, count, dtype)

    def bcast(self, ptr, count, dtype, root, stream):
        self.calls.append(("bcast", count, dtype, root, stream))
        self.view(ptr, count, dtype)[...] = 9


def fake_cupy(devices_used):
    nccl = SimpleNamespace(get_unique_id=lambda: b"id", NcclCommunicator=FakeNcclCommunicator,
                           NCCL_FLOAT16=0, NCCL_FLOAT32=1, NCCL_FLOAT64=2, NCCL_INT64=3,
                           NCCL_SUM=4)
    device = lambda i: SimpleNamespace(use=lambda: devices_used.append(i))  # noqa: E731
    return SimpleNamespace(cuda=SimpleNamespace(
        nccl=nccl, Device=device, runtime=SimpleNamespace(getDeviceCount=lambda: 4),
        get_current_stream=lambda: SimpleNamespace(ptr=77)))


def test_nccl_on_gpu_arrays(monkeypatch):
    monkeypatch.setattr(distributed, "_device_pointer", lambda a: a.ctypes.data)
    host = SimpleNamespace(rank=1, size=2, local_rank=lambda: 5,
                           bcast_object=lambda obj, root=0: b"rank 0's id")
    used = []
    gpu = distributed._NCCL(host, fake_cupy(used))
    assert used == [1]                                  # local rank 5 of 4 GPUs
    assert gpu.comm.args == (2, b"rank 0's id", 1)
    comm = Communicator(SimpleNamespace(rank=1, size=2), gpu)
    model = two_layer_model()
    for p in model.parameters():
        p.grad = numpy.ones_like(p.data)
    distributed.average_gradients(model.parameters(), comm)
    n = sum(p.size for p in model.parameters())
    assert gpu.comm.calls == [("allReduce", n, 1, 4, 77)]
    assert all((p.grad == 1).all() for p in model.parameters())     # (1 + 1) / 2
    distributed.broadcast_parameters(model, comm=comm)
    assert gpu.comm.calls[1] == ("bcast", 12, 1, 0, 77)
    assert all((p.data == 9).all() for p in model.parameters())
    with pytest.raises(TypeError, match="NCCL sums"):
        gpu.all_reduce(numpy.zeros(2, numpy.int8), numpy.zeros(2, numpy.int8))


# -- sharding -----------------------------------------------------------------------
def batches(loader):
    return [sorted(y.tolist()) for _, y in loader]


def ranks(size):
    return [SimpleNamespace(rank=r, size=size) for r in range(size)]


@pytest.mark.parametrize("n", [128, 131])
def test_shards_make_the_batches_of_one_process(n):
    x = y = numpy.arange(n)
    one = DataLoader(x, y, 32, seed=3)
    shards = [ShardedLoader(x, y, 16, comm, seed=3) for comm in ranks(2)]
    epochs = []
    for _ in range(2):      # reshuffled every epoch, the same order on both ranks
        per_rank = [batches(loader) for loader in shards]
        assert len(per_rank[0]) == len(per_rank[1]) == len(shards[0])
        merged = [sorted(a + b) for a, b in zip(*per_rank)]
        if n % 2 == 0:
            assert merged == batches(one)
        else:   # padded with the first sample of the order: 132 = 2 * 66
            assert sum(map(len, merged)) == n + 1 and set(sum(merged, [])) == set(range(n))
        epochs.append(merged)
    assert epochs[0] != epochs[1]


def test_shards_without_shuffle_and_with_drop_last():
    x = y = numpy.arange(10)
    comm = ranks(3)
    assert batches(ShardedLoader(x, y, 2, comm[1], shuffle=False)) == [[1, 4], [0, 7]]
    loader = ShardedLoader(x, y, 2, comm[2], shuffle=False, drop_last=True)
    assert batches(loader) == [[2, 5]] and loader.num_samples == 2


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(rank=2, size=2), ValueError, "0 <= rank < world_size"),
    (dict(rank=0, size=0), ValueError, "world_size must be >= 1"),
    (dict(rank=0.0, size=2), TypeError, "rank must be an int"),
    (dict(rank=0, size=2, shuffle=True), ValueError, "pass the same seed"),
    (dict(rank=0, size=20, drop_last=True, seed=1), ValueError,
     "leaves nothing for 20 ranks"),
])
def test_shard_arguments_are_checked(kwargs, error, message):
    comm = SimpleNamespace(rank=kwargs.pop("rank"), size=kwargs.pop("size"))
    with pytest.raises(error, match=message):
        ShardedLoader(numpy.zeros(10), numpy.zeros(10), 2, comm, **kwargs)


def test_cli_warns_without_python_m_mpi4py(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "init", lambda device: Communicator(FakeHost()))
    monkeypatch.delitem(sys.modules, "mpi4py.run", raising=False)
    comm = cli_train.communicator(SimpleNamespace(distributed=True, device="cpu"))
    assert comm.size == 2 and "python -m mpi4py -m minidl" in capsys.readouterr().err
