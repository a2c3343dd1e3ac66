"""minidl.ext.onnx: exported models checked in ONNX Runtime, round trips, graphs
written elsewhere, and errors. ``minidl export``: tests/cli/test_export.py."""
import importlib.util
import sys

import numpy as np
import pytest

import minidl
from minidl import Dense, Flatten, Layer, ReLU, Sequential
from minidl.ext.pytorch import to_torch

from conftest import fails_instead_of_hanging, special_files
from interop_models import MODELS, assert_close, build, layer_kinds, needs_onnx, run_onnx


@needs_onnx
@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_runtime_matches_predict(name, tmp_path):
    model, x = build(name)
    minidl.ext.onnx.export(model, tmp_path / "m.onnx", x.shape[1:])
    assert_close(run_onnx(tmp_path / "m.onnx", x), model.predict(x))
    assert_close(run_onnx(tmp_path / "m.onnx", x[:1]), model.predict(x[:1]))  # any batch


@needs_onnx
def test_float64_model_is_exported_as_float32(tmp_path):
    import onnx
    model, x = build("every_layer", dtype="float64")
    proto = minidl.ext.onnx.export(model, tmp_path / "m.onnx", x.shape[1:])
    assert {w.data_type for w in proto.graph.initializer} == {onnx.TensorProto.FLOAT}
    assert proto.opset_import[0].version == 17
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "N" and not batch.HasField("dim_value")
    assert_close(run_onnx(tmp_path / "m.onnx", x), model.predict(x))


@needs_onnx
@pytest.mark.parametrize("name", sorted(MODELS))
def test_load_gives_back_the_same_layers_and_weights(name, tmp_path):
    model, x = build(name)
    minidl.ext.onnx.export(model, tmp_path / "m.onnx", x.shape[1:])
    loaded = minidl.ext.onnx.load(tmp_path / "m.onnx")
    assert layer_kinds(loaded) == layer_kinds(model)
    expected = model.state_dict()
    if name == "sequence":    # ONNX has no BatchNorm without gamma and beta: they come as 1, 0
        expected.update({"4.weight": np.ones(10, "float32"), "4.bias": np.zeros(10, "float32")})
    state = loaded.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        if not key.endswith("num_batches_tracked"):      # ONNX keeps no counter
            np.testing.assert_array_equal(state[key], value, err_msg=key)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


@needs_onnx
def test_load_keeps_hyper_parameters(tmp_path):
    model, x = build("every_layer")
    minidl.ext.onnx.export(model, tmp_path / "m.onnx", [np.int64(d) for d in x.shape[1:]])
    loaded = minidl.ext.onnx.load(tmp_path / "m.onnx")
    assert loaded[0].padding == "same" and loaded[0].activation.negative_slope == 0.2
    assert loaded[5].p == 0.3 and loaded[1].eps == 1e-5 and loaded[1].momentum == 0.1
    assert loaded[13].axis == 1


@needs_onnx
def test_nested_sequentials_come_back_flat(tmp_path):
    model = Sequential([Dense(4, 3, activation="relu"), Sequential([Dense(3, 2), ReLU()])])
    minidl.ext.onnx.export(model, tmp_path / "m.onnx", (4,))
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    assert_close(run_onnx(tmp_path / "m.onnx", x), model.predict(x))
    loaded = minidl.ext.onnx.load(tmp_path / "m.onnx")
    assert layer_kinds(loaded) == [("Dense", "ReLU"), ("Dense", "Identity"), ("ReLU", "NoneType")]
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


# -- errors ---------------------------------------------------------------------------
class Square(Layer):
    def __init__(self):
        super().__init__(dtype=None)

    def forward(self, x, training=True):
        return x * x


