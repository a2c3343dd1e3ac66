"""The cupy backend end to end: training, evaluation, checkpoints and the CLI on a GPU.

Every test here is marked ``gpu`` and skips, saying why, without a CUDA device. The
CPU tests cover the same code on numpy; these check what only a device shows: the
same numbers as the CPU, and a training step that waits for the device once (the
rest runs under ``cupyx.allow_synchronize(False)``, where any wait raises).
``benchmarks/gpu_check.sh`` runs them on a lent machine.
"""
import re

import numpy as np
import pytest

import minidl
from minidl import (SGD, Adam, BatchNorm2D, Conv2D, CSVLogger, DataLoader, Dense, Dropout,
                    Flatten, MaxPool2D, ModelCheckpoint, ReLU, Sequential, SoftmaxCrossEntropy,
                    Trainer, backend, cli)
from minidl.ext.recorder import GradientRecorder
from minidl.data import datasets

from conftest import write_fake_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not minidl.gpu_available(),
                       reason="no CUDA device, or CuPy not installed (pip install "
                              "'minidl[gpu]'); benchmarks/gpu_check.sh runs these on a GPU"),
]


def build(pool=True):
    """A small CNN with every kind of layer a training step meets (no conv bias before
    the batch norm: its true gradient is 0, and rounding noise would differ by device)."""
    minidl.manual_seed(0)
    layers = [Conv2D(1, 4, 3, padding=1, bias=False), BatchNorm2D(4), ReLU()]
    layers += [MaxPool2D(2), Flatten(), Dense(4 * 4 * 4, 3)] if pool else \
              [Flatten(), Dense(4 * 8 * 8, 3)]
    return Sequential(layers)


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, n)


