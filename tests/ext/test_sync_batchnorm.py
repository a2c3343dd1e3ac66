"""SyncBatchNorm (minidl/ext/sync_batchnorm.py): in one process it is BatchNorm
(gradcheck); over ranks (threads here, a real 2-rank MPI job at the end) it is BatchNorm
over the global batch, as PyTorch's; convert_sync_batchnorm keeps every layer's state;
its checkpoints load in one process without minidl.ext."""
import subprocess
import sys

import numpy
import pytest

import minidl
from minidl.ext import distributed
from minidl.ext.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from minidl.ext.zoo import mnist_cnn, resnet_small
from minidl.layers.registry import layer_class

import distributed_job
from conftest import ThreadRanks, randn
from distributed_job import MPIEXEC, run_job


def layer_pair(saved_as, c, seed=0):
    """A BatchNorm and a SyncBatchNorm (this process alone) with the same gamma, beta."""
    beta = numpy.random.default_rng(seed).standard_normal(c)
    bn = layer_class(saved_as)(c, dtype=numpy.float64)
    sync = SyncBatchNorm(c, dtype=numpy.float64, saved_as=saved_as)
    for layer in (bn, sync):
        layer.weight.data = 1 + 0.1 * numpy.arange(c, dtype=numpy.float64)
        layer.bias.data = beta.copy()
    return bn, sync


@pytest.mark.parametrize("saved_as, shape", [("BatchNorm2D", (5, 3, 4, 4)),
                                             ("BatchNorm1D", (6, 3)), ("BatchNorm1D", (4, 3, 5))])
def test_in_one_process_it_is_batchnorm(xp, saved_as, shape):
    bn, sync = layer_pair(saved_as, shape[1])
    x, dy = randn(xp, *shape, seed=1) + 2.0, randn(xp, *shape, seed=2)
    for training in (True, False):
        sync.zero_grad(), bn.zero_grad()
        numpy.testing.assert_allclose(sync.forward(x, training), bn.forward(x, training),
                                      rtol=1e-13, atol=1e-13)
        numpy.testing.assert_allclose(sync.backward(dy), bn.backward(dy), rtol=1e-13, atol=1e-13)
        for name in ("running_mean", "running_var"):
            numpy.testing.assert_allclose(getattr(sync, name), getattr(bn, name), rtol=1e-14)
        for a, b in zip(sync.parameters(), bn.parameters()):
            numpy.testing.assert_allclose(a.grad, b.grad, rtol=1e-13)
        assert minidl.gradcheck(sync, x, training=training) < 1e-6


def split_run(x, dy, sizes, saved_as="BatchNorm2D", affine=True):
    """SyncBatchNorm on ranks (threads) holding ``sizes`` samples of ``x`` each: every
    rank's y, dx, its own dgamma and dbeta, and its running statistics."""
    starts = numpy.cumsum([0] + list(sizes))
    c = x.shape[1]

    def rank(comm):
        part = slice(starts[comm.rank], starts[comm.rank + 1])
        layer = SyncBatchNorm(c, comm, dtype=numpy.float64, saved_as=saved_as, affine=affine)
        if affine:
            layer.weight.data = 1 + 0.1 * numpy.arange(c, dtype=numpy.float64)
            layer.bias.data = numpy.linspace(-1, 1, c)
        y = layer.forward(x[part])
        dx = layer.backward(dy[part])
        grads = [p.grad for p in layer.parameters()] if affine else [0, 0]
        return y, dx, *grads, layer.running_mean, layer.running_var
    return ThreadRanks(len(sizes)).run(rank)


@pytest.mark.parametrize("sizes", [(3, 3), (4, 1, 2), (0, 5)])
def test_over_ranks_it_is_batchnorm_over_the_global_batch(xp, sizes):
    """Equal or unequal shares (even none): the ranks together compute BatchNorm's y and
    dx of the whole batch, and their gamma, beta gradients add up to BatchNorm's."""
    x, dy = randn(xp, sum(sizes), 3, 4, 4, seed=3) * 3 + 1, randn(xp, sum(sizes), 3, 4, 4, seed=4)
    bn, _ = layer_pair("BatchNorm2D", 3)
    bn.bias.data = numpy.linspace(-1, 1, 3)
    y, dx = bn.forward(x), bn.backward(dy)
    ranks = split_run(x, dy, sizes)
    numpy.testing.assert_allclose(numpy.concatenate([r[0] for r in ranks]), y, atol=1e-13)
    numpy.testing.assert_allclose(numpy.concatenate([r[1] for r in ranks]), dx, atol=1e-13)
    numpy.testing.assert_allclose(sum(r[2] for r in ranks), bn.weight.grad, atol=1e-12)
    numpy.testing.assert_allclose(sum(r[3] for r in ranks), bn.bias.grad, atol=1e-12)
    for r in ranks:     # the same running statistics on every rank: BatchNorm's
        numpy.testing.assert_allclose(r[4], bn.running_mean, atol=1e-14)
        numpy.testing.assert_allclose(r[5], bn.running_var, atol=1e-14)


