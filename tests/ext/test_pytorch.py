"""minidl.ext.pytorch: to_torch and from_torch, compared with PyTorch's own layers."""
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from minidl import Concat, Conv2D, Dense, Flatten, Layer, ReLU, Residual, Sequential, Tanh
from minidl.ext.pytorch import from_torch, to_torch
from minidl.ext.zoo import resnet_small

from interop_models import MODELS, assert_close, build, layer_kinds

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="torch is not installed: pip install torch")


def torch_output(module, x):
    import torch
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@needs_torch
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")   # torch's note
def test_torch_computes_what_minidl_computes(name):
    model, x = build(name)
    module = to_torch(model).eval()
    assert_close(torch_output(module, x), model.predict(x))


@needs_torch
@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_gives_identical_predictions(name):
    model, x = build(name)
    back = from_torch(to_torch(model))
    assert layer_kinds(back) == layer_kinds(model)
    expected = model.state_dict()
    for key, value in back.state_dict().items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    assert sorted(back.state_dict()) == sorted(expected)
    np.testing.assert_array_equal(back.predict(x), model.predict(x))


@needs_torch
def test_float64_and_the_training_mode_carry_over():
    import torch
    model, x = build("every_layer", dtype="float64")
    module = to_torch(model)
    assert module[0].weight.dtype == torch.float64 and module.training
    back = from_torch(module.eval())
    assert back[0].dtype == np.float64 and not back.training
    np.testing.assert_array_equal(back.predict(x), model.predict(x))


@needs_torch
def test_a_torch_model_written_by_hand():
    """A module minidl did not make: trained batch-norm statistics, an AdaptiveAvgPool2d
    + Flatten pair, Linear weights (out, in), activations named as torch names them."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(2, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                           nn.AvgPool2d(3, 2, padding=1), nn.Conv2d(5, 4, (2, 3), padding="same"),
                           nn.Tanh(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(4, 6),
                           nn.LeakyReLU(0.3), nn.Dropout(0.2), nn.Linear(6, 3), nn.Softmax(dim=1))
    module.train()
    for _ in range(3):                                 # moves the running statistics
        module(torch.randn(8, 2, 11, 9))
    module.eval()
    model = from_torch(module)
    assert [kind for kind, _ in layer_kinds(model)] == [
        "Conv2D", "BatchNorm2D", "ReLU", "AvgPool2D", "Conv2D", "Tanh", "GlobalAvgPool2D",
        "Dense", "LeakyReLU", "Dropout", "Dense", "Softmax"]
    x = np.random.default_rng(0).standard_normal((4, 2, 11, 9)).astype(np.float32)
    assert_close(model.predict(x), torch_output(module, x))
    assert int(model[1].num_batches_tracked) == 3


@needs_torch
def test_the_convolution_family_written_by_hand():
    """Dilation, groups, depthwise, ConvTranspose2d and the pools' modes, as a torch user
    writes them, come over with their settings and compute the same."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 6, 3, padding="same", dilation=2, groups=3),
                           nn.Conv2d(6, 6, 3, stride=2, groups=6, bias=False),
                           nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1, dilation=1, groups=2),
                           nn.Sigmoid(), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                           nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)).eval()
    model = from_torch(module)
    assert (model[0].dilation, model[0].groups, model[1].groups) == ((2, 2), 3, 6)
    assert model[2].weight.shape == (6, 2, 4, 4) and model[2].output_padding == (0, 0)
    assert model[4].ceil_mode and not model[5].count_include_pad
    x = np.random.default_rng(0).standard_normal((2, 3, 13, 11)).astype(np.float32)
    assert_close(model.predict(x), torch_output(module, x))


class Square(Layer):
    def forward(self, x, training=True):
        return x * x


@needs_torch
def test_errors_name_the_layer_or_module():
    from torch import nn
    with pytest.raises(TypeError, match=r"layer 1 \(Square\) has no PyTorch equivalent"):
        to_torch(Sequential([Dense(2, 2), Square()]))
    with pytest.raises(TypeError, match=r"layer 1\.0 \(Square\) has no PyTorch equivalent"):
        to_torch(Sequential([Dense(2, 2), Sequential([Square()])]))
    with pytest.raises(TypeError, match=r"layer 0\.activation \(Square\)"):
        to_torch(Dense(2, 2, activation=Square()))
    with pytest.raises(TypeError, match="must be a minidl Sequential or Layer, got str"):
        to_torch("model")
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got Sequential"):
        from_torch(Sequential([Dense(2, 2)]))
    with pytest.raises(TypeError, match=r"layer 0\.block\.1 \(Square\) has no PyTorch"):
        to_torch(Residual(Sequential([Dense(2, 2), Square()])))
    with pytest.raises(TypeError, match=r"layer 0\.1 \(Square\) has no PyTorch"):
        to_torch(Concat([Dense(2, 2), Square()]))
    with pytest.raises(TypeError, match=r"module 1 \(GELU\) has no minidl layer"):
        from_torch(nn.Sequential(nn.Linear(2, 2), nn.GELU()))
    with pytest.raises(TypeError, match=r"module 1\.0 \(GELU\) has no minidl layer"):
        from_torch(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.GELU())))
    residual = to_torch(Residual(Dense(2, 2), shortcut=Dense(2, 2)))
    residual[0].shortcut = nn.GELU()
    with pytest.raises(TypeError, match=r"module 0\.shortcut \(GELU\) has no minidl layer"):
        from_torch(residual)
    cases = [(nn.Conv2d(1, 2, 3, padding_mode="reflect"),
              r"module 0 \(Conv2d\): padding_mode='reflect' is not supported"),
             (nn.MaxPool2d(2, dilation=2), "dilation=2 is not supported"),
             (nn.AvgPool2d(3, divisor_override=4), "divisor_override=4 is not supported"),
             (nn.BatchNorm1d(3, track_running_stats=False), "track_running_stats=False"),
             (nn.Softmax(), "dim=None"), (nn.Flatten(0), "start_dim=0")]
    for module, message in cases:
        with pytest.raises(ValueError, match=message):
            from_torch(module)