@needs_onnx
def test_a_layer_without_export_is_named(tmp_path):
    model = Sequential([Dense(4, 3), Square()])
    with pytest.raises(TypeError, match=r"layer 1 \(Square\) has no ONNX export"):
        minidl.ext.onnx.export(model, tmp_path / "m.onnx", (4,))
    nested = Sequential([Dense(4, 3), Sequential([ReLU(), Square()])])
    with pytest.raises(TypeError, match=r"layer 1\.1 \(Square\)"):
        minidl.ext.onnx.export(nested, tmp_path / "m.onnx", (4,))
    with pytest.raises(TypeError, match=r"layer 0\.activation \(Square\)"):
        minidl.ext.onnx.export(Dense(4, 3, activation=Square()), tmp_path / "m.onnx", (4,))
    assert not (tmp_path / "m.onnx").exists()


@needs_onnx
@pytest.mark.parametrize("shape, error, message", [
    ((1, 28), ValueError, r"does not accept input_shape \(1, 28\).*Conv2D: expected a 4-D"),
    ((1, 1, 28, 28), ValueError, "without the batch"),
    ((0, 28, 28), ValueError, "must be positive"),
    ("1,28,28", TypeError, "tuple of ints"),
    ((1, 28.0, 28), TypeError, "tuple of ints"),
    ((), TypeError, "tuple of ints"),
])
def test_bad_input_shape(shape, error, message, tmp_path):
    with pytest.raises(error, match=message):
        minidl.ext.onnx.export(minidl.ext.zoo.lenet5(), tmp_path / "m.onnx", shape)


@needs_onnx
def test_export_needs_a_model(tmp_path):
    with pytest.raises(TypeError, match="must be a minidl Sequential or Layer, got list"):
        minidl.ext.onnx.export([Dense(2, 2)], tmp_path / "m.onnx", (2,))


@needs_onnx
def test_load_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        minidl.ext.onnx.load(tmp_path / "none.onnx")
    (tmp_path / "text.onnx").write_text("not a model at all")
    with pytest.raises(ValueError, match="is not a valid ONNX model"):
        minidl.ext.onnx.load(tmp_path / "text.onnx")
    minidl.ext.onnx.export(minidl.ext.zoo.lenet5(), tmp_path / "m.onnx", (1, 28, 28))
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="is not a valid ONNX model"):
        minidl.ext.onnx.load(tmp_path / "cut.onnx")


def save_graph(path, nodes, weights=(), shape=(1, 8, 8), opset=17, output_rank=4):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT,
                                       ["N", "C", "H", "W"][:output_rank])],
        [numpy_helper.from_array(np.asarray(w, dtype=np.int64 if name == "axes" else np.float32),
                                 name) for name, w in weights])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]),
                    str(path))
    return path


