"""Inspection: layer hooks, GradientRecorder's statistics, the summary's receptive
field and FLOPs columns. Every recorded number is recomputed here independently."""
import re

import numpy as np
import pytest

import minidl
from minidl import (SGD, BatchNorm2D, Conv2D, DataLoader, Dense, Flatten, GlobalAvgPool2D,
                    MaxPool2D, ReLU, Sequential, SoftmaxCrossEntropy, Trainer)
from minidl.ext.recorder import GradientRecorder
from minidl.ext.recorder import activation_table
from minidl.summary import receptive_field_step


def small_model():
    return Sequential(Conv2D(1, 3, 3, padding=1, activation="relu"), MaxPool2D(2),
                      Flatten(), Dense(3 * 3 * 3, 8), ReLU(), Dense(8, 4))


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 1, 6, 6)).astype(np.float32),
            rng.integers(0, 4, n).astype(np.int64))


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


# -- hooks ----------------------------------------------------------------------
def test_forward_hook_gets_layer_input_and_output_and_can_be_removed():
    layer = Dense(3, 2)
    calls = []
    remove = layer.register_hook(lambda lay, x, y: calls.append((lay, x, y)))
    x = np.ones((4, 3), np.float32)
    y = layer(x)
    assert len(calls) == 1
    assert calls[0][0] is layer and calls[0][1] is x and calls[0][2] is y
    remove()
    layer(x)
    assert len(calls) == 1
    remove()                                   # a second call is harmless
    assert layer.forward_hooks == []


def test_hooks_fire_in_forward_order_then_reverse_with_dy_and_dx():
    model = small_model()
    x, y = batch()
    events = []
    for i, layer in enumerate(model):
        layer.register_hook(lambda lay, a, b, i=i: events.append(("fwd", i, a, b)))
        layer.register_hook(lambda lay, dy, dx, i=i: events.append(("bwd", i, dy, dx)),
                            kind="backward")
    logits = model.forward(x)
    loss = SoftmaxCrossEntropy()
    loss(logits, y)
    dlogits = loss.backward()
    dx = model.backward(dlogits)
    n = len(model)
    assert [(kind, i) for kind, i, *_ in events] == (
        [("fwd", i) for i in range(n)] + [("bwd", i) for i in reversed(range(n))])
    fwd, bwd = events[:n], events[n:]
    assert fwd[0][2] is x and fwd[-1][3] is logits
    for (_, _, _, out), (_, _, inp, _) in zip(fwd, fwd[1:]):
        assert inp is out                      # each layer's input is the last one's output
    assert bwd[0][2] is dlogits and bwd[-1][3] is dx
    for (_, _, _, dx_later), (_, _, dy_earlier, _) in zip(bwd, bwd[1:]):
        assert dy_earlier is dx_later          # dL/dx of layer i+1 is dL/dy of layer i
    for _, i, dy, dxi in bwd:                  # shapes: dy like the output, dx like the input
        assert dy.shape == fwd[i][3].shape and dxi.shape == fwd[i][2].shape


def test_backward_hook_dx_is_what_backward_returns():
    layer = ReLU()
    seen = []
    layer.register_hook(lambda lay, dy, dx: seen.append((dy, dx)), kind="backward")
    x = np.array([[-1.0, 2.0, 0.5]], np.float32)
    layer(x)
    dy = np.array([[3.0, 4.0, 5.0]], np.float32)
    dx = layer.backward_with_hooks(dy)
    assert seen[0][0] is dy and seen[0][1] is dx
    np.testing.assert_array_equal(dx, [[0.0, 4.0, 5.0]])


def test_plain_forward_and_backward_bypass_hooks():
    """Hooks belong to __call__ and backward_with_hooks (what Sequential calls)."""
    layer = ReLU()
    calls = []
    layer.register_hook(lambda *a: calls.append(a))
    layer.register_hook(lambda *a: calls.append(a), kind="backward")
    layer.backward(layer.forward(np.ones((1, 2), np.float32)))
    assert calls == []


def test_register_hook_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'forward' or 'backward'"):
        ReLU().register_hook(print, kind="both")


# -- GradientRecorder: gradients --------------------------------------------------
def test_recorded_grad_norm_equals_norm_of_grad_for_one_step():
    model = small_model()
    x, y = batch()
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
    x, y = batch(12)
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
    x, y = batch()
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
    x, y = batch(12)
    sampled = []
    model[0].register_hook(lambda lay, a, b: sampled.append(float(b.mean())))
    history = fit(model, x, y, GradientRecorder(model, every=2), batch_size=2, lr=0.0)
    assert len(sampled) == 6                       # six batches
    expected = np.mean(sampled[0::2])              # batches 0, 2, 4
    assert history["act_mean/0:Conv2D"][0] == pytest.approx(expected, rel=1e-6)


def test_every_epoch_logs_the_same_keys():
    """Sampling restarts each epoch, so History's lists stay one entry per epoch."""
    model = small_model()
    x, y = batch(12)
    history = fit(model, x, y, GradientRecorder(model, every=10), batch_size=4, epochs=4)
    lengths = {key: len(values) for key, values in history.history.items()}
    assert set(lengths.values()) == {4}, lengths


def test_evaluation_is_not_recorded_and_hooks_are_removed_after_fit():
    model = small_model()
    x, y = batch()
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


# -- summary: receptive field and FLOPs ---------------------------------------------
def summary_rows(model, input_shape):
    text = model.summary(input_shape, print_fn=None)
    rows = {}
    for line in text.splitlines():
        if re.match(r"\d+: ", line):
            cells = re.split(r"\s{2,}", line.strip())
            rows[int(line.split(":")[0])] = cells
    return text, rows


