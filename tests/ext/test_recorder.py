"""GradientRecorder (minidl/ext/recorder.py): gradient norms and activation statistics
(sampled every n batches), nothing recorded in evaluation, hooks removed after fit, the
activation table, and the zero gradient of a conv bias before batch norm. Every
recorded number is recomputed here independently."""
import numpy as np
import pytest

import minidl
from minidl import (SGD, BatchNorm2D, Conv2D, DataLoader, Dense, Flatten, MaxPool2D, ReLU,
                    Sequential, SoftmaxCrossEntropy, Trainer)
from minidl.ext.recorder import GradientRecorder, activation_table, grad_norms

from conftest import small_batch, small_model


def fit(model, x, y, recorder, batch_size=None, lr=0.1, epochs=1, val=None):
    trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=lr), verbose=0)
    loader = DataLoader(x, y, batch_size or len(x), shuffle=False)
    return trainer.fit(loader, epochs=epochs, val=val, callbacks=[recorder])


def manual_grad_norms(model, x, y):
    """{"i.name": ||grad||} for one forward/backward, in float64, grads then cleared."""
    loss = SoftmaxCrossEntropy()
    loss(model.forward(x), y)
    model.backward(loss.backward())
    norms = {name: float(np.sqrt(np.sum(p.grad.astype(np.float64) ** 2)))
             for name, p in model.named_parameters()}
    model.zero_grad()
    return norms


# -- GradientRecorder: gradients --------------------------------------------------
def test_recorded_grad_norm_equals_norm_of_grad_for_one_step():
    model = small_model()
    x, y = small_batch()
    expected = manual_grad_norms(model, x, y)   # same weights the first step will see
    recorder = GradientRecorder(model, every=1)
    history = fit(model, x, y, recorder)
    assert len(expected) == 6
    for name, norm in expected.items():
        assert history[f"grad_norm/{name}"][0] == pytest.approx(norm, rel=1e-5)
        assert recorder.norms_per_epoch()[name] == [history[f"grad_norm/{name}"][0]]


def test_recorded_grad_norm_is_the_mean_over_the_epochs_batches():
    minidl.manual_seed(7)
    model = small_model()
    minidl.manual_seed(7)
    twin = small_model()                          # same weights, trained by hand below
    x, y = small_batch(12)
    history = fit(model, x, y, GradientRecorder(model), batch_size=4, lr=0.05)
    optimizer = SGD(twin.parameters(), lr=0.05)
    per_batch = []
    for start in (0, 4, 8):
        per_batch.append(manual_grad_norms(twin, x[start:start + 4], y[start:start + 4]))
        loss = SoftmaxCrossEntropy()              # now the real step, as Trainer does it
        loss(twin.forward(x[start:start + 4]), y[start:start + 4])
        twin.backward(loss.backward())
        optimizer.step()
        optimizer.zero_grad()
    for name in per_batch[0]:
        mean = np.mean([norms[name] for norms in per_batch])
        assert history[f"grad_norm/{name}"][0] == pytest.approx(mean, rel=1e-5)


# -- GradientRecorder: activations ------------------------------------------------
def manual_forward(model, x):
    """Each layer's training-mode output, computed layer by layer without hooks."""
    outputs = []
    for layer in model:
        x = layer.forward(x, training=True)
        outputs.append(x)
    return outputs


def test_activation_statistics_match_a_manual_forward():
    model = small_model()
    x, y = small_batch()
    outputs = [out.astype(np.float64) for out in manual_forward(model, x)]
    history = fit(model, x, y, GradientRecorder(model, every=1), lr=0.0)
    for i, (layer, out) in enumerate(zip(model, outputs)):
        name = f"{i}:{type(layer).__name__}"
        assert history[f"act_mean/{name}"][0] == pytest.approx(out.mean(), rel=1e-5, abs=1e-7)
        assert history[f"act_std/{name}"][0] == pytest.approx(out.std(), rel=1e-5)
    relu_layers = {f"dead_relu/{i}:{type(layer).__name__}" for i, layer in enumerate(model)
                   if i in (0, 4)}             # Conv2D(activation="relu") and ReLU()
    assert {k for k in history.history if k.startswith("dead_relu/")} == relu_layers


def test_dead_relu_fraction_on_a_constructed_input():
    dense = Dense(4, 4)
    dense.weight.data[...] = np.eye(4, dtype=np.float32)     # z = x
    dense.bias.data[...] = 0.0
    model = Sequential(dense, ReLU(), Dense(4, 2))
    x = np.array([[-1.0, 0.0, 2.0, 3.0],                     # 2 of 4 are <= 0
                  [-2.0, -3.0, -0.5, 1.0],                   # 3 of 4
                  [4.0, 5.0, 6.0, 7.0],                      # 0 of 4
                  [-1.0, -1.0, -1.0, -1.0]], np.float32)     # 4 of 4
    history = fit(model, x, np.array([0, 1, 0, 1]), GradientRecorder(model, every=1), lr=0.0)
    assert history["dead_relu/1:ReLU"][0] == pytest.approx(9 / 16)
    assert "dead_relu/0:Dense" not in history      # no ReLU inside, so no dead fraction