def test_over_ranks_matches_torch(xp, torch_reference):
    """Two ranks of 4 and 2 samples against torch.nn.SyncBatchNorm over all 6 (which, in
    one process, normalises over its whole input)."""
    x, dy = randn(xp, 6, 3, 4, 4, seed=5) * 2 - 1, randn(xp, 6, 3, 4, 4, seed=6)

    def compute(torch):
        layer = torch.nn.SyncBatchNorm(3).double()
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(1 + 0.1 * numpy.arange(3)))
            layer.bias.copy_(torch.tensor(numpy.linspace(-1, 1, 3)))
        x_t = torch.tensor(x, requires_grad=True)
        y = layer(x_t)
        y.backward(torch.tensor(dy))
        return {"y": y.detach().numpy(), "dx": x_t.grad.numpy(),
                "dgamma": layer.weight.grad.numpy(), "dbeta": layer.bias.grad.numpy(),
                "running_mean": layer.running_mean.numpy(),
                "running_var": layer.running_var.numpy()}
    ref = torch_reference(compute)
    ranks = split_run(x, dy, (4, 2))
    numpy.testing.assert_allclose(numpy.concatenate([r[0] for r in ranks]), ref["y"], atol=1e-12)
    numpy.testing.assert_allclose(numpy.concatenate([r[1] for r in ranks]), ref["dx"], atol=1e-12)
    numpy.testing.assert_allclose(ranks[0][2] + ranks[1][2], ref["dgamma"], atol=1e-12)
    numpy.testing.assert_allclose(ranks[0][3] + ranks[1][3], ref["dbeta"], atol=1e-12)
    for r in ranks:
        numpy.testing.assert_allclose(r[4], ref["running_mean"], atol=1e-13)
        numpy.testing.assert_allclose(r[5], ref["running_var"], atol=1e-13)


def test_without_affine_and_for_1d_input(xp):
    x, dy = randn(xp, 5, 4, 3, seed=7), randn(xp, 5, 4, 3, seed=8)
    bn = minidl.BatchNorm1D(4, affine=False, dtype=numpy.float64)
    y, dx = bn.forward(x), bn.backward(dy)
    ranks = split_run(x, dy, (2, 3), saved_as="BatchNorm1D", affine=False)
    numpy.testing.assert_allclose(numpy.concatenate([r[0] for r in ranks]), y, atol=1e-13)
    numpy.testing.assert_allclose(numpy.concatenate([r[1] for r in ranks]), dx, atol=1e-13)


def test_errors(xp):
    with pytest.raises(ValueError, match="saved_as must be one of"):
        SyncBatchNorm(3, saved_as="LayerNorm")
    with pytest.raises(ValueError, match=r"SyncBatchNorm: expected input of shape \(N, C, H, W\)"):
        SyncBatchNorm(3).forward(numpy.zeros((2, 3)))
    # one value per channel over all the ranks: no variance to normalise by
    with pytest.raises(ValueError, match="more than one value per channel over the 2 ranks, "
                                         "got 1"):
        ThreadRanks(2).run(lambda comm: SyncBatchNorm(3, comm, saved_as="BatchNorm1D").forward(
            numpy.ones((comm.rank, 3), numpy.float32)))


def test_registered_and_described():
    assert layer_class("SyncBatchNorm") is SyncBatchNorm
    assert repr(SyncBatchNorm(4)) == ("SyncBatchNorm(4, momentum=0.1, eps=1e-05, ranks=1, "
                                      "saved_as=BatchNorm2D)")
    assert minidl.layers.base.layer_spec(SyncBatchNorm(4, saved_as="BatchNorm1D")) == \
        minidl.layers.base.layer_spec(minidl.BatchNorm1D(4))


# -- convert_sync_batchnorm ------------------------------------------------------------------
def test_convert_replaces_nested_batchnorms_keeping_their_state():
    model = resnet_small()
    model.train()
    bns = [layer for layer in walk(model) if isinstance(layer, minidl.BatchNorm2D)]
    params = [id(p) for p in model.parameters()]
    optimizer = minidl.SGD(model.parameters(), lr=0.1)          # made before the conversion
    for i, bn in enumerate(bns):
        bn.running_mean += i
    bns[3].eval()
    hooked = []
    bns[0].register_hook(lambda layer, x, y: hooked.append(type(layer).__name__))
    comm = distributed.Communicator()
    assert convert_sync_batchnorm(model, comm) is model
    syncs = [layer for layer in walk(model) if isinstance(layer, SyncBatchNorm)]
    assert len(syncs) == len(bns) == 15 and not any(isinstance(layer, minidl.BatchNorm2D)
                                                    for layer in walk(model))
    assert [id(p) for p in model.parameters()] == params        # the same Parameter objects
    for i, (sync, bn) in enumerate(zip(syncs, bns)):
        assert sync.comm is comm and sync.running_mean is bn.running_mean
        assert (sync.training, sync.num_features) == (bn.training, bn.num_features)
    block = model.layers[7]     # a Residual with a projection: block and shortcut converted
    assert block.shortcut.layers[1] is syncs[7] and block.branches[1] is block.shortcut
    x = numpy.random.default_rng(0).random((2, 1, 28, 28), dtype=numpy.float32)
    model.forward(x)
    model.backward(numpy.ones((2, 10), numpy.float32))
    before = model.parameters()[0].data.copy()
    optimizer.step()
    assert hooked == ["SyncBatchNorm"] and not (model.parameters()[0].data == before).all()


