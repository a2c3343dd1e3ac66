"""Residual and Concat: gradients, a loop reference, PyTorch (live and golden),
nesting in Sequential, save/load, hooks and summary."""
import importlib.util
import os

import numpy as np
import pytest

import minidl
from minidl import (BatchNorm2D, Concat, Conv2D, Dense, Flatten, GlobalAvgPool2D, MaxPool2D, ReLU,
                    Residual, Sequential)

from conftest import GOLDEN_DIR, randn
from reference_conv import conv_backward, conv_forward

F64 = np.float64

GOLDEN = os.fspath(GOLDEN_DIR)


def _golden_module():
    spec = importlib.util.spec_from_file_location(
        "make_golden_blocks", os.path.join(GOLDEN, "make_golden_blocks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


blocks_cases = _golden_module()


def resnet_block(c_in, c_out, stride, dtype=F64):
    shortcut = None if (c_in, stride) == (c_out, 1) else Sequential(
        Conv2D(c_in, c_out, 1, stride=stride, bias=False, dtype=dtype),
        BatchNorm2D(c_out, dtype=dtype))
    return Residual(Sequential(Conv2D(c_in, c_out, 3, stride=stride, padding=1, bias=False,
                                      dtype=dtype),
                               BatchNorm2D(c_out, dtype=dtype), ReLU(),
                               Conv2D(c_out, c_out, 3, padding=1, bias=False, dtype=dtype),
                               BatchNorm2D(c_out, dtype=dtype)), shortcut)


@pytest.mark.parametrize("make", [
    lambda: resnet_block(3, 3, 1),
    lambda: resnet_block(3, 4, 2),
    lambda: Concat([Conv2D(3, 2, 1, dtype=F64), Sequential(Conv2D(3, 2, 3, padding=1, dtype=F64),
                                                            ReLU()), MaxPool2D(3, 1, 1)]),
    lambda: Concat([Conv2D(3, 2, 3, padding=1, dtype=F64), Conv2D(3, 2, 3, padding=1, dtype=F64)],
                   axis=-1),
], ids=["identity", "projection", "concat_channels", "concat_width"])
def test_gradcheck(make):
    assert minidl.gradcheck(make(), randn(np, 2, 3, 5, 5)) < 1e-6


def test_residual_of_a_conv_matches_the_loop_reference():
    """y = conv(x) + x and dx = conv's dx + dy, with the conv written as loops."""
    conv = Conv2D(3, 3, 3, padding=1, dtype=F64)
    block = Residual(conv)
    x, dy = randn(np, 2, 3, 5, 5, seed=1), randn(np, 2, 3, 5, 5, seed=2)
    w, b = conv.weight.data, conv.bias.data
    np.testing.assert_allclose(block.forward(x), conv_forward(x, w, b, (1, 1), (1, 1)) + x,
                               rtol=1e-12)
    dx = block.backward(dy)
    dw, db, dx_conv = conv_backward(dy, x, w, (1, 1), (1, 1))
    np.testing.assert_allclose(dx, dx_conv + dy, rtol=1e-12)
    np.testing.assert_allclose(conv.weight.grad, dw, rtol=1e-12)
    np.testing.assert_allclose(conv.bias.grad, db, rtol=1e-12)


def _check_against(case, y, dx, grads, buffers):
    model, x, dy = blocks_cases.inputs(case)
    np.testing.assert_allclose(model.forward(x, training=True), y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.backward(dy), dx, rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, grads[name], rtol=1e-10, atol=1e-12, err_msg=name)
    for name, value in buffers.items():
        np.testing.assert_allclose(dict(model.named_buffers())[name], value, rtol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("case", sorted(blocks_cases.CASES))
def test_matches_torch_golden(case):
    """Against numbers torch recorded (tests/golden/make_golden_blocks.py): no torch needed."""
    with np.load(os.path.join(GOLDEN, "blocks.npz")) as data:
        saved = {k[len(case) + 1:]: data[k] for k in data.files if k.startswith(case + "/")}
    model, x, dy = blocks_cases.inputs(case)
    np.testing.assert_array_equal(x, saved["x"])     # the same inputs as when recorded
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, saved[f"param/{name}"])
    part = {kind: {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(kind + "/")}
            for kind in ("grad", "buffer")}
    _check_against(case, saved["y"], saved["dx"], part["grad"], part["buffer"])


@pytest.mark.parametrize("case", sorted(blocks_cases.CASES))
def test_matches_torch_live(case):
    pytest.importorskip("torch")
    model, x, dy = blocks_cases.inputs(case)
    _check_against(case, *blocks_cases.torch_results(model, x, dy))


def test_nested_in_sequential_save_load_and_modes(tmp_path):
    model = Sequential(Conv2D(1, 4, 3, padding=1), resnet_block(4, 4, 1, np.float32),
                       ReLU(), resnet_block(4, 8, 2, np.float32), ReLU(),
                       Concat([Conv2D(8, 2, 1), Conv2D(8, 3, 3, padding=1)]),
                       GlobalAvgPool2D(), Dense(5, 3))
    x = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32)
    for _ in range(2):      # move the running statistics away from their start
        model.forward(x, training=True)
    model.eval()
    assert not model[1].block[1].training and not model[3].shortcut[1].training
    before = model.forward(x)
    model.save(tmp_path / "m.npz")
    minidl.manual_seed(99)
    other = Sequential(Conv2D(1, 4, 3, padding=1), resnet_block(4, 4, 1, np.float32),
                       ReLU(), resnet_block(4, 8, 2, np.float32), ReLU(),
                       Concat([Conv2D(8, 2, 1), Conv2D(8, 3, 3, padding=1)]),
                       GlobalAvgPool2D(), Dense(5, 3)).load(tmp_path / "m.npz")
    np.testing.assert_array_equal(other.forward(x, training=False), before)
    rebuilt = minidl.load_model(tmp_path / "m.npz")     # from the file alone
    np.testing.assert_array_equal(rebuilt.forward(x, training=False), before)
    assert "3.shortcut.1.running_var" in model.state_dict()
    wrong = Sequential(Conv2D(1, 4, 3, padding=1), resnet_block(4, 4, 1, np.float32),
                       ReLU(), resnet_block(4, 6, 2, np.float32), ReLU(),
                       Concat([Conv2D(6, 2, 1), Conv2D(6, 3, 3, padding=1)]),
                       GlobalAvgPool2D(), Dense(5, 3))
    with pytest.raises(ValueError, match="different model structure"):
        wrong.load(tmp_path / "m.npz")


def test_load_state_dict_checks_before_changing_anything():
    block = resnet_block(2, 4, 2)
    state = block.state_dict()
    state["shortcut.0.weight"] = np.zeros((4, 2, 3, 3))
    weight = block.block[0].weight.data.copy()
    state["block.0.weight"] = np.zeros_like(weight)
    with pytest.raises(ValueError, match="shortcut.0.weight"):
        block.load_state_dict(state)
    np.testing.assert_array_equal(block.block[0].weight.data, weight)


def test_hooks_fire_inside_branches_in_order():
    inner = Conv2D(2, 2, 3, padding=1, dtype=F64)
    shortcut = Conv2D(2, 2, 1, dtype=F64)
    calls = []
    inner.register_hook(lambda layer, x, y: calls.append("inner forward"))
    shortcut.register_hook(lambda layer, dy, dx: calls.append("shortcut backward"), "backward")
    model = Sequential(Residual(Sequential(inner), shortcut))
    model.register_hook(lambda layer, x, y: calls.append("model forward"))
    y = model(randn(np, 1, 2, 4, 4))
    model.backward(np.ones_like(y))
    assert calls == ["inner forward", "model forward", "shortcut backward"]


def test_summary_counts_flops_and_receptive_field():
    model = Sequential(Conv2D(1, 2, 3, padding=1), resnet_block(2, 4, 2, np.float32),
                       Concat([Conv2D(4, 2, 1), Conv2D(4, 2, 5, padding=2)]),
                       GlobalAvgPool2D())
    text = model.summary((1, 8, 8), print_fn=None)
    rows = {line.split()[1]: line.split() for line in text.splitlines() if ": " in line}
    # 3x3 conv: 3; block: 3x3 stride 2 -> 5 (jump 2), 3x3 -> 9; Concat's 5x5: 9 + 4 * 2
    assert rows["Residual"][-2] == "9x9" and rows["Concat"][-2] == "17x17"
    block = model[1]
    expected = (block.block.flops((1, 2, 8, 8)) + block.shortcut.flops((1, 2, 8, 8))
                + 4 * 4 * 4)                     # one addition per output value
    assert block.flops((1, 2, 8, 8)) == expected > 0
    assert model[2].flops((1, 4, 4, 4)) == (Conv2D(4, 2, 1).flops((1, 4, 4, 4))
                                            + Conv2D(4, 2, 5, padding=2).flops((1, 4, 4, 4)))
    assert "Params  " in text and "(8, 4, 4)" not in text and "(4, 4, 4)" in text


def test_errors_name_the_layer_and_the_shapes():
    with pytest.raises(ValueError, match=r"Residual: .*\(2, 4, 3, 3\).*\(2, 2, 5, 5\).*shortcut="):
        Residual(Conv2D(2, 4, 3, stride=2, padding=1)).forward(np.zeros((2, 2, 5, 5)))
    with pytest.raises(ValueError, match="Residual"):
        Sequential(Residual(Conv2D(2, 4, 3))).summary((2, 5, 5), print_fn=None)
    with pytest.raises(TypeError, match="Residual: block must be a Layer, got function"):
        Residual(lambda x: x)
    conv = Conv2D(2, 2, 1)
    with pytest.raises(ValueError, match="same layer object"):
        Concat([conv, conv])
    with pytest.raises(ValueError, match="axis must be a non-zero int"):
        Concat([Conv2D(2, 2, 1)], axis=0)
    with pytest.raises(ValueError, match=r"Concat: branch outputs .* must agree"):
        Concat([Conv2D(2, 2, 1), Conv2D(2, 2, 3)]).forward(np.zeros((1, 2, 5, 5)))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        Residual(Conv2D(2, 2, 1)).backward(np.zeros((1, 2, 3, 3)))
    block = Residual(Conv2D(2, 2, 1))
    block.forward(np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"Residual.backward: expected dy of shape \(1, 2, 3, 3\)"):
        block.backward(np.zeros((1, 2, 4, 4), np.float32))


def test_training_a_resnet_block_lowers_the_loss():
    """A Residual inside a model trained by the Trainer: the usual loop just works."""
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 8, 8)).astype(np.float32)
    y = (x[:, 0, :4].mean(axis=(1, 2)) > x[:, 0, 4:].mean(axis=(1, 2))).astype(np.int64)
    model = Sequential(Conv2D(1, 4, 3, padding=1), resnet_block(4, 4, 1, np.float32), ReLU(),
                       Flatten(), Dense(4 * 64, 2))
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(), minidl.Adam(
        model.parameters(), lr=1e-2), verbose=0)
    history = trainer.fit(minidl.DataLoader(x, y, 16, seed=0), epochs=5)
    assert history["loss"][-1] < 0.5 * history["loss"][0]