@needs_onnx
def test_load_names_what_minidl_cannot_express(tmp_path):
    from onnx.helper import make_node
    cases = [
        ([make_node("Erf", ["input"], ["y"], name="e")], [],
         r"node 'e' \(Erf\): minidl has no layer"),
        ([make_node("Add", ["input", "b"], ["y"], name="plus")], [("b", np.ones(8))],
         r"node 'plus' \(Add\): minidl has no layer for this op"),       # a bias, not a branch
        ([make_node("Relu", ["input"], ["a"]), make_node("Relu", ["input"], ["y"])], [],
         r"node 'Relu' \(Relu\): its output is not on the way from the input"),
        ([make_node("Relu", ["w"], ["y"])], [("w", np.ones((1, 1, 8, 8)))],
         "tensor 'y' is not computed from 'input'"),
        ([make_node("Relu", ["w"], ["a"]), make_node("Add", ["input", "a"], ["y"])],
         [("w", np.ones((1, 1, 8, 8)))], "tensor 'y' is not computed from 'input'"),
        ([make_node("Relu", ["input"], ["a"]), make_node("Sigmoid", ["input"], ["b"]),
          make_node("Add", ["a", "b"], ["c"]), make_node("Add", ["c", "a"], ["y"])], [],
         r"node 'Relu' \(Relu\): it is in two branches that do not split at one tensor"),
        ([make_node("Conv", ["input", "w"], ["a"]), make_node("Add", ["a", "input"], ["y"])],
         [("w", np.ones((2, 1, 1, 1)))],
         r"\(Add\): Residual: .* the block gives \(1, 2, 8, 8\) but the input"),
        ([make_node("Relu", ["input"], ["a"]), make_node("Concat", ["a", "input"], ["y"], axis=0)],
         [], r"\(Concat\): Concat: axis must be a non-zero int"),
        ([make_node("MaxPool", ["input"], ["y"], kernel_shape=[3, 3], pads=[0, 0, 1, 1])], [],
         r"uneven pads \[0, 0, 1, 1\]"),
        ([make_node("MaxPool", ["input"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])], [],
         r"dilations=\[2, 2\] is not supported"),
        ([make_node("ConvTranspose", ["input", "w"], ["y"], output_shape=[9, 9])],
         [("w", np.ones((1, 2, 2, 2)))], r"output_shape=\[9, 9\] is not supported"),
        ([make_node("ConvTranspose", ["input", "w"], ["y"], pads=[1, 1, 0, 0])],
         [("w", np.ones((1, 2, 3, 3)))], "ConvTranspose2D crops both sides alike"),
        ([make_node("Conv", ["input", "w"], ["y"], group=3)], [("w", np.ones((4, 1, 3, 3)))],
         r"Conv2D: in_channels \(3\) and out_channels \(4\) must be divisible by groups"),
        ([make_node("Conv", ["input", "w"], ["y"], strides=[2, 2], pads=[0, 0, 1, 1])],
         [("w", np.ones((2, 1, 2, 2)))], "pads both sides alike, or as 'same' at stride 1"),
        ([make_node("Flatten", ["input"], ["a"]), make_node("Gemm", ["a", "w"], ["y"])],
         [("w", np.ones((65, 2)))], r"Dense: expected input of shape \(N, 65\)"),
    ]
    for i, (nodes, weights, message) in enumerate(cases):
        path = save_graph(tmp_path / f"{i}.onnx", nodes, weights)
        with pytest.raises(ValueError, match=message):
            minidl.ext.onnx.load(path)
    old = save_graph(tmp_path / "old.onnx", [make_node("Relu", ["input"], ["y"])], opset=11)
    with pytest.raises(ValueError, match="uses opset 11; minidl reads opset 13 or newer"):
        minidl.ext.onnx.load(old)


@needs_onnx
def test_load_reads_graphs_written_elsewhere(tmp_path):
    """Gemm with transB and alpha (as torch writes Linear), an unnamed activation after a
    Conv (a layer of its own), a ReduceMean with axes as an input (opset 18)."""
    from onnx.helper import make_node
    rng = np.random.default_rng(0)
    w, wl, bl = rng.normal(size=(3, 1, 3, 3)), rng.normal(size=(5, 3)), rng.normal(size=5)
    nodes = [make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             make_node("Relu", ["c"], ["r"]),
             make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=0),
             make_node("Gemm", ["m", "wl", "bl"], ["y"], transB=1, alpha=2.0)]
    path = save_graph(tmp_path / "g.onnx", nodes, [("w", w), ("axes", [2, 3]), ("wl", wl),
                                                   ("bl", bl)], opset=18, output_rank=2)
    model = minidl.ext.onnx.load(path)
    assert layer_kinds(model) == [("Conv2D", "Identity"), ("ReLU", "NoneType"),
                                  ("GlobalAvgPool2D", "NoneType"), ("Dense", "Identity")]
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    assert_close(model.predict(x), run_onnx(path, x))


@needs_onnx
def test_load_reads_branches_in_any_order(tmp_path):
    """An identity branch is the split tensor itself: the Residual's shortcut whichever
    input of the Add it is, an Identity layer in a Concat. Nodes in any topological
    order; names that follow no rule."""
    from onnx.helper import make_node
    nodes = [make_node("Tanh", ["input"], ["t"]), make_node("Relu", ["input"], ["r"]),
             make_node("Add", ["input", "r"], ["a"]), make_node("Sigmoid", ["t"], ["s"]),
             make_node("Concat", ["a", "input", "s"], ["y"], axis=1)]
    path = save_graph(tmp_path / "g.onnx", nodes, shape=(2, 3, 3))
    model = minidl.ext.onnx.load(path)
    assert layer_kinds(model) == [("Concat", [("Residual", [("ReLU", "NoneType")]),
                                              ("Identity", "NoneType"),
                                              [("Tanh", "NoneType"), ("Sigmoid", "NoneType")]])]
    assert model[0].branches[0].shortcut is None
    x = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
    assert_close(model.predict(x), run_onnx(path, x))