def test_activations_are_sampled_every_n_batches():
    model = small_model()
    x, y = small_batch(12)
    sampled = []
    model[0].register_hook(lambda lay, a, b: sampled.append(float(b.mean())))
    history = fit(model, x, y, GradientRecorder(model, every=2), batch_size=2, lr=0.0)
    assert len(sampled) == 6                       # six batches
    expected = np.mean(sampled[0::2])              # batches 0, 2, 4
    assert history["act_mean/0:Conv2D"][0] == pytest.approx(expected, rel=1e-6)


def test_every_epoch_logs_the_same_keys():
    """Sampling restarts each epoch, so History's lists stay one entry per epoch."""
    model = small_model()
    x, y = small_batch(12)
    history = fit(model, x, y, GradientRecorder(model, every=10), batch_size=4, epochs=4)
    lengths = {key: len(values) for key, values in history.history.items()}
    assert set(lengths.values()) == {4}, lengths


def test_evaluation_is_not_recorded_and_hooks_are_removed_after_fit():
    model = small_model()
    x, y = small_batch()
    outputs = manual_forward(model, x)
    val = DataLoader(x * 100.0, y, 4, shuffle=False)  # very different activations
    history = fit(model, x, y, GradientRecorder(model, every=1), lr=0.0, val=val)
    assert "val_loss" in history
    assert history["act_mean/5:Dense"][0] == pytest.approx(float(outputs[5].mean()), rel=1e-5)
    assert all(layer.forward_hooks == [] and layer.backward_hooks == [] for layer in model)


def test_recorder_argument_checks():
    with pytest.raises(ValueError, match="every must be a positive int"):
        GradientRecorder(small_model(), every=0)
    with pytest.raises(TypeError, match="expected a Sequential"):
        GradientRecorder(Dense(2, 2))


def test_activation_table():
    logs = {"act_mean/0:Conv2D": 0.5, "act_std/0:Conv2D": 1.25, "dead_relu/0:Conv2D": 0.5,
            "act_mean/10:Dense": -0.125, "act_std/10:Dense": 2.0, "grad_norm/0.weight": 3.0}
    lines = activation_table(logs).splitlines()
    assert lines[0].split() == ["Layer", "act", "mean", "act", "std", "dead", "ReLU"]
    assert lines[1].split() == ["0:Conv2D", "0.5000", "1.2500", "50.0%"]
    assert lines[2].split() == ["10:Dense", "-0.1250", "2.0000", "-"]


# -- what gradients.png shows --------------------------------------------------------------
def test_conv_bias_before_batch_norm_records_a_zero_gradient():
    """What docs/architecture.md tells readers to expect in gradients.png."""
    model = Sequential(Conv2D(1, 3, 3, padding=1), BatchNorm2D(3), ReLU(), MaxPool2D(2),
                       Flatten(), Dense(27, 4))
    x, y = small_batch()
    history = fit(model, x, y, GradientRecorder(model), lr=0.0)
    assert history["grad_norm/0.bias"][0] < 1e-5 * history["grad_norm/0.weight"][0]
    assert history["grad_norm/1.bias"][0] > 1e-3 * history["grad_norm/1.weight"][0]


def test_grad_norms_come_from_a_history_too():
    """A resumed run's plot used to show the resumed epochs only: the norms are in the
    History, which holds the earlier epochs as well."""
    x, y = small_batch(16)
    recorder = GradientRecorder(small_model())
    history = fit(recorder.model, x, y, recorder, batch_size=8, epochs=2)
    earlier = minidl.History([{"grad_norm/0.weight": 5.0, "grad_norm/10.bias": 1.0}])
    resumed = minidl.History(earlier.rows() + history.rows())
    norms = grad_norms(resumed)
    assert list(norms) == ["0.bias", "0.weight", "3.bias", "3.weight", "5.bias", "5.weight",
                           "10.bias"]
    assert norms["0.weight"] == [5.0] + recorder.norms_per_epoch()["0.weight"]
    np.testing.assert_array_equal(norms["10.bias"], [1.0, np.nan, np.nan])
    assert np.isnan(norms["0.bias"][0]) and len(norms["0.bias"]) == 3
    assert grad_norms(recorder.epoch_logs) == recorder.norms_per_epoch()
