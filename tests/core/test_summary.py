"""minidl.summary: the summary table (output shapes, parameters, receptive field,
FLOPs), nested Sequentials, receptive_field_step, and a summary asked for between
forward and backward. Every number is recomputed here by hand."""
import re

import numpy as np
import pytest

import minidl
from minidl import (Conv2D, ConvTranspose2D, Dense, Flatten, GlobalAvgPool2D, MaxPool2D, ReLU,
                    Sequential, Tanh)
from minidl.summary import receptive_field_step

from conftest import randn, to_np


def test_summary_table():
    model = Sequential(Conv2D(1, 32, 3, padding=1, activation="relu"), MaxPool2D(2),
                       Conv2D(32, 64, 3, padding=1, activation="relu"), MaxPool2D(2),
                       Flatten(), Dense(3136, 128, activation="relu"), Dense(128, 10))
    lines = []
    text = model.summary((1, 28, 28), print_fn=lines.append)
    assert lines == [text]
    assert "(32, 28, 28)" in text and "(64, 7, 7)" in text and "(10,)" in text
    assert "Total params: 421,642" in text
    conv1 = next(l for l in text.splitlines() if l.startswith("0: Conv2D"))
    assert "3x3" in conv1 and "320" in conv1
    conv2 = next(l for l in text.splitlines() if l.startswith("2: Conv2D"))
    assert "8x8" in conv2  # 3 + 1*(2-1) + 2*(3-1)
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2D\) cannot take input"):
        model.summary((3, 28, 28), print_fn=None)


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


def test_summary_between_forward_and_backward_keeps_gradients(xp):
    def build():
        minidl.manual_seed(0)
        return Sequential(Dense(3, 4, activation="sigmoid", dtype=np.float64), Tanh(),
                          Dense(4, 2, dtype=np.float64))
    model, reference = build(), build()
    x, dy = randn(xp, 5, 3, seed=1), randn(xp, 5, 2, seed=2)
    model.forward(x)
    reference.forward(x)
    model.summary((3,), print_fn=None)
    np.testing.assert_allclose(to_np(model.backward(dy)), to_np(reference.backward(dy)))


def test_summary_of_the_convolution_family_by_hand():
    """Dilation widens the receptive field ((k - 1) * d * jump), groups divide the FLOPs,
    a ConvTranspose2D adds floor((k - 1) * d / s) input positions and divides the jump."""
    model = Sequential(Conv2D(2, 4, 3, padding=2, dilation=2),            # rf 1 + 2*2 = 5
                       Conv2D(4, 4, 3, stride=2, padding=1, groups=4),    # 5 + 2 = 7, jump 2
                       Conv2D(4, 8, 3, padding=2, dilation=2, groups=2),  # 7 + 2*2*2 = 15
                       ConvTranspose2D(8, 2, 4, stride=2, padding=1),     # 15 + 1*2 = 17, jump 1
                       Conv2D(2, 1, 3, padding=1))                        # 17 + 2 = 19
    text, rows = summary_rows(model, (2, 16, 16))
    assert [rows[i][3] for i in range(5)] == ["5x5", "7x7", "15x15", "17x17", "19x19"]
    assert [rows[i][1] for i in range(5)] == ["(4, 16, 16)", "(4, 8, 8)", "(8, 8, 8)",
                                              "(2, 16, 16)", "(1, 16, 16)"]
    # 2 * C/G*k1*k2 * F * Ho * Wo; the transposed one: 2 * C_out/G*k1*k2 * C_in * H * W
    flops = [2 * 2 * 9 * 4 * 256, 2 * 1 * 9 * 4 * 64, 2 * 2 * 9 * 8 * 64,
             2 * 2 * 16 * 8 * 64, 2 * 2 * 9 * 1 * 256]
    assert [layer.flops(shape) for layer, shape in zip(
        model, [(1, 2, 16, 16), (1, 4, 16, 16), (1, 4, 8, 8), (1, 8, 8, 8), (1, 2, 16, 16)])] \
        == flops
    assert rows[1][2] == str(4 * 9 + 4) and rows[3][2] == str(8 * 2 * 16 + 2)   # parameters


def test_receptive_field_after_upsampling_is_rounded_up():
    """ConvTranspose2D(k=2, s=2) first: each output sees one input and outputs are half
    an input pixel apart, so a 2x2 window after it sees 1 + 0.5 -> 2 input pixels."""
    model = Sequential(ConvTranspose2D(1, 1, 2, stride=2), MaxPool2D(2, stride=1))
    _, rows = summary_rows(model, (1, 4, 4))
    assert [rows[i][3] for i in range(2)] == ["1x1", "2x2"]
    assert receptive_field_step(model[0], (1, 1), (1, 1)) == ((1, 1), (0.5, 0.5))
