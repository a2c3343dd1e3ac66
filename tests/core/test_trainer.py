"""The training loop: it learns, reports, stops clearly, reproduces, keeps float32.
Its callbacks: test_callbacks.py; its schedulers: test_schedulers.py."""
import numpy as np
import pytest

import minidl
from minidl import (MSE, SGD, BatchNorm2D, Callback, Conv2D, DataLoader, Dense, EarlyStopping,
                    Flatten, MaxPool2D, ModelCheckpoint, ReLU, Sequential, SoftmaxCrossEntropy,
                    Trainer)
from minidl.ext.recorder import GradientRecorder
from minidl.ext.zoo import mnist_cnn
from minidl.trainer import accuracy

from conftest import bar_model, make_trainer, oriented_bars, tiny, tiny_trainer


def test_small_cnn_learns_oriented_bars():
    x, y = oriented_bars(1200)
    xv, yv = oriented_bars(300, seed=1)
    model = bar_model()
    trainer = make_trainer(model)
    history = trainer.fit(DataLoader(x, y, 32, seed=0), epochs=4,
                          val=DataLoader(xv, yv, 100, shuffle=False))
    assert history.epochs == 4
    assert history["val_accuracy"][-1] > 0.95, history.history
    assert history["loss"][-1] < history["loss"][0]
    assert trainer.evaluate(DataLoader(xv, yv, 100, shuffle=False))["accuracy"] > 0.95
    assert (model.predict(xv).argmax(1) == yv).mean() > 0.95


def test_progress_bar_and_epoch_lines(capsys):
    x, y = oriented_bars(64)
    model = bar_model()
    Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.01)).fit(
        DataLoader(x, y, 16), epochs=1)
    out = capsys.readouterr()
    assert "Epoch 1/1" in out.err and "img_s" in out.err and "accuracy" in out.err
    assert "epoch 1/1: loss=" in out.out


def test_verbose_zero_is_silent(capsys):
    x, y = oriented_bars(32)
    make_trainer(bar_model()).fit(DataLoader(x, y, 16), epochs=1)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_verbose_two_prints_the_epoch_lines_without_bars(capsys):
    x, y = oriented_bars(32)
    trainer = make_trainer(bar_model())
    trainer.fit(DataLoader(x, y, 16), epochs=2, verbose=2)
    out = capsys.readouterr()
    assert [line[:10] for line in out.out.splitlines()] == ["epoch 1/2:", "epoch 2/2:"]
    assert out.err == "" and trainer.epochs == 2


def test_same_seed_same_weights_after_training():
    def run():
        minidl.manual_seed(5)
        x, y = oriented_bars(96)
        model = Sequential(bar_model().layers + [minidl.Dropout(0.2)])
        make_trainer(model).fit(DataLoader(x, y, 16), epochs=2)
        return model.state_dict()

    a, b = run(), run()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    x, y = oriented_bars(128)
    model = bar_model()
    trainer = make_trainer(model)
    ckpt = tmp_path / "best.npz"
    trainer.fit(DataLoader(x, y, 32), epochs=1, val=DataLoader(x, y, 64),
                callbacks=[ModelCheckpoint(ckpt)])
    good = ckpt.read_bytes()
    x_bad = x.copy()
    x_bad[40] = np.nan
    with pytest.raises(FloatingPointError, match=r"loss became nan at epoch 1, batch 2"):
        trainer.fit(DataLoader(x_bad, y, 32, shuffle=False), epochs=1,
                    callbacks=[ModelCheckpoint(ckpt)])
    assert ckpt.read_bytes() == good


def test_gradient_clipping_is_applied():
    x, y = oriented_bars(32)
    model = bar_model()
    trainer = make_trainer(model, clip_grad_norm=1e-3)
    before = model.state_dict()
    trainer.optimizer = SGD(model.parameters(), lr=1.0)
    trainer.train_step(x[:16], y[:16])
    change = np.sqrt(sum(((model.state_dict()[k] - v) ** 2).sum() for k, v in before.items()))
    assert change == pytest.approx(1e-3, rel=1e-2)