def test_without_torch_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)       # import torch now fails
    with pytest.raises(ImportError, match="to_torch needs PyTorch: pip install torch"):
        to_torch(Dense(2, 2))
    with pytest.raises(ImportError, match="from_torch needs PyTorch"):
        from_torch(object())


@needs_torch
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime is not installed: pip install 'minidl[onnx]'")
def test_the_examples_in_interop_md_run(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parents[2] / "docs" / "interop.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "interop.md", "exec"), {})
    differences = [float(line) for line in capsys.readouterr().out.split()]
    assert len(differences) == 2 and max(differences) < 1e-4


@needs_torch
def test_nested_sequentials_stay_nested():
    model = Sequential([Dense(4, 3, activation="relu"), Sequential([Dense(3, 2), Tanh()])])
    module = to_torch(model)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    assert_close(torch_output(module, x), model.predict(x))
    back = from_torch(module)
    assert isinstance(back[1], Sequential) and layer_kinds(back[1]) == layer_kinds(model[1])
    np.testing.assert_array_equal(back.predict(x), model.predict(x))


@needs_torch
def test_blocks_keep_their_branches_and_modes():
    """An empty branch (the identity) both ways; a branch that torch needs two modules
    for (a Dense and its activation) comes back as one layer; train mode reaches every
    branch; torch's state_dict names are minidl's where each branch is one module."""
    model = Sequential([Residual(Dense(4, 4), shortcut=Sequential([])),
                        Concat([Sequential([]), Dense(4, 3, activation="relu"), ReLU()]),
                        Residual(Sequential([Dense(11, 11), Tanh()]))])
    module = to_torch(model)
    resnet = resnet_small(width=4)
    assert sorted(to_torch(resnet).state_dict()) == sorted(resnet.state_dict())
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    assert_close(torch_output(module, x), model.predict(x))
    back = from_torch(module.eval())
    assert layer_kinds(back) == layer_kinds(model) and back[1].axis == 1
    assert not back.training and not back[2].block[0].training
    np.testing.assert_array_equal(back.predict(x), model.predict(x))
    assert from_torch(module.train())[2].block[1].training


@needs_torch
def test_a_float16_model_converts_both_ways():
    import torch
    model = Sequential(Conv2D(1, 2, 3, activation="relu", dtype="float16"), Flatten(),
                       Dense(2 * 4 * 4, 3, dtype="float16"))
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float16)
    module = to_torch(model).eval()
    assert {p.dtype for p in module.parameters()} == {torch.float16}
    np.testing.assert_allclose(torch_output(module, x), model.predict(x), rtol=1e-2, atol=1e-2)
    back = from_torch(module)
    assert back[0].dtype == np.float16
    np.testing.assert_array_equal(back.predict(x), model.predict(x))


@needs_torch
def test_only_a_flatten_that_gives_n_c_makes_a_global_pool():
    import torch
    nn = torch.nn
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 5)).astype(np.float32)
    for flatten in (nn.Flatten(), nn.Flatten(1, 3)):           # (N, C, 1, 1) -> (N, C)
        module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), flatten).eval()
        model = from_torch(module)
        assert layer_kinds(model)[1] == ("GlobalAvgPool2D", "NoneType")
        assert_close(model.predict(x), torch_output(module, x))
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(start_dim=2))
    assert torch_output(module, x).shape == (2, 2, 1)      # not what GlobalAvgPool2D gives
    with pytest.raises(TypeError, match=r"module 1 \(AdaptiveAvgPool2d\) has no minidl layer; "
                                        r"AdaptiveAvgPool2d\(1\) is read when a Flatten\(\)"):
        from_torch(module)


@needs_torch
def test_meta_tensors_are_refused():
    import torch
    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(3, 2))
        norm = torch.nn.BatchNorm1d(3, affine=False)          # meta buffers only
    for module, where in ((module, r"module 1 \(Linear\)"), (norm, r"module 0 \(BatchNorm1d\)")):
        with pytest.raises(ValueError, match=f"{where}: its parameters or buffers are meta"):
            from_torch(module)


@needs_torch
def test_nesting_past_the_limit_is_refused_not_a_recursion_error():
    import torch
    from minidl.ext.convert import MAX_DEPTH
    module, model = torch.nn.Linear(2, 2), Dense(2, 2)
    for depth in range(1, 3001):
        module, model = torch.nn.Sequential(module), Sequential(model)
        if depth == MAX_DEPTH:
            x = np.ones((1, 2), np.float32)
            assert_close(from_torch(module).predict(x), torch_output(module, x))
            assert_close(torch_output(to_torch(model), x), model.predict(x))
    for convert, message in ((from_torch, "from_torch"), (to_torch, "to_torch")):
        with pytest.raises(ValueError, match=f"{message}: layers nested more than 100 levels "
                                             f"deep; minidl converts at most 100"):
            convert(module if convert is from_torch else model)