def test_fit_gives_the_numbers_of_the_cpu():
    """Same weights, same batches: the History (with GradientRecorder's device-side
    sums) and the trained weights agree between numpy and cupy. SGD, not Adam: Adam
    would turn rounding differences in near-zero gradients into steps of size lr."""
    x, y = data()
    results = {}
    for name in ("numpy", "cupy"):
        with minidl.set_backend(name):
            model = build()
            trainer = Trainer(model, SoftmaxCrossEntropy(0.1),
                              SGD(model.parameters(), lr=0.05, momentum=0.9), verbose=0)
            history = trainer.fit(DataLoader(x, y, 4, shuffle=False), epochs=2,
                                  callbacks=[GradientRecorder(model, every=1)])
            results[name] = history.history, model.state_dict()
    (cpu_history, cpu_state), (gpu_history, gpu_state) = results["numpy"], results["cupy"]
    assert set(gpu_history) == set(cpu_history)
    for key in cpu_history:
        if key != "time":
            # atol: a dead-ReLU fraction moves by 1/1024 per output rounded across 0
            np.testing.assert_allclose(gpu_history[key], cpu_history[key], rtol=1e-3,
                                       atol=5e-3, err_msg=key)
    for key in cpu_state:
        np.testing.assert_allclose(gpu_state[key], cpu_state[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)


@pytest.mark.parametrize("make", [
    lambda: minidl.Conv2D(4, 6, 3, padding=2, dilation=2, groups=2, dtype=np.float64),
    lambda: minidl.Conv2D(4, 4, 3, stride=2, padding=1, groups=4, dtype=np.float64),
    lambda: minidl.ConvTranspose2D(4, 6, 3, stride=2, padding=1, output_padding=1,
                                   dilation=2, groups=2, dtype=np.float64),
    lambda: minidl.MaxPool2D(3, 2, 1, ceil_mode=True),
    lambda: minidl.AvgPool2D(3, 2, 1, ceil_mode=True, count_include_pad=False),
], ids=["dilated-groups", "depthwise", "transposed", "max-ceil", "avg-ceil-no-pad"])
def test_the_convolution_family_gives_the_numbers_of_the_cpu(make):
    """Forward, dx and every parameter's gradient of each new case, float64."""
    x = np.random.default_rng(0).standard_normal((3, 4, 9, 8))
    results = {}
    for name, device in (("numpy", "cpu"), ("cupy", "gpu")):
        with minidl.set_backend(name):
            minidl.manual_seed(0)
            layer = make()
            y = layer.forward(minidl.to_device(x, device))
            dx = layer.backward(y * 0.5 + 1.0)
            results[name] = [minidl.to_numpy(a) for a in [y, dx] + [p.grad for p in
                                                                    layer.parameters()]]
    for cpu, gpu in zip(results["numpy"], results["cupy"]):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pool", [False, True], ids=["no-pool", "MaxPool2D"])
def test_a_training_step_waits_for_the_device_once(monkeypatch, pool):
    """Everything but the Trainer's one read runs with synchronisation forbidden:
    forward, loss, metrics, backward (with GradientRecorder's hooks), the update."""
    import cupyx
    with minidl.set_backend("cupy") as cupy:
        model = Sequential(build(pool).layers + [Dropout(0.25)])
        trainer = Trainer(model, SoftmaxCrossEntropy(0.1), Adam(model.parameters(), lr=1e-3),
                          metrics={"acc": "accuracy"}, verbose=0)
        recorder = GradientRecorder(model, every=1)
        recorder.on_train_begin(trainer)
        x, y = (cupy.asarray(a) for a in data(8))
        trainer.train_step(x, y)            # warm-up: kernels compiled, buffers made
        reads = []
        real = backend.to_floats

        def allowed_read(values):
            reads.append(len(values))
            with cupyx.allow_synchronize(True):
                return real(values)

        monkeypatch.setattr(backend, "to_floats", allowed_read)
        with cupyx.allow_synchronize(False):
            trainer.train_step(x, y)
        assert reads == [2]                 # loss and acc, in one read
        logs = {}
        recorder.on_epoch_end(trainer, 0, logs)
        assert reads == [2, len(logs)] and all(np.isfinite(list(logs.values())))
        recorder.remove()


def test_evaluate_predict_and_a_checkpoint_round_trip(tmp_path):
    x, y = data(16)
    xv, yv = data(8, seed=1)
    path = tmp_path / "m.npz"
    with minidl.set_backend("cupy"):
        model = build()
        trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.05),
                          verbose=0)
        history = trainer.fit(
            DataLoader(x, y, 4), epochs=2, val=DataLoader(xv, yv, 4, shuffle=False),
            callbacks=[ModelCheckpoint(path, monitor="val_loss", save_best_only=False),
                       CSVLogger(tmp_path / "history.csv")])
        logs = trainer.evaluate(DataLoader(xv, yv, 4, shuffle=False))
        assert logs["loss"] == pytest.approx(history["val_loss"][-1], rel=1e-5)
        assert logs["accuracy"] == pytest.approx(history["val_accuracy"][-1])
        predicted = model.predict(xv, batch_size=3)
        assert isinstance(predicted, np.ndarray)
        again = build().load(path)
        assert again.device == "gpu"
        np.testing.assert_allclose(again.predict(xv), predicted, rtol=1e-5, atol=1e-6)
    on_cpu = build().load(path)
    assert on_cpu.device == "cpu"
    np.testing.assert_allclose(on_cpu.predict(xv), predicted, rtol=1e-4, atol=1e-5)
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 3


def test_the_cli_trains_and_evaluates_on_the_gpu(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist",
                        write_fake_dataset(root, "mnist", n_train=300))
    out = tmp_path / "run"
    code = cli.main(["train", "--device", "gpu", "--limit", "256", "--epochs", "1",
                     "--data-root", str(root), "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    last = printed.strip().splitlines()[-1]
    assert re.fullmatch(r"test accuracy: [01]\.\d{4}", last)
    assert (out / "model.npz").exists() and (out / "run.json").exists()
    code = cli.main(["evaluate", "--device", "gpu", "--checkpoint", str(out / "model.npz"),
                     "--data-root", str(root)])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
