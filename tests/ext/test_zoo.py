"""The ready-made networks (minidl/ext/zoo.py): resnet_small and its basic block,
mobilenet_small and its depthwise-separable block, and ``minidl train --model resnet``
and ``--model mobilenet``."""
import json

import numpy as np
import pytest

import minidl
import minidl.ext.plots
from minidl import cli
from minidl.data import datasets
from minidl.ext.zoo import MODELS, basic_block, mobilenet_small, resnet_small, separable_block

from conftest import write_fake_dataset


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist", write_fake_dataset(root, "mnist", n_train=300))
    return root


def test_resnet_small_shapes_and_structure():
    model = resnet_small(num_classes=7, width=4)
    assert MODELS["resnet"] is resnet_small
    assert model.output_shape((2, 1, 28, 28)) == (2, 7)
    residuals = [layer for layer in model if isinstance(layer, minidl.Residual)]
    assert len(residuals) == 6                       # 3 stages of 2 blocks
    # the first block of stages 2 and 3 halves the size through a projection
    assert [r.shortcut is not None for r in residuals] == [False, False, True, False, True, False]
    assert residuals[2].output_shape((1, 4, 28, 28)) == (1, 8, 14, 14)
    text = model.summary((1, 28, 28), print_fn=None)
    assert "(16, 7, 7)" in text and "GlobalAvgPool2D" in text


def test_basic_block_keeps_or_projects():
    """The block's gradients are checked in tests/core/layers/test_blocks.py (the same
    layers in float64); here: which shortcut it gets, and the shapes of both passes."""
    assert basic_block(4, 4).shortcut is None
    block = basic_block(4, 8, stride=2)
    assert block.output_shape((1, 4, 6, 6)) == (1, 8, 3, 3)
    y = block.forward(np.ones((2, 4, 6, 6), np.float32))
    assert y.shape == (2, 8, 3, 3) and y.dtype == np.float32
    assert block.backward(np.ones_like(y)).shape == (2, 4, 6, 6)


def test_mobilenet_small_shapes_and_structure():
    model = mobilenet_small(num_classes=7, width=4)
    assert MODELS["mobilenet"] is mobilenet_small
    assert model.output_shape((2, 1, 28, 28)) == (2, 7)
    convs = [layer for block in model if isinstance(block, minidl.Sequential)
             for layer in block if isinstance(layer, minidl.Conv2D)]
    depthwise, pointwise = convs[::2], convs[1::2]
    assert [c.groups for c in depthwise] == [c.in_channels for c in depthwise] == [4, 8, 16, 16, 32]
    assert all(c.out_channels == c.in_channels and c.kernel_size == (3, 3) for c in depthwise)
    assert [c.stride for c in depthwise] == [(1, 1), (2, 2), (1, 1), (2, 2), (1, 1)]
    assert all(c.kernel_size == (1, 1) and c.groups == 1 for c in pointwise)
    text = model.summary((1, 28, 28), print_fn=None)
    assert "(32, 7, 7)" in text and "GlobalAvgPool2D" in text


def test_separable_block_costs_less_than_a_full_convolution():
    block = separable_block(8, 16, stride=2)
    assert block.output_shape((1, 8, 6, 6)) == (1, 16, 3, 3)
    assert block.flops((1, 8, 6, 6)) == 2 * (9 * 8 + 8 * 16) * 9      # 9C + CF per pixel
    assert minidl.Conv2D(8, 16, 3, stride=2, padding=1).flops((1, 8, 6, 6)) == 2 * 9 * 8 * 16 * 9
    y = block.forward(np.ones((2, 8, 6, 6), np.float32))
    assert y.dtype == np.float32 and block.backward(np.ones_like(y)).shape == (2, 8, 6, 6)


@pytest.mark.slow
@pytest.mark.parametrize("name, layer", [("resnet", "Residual"), ("mobilenet", "Sequential")])
def test_cli_trains_and_evaluates_a_zoo_model(name, layer, data_root, tmp_path, capsys,
                                              monkeypatch):
    monkeypatch.setattr(minidl.ext.plots, "available", lambda: False)    # plots: cli/test_train.py
    out = tmp_path / "run"
    code = cli.main(["train", "--model", name, "--limit", "96", "--epochs", "1",
                     "--batch-size", "48", "--data-root", str(data_root), "--out", str(out),
                     "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert layer in printed
    assert json.loads((out / "run.json").read_text())["model"] == name
    last = printed.strip().splitlines()[-1]
    assert cli.main(["evaluate", "--checkpoint", str(out / "model.npz"),
                     "--data-root", str(data_root)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