def test_unknown_metric_and_device_mismatch():
    model = bar_model()
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.1), metrics=("f1",))
    model.device = "gpu"  # as if moved; batches come from the numpy backend
    x, y = oriented_bars(8)
    with pytest.raises(ValueError, match="model is on the gpu but batches come on the cpu"):
        make_trainer(model).fit(DataLoader(x, y, 4), epochs=1)


# -- edge cases: empty loaders, metric names, label shapes, errors mid-fit ---------
def test_loader_with_no_batches_is_an_error_not_zeros():
    x, y = tiny(10)
    empty = DataLoader(x, y, batch_size=16, drop_last=True)   # len(empty) == 0
    trainer = tiny_trainer()
    with pytest.raises(ValueError, match="Trainer.fit: .*yields no samples"):
        trainer.fit(empty, epochs=2)
    with pytest.raises(ValueError, match="Trainer.evaluate: .*yields no samples"):
        trainer.evaluate(empty)


def test_metric_names_must_be_unique_and_not_reserved():
    def loss(logits, labels):
        return 100.0

    with pytest.raises(ValueError, match="two metrics named '<lambda>'"):
        tiny_trainer(metrics=[lambda a, b: 0.0, lambda a, b: 1.0])
    with pytest.raises(ValueError, match="metric name 'loss' is reserved"):
        tiny_trainer(metrics=[loss])
    with pytest.raises(ValueError, match="metric name 'val_top' is reserved"):
        tiny_trainer(metrics={"val_top": loss})


def test_metrics_as_a_dict_of_names_and_functions():
    x, y = tiny(12)
    data = DataLoader(x, y, 4, shuffle=False)
    trainer = tiny_trainer(metrics={"acc": "accuracy", "zero": lambda a, b: 0.0,
                                    "one": lambda a, b: 1.0})
    logs = trainer.evaluate(data)
    assert set(logs) == {"loss", "acc", "zero", "one"}
    assert logs["zero"] == 0.0 and logs["one"] == 1.0
    plain = Trainer(trainer.model, SoftmaxCrossEntropy(), trainer.optimizer, metrics=(),
                    verbose=0)
    assert logs["loss"] == pytest.approx(plain.evaluate(data)["loss"])


def test_accuracy_takes_class_indices_or_one_hot_labels():
    logits = np.array([[2.0, 0, 0], [0, 2, 0], [0, 0, 2]])
    labels = np.array([0, 1, 1])
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    assert accuracy(logits, np.eye(3)[labels]) == pytest.approx(2 / 3)   # N == classes
    with pytest.raises(ValueError, match=r"accuracy: labels of shape \(3, 1\)"):
        accuracy(logits, labels[:, None])
    with pytest.raises(ValueError, match=r"accuracy: labels of shape \(2,\)"):
        accuracy(logits, labels[:2])


def test_mse_with_one_hot_targets_reports_accuracy():
    x, y = tiny(10)
    trainer = tiny_trainer(loss=MSE())
    data = DataLoader(x, np.eye(3, dtype=np.float32)[y], batch_size=5, shuffle=False)
    logs = trainer.evaluate(data)
    expected = (trainer.model.predict(x).argmax(1) == y).mean()
    assert logs["accuracy"] == pytest.approx(expected)