def test_summary_receptive_field_and_flops_by_hand():
    model = Sequential(Conv2D(1, 4, 5, padding=2), MaxPool2D(2),
                       Conv2D(4, 8, 3, stride=2, activation="relu"), GlobalAvgPool2D())
    text, rows = summary_rows(model, (1, 16, 16))
    # conv 5x5: rf 5, outputs 1 pixel apart; 2x2 pool: rf 5 + 1*1 = 6, jump 2;
    # conv 3x3 stride 2: rf 6 + 2*2 = 10, jump 4; global pooling sees everything.
    assert [rows[i][3] for i in range(4)] == ["5x5", "6x6", "10x10", "all"]
    assert [rows[i][1] for i in range(4)] == ["(4, 16, 16)", "(4, 8, 8)", "(8, 3, 3)", "(8,)"]
    # FLOPs = 2 * C_in * k1 * k2 * F * Ho * Wo:  2*1*25*4*256 = 51,200;  2*4*9*8*9 = 5,184
    assert [rows[i][4] for i in range(4)] == ["51.20K", "-", "5.18K", "-"]
    assert "Total FLOPs per sample (forward): 56.38K" in text
    assert model[0].flops((1, 1, 16, 16)) == 51200 and model[2].flops((1, 4, 8, 8)) == 5184


def test_summary_receptive_field_of_rectangular_kernels_and_dense():
    model = Sequential(Conv2D(1, 2, (3, 1)), MaxPool2D((2, 1), stride=(2, 1)),
                       Conv2D(2, 2, (1, 3)), Flatten(), Dense(2 * 4 * 8, 3), ReLU())
    _, rows = summary_rows(model, (1, 10, 10))
    assert [rows[i][3] for i in range(6)] == ["3x1", "4x1", "4x3", "4x3", "all", "all"]


def test_summary_of_nested_sequential_matches_the_flat_model():
    """A nested Sequential counts as its layers would: its row shows what the flat
    model shows after its last layer, and the totals are the same."""
    def layers():
        return [Conv2D(1, 4, 3), MaxPool2D(2), Conv2D(4, 8, 3, stride=2, activation="relu"),
                Flatten(), Dense(8 * 2 * 2, 3)]

    inner = layers()
    nested = Sequential(Sequential(Sequential(inner[:2]), inner[2]), *inner[3:])
    flat_text, flat = summary_rows(Sequential(layers()), (1, 14, 14))
    nested_text, rows = summary_rows(nested, (1, 14, 14))
    # conv 3x3: 3; pool 2: 3 + 1 = 4, jump 2; conv 3x3 stride 2: 4 + 2 * 2 = 8
    assert [flat[i][3] for i in range(5)] == ["3x3", "4x4", "8x8", "8x8", "all"]
    for row, flat_row in ((0, 2), (1, 3), (2, 4)):  # output shape, receptive field
        assert (rows[row][1], rows[row][3]) == (flat[flat_row][1], flat[flat_row][3])
    assert nested_text.splitlines()[-2:] == flat_text.splitlines()[-2:]  # params, FLOPs


def test_receptive_field_step():
    assert receptive_field_step(Conv2D(1, 1, 3, stride=2), (5, 5), (2, 2)) == ((9, 9), (4, 4))
    assert receptive_field_step(ReLU(), (5, 5), (2, 2)) == ((5, 5), (2, 2))
    assert receptive_field_step(Dense(2, 2), (5, 5), (2, 2))[0] is None
    block = Sequential(Conv2D(1, 1, 3, stride=2), MaxPool2D(2))
    assert receptive_field_step(block, (5, 5), (2, 2)) == ((13, 13), (8, 8))  # 9, then 13


def test_a_layer_says_it_sees_the_whole_input_by_a_class_attribute():
    class Mix(minidl.Identity):       # e.g. attention over all positions
        sees_whole_input = True

    assert receptive_field_step(Mix(), (5, 5), (2, 2))[0] is None
    assert GlobalAvgPool2D.sees_whole_input and not Conv2D.sees_whole_input


def test_no_import_cycle_and_no_module_named_like_the_standard_library():
    import ast
    import sys
    from pathlib import Path
    package = Path(minidl.__file__).parent
    modules = {".".join(p.relative_to(package.parent).with_suffix("").parts): p
               for p in package.rglob("*.py") if p.stem != "__init__"}
    # minidl/random.py is the one left (layers' owner renames it): no new ones
    clashes = {m.rsplit(".", 1)[-1] for m in modules} & set(sys.stdlib_module_names)
    assert clashes <= {"__main__", "random"}, clashes

    def imports(name, path):    # "from .x import y", "from . import x", in functions too
        package_name = name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package_name.rsplit(".", node.level - 1)[0]
                targets = ([f"{base}.{node.module}"] if node.module
                           else [f"{base}.{alias.name}" for alias in node.names])
                found |= {t for t in targets if t in modules}
        return found

    graph = {name: imports(name, path) for name, path in modules.items()}

    def reaches(start, goal):
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo += graph[name]
        return False

    assert "minidl.backend" in graph["minidl.cli"]      # "from . import backend" counts
    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, cycles


def test_conv_bias_before_batch_norm_records_a_zero_gradient():
    """What docs/architecture.md tells readers to expect in gradients.png."""
    model = Sequential(Conv2D(1, 3, 3, padding=1), BatchNorm2D(3), ReLU(), MaxPool2D(2),
                       Flatten(), Dense(27, 4))
    x, y = batch()
    history = fit(model, x, y, GradientRecorder(model), lr=0.0)
    assert history["grad_norm/0.bias"][0] < 1e-5 * history["grad_norm/0.weight"][0]
    assert history["grad_norm/1.bias"][0] > 1e-3 * history["grad_norm/1.weight"][0]