@needs_onnx
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")      # the TorchScript exporter
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")   # torch's note
@pytest.mark.slow                                               # importing torch.onnx
def test_load_reads_what_torch_onnx_export_writes(tmp_path):
    import torch
    from torch import nn
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.AvgPool2d(3, 2, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    # branches as torch writes them: "/1/Add", the batch norm folded into the Conv
    blocks, _ = build("branches")
    with_branches = to_torch(Sequential(blocks.layers[:3]
                                        + [Flatten(), Dense(28 * 12 * 10, 3)])).eval()
    # the convolution family: (2, 9, 10) -> (4, 9, 10) -> (2, 18, 20) -> (2, 9, 10) -> (2, 5, 6)
    family = nn.Sequential(nn.Conv2d(2, 4, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
                           nn.Conv2d(4, 4, 3, padding=1, groups=4),
                           nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1),
                           nn.MaxPool2d(3, 2, ceil_mode=True),
                           nn.AvgPool2d(2, 2, 1, ceil_mode=True, count_include_pad=False),
                           nn.Flatten(), nn.Linear(2 * 5 * 6, 3)).eval()
    shapes = [(1, 8, 8), (3, 12, 10), (2, 9, 10)]
    for i, module in enumerate([module, with_branches, family]):
        x = np.random.default_rng(0).standard_normal((3,) + shapes[i])
        path = str(tmp_path / f"{i}.onnx")
        torch.onnx.export(module, (torch.randn(2, *x.shape[1:]),), path, dynamo=False,
                          opset_version=17, input_names=["input"],
                          dynamic_axes={"input": {0: "N"}})
        model = minidl.ext.onnx.load(path)
        with torch.no_grad():
            assert_close(model.predict(x), module(torch.from_numpy(x.astype(np.float32))).numpy())


def test_export_without_onnx_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)       # import onnx now fails
    for call in (lambda: minidl.ext.onnx.export(Dense(2, 2), tmp_path / "m.onnx", (2,)),
                 lambda: minidl.ext.onnx.load(tmp_path / "m.onnx")):
        with pytest.raises(ImportError, match=r"needs the onnx package: pip install "
                                              r"'minidl\[onnx\]'"):
            call()


# -- untrusted graphs: bounded work, clear refusals naming the node -----------------------
@needs_onnx
def test_a_long_graph_of_residual_blocks_loads_in_time_linear_in_its_nodes(tmp_path):
    """62,000 nodes: 2,000 blocks of 30 activations, each joined to its input by an Add.
    Finding each Add's split by walking back to the graph input, as minidl did, visits
    2,000 x 31,000 tensors on average (minutes, and a RecursionError first); a walk
    that stops at the split visits each tensor once."""
    import onnx
    from onnx import TensorProto, helper
    nodes, x = [], "input"
    for b in range(2000):
        t = x
        for i in range(30):
            nodes.append(onnx.NodeProto(op_type=("Tanh", "Relu")[i % 2], input=[t],
                                        output=[f"{b}.{i}"], name=f"{b}.{i}"))
            t = f"{b}.{i}"
        nodes.append(onnx.NodeProto(op_type="Add", input=[t, x], output=[str(b)], name=str(b)))
        x = str(b)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["N", 4])], [helper.make_tensor_value_info(
            x, TensorProto.FLOAT, ["N", 4])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                    tmp_path / "long.onnx")
    model = minidl.ext.onnx.load(tmp_path / "long.onnx")
    assert len(model) == 2000 and len(model[-1].block) == 30 and model[-1].shortcut is None
    x = expected = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    for _ in range(2000):
        y = expected
        for i in range(30):
            y = np.maximum(y, 0) if i % 2 else np.tanh(y)
        expected = y + expected
    assert_close(model.predict(x), expected)