def test_error_in_fit_still_ends_callbacks_and_keeps_history():
    x, y = tiny(40)
    trainer = tiny_trainer()
    model = trainer.model
    ended = []

    class Blow(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 1:
                model.layers[0].weight.data[:] = np.nan   # the next loss is nan

        def on_train_end(self, trainer):
            ended.append(True)

    stop = EarlyStopping(monitor="loss", patience=5, restore_best_weights=True)
    recorder = GradientRecorder(model, every=1)
    with pytest.raises(FloatingPointError, match="loss became nan") as info:
        trainer.fit(DataLoader(x, y, 8, seed=0), epochs=5, callbacks=[recorder, stop, Blow()])
    assert ended == [True]
    assert model.layers[0].forward_hooks == [] and model.layers[0].backward_hooks == []
    assert np.isfinite(model.layers[0].weight.data).all()     # best weights put back
    assert info.value.history.epochs == 2 and len(info.value.history["loss"]) == 2


# -- divergence, bad arguments, device reads --------------------------------------
@pytest.mark.parametrize("optimizer", [minidl.Adam, minidl.RMSprop])
def test_a_diverging_adaptive_optimizer_stops_with_the_sgd_message(optimizer):
    """lr=1e6 makes the loss huge but finite: before, fit ended normally with it."""
    x, y = oriented_bars(96)
    model = bar_model()
    trainer = Trainer(model, SoftmaxCrossEntropy(), optimizer(model.parameters(), lr=1e6),
                      verbose=0)
    with pytest.raises(FloatingPointError, match=r"Trainer: the loss became .* at epoch 1, "
                       r"batch \d+, over 10000 times its start .*lower learning rate") as info:
        trainer.fit(DataLoader(x, y, 16, seed=0), epochs=3)
    assert info.value.history.epochs == 0


def test_max_loss_ratio_none_trains_on_and_bad_ratios_are_refused():
    x, y = oriented_bars(32)
    model = bar_model()
    trainer = Trainer(model, SoftmaxCrossEntropy(), minidl.RMSprop(model.parameters(), lr=1e6),
                      verbose=0, max_loss_ratio=None)
    assert trainer.fit(DataLoader(x, y, 16, seed=0), epochs=1).epochs == 1
    for ratio, error in ((1.0, ValueError), (float("inf"), ValueError), ("10", TypeError)):
        with pytest.raises(error, match="max_loss_ratio must be"):
            make_trainer(bar_model(), max_loss_ratio=ratio)


def test_a_parameter_that_became_inf_stops_fit_before_evaluation():
    x, y = tiny(8)
    trainer = tiny_trainer()

    class Overflow(minidl.SGD):          # the last update of the epoch overflows
        def step(self):
            super().step()
            if trainer.batch == 1:
                trainer.model.layers[0].bias.data[0] = np.inf

    trainer.optimizer = Overflow(trainer.model.parameters(), lr=0.01)
    evaluated = []
    trainer.evaluate = lambda data: evaluated.append(1)
    with pytest.raises(FloatingPointError, match="0.bias became inf or nan in epoch 1"):
        trainer.fit(DataLoader(x, y, 4, shuffle=False), epochs=2, val=DataLoader(x, y, 4))
    assert evaluated == []


def test_a_nan_loss_leaves_the_parameters_of_the_step_before():
    x, y = tiny(8)
    trainer = tiny_trainer()
    before = trainer.model.state_dict()
    x[5] = np.nan                                   # in the second batch
    with pytest.raises(FloatingPointError, match="loss became nan at epoch 1, batch 2"):
        trainer.fit(DataLoader(x, y, 4, shuffle=False), epochs=1)
    after = trainer.model.state_dict()
    assert all(np.isfinite(v).all() for v in after.values())
    assert not np.array_equal(after["0.weight"], before["0.weight"])   # batch 1 applied


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # inf inputs on the way
def test_labels_out_of_range_are_the_losses_error_in_fit_and_evaluate():
    x, y = tiny(8)
    y[3] = 7
    trainer = tiny_trainer()
    with pytest.raises(ValueError, match=r"expected labels in \[0, 3\)"):
        trainer.fit(DataLoader(x, y, 4, shuffle=False), epochs=1)
    with pytest.raises(ValueError, match=r"expected labels in \[0, 3\)"):
        trainer.evaluate(DataLoader(x, y, 4, shuffle=False))
    x[0] = np.inf
    with pytest.raises(FloatingPointError, match="Trainer.evaluate: the loss became nan at "
                                                 "batch 1"):
        trainer.evaluate(DataLoader(x, y % 3, 4, shuffle=False))


@pytest.mark.parametrize("data", [np.zeros((8, 4), np.float32),
                                  (np.zeros((8, 4), np.float32), np.zeros(8, int)), 5])
def test_fit_and_evaluate_want_a_dataloader(data):
    trainer = tiny_trainer()
    with pytest.raises(TypeError, match="Trainer.fit: train must be a DataLoader"):
        trainer.fit(data)
    x, y = tiny(8)
    with pytest.raises(TypeError, match="Trainer.fit: val must be a DataLoader"):
        trainer.fit(DataLoader(x, y, 4), val=data)
    with pytest.raises(TypeError, match="Trainer.evaluate: data must be a DataLoader"):
        trainer.evaluate(data)


@pytest.mark.parametrize("epochs, error", [(-1, ValueError), (0, ValueError),
                                           (2.0, TypeError), ("3", TypeError)])
def test_fit_epochs_must_be_a_positive_int(epochs, error):
    x, y = tiny(8)
    with pytest.raises(error, match="Trainer.fit: epochs must be"):
        tiny_trainer().fit(DataLoader(x, y, 4), epochs=epochs)


def test_a_training_step_reads_the_device_once(monkeypatch):
    """Loss and metrics stay arrays until one backend.to_floats call per step; the
    recorder reads its sums once per epoch."""
    x, y = tiny(12)
    trainer = tiny_trainer(metrics={"acc": "accuracy", "top": "accuracy"})
    reads = []
    real = minidl.backend.to_floats

    def counting(values):
        reads.append([type(v).__name__ for v in values])
        return real(values)

    monkeypatch.setattr(minidl.backend, "to_floats", counting)
    recorder = GradientRecorder(trainer.model, every=1)
    trainer.fit(DataLoader(x, y, 4), epochs=1, callbacks=[recorder])
    # 3 steps, the parameter check, the recorder's epoch means
    assert len(reads) == 5
    assert all(name != "float" for step in reads[:3] for name in step), reads


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy's overflow note
def test_an_mse_loss_that_overflows_is_divergence_and_a_nan_target_the_losses_error():
    x, y = tiny(8)
    targets = np.eye(3, dtype=np.float32)[y]
    trainer = tiny_trainer(loss=MSE(), metrics=())
    trainer.model.layers[0].weight.data[:] = 1e20       # finite outputs, squares overflow
    with pytest.raises(FloatingPointError, match="the loss became inf at epoch 1, batch 1"):
        trainer.fit(DataLoader(x, targets, 4, shuffle=False), epochs=1)
    targets[1, 0] = np.nan
    with pytest.raises(ValueError, match="MSE: expected a finite target"):
        tiny_trainer(loss=MSE(), metrics=()).fit(DataLoader(x, targets, 4, shuffle=False))


# -- the fast paths in a training step -----------------------------------------------------
def small_model(dtype=np.float64):
    return Sequential([Conv2D(1, 4, 3, padding=1, dtype=dtype), BatchNorm2D(4, dtype=dtype),
                       ReLU(), MaxPool2D(2), Conv2D(4, 6, 3, padding=1, dtype=dtype), ReLU(),
                       MaxPool2D(2), Flatten(), Dense(6 * 2 * 2, 5, dtype=dtype)])


def test_trainer_step_still_trains():
    minidl.manual_seed(0)
    model = small_model(np.float32)
    trainer = minidl.Trainer(model, SoftmaxCrossEntropy(),
                             minidl.SGD(model.parameters(), lr=0.05), verbose=0)
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    y = np.arange(8) % 5
    first, _ = trainer.train_step(x, y)
    for _ in range(20):
        loss, _ = trainer.train_step(x, y)
    assert loss < first


def test_float32_end_to_end_in_a_training_step():
    """No silent float64: every activation, gradient and parameter stays float32."""
    minidl.manual_seed(0)
    model = mnist_cnn()
    seen = []
    for layer in model:
        layer.register_hook(lambda l, a, b: seen.extend([a, b]), "forward")
        layer.register_hook(lambda l, a, b: seen.extend([a, b]), "backward")
    trainer = minidl.Trainer(model, SoftmaxCrossEntropy(),
                             minidl.SGD(model.parameters(), lr=0.01, momentum=0.9), verbose=0)
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    trainer.train_step(x, np.arange(4))
    assert all(a.dtype == np.float32 for a in seen if a is not None and a.dtype.kind == "f")
    for p in model.parameters():
        assert p.data.dtype == np.float32
    assert all(p.grad is None for p in model.parameters())     # zero_grad after the step
