"""Data-parallel training (minidl/ext/distributed.py): real 2-rank MPI jobs (also of
``minidl train --distributed``), ranks as threads, and the pieces with fake communicators.
The jobs are tests/distributed_job.py; the transport's own tests: test_transport.py."""
import json
import sys
from types import SimpleNamespace

import numpy
import pytest

import minidl
from minidl.cli import train as cli_train
from minidl.data import DataLoader
from minidl.ext import distributed, resume
from minidl.ext.distributed import Communicator, DistributedOptimizer, RankSync, ShardedLoader
from minidl.ext.sync_batchnorm import SyncBatchNorm

import distributed_job
from conftest import ThreadRanks, write_fake_dataset
from distributed_job import MPIEXEC, run_job

needs_mpi = pytest.mark.skipif(
    MPIEXEC is None, reason="the 'dist' extra is not installed (mpi4py, and the mpich wheel's "
                            "mpiexec beside python): pip install -e '.[dist]'")


# -- real jobs ------------------------------------------------------------------
@needs_mpi
def test_two_ranks_of_32_equal_one_process_of_64(tmp_path):
    done, _ = run_job("train", str(tmp_path / "rank"))
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
def test_every_rank_draws_its_own_dropout_masks(tmp_path):
    """Whatever the order of building, seeding and broadcasting (the old recipe seeded
    per rank after building, which Dropout never saw): different masks at every step on
    the two ranks, and still bit-identical weights."""
    done, _ = run_job("dropout", str(tmp_path / "masks.json"))
    assert done.returncode == 0, done.stderr
    found = json.loads((tmp_path / "masks.json").read_text())
    for order, ranks in found.items():
        masks, weights = ranks["masks"], ranks["weights"]
        assert len(masks[0]) == len(masks[1]) == 10, order        # 2 epochs of 5 steps
        assert all(a != b for a, b in zip(*masks)), order
        assert weights[0] == weights[1], order
    again, _ = run_job("dropout", str(tmp_path / "again.json"))     # and the same each run
    assert json.loads((tmp_path / "again.json").read_text()) == found