def _nested_joins(path, depth):
    """y_k = Add(y_(k-1), input), y_0 = Relu(input): Residuals nested ``depth`` deep."""
    from onnx.helper import make_node
    nodes = [make_node("Relu", ["input"], ["y0"])]
    nodes += [make_node("Add", [f"y{k - 1}", "input"], [f"y{k}"], name=f"add{k}")
              for k in range(1, depth + 1)]
    return save_graph(path, nodes, shape=(4,), output_rank=2)


@needs_onnx
def test_joins_nested_past_the_limit_are_refused_not_a_recursion_error(tmp_path):
    from minidl.ext.convert import MAX_DEPTH
    deepest = minidl.ext.onnx.load(_nested_joins(tmp_path / "100.onnx", MAX_DEPTH))
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(deepest.predict(x), x * (MAX_DEPTH + 1))
    for depth in (MAX_DEPTH + 1, 400):
        with pytest.raises(ValueError, match=rf"node 'add{depth - MAX_DEPTH}' \(Add\): joins "
                                             rf"nested more than 100 deep; minidl reads at "
                                             rf"most 100"):
            minidl.ext.onnx.load(_nested_joins(tmp_path / f"{depth}.onnx", depth))
    model = Dense(4, 4)
    for _ in range(3000):
        model = Sequential(model)
    with pytest.raises(ValueError, match="export: layers nested more than 100 levels deep"):
        minidl.ext.onnx.export(model, tmp_path / "deep.onnx", (4,))


@needs_onnx
def test_load_refuses_settings_that_contradict_or_cannot_be_computed(tmp_path):
    from onnx.helper import make_node
    gemm = [make_node("Flatten", ["input"], ["a"]), make_node("Gemm", ["a", "w"], ["y"],
                                                               alpha=float("nan"))]
    cases = [
        ([make_node("Conv", ["input", "w"], ["y"], kernel_shape=[3, 3], name="c")],
         [("w", np.ones((2, 1, 1, 1)))], {}, r"node 'c' \(Conv\): a weight of shape "
                                             r"\(2, 1, 1, 1\) and kernel_shape \[3, 3\]"),
        ([make_node("Conv", ["input", "w"], ["y"])], [("w", np.ones((2, 1)))], {},
         r"node 'Conv' \(Conv\): a weight of shape \(2, 1\)"),
        (gemm, [("w", np.ones((64, 2)))], {"output_rank": 2},
         r"node 'Gemm' \(Gemm\): Gemm: alpha must be a finite number, got nan"),
        ([make_node("Relu", ["input"], ["y"])], [], {"shape": (1, -8, 8)},
         r"fixed positive sizes after it, got \[None, 1, -8, 8\]"),
        ([make_node("Softmax", ["input"], ["y"], axis=7, name="s")], [], {},
         r"node 's' \(Softmax\): axis 7 is out of range for a 4-D input"),
    ]
    for i, (nodes, weights, options, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            minidl.ext.onnx.load(save_graph(tmp_path / f"{i}.onnx", nodes, weights, **options))


@needs_onnx
@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/zero are POSIX")
def test_load_refuses_a_fifo_or_a_device(tmp_path):
    for path in special_files(tmp_path, "model.onnx"):
        with fails_instead_of_hanging(), pytest.raises(ValueError, match="not a regular file"):
            minidl.ext.onnx.load(path)


@needs_onnx
def test_export_replaces_a_file_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
    import errno
    import onnx
    model, x = build("lenet5")
    path = tmp_path / "m.onnx"
    minidl.ext.onnx.export(model, path, x.shape[1:])
    before = path.read_bytes()

    def full_disk(proto, f, *args, **kwargs):
        f.write(proto.SerializeToString()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(onnx, "save_model", full_disk)
    with pytest.raises(OSError, match="No space left"):
        minidl.ext.onnx.export(Sequential(Flatten(), Dense(784, 3)), path, x.shape[1:])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