def test_convert_a_layer_alone_and_what_it_cannot_reach():
    bn = minidl.BatchNorm1D(3, momentum=None, eps=1e-3, affine=False)
    sync = convert_sync_batchnorm(bn, distributed.Communicator())
    assert isinstance(sync, SyncBatchNorm) and sync.saved_as == "BatchNorm1D"
    assert (sync.momentum, sync.eps, sync.affine, sync.weight) == (None, 1e-3, False, None)
    assert convert_sync_batchnorm(minidl.Dense(2, 3), None).__class__ is minidl.Dense

    class Hidden(minidl.layers.base.Container):
        def __init__(self):
            super().__init__()
            self.inside = {"bn": minidl.BatchNorm2D(2)}

        def named_layers(self):
            return list(self.inside.items())
    with pytest.raises(TypeError, match="Hidden holds its layer BatchNorm2D neither in an "
                                        "attribute nor in a list"):
        convert_sync_batchnorm(Hidden(), None)


def walk(layer):
    yield layer
    if isinstance(layer, minidl.layers.base.Container):
        for _, child in layer.named_layers():
            yield from walk(child)


def test_checkpoints_load_in_one_process_without_minidl_ext(tmp_path):
    model = convert_sync_batchnorm(mnist_cnn(), distributed.Communicator())
    x = numpy.random.default_rng(0).random((8, 1, 28, 28), dtype=numpy.float32)
    model.forward(x)                    # running statistics that are not the defaults
    path = tmp_path / "sync.npz"
    model.save(path)
    numpy.save(tmp_path / "x.npy", x)
    numpy.save(tmp_path / "y.npy", model.predict(x))
    script = ("import sys, numpy, minidl; m = minidl.load_model(sys.argv[1]); "
              "assert not [n for n in sys.modules if n.startswith('minidl.ext')], 'ext loaded'; "
              "assert type(m.layers[1]).__name__ == 'BatchNorm2D'; "
              "y = m.predict(numpy.load(sys.argv[2])); "
              "assert numpy.array_equal(y, numpy.load(sys.argv[3])), 'other outputs'")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    again = convert_sync_batchnorm(mnist_cnn(), None).load(path)    # and back into one
    assert numpy.array_equal(again.predict(x), model.predict(x))


# -- a real job: 2 ranks x 32 against one process at 64 -------------------------------------
@pytest.mark.skipif(MPIEXEC is None, reason="the 'dist' extra is not installed (mpi4py and "
                                            "the mpich wheel's mpiexec): pip install -e '.[dist]'")
@pytest.mark.slow
def test_mnist_cnn_on_two_ranks_of_32_equals_one_process_of_64(tmp_path):
    """20 SGD steps of mnist_cnn with SyncBatchNorm, Dropout included (the one process
    draws, for each sample, the mask its rank drew: distributed_job.DropoutOfTheRanks).

    float64: the 20 steps end where one process ends, to 1e-10 of each array. float32:
    each of the 20 steps, from the ranks' state before it, ends where one process's step
    from that state ends, to 1e-5 of the state's norm. The float32 paths themselves drift
    apart (1e-4 here): other sums round otherwise, and once in a while a pre-activation
    within rounding of 0 lands on the other side of a ReLU, a switch that any other
    order of summation throws too (docs/distributed.md, "SyncBatchNorm")."""
    done, _ = run_job("syncbn", str(tmp_path / "rank"), timeout=300)
    assert done.returncode == 0, done.stderr
    for dtype in (numpy.float64, numpy.float32):
        name = tmp_path / f"rank{numpy.dtype(dtype).name}"
        ranks = [numpy.load(f"{name}-{rank}.npz") for rank in (0, 1)]
        for key in [k for k in ranks[0].files if k != "history.time"]:   # one model, bit for bit
            assert numpy.array_equal(ranks[0][key], ranks[1][key]), key
        if dtype == numpy.float32:
            _, history = distributed_job.one_process_syncbn_reference(
                dtype, snapshots=f"{name}-steps.npz")
            assert len(history.step_errors) == 20 and max(history.step_errors) < 1e-5
            continue
        model, history = distributed_job.one_process_syncbn_reference(dtype)
        for key, value in model.state_dict().items():   # weights and running statistics
            scale = max(float(numpy.abs(value).max()), 1e-30)
            assert numpy.abs(ranks[0][key] - value).max() <= 1e-10 * scale, key
        for key, values in history.history.items():
            if key != "time":
                numpy.testing.assert_allclose(ranks[0][f"history.{key}"], values, rtol=1e-10,
                                              err_msg=key)
        assert history["val_accuracy"][-1] > 0.9        # it did learn