@needs_mpi
def test_a_killed_two_rank_run_resumes_bit_for_bit(tmp_path):
    """Three epochs whole, against three epochs with rank 1 SIGKILLed in epoch 2 and the
    job resumed from the state of epoch 1: the same weights, optimizer state and
    history on both ranks, bit for bit. Each rank's streams (augmentation, Dropout,
    minidl's) are its own, in the state file."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done, _ = run_job("resume", f"{straight}-", f"{straight}.npz", "straight")
    assert done.returncode == 0, done.stderr
    done, seconds = run_job("resume", f"{killed}-", f"{killed}.npz", "killed")
    assert done.returncode != 0 and seconds < 10     # the kill ends the whole job
    state = numpy.load(f"{killed}.npz")
    assert int(state["epoch"]) == 1 and int(state["ranks"]) == 2
    assert state["rng/model.5"].shape == (2,) and state["rng/model.5"][0] != state["rng/model.5"][1]
    assert state["rng/loader"][0] == state["rng/loader"][1]     # the shuffle is shared
    done, _ = run_job("resume", f"{killed}-", f"{killed}.npz", "resumed")
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        whole, resumed = numpy.load(f"{straight}-{rank}.npz"), numpy.load(f"{killed}-{rank}.npz")
        assert sorted(whole.files) == sorted(resumed.files)
        assert any(k.startswith("optimizer/state.") for k in whole.files)
        for key in whole.files:
            assert numpy.array_equal(whole[key], resumed[key]), (rank, key)
    assert numpy.load(f"{straight}-0.npz")["history/loss"].shape == (3,)
    first, second = numpy.load(f"{straight}-0.npz"), numpy.load(f"{straight}-1.npz")
    assert all(numpy.array_equal(first[k], second[k]) for k in first.files)


@needs_mpi
def test_an_error_on_one_rank_aborts_the_job_quickly():
    done, seconds = run_job("fail", timeout=60)    # a hang would time out
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stderr
    assert seconds < 10


@needs_mpi
def test_a_killed_rank_ends_the_job_quickly():
    done, seconds = run_job("kill", timeout=60)
    assert done.returncode != 0 and "Killed" in done.stdout + done.stderr
    assert seconds < 10


@needs_mpi
def test_ranks_that_train_differently_all_stop_naming_the_difference(tmp_path):
    done, _ = run_job("differ", str(tmp_path / "errors.json"))
    assert done.returncode == 0, done.stderr   # every rank raised, and went on alike
    errors = json.loads((tmp_path / "errors.json").read_text())
    tail = "every rank stops here rather than wait for the others"
    assert errors == {
        "epochs": f"RankSync: the ranks must train alike, but they differ in epochs "
                  f"(rank 0: 2; rank 1: 3); {tail} at a step that one of them never takes",
        "seed": f"RankSync: the ranks must train alike, but they differ in loader seed "
                f"(rank 0: 7; rank 1: 8); {tail} at a step that one of them never takes",
        "optimizer": f"RankSync: the ranks must train alike, but they differ in "
                     f"optimizer.class (rank 0: \"SGD\"; rank 1: \"Adam\"); {tail} at a step "
                     f"that one of them never takes",
        "model": f"broadcast_parameters: the ranks must train alike, but they differ in "
                 f"model.layers[2] (rank 0: \"model.1 (ReLU)\"; rank 1: \"model.1 "
                 f"(MaxPool2D)\"); {tail} at a step that one of them never takes"}
    done, seconds = run_job("other-epochs", timeout=60)     # not caught: the job ends
    assert done.returncode != 0 and "differ in epochs (rank 0: 2; rank 1: 3)" in done.stderr
    assert seconds < 10


@needs_mpi
def test_a_rank_that_leaves_early_or_stops_ends_the_job_saying_which():
    done, seconds = run_job("leave-early", timeout=60)       # collectives time out at 2 s
    assert done.returncode != 0 and seconds < 10
    assert "CollectiveTimeout" in done.stderr
    assert ("rank 1 waits in a barrier (collective #15) instead" in done.stderr
            or "rank 0 waits in an allreduce of 235 float32 (collective #15) instead"
            in done.stderr), done.stderr
    done, seconds = run_job("stopped", timeout=60)
    assert done.returncode != 0 and seconds < 10
    assert ("rank 0 waited 2.0 s in an allgather of sizes (collective #1) for the other ranks; "
            "rank 1 did not arrive and did not answer: stopped, dead, or busy outside "
            "minidl's collectives (did one leave fit early?)") in done.stderr, done.stderr


@needs_mpi
@pytest.mark.slow
def test_cli_train_distributed(tmp_path):
    checksums = tmp_path / "checksums.json"
    checksums.write_text(json.dumps(write_fake_dataset(tmp_path / "data", "mnist", 300)))
    out = tmp_path / "run"
    done, _ = run_job("cli", str(checksums), "train", "--distributed", "--limit", "256",
                      "--epochs", "1", "--batch-size", "32", "--data-root",
                      str(tmp_path / "data"), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test accuracy:") == 1       # printed by rank 0 only
    assert done.stdout.count("Total params") == 1
    assert "2 ranks" in done.stdout and "SyncBatchNorm" in done.stdout
    for name in ("model.npz", "history.csv", "run.json"):
        assert (out / name).exists(), name
    assert len((out / "history.csv").read_text().strip().splitlines()) == 2   # one writer
    assert int(numpy.load(out / "state.npz")["ranks"]) == 2         # both ranks' streams
    assert type(minidl.load_model(out / "model.npz").layers[1]) is minidl.BatchNorm2D


@needs_mpi
def test_cli_error_on_one_rank_aborts_the_job(tmp_path):
    # rank 1 finds no data; rank 0, which has it, would wait for rank 1 forever
    checksums = tmp_path / "checksums.json"
    checksums.write_text(json.dumps(write_fake_dataset(tmp_path / "data", "mnist", 300)))
    done, seconds = run_job("cli-no-data-on-rank-1", str(checksums), "train",
                            "--distributed", "--limit", "256", "--data-root",
                            str(tmp_path / "data"), "--out", str(tmp_path / "o"), timeout=60)
    assert done.returncode != 0
    assert "minidl train: error:" in done.stderr and "no data here" in done.stderr
    assert seconds < 10


# -- fakes: the collectives of a job of two, seen from one rank ---------------------
class FakeHost:
    """Rank 0 of 2; the other rank's arrays are ``other``, consumed in call order; what it
    gathers is ``others(value)``: the other ranks' values (by default, this one's)."""

    def __init__(self, *other, rank=0, size=2, others=None):
        self.rank, self.size = rank, size
        self.other = list(other)
        self.others = others or (lambda value: [value] * (size - 1))
        self.calls = []

    def all_reduce(self, a, out, timeout=None):
        self.calls.append(("all_reduce", a.shape))
        out[...] = a + self.other.pop(0)

    def broadcast(self, a, root, timeout=None):
        self.calls.append(("broadcast", a.shape, root))
        a[...] = self.other.pop(0)

    def barrier(self, timeout=None):
        self.calls.append(("barrier", timeout))

    def allgather_object(self, value, timeout=None):
        self.calls.append(("allgather",))
        value = json.loads(json.dumps(value))       # as MPIHost sends it
        others = self.others(value)
        return others[:self.rank] + [value] + others[self.rank:]


class MirrorHost(FakeHost):
    """Rank 1 of 2 whose partner always holds the same arrays: sums are doubles."""

    def __init__(self):
        super().__init__(rank=1)

    def all_reduce(self, a, out, timeout=None):
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
    assert comm.host.calls[0] == ("allgather",)     # the ranks agree on the set-up first
    assert len(comm.host.calls) == 1 + steps + 2 * 2


def test_ranks_with_different_numbers_of_batches_all_stop():
    model = two_layer_model()
    x, y = numpy.zeros((64, 3), numpy.float32), numpy.zeros(64, numpy.int64)
    for mine, other in ((2, 4), (4, 2)):    # 2 batches here, 4 there; and the other way
        host = FakeHost(others=lambda value: [{**value, "batches per epoch": other,
                                               "batch size": 64 // other}])
        comm = Communicator(host)
        trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(), DistributedOptimizer(
            minidl.SGD(model.parameters(), lr=0.1), comm), verbose=0)
        with pytest.raises(ValueError, match=f"RankSync: the ranks must train alike, but they "
                                             f"differ in batches per epoch \\(rank 0: {mine}; "
                                             f"rank 1: {other}\\), and in batch size "
                                             f"\\(rank 0: {64 // mine}; rank 1: {64 // other}"):
            trainer.fit(DataLoader(x, y, 64 // mine, seed=0), epochs=1,
                        callbacks=[RankSync(comm)])
        assert host.calls == [("allgather",)]     # stopped before any step


def test_the_refusal_groups_the_ranks_and_points_at_the_first_difference():
    minidl.manual_seed(0)
    model = two_layer_model()
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(label_smoothing=0.1),
                             minidl.Adam(model.parameters(), lr=1e-3), verbose=0)
    trainer.train_loader, trainer.epochs = DataLoader(numpy.zeros((8, 3)), numpy.zeros(8), 4,
                                                      seed=5), 3

    def others(value):
        third = json.loads(json.dumps(value))
        third["model"]["arrays"][2] = "2.weight (4, 5) float32"
        third["optimizer"]["settings"]["lr"] = 0.01
        return [value, third]
    comm = Communicator(FakeHost(size=3, others=others))
    with pytest.raises(ValueError) as error:
        distributed.check_same_training(trainer, comm)
    assert str(error.value) == (
        "RankSync: the ranks must train alike, but they differ in model.arrays[2] (rank 0, 1: "
        "\"2.weight (4, 2) float32\"; rank 2: \"2.weight (4, 5) float32\"), and in "
        "optimizer.settings.lr (rank 0, 1: 0.001; "
        "rank 2: 0.01); every rank stops here rather than wait for the others at a step that "
        "one of them never takes")
    distributed.check_same_training(trainer, Communicator(FakeHost(size=3)))    # all alike
    distributed.check_same_training(trainer, Communicator())                    # one: no call


def two_layer_model():
    return minidl.Sequential(minidl.Dense(3, 4), minidl.ReLU(), minidl.Dense(4, 2))


def test_check_same_on_all_ranks():
    distributed.check_same_on_all_ranks(5, Communicator(FakeHost(numpy.array([5.0, 25.0]))),
                                        "steps")
    with pytest.raises(ValueError, match="steps differ between the ranks"):
        distributed.check_same_on_all_ranks(
            5, Communicator(FakeHost(numpy.array([6.0, 36.0]))), "steps")


# -- a random stream per rank -------------------------------------------------------
def streams(model, loader):
    return {name: json.dumps(rng.bit_generator.state)
            for name, rng in resume.generators(model, loader).items()}


def test_seed_per_rank_gives_each_rank_its_own_streams_but_the_shuffle():
    from minidl.ext.transforms import Compose, RandomShift

    def setup():
        minidl.manual_seed(0)       # every rank alike, as after one seed everywhere
        model = minidl.Sequential(minidl.Dense(3, 4), minidl.Dropout(0.5))
        loader = DataLoader(numpy.zeros((8, 3)), numpy.zeros(8), 4, seed=1,
                            transform=Compose([RandomShift(1)]))
        return model, loader
    before = streams(*setup())
    assert set(before) == {"minidl", "loader", "transform.0", "model.1"}
    model, loader = setup()
    distributed.seed_per_rank(model, loader, Communicator())     # one process: untouched
    assert streams(model, loader) == before
    after = []
    for rank in (0, 1, 1):
        model, loader = setup()
        model.layers[1].gpu_rng = "a GPU stream made from the old one"
        distributed.seed_per_rank(model, loader, SimpleNamespace(rank=rank, size=2))
        after.append(streams(model, loader))
        assert model.layers[1].gpu_rng is None
    assert after[1] == after[2]                             # the same in every run
    distributed.seed_per_rank(model, [(numpy.zeros((4, 3)), numpy.zeros(4))],   # any batches
                              SimpleNamespace(rank=1, size=2))
    for name in before:
        if name == "loader":
            assert after[0][name] == after[1][name] == before[name]
        else:
            assert len({after[0][name], after[1][name], before[name]}) == 3, name


# -- averaging -------------------------------------------------------------------------
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
    assert host.calls[0] == ("allgather",)      # the ranks agree on the model first
    assert len(host.calls) == 1 + len(arrays) and all(c[2] == 0 for c in host.calls[1:])
    for a in [p.data for p in model.parameters()] + [v for _, v in model.named_buffers()]:
        assert (a == 7).all()
    with pytest.raises(ValueError, match="root must be a rank in"):
        distributed.broadcast_parameters(model, root=2, comm=Communicator(host))


def test_average_buffers_averages_batchnorm_statistics_only():
    bn = minidl.BatchNorm1D(2)
    bn.running_mean[...] = [1, 2]
    bn.running_var[...] = [4, 4]
    bn.num_batches_tracked[...] = 5
    sync = SyncBatchNorm(3, saved_as="BatchNorm1D")    # equal on every rank: left alone
    host = FakeHost(numpy.array([3, 4, 2, 2], numpy.float32))
    distributed.average_buffers(minidl.Sequential(bn, minidl.Sequential(sync)),
                                Communicator(host))
    numpy.testing.assert_array_equal(bn.running_mean, [2, 3])
    numpy.testing.assert_array_equal(bn.running_var, [3, 3])
    assert int(bn.num_batches_tracked) == 5 and host.calls == [("all_reduce", (4,))]


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


# -- the job's set-up -----------------------------------------------------------------
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
    assert comm.sum([1, 2]) == [1.0, 2.0] and comm.allgather({"a": 1}) == [{"a": 1}]
    comm.barrier()
    with pytest.raises(ValueError, match="--distributed needs MPI"):
        cli_train.communicator(SimpleNamespace(distributed=True, device="cpu",
                                               collective_timeout=300.0))


def test_ranks_share_the_cores_of_their_machine(monkeypatch):
    limits = []
    monkeypatch.setitem(sys.modules, "threadpoolctl", SimpleNamespace(
        threadpool_limits=lambda n, user_api: limits.append((n, user_api))))
    monkeypatch.setattr(distributed.parallel, "NUM_THREADS", None)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(8)),
                        raising=False)
    distributed._share_cores(3)         # 8 cores, 3 ranks on this machine: 2 threads each
    assert distributed.parallel.NUM_THREADS == 2 and limits == [(2, "blas")]
    distributed._share_cores(16)        # more ranks than cores: still one
    distributed._share_cores(2, threads=3)
    assert limits[1:] == [(1, "blas"), (3, "blas")]
    with pytest.raises(ValueError, match="distributed.init: threads must be >= 1"):
        distributed._share_cores(2, threads=0)


def test_cli_converts_batchnorm_unless_told_not_to():
    minidl.manual_seed(0)
    models = {(rank, sync): minidl.ext.zoo.mnist_cnn() for rank in (0, 1)
              for sync in (True, False)}

    def rank(comm):
        return {sync: cli_train.data_parallel_model(models[comm.rank, sync], SimpleNamespace(
            sync_batchnorm=sync), comm) for sync in (True, False)}
    for built in ThreadRanks(2).run(rank):
        assert type(built[True].layers[1]) is SyncBatchNorm
        assert type(built[False].layers[1]) is minidl.BatchNorm2D
    for sync in (True, False):      # rank 0's weights on both
        assert numpy.array_equal(models[0, sync].layers[0].weight.data,
                                 models[1, sync].layers[0].weight.data)
    parser = minidl.cli.build_parser()
    args = parser.parse_args(["train", "--distributed", "--no-sync-batchnorm",
                              "--collective-timeout", "2.5"])
    assert (args.sync_batchnorm, args.collective_timeout) == (False, 2.5)
    assert parser.parse_args(["train"]).sync_batchnorm is True


@pytest.mark.parametrize("seconds", ["0", "-1", "soon", "nan"])
def test_cli_refuses_a_timeout_that_is_not_a_positive_number(seconds, capsys):
    with pytest.raises(SystemExit):
        minidl.cli.build_parser().parse_args(["train", "--collective-timeout", seconds])
    assert "must be a number of seconds > 0" in capsys.readouterr().err


# -- each rank's streams in the training state ----------------------------------------
def test_the_state_of_a_job_holds_every_ranks_generators(tmp_path):
    minidl.manual_seed(0)
    models = [minidl.Sequential(minidl.Dense(3, 2), minidl.Dropout(0.5)) for _ in range(2)]
    x, y = numpy.zeros((8, 3), numpy.float32), numpy.zeros(8, numpy.int64)

    def rank(comm):
        loader = ShardedLoader(x, y, 2, comm, seed=0)
        models[comm.rank].layers[1].rng = numpy.random.default_rng(comm.rank)
        return resume.generator_states(models[comm.rank], loader, comm)
    states = ThreadRanks(2).run(rank)
    assert states[0].keys() == states[1].keys() == {"ranks", "rng/minidl", "rng/loader",
                                                     "rng/model.1"}
    assert int(states[0]["ranks"]) == 2 and states[0]["rng/model.1"].shape == (2,)
    assert all(numpy.array_equal(states[0][k], states[1][k]) for k in states[0])
    texts = states[0]["rng/model.1"]
    assert json.loads(texts[1]) == numpy.random.default_rng(1).bit_generator.state


def test_a_state_resumes_only_on_as_many_ranks_as_wrote_it(tmp_path):
    x, y = numpy.zeros((8, 3), numpy.float32), numpy.zeros(8, numpy.int64)
    path = str(tmp_path / "state.npz")

    def run(comm, resume_it):
        minidl.manual_seed(0)
        model = two_layer_model()
        trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                                 minidl.SGD(model.parameters(), lr=0.1), verbose=0)
        loader = ShardedLoader(x, y, 2, comm, seed=0) if comm else DataLoader(x, y, 2, seed=0)
        trainer.fit(loader, epochs=1, callbacks=[resume.TrainingState(
            path, resume=resume_it, comm=comm)])
    ThreadRanks(2).run(lambda comm: run(comm, False))
    with pytest.raises(ValueError, match="was written by a job of 2 rank\\(s\\), this one has "
                                         "3: each rank's random streams"):
        ThreadRanks(3).run(lambda comm: run(comm, True))
    with pytest.raises(ValueError, match="written by a job of 2 rank\\(s\\), this one has 1"):
        run(None, True)
    run(None, False)                            # one process's state, on two ranks
    with pytest.raises(ValueError, match="written by a job of 1 rank\\(s\\), this one has 2"):
        ThreadRanks(2).run(lambda comm: run(comm, True))
    with pytest.raises(ValueError, match="TrainingState: the loader is one shard of a job of 2 "
                                         "ranks: pass TrainingState\\(..., comm=comm\\)"):
        minidl.manual_seed(0)
        model = two_layer_model()
        minidl.Trainer(model, minidl.SoftmaxCrossEntropy(), minidl.SGD(model.parameters(), lr=0.1),
                       verbose=0).fit(ShardedLoader(x, y, 2, SimpleNamespace(rank=0, size=2),
                                                    seed=0),
                                      callbacks=[resume.TrainingState(path)])


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
    inits = []
    monkeypatch.setattr(distributed, "init", lambda device, timeout: inits.append(timeout)
                        or Communicator(FakeHost()))
    monkeypatch.delitem(sys.modules, "mpi4py.run", raising=False)
    comm = cli_train.communicator(SimpleNamespace(distributed=True, device="cpu",
                                                  collective_timeout=2.5))
    assert comm.size == 2 and "python -m mpi4py -m minidl" in capsys.readouterr().err
    assert inits == [2.5]       # --collective-timeout
