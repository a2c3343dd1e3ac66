"""im2col and col2im (minidl/layers/im2col.py) split between threads, over channels or,
with one channel, over samples: still the numbers of tests/reference_conv.py."""
import numpy as np
import pytest

from minidl.layers import parallel as parallel_module

from conftest import check_against_reference, conv64, randn


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("channels", [1, 5])          # 1 channel: split over samples
def test_threaded_im2col_and_col2im_match_reference(monkeypatch, threads, channels):
    monkeypatch.setattr(parallel_module, "NUM_THREADS", threads)
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)
    layer = conv64(np, channels, 3, 3, stride=1, padding=1)
    x, dz = randn(np, 4, channels, 6, 5, seed=1), randn(np, 4, 3, 6, 5, seed=2)
    check_against_reference(layer, x, dz, (1, 1), (1, 1))
    layer = conv64(np, channels, 2, (3, 2), stride=(2, 1), padding=(1, 0))
    x = randn(np, 4, channels, 7, 6, seed=3)
    dz = randn(np, 4, 2, 4, 5, seed=4)
    check_against_reference(layer, x, dz, (2, 1), (1, 0))
