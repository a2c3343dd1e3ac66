"""ONNX export of a minidl model, and loading such a graph back (docs/interop.md).

    minidl.ext.onnx.export(model, "model.onnx", input_shape=(1, 28, 28))
    model = minidl.ext.onnx.load("model.onnx")

The graph has one input "input" of shape (N, *input_shape), N symbolic, and one output
"output", opset 17, and float32 weights and values throughout (a float64 model is
rounded); ``metadata`` (a checkpoint's: preprocessing, class names) goes into the
model's metadata_props, each value as JSON text. Each layer maps to one op:

    Conv2D -> Conv              pads [top, left, bottom, right]: "same" may be uneven;
                                dilations, group
    ConvTranspose2D -> ConvTranspose   weight (C_in, C_out/G, k1, k2) in both; pads,
                                output_padding, dilations, group
    Dense -> Gemm               y = x @ W + b with W stored (in, out), so transB = 0
    MaxPool2D -> MaxPool        padding never wins a max, in both; ceil_mode
    AvgPool2D -> AveragePool    ceil_mode, count_include_pad (ONNX's default is 0)
    GlobalAvgPool2D -> ReduceMean over axes (2, 3), keepdims = 0: (N, C) as minidl
    Flatten -> Flatten (axis 1)   BatchNorm1D/2D -> BatchNormalization (running stats)
    Dropout -> Dropout (identity at inference)   activations -> Relu, LeakyRelu, ...
    Residual -> its branches from one input, joined by Add     Concat -> ..., by Concat
    the activation of Conv2D or Dense "3" -> a node of its own, "3.activation"

How nodes and initializers are named, and how ``load`` reads a graph: docs/interop.md.
Each layer class's ``OnnxConverter`` is kept in the layer registry (the calls to
``register`` at the end): export looks a layer's class up there, load a node's op.
"""
import json
import os

from .. import backend
from ..checks import check_padding, check_real, is_int
from ..layers import (AvgPool2D, BatchNorm1D, BatchNorm2D, Concat, Conv2D, ConvTranspose2D,
                      Dense, Dropout, Flatten, GlobalAvgPool2D, Identity, LeakyReLU, MaxPool2D,
                      ReLU, Residual, Sigmoid, Softmax, Tanh)
from ..layers.registry import converters, register_converter
from ..model import Sequential
from ..serialization import atomic_write, open_regular
from .convert import MAX_DEPTH, add_layer, as_sequential, require

OPSET = 17
IR_VERSION = 8          # the IR version that came with opset 17: readable by older runtimes
_INSTALL = "the onnx package: pip install 'minidl[onnx]' (onnx, onnxruntime)"


def export(model, path, input_shape, metadata=None):
    """Write ``model`` (a Sequential or a single Layer) to ``path`` as an ONNX model.

    ``input_shape`` is one sample's shape, without the batch: (C, H, W) or (features,);
    ``metadata``: a dict of JSON values, stored as the model's metadata_props.
    Raises ImportError without the ``onnx`` package, TypeError for a layer that has no
    ONNX equivalent (naming it) or a bad ``input_shape``, ValueError when the model
    does not accept ``input_shape``. Returns the ``onnx.ModelProto`` it wrote."""
    onnx = require("onnx", "minidl.ext.onnx.export", _INSTALL)
    path = os.fspath(path)
    model = as_sequential(model, "minidl.ext.onnx.export")
    input_shape, output_shape = _checked_shapes(model, input_shape)
    graph = _Graph(onnx)
    y = _export_layer(graph, model, "input", "")
    if y == "input":                      # an empty model: the graph still needs a node
        y = graph.node("Identity", ["input"], "output")
    last = graph.nodes[-1]                # its tensor is the graph's output: name it so
    last.output[list(last.output).index(y)] = y = "output"
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(graph.nodes, "minidl", [_tensor_info(onnx, "input", input_shape)],
                               [_tensor_info(onnx, y, output_shape[1:])], graph.weights),
        opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="minidl")
    proto.ir_version = IR_VERSION
    onnx.helper.set_model_props(proto, {key: json.dumps(value)
                                        for key, value in (metadata or {}).items()})
    onnx.checker.check_model(proto, full_check=True)     # shapes inferred and checked too
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a full disk keeps the old file
        onnx.save_model(proto, f)
    return proto


def _checked_shapes(model, input_shape):
    """``input_shape`` as a tuple of positive ints that the model accepts, and the
    model's output shape for one sample."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(is_int(d) for d in shape):
        raise TypeError(f"minidl.ext.onnx.export: input_shape must be a tuple of ints (one "
                        f"sample's shape, without the batch), got {input_shape!r}")
    shape = tuple(int(d) for d in shape)
    if min(shape) < 1:
        raise ValueError(f"minidl.ext.onnx.export: input_shape must be positive, got {shape}")
    try:
        return shape, model.output_shape((1,) + shape)
    except ValueError as exc:
        raise ValueError(f"minidl.ext.onnx.export: the model does not accept input_shape "
                         f"{shape} (one sample, without the batch): {exc}") from None


def _tensor_info(onnx, name, shape):
    """A float32 tensor of shape (N, *shape), N the symbolic batch."""
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", *shape])


class _Graph:
    """The nodes and weights of the graph being built. A node's output tensor has the
    node's name, so names are unique as long as layer names are."""

    def __init__(self, onnx):
        self.onnx, self.nodes, self.weights = onnx, [], []

    def node(self, op, inputs, name, **attributes):
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [name], name=name,
                                                     **attributes))
        return name

    def weight(self, name, array):
        """An initializer from a number or a numpy or cupy array, as float32."""
        value = backend.to_numpy(array).astype("float32")
        self.weights.append(self.onnx.numpy_helper.from_array(value, name))
        return name


class OnnxConverter:
    """How one layer class maps to ONNX: ``export(graph, layer, x, name)`` adds its nodes
    and returns its output's name; ``load(attributes, weights, input_shape)`` builds the
    layer back from a node of one of ``ops`` (for a ``join``, such as Residual's Add,
    ``weights`` is the list of branches, each the list of layers from the split to one
    input of the joining node). A class that only exports leaves ``ops`` empty."""

    def __init__(self, export, ops=(), load=None, join=False):
        self.export, self.ops, self.load, self.join = export, tuple(ops), load, join


def register(cls, export, ops=(), load=None, join=False):
    """Make the registered layer class ``cls`` exportable (and loadable from ``ops``)."""
    register_converter("onnx", cls, OnnxConverter(export, ops, load, join))


# -- export: one function per layer type: (graph, layer, input name, layer name) -> output
def _export_layer(graph, layer, x, name):
    found = converters("onnx").get(type(layer))
    if found is None:
        exportable = sorted(cls.__name__ for cls in converters("onnx"))
        raise TypeError(f"minidl.ext.onnx.export: layer {name} ({type(layer).__name__}) has no "
                        f"ONNX export; exportable: {exportable}")
    return found.export(graph, layer, x, name)


def _export_sequential(graph, model, x, name):
    for i, layer in enumerate(model.layers):
        x = _export_layer(graph, layer, x, f"{name}.{i}" if name else str(i))
    return x


def _export_conv(graph, layer, x, name):
    """A Conv or, with ``output_padding``, a ConvTranspose node: the same attributes."""
    (top, bottom), (left, right) = layer.pads
    transposed = {"output_padding": list(layer.output_padding)} if layer.transposed else {}
    return _export_weighted(graph, layer, x, name, "ConvTranspose" if transposed else "Conv",
                            kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                            pads=[top, left, bottom, right], dilations=list(layer.dilation),
                            group=layer.groups, **transposed)


def _export_dense(graph, layer, x, name):
    return _export_weighted(graph, layer, x, name, "Gemm")


def _export_weighted(graph, layer, x, name, op, **attributes):
    """The layer's ``op`` node on its weight and bias, then its activation's node."""
    inputs = [x, graph.weight(f"{name}.weight", layer.weight.data)]
    if layer.bias is not None:
        inputs.append(graph.weight(f"{name}.bias", layer.bias.data))
    z = graph.node(op, inputs, name, **attributes)
    if type(layer.activation) is Identity:
        return z
    return _export_layer(graph, layer.activation, z, f"{name}.activation")


def _export_pool(op):
    """The exporter of a MaxPool2D or AvgPool2D: a node with its window, padded evenly."""
    def export(graph, layer, x, name):
        p1, p2 = layer.padding
        average = {"count_include_pad": int(layer.count_include_pad)} if op == "AveragePool" \
            else {}
        return graph.node(op, [x], name, kernel_shape=list(layer.kernel_size),
                          strides=list(layer.stride), pads=[p1, p2, p1, p2],
                          ceil_mode=int(layer.ceil_mode), **average)
    return export


def _export_batch_norm(graph, layer, x, name):
    cpu, c = backend.get_module("cpu"), layer.num_features
    gamma = layer.weight.data if layer.affine else cpu.ones(c)       # y = x_hat without
    beta = layer.bias.data if layer.affine else cpu.zeros(c)         # affine parameters
    arrays = {"weight": gamma, "bias": beta, "running_mean": layer.running_mean,
              "running_var": layer.running_var}
    attributes = {"epsilon": layer.eps}
    if layer.momentum is not None:       # ONNX's momentum is the share of the old value
        attributes["momentum"] = 1.0 - layer.momentum
    inputs = [graph.weight(f"{name}.{key}", value) for key, value in arrays.items()]
    return graph.node("BatchNormalization", [x] + inputs, name, **attributes)


def _export_dropout(graph, layer, x, name):
    return graph.node("Dropout", [x, graph.weight(f"{name}.ratio", layer.p)], name)


def _export_leaky_relu(graph, layer, x, name):
    return graph.node("LeakyRelu", [x], name, alpha=layer.negative_slope)


def _export_softmax(graph, layer, x, name):
    return graph.node("Softmax", [x], name, axis=layer.axis)


def _export_residual(graph, layer, x, name):
    """y = block(x) + shortcut(x): both branches read ``x``; an Add joins them."""
    y = _export_layer(graph, layer.block, x, f"{name}.block")
    s = x if layer.shortcut is None else _export_layer(graph, layer.shortcut, x,
                                                       f"{name}.shortcut")
    return graph.node("Add", [y, s], name)


def _export_concat(graph, layer, x, name):
    """Every branch reads ``x``; a Concat joins them along the layer's axis."""
    ys = [_export_layer(graph, branch, x, f"{name}.{i}")
          for i, branch in enumerate(layer.branches)]
    return graph.node("Concat", ys, name, axis=layer.axis)


def _export_op(op, **attributes):
    """The exporter of a layer that is one node with fixed attributes."""
    return lambda graph, layer, x, name: graph.node(op, [x], name, **attributes)


# -- load ---------------------------------------------------------------------------
def load(path):
    """A Sequential (float32) computing the ONNX graph in ``path``, opset 13 or newer
    (what it reads: docs/interop.md). Raises ImportError without ``onnx``,
    FileNotFoundError, ValueError for a file that is not a valid ONNX model or holds a
    graph minidl cannot express (naming the node and the reason)."""
    onnx = require("onnx", "minidl.ext.onnx.load", _INSTALL)
    path = os.fspath(path)
    graph = _Reader(onnx, _read_model(onnx, path).graph, path)
    layers, _ = graph.layers(graph.input, graph.output, graph.input_shape)
    graph.check_all_loaded()
    return Sequential(layers)


def _read_model(onnx, path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"minidl.ext.onnx.load: {path!r} does not exist")
    from google.protobuf.message import DecodeError
    try:
        with open_regular(path) as f:          # ValueError for a FIFO or a device
            proto = onnx.load_model_from_string(f.read())   # and no external data
        onnx.checker.check_model(proto)
    except (DecodeError, onnx.checker.ValidationError, ValueError) as exc:
        raise ValueError(f"minidl.ext.onnx.load: {path!r} is not a valid ONNX model "
                         f"({type(exc).__name__}: {exc})") from None
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    if opset < 13:
        raise ValueError(f"minidl.ext.onnx.load: {path!r} uses opset {opset}; minidl reads "
                         f"opset 13 or newer (Softmax and Dropout changed in 13)")
    return proto


def _input_shape(value_info, path):
    """(1, d1, d2, ...) from the graph input: a symbolic batch, fixed other sizes."""
    dims = value_info.type.tensor_type.shape.dim
    sizes = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(sizes) < 2 or None in sizes[1:] or min(sizes[1:]) < 1:
        raise ValueError(f"minidl.ext.onnx.load: {path!r}: the input needs a batch axis and "
                         f"fixed positive sizes after it, got {sizes} (None: symbolic)")
    return (1, *sizes[1:])


class _Reader:
    """An ONNX graph read as minidl layers, backwards from the output: each tensor has
    one source (its node's data input or, for a join, the tensor where its branches
    split), so layers are chains of sources and a join's branches are the chains from
    its split to its inputs (docs/interop.md)."""

    def __init__(self, onnx, graph, path):
        self.onnx, self.path = onnx, path
        self.weights = {w.name: _weight(onnx, w, path) for w in graph.initializer}
        inputs = [v for v in graph.input if v.name not in self.weights]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ValueError(f"minidl.ext.onnx.load: {path!r} has {len(inputs)} inputs and "
                             f"{len(graph.output)} outputs; minidl models have one of each")
        self.input, self.input_shape = inputs[0].name, _input_shape(inputs[0], path)
        self.output = graph.output[0].name
        self.nodes = list(graph.node)
        self.producer = {t: node for node in self.nodes for t in node.output if t}
        self.loaded = set()
        # op -> the registered converter that loads it: joins (branches), other nodes
        found = {op: c for c in converters("onnx").values() if c.load for op in c.ops}
        self.joins = {op: c for op, c in found.items() if c.join}
        self.loaders = {op: c for op, c in found.items() if not c.join}
        for node in self.nodes:      # torch.onnx.export shares equal weights: Identity(w)
            if node.op_type == "Identity" and node.input and node.input[0] in self.weights:
                self.weights[node.output[0]] = self.weights[node.input[0]]
                self.loaded.add(id(node))
        # Every tensor's source, and its depth (steps up its sources to a root), in the
        # graph's (topological) order. A join's split is a climb from its inputs; in a
        # nesting of chains and joins no tensor is climbed twice: the walk is linear.
        self.sources, self.depth, self.steps = {}, {}, len(self.producer)
        for node in self.nodes:
            inputs = self.data_inputs(node)
            source = self.split(node, inputs) if self.is_join(node) else \
                (inputs[0] if inputs else None)
            for t in node.output:
                self.sources[t] = source
                self.depth[t] = 0 if source is None else self.depth.get(source, 0) + 1

    def where(self, node):
        name = node.name or node.op_type
        return f"minidl.ext.onnx.load: {self.path!r}, node {name!r} ({node.op_type})"

    def data_inputs(self, node):
        return [t for t in node.input if t and t not in self.weights]

    def is_join(self, node):
        return (node.op_type in self.joins and node.domain in ("", "ai.onnx")
                and len(self.data_inputs(node)) > 1)

    def split(self, node, inputs):
        """The nearest tensor on every input's chain of sources: where the branches of the
        join ``node`` split (None when they come from different inputs or weights)."""
        split = inputs[0]
        for t in inputs[1:]:
            while split != t and split is not None and t is not None:
                self.steps -= 1
                if self.steps < 0:
                    raise ValueError(f"{self.where(node)}: its branches share nodes with "
                                     f"another join's; minidl reads nestings of chains and "
                                     f"joins")
                if self.depth.get(split, 0) >= self.depth.get(t, 0):
                    split = self.sources.get(split)
                else:
                    t = self.sources.get(t)
            split = split if split == t else None
        return split

    def layers(self, start, end, shape, depth=0):
        """The layers computing tensor ``end`` from tensor ``start`` of ``shape``, and
        the shape of ``end``; ``depth``: how many joins they are nested in."""
        chain = [end]
        while chain[-1] != start:
            chain.append(self.sources.get(chain[-1]))
            if chain[-1] is None:
                raise ValueError(f"minidl.ext.onnx.load: {self.path!r}: tensor {end!r} is not "
                                 f"computed from {start!r}; minidl reads one input, chains of "
                                 f"nodes and branches that join at an Add or a Concat")
        layers, previous = [], None
        for t in reversed(chain[:-1]):
            node = self.producer[t]
            layer, shape = self.layer(node, self.sources[t], shape, depth)
            add_layer(layers, layer,
                       previous is not None and node.name == f"{previous.name}.activation")
            previous = node
        return layers, shape

    def layer(self, node, source, shape, depth):
        """The layer of one node that reads ``source`` of ``shape``, and its output shape.
        A join's loader takes the layers of each branch where a node's takes its weights."""
        where = self.where(node)
        if id(node) in self.loaded:
            raise ValueError(f"{where}: it is in two branches that do not split at one tensor; "
                             f"minidl's Residual and Concat split at one and join at one")
        self.loaded.add(id(node))
        if self.is_join(node):
            if depth >= MAX_DEPTH:
                raise ValueError(f"{where}: joins nested more than {MAX_DEPTH} deep; minidl "
                                 f"reads at most {MAX_DEPTH}")
            loader = self.joins[node.op_type].load
            inputs = [self.layers(source, t, shape, depth + 1)[0] for t in node.input if t]
        else:
            loader, inputs = self.loader_and_weights(node, source, where)
        try:
            attributes = {a.name: _attribute(self.onnx, a) for a in node.attribute}
            layer = loader(attributes, inputs, shape)
            return layer, layer.output_shape(shape)
        except (TypeError, ValueError, LookupError) as exc:     # a missing attribute: KeyError
            raise ValueError(f"{where}: {exc!r}" if isinstance(exc, LookupError)
                             else f"{where}: {exc}") from None

    def loader_and_weights(self, node, source, where):
        """The loader of a node that reads ``source`` as its first input, and the other
        inputs, which must be weights."""
        found = self.loaders.get(node.op_type)
        if found is None or node.domain not in ("", "ai.onnx"):
            raise ValueError(f"{where}: minidl has no layer for this op; it reads "
                             f"{sorted(self.loaders) + sorted(self.joins)}")
        extra = [t for t in node.input[1:] if t]
        missing = [t for t in extra if t not in self.weights]
        if node.input[0] != source or missing or len([t for t in node.output if t]) != 1:
            raise ValueError(f"{where}: needs the data as its first input, every other "
                             f"input a weight (not {missing}) and exactly one output")
        return found.load, [self.weights[t] for t in extra]

    def check_all_loaded(self):
        for node in self.nodes:
            if id(node) not in self.loaded:
                raise ValueError(f"{self.where(node)}: its output is not on the way from "
                                 f"the input to the graph output; minidl reads graphs whose "
                                 f"every node is")


def _weight(onnx, tensor, path):
    """An initializer as a numpy array; ValueError naming it when it is not one."""
    where = f"minidl.ext.onnx.load: {path!r}, initializer {tensor.name!r}"
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise ValueError(f"{where} keeps its data in another file; minidl reads models "
                         f"held in one file")
    try:
        return onnx.numpy_helper.to_array(tensor)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _attribute(onnx, a):
    value = onnx.helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode()
    return list(value) if isinstance(value, (list, tuple)) else value


def _expect(attributes, **supported):
    """ValueError unless each attribute is absent or has the value minidl supports."""
    for key, value in supported.items():
        if attributes.get(key, value) != value:
            raise ValueError(f"{key}={attributes[key]!r} is not supported (only {value!r})")


def _decimal(value):
    """A float32 attribute with 6 significant digits: 0.1 is stored as 0.10000000149."""
    return float(f"{value:.6g}")


def _window_arguments(attributes):
    """(kernel, stride, padding, ceil_mode) of a pooling node with even padding."""
    _expect(attributes, auto_pad="NOTSET", dilations=[1, 1], storage_order=0)
    kernel = tuple(attributes["kernel_shape"])
    top, left, bottom, right = attributes.get("pads", [0, 0, 0, 0])
    if (top, left) != (bottom, right):
        raise ValueError(f"uneven pads {[top, left, bottom, right]}: minidl pools pad "
                         f"both sides alike")
    return (kernel, tuple(attributes.get("strides", [1, 1])), (top, left),
            bool(attributes.get("ceil_mode", 0)))


def _load_conv(attributes, weights, shape):
    f, c, k1, k2 = _conv_weight_shape(attributes, weights, "(F, C/group, k1, k2)")
    stride, dilation, groups = _conv_geometry(attributes)
    span = tuple(d * (k - 1) + 1 for d, k in zip(dilation, (k1, k2)))
    layer = Conv2D(c * groups, f, (k1, k2), stride, _conv_padding(attributes, span, stride),
                   dilation, groups, bias=len(weights) > 1)
    layer.load_state_dict(dict(zip(("weight", "bias"), weights)))
    return layer


def _conv_weight_shape(attributes, weights, expected):
    """The shape of a Conv or ConvTranspose node's 4-D weight, whose kernel is kernel_shape."""
    w = weights[0]
    if w.ndim != 4 or list(attributes.get("kernel_shape", w.shape[2:])) != list(w.shape[2:]):
        raise ValueError(f"a weight of shape {w.shape} and kernel_shape "
                         f"{attributes.get('kernel_shape')}: expected a weight {expected} "
                         f"and kernel_shape [k1, k2]")
    return w.shape


def _conv_geometry(attributes):
    """(strides, dilations, group) of a Conv or ConvTranspose node."""
    return (tuple(attributes.get("strides", [1, 1])), tuple(attributes.get("dilations", [1, 1])),
            attributes.get("group", 1))


def _load_conv_transpose(attributes, weights, shape):
    _expect(attributes, auto_pad="NOTSET", output_shape=None)
    c, f, k1, k2 = _conv_weight_shape(attributes, weights, "(C, F/group, k1, k2)")
    stride, dilation, groups = _conv_geometry(attributes)
    top, left, bottom, right = attributes.get("pads", [0, 0, 0, 0])
    if (top, left) != (bottom, right):
        raise ValueError(f"uneven pads {[top, left, bottom, right]}: minidl's ConvTranspose2D "
                         f"crops both sides alike")
    layer = ConvTranspose2D(c, f * groups, (k1, k2), stride, (top, left),
                            tuple(attributes.get("output_padding", [0, 0])), dilation, groups,
                            bias=len(weights) > 1)
    layer.load_state_dict(dict(zip(("weight", "bias"), weights)))
    return layer


def _conv_padding(attributes, kernel, stride):
    """Conv2D's padding: the pads of both sides when they are alike, else "same" (at
    stride 1, the extra row and column at the bottom and right: ONNX's auto_pad
    SAME_UPPER, which torch writes for padding="same")."""
    if attributes.get("auto_pad") == "SAME_UPPER" and stride == (1, 1):
        return "same"
    _expect(attributes, auto_pad="NOTSET")
    top, left, bottom, right = attributes.get("pads", [0, 0, 0, 0])
    if (top, left) == (bottom, right):
        return top, left
    if stride == (1, 1) and check_padding("same", kernel, stride, "") == ((top, bottom),
                                                                         (left, right)):
        return "same"
    raise ValueError(f"pads {[top, left, bottom, right]}: minidl's Conv2D pads both sides "
                     f"alike, or as 'same' at stride 1")


def _load_gemm(attributes, weights, shape):
    _expect(attributes, transA=0)
    w = weights[0].T if attributes.get("transB", 0) else weights[0]
    if w.ndim != 2:
        raise ValueError(f"the weight must be 2-D, got shape {w.shape}")
    alpha, beta = (check_real(attributes.get(k, 1.0), k, "Gemm") for k in ("alpha", "beta"))
    w = w * alpha
    layer = Dense(w.shape[0], w.shape[1], bias=len(weights) > 1)
    state = {"weight": w}
    if len(weights) > 1:
        bias = weights[1] * beta
        state["bias"] = backend.get_module("cpu").broadcast_to(bias, (w.shape[1],))
    layer.load_state_dict(state)
    return layer


def _load_max_pool(attributes, weights, shape):
    return MaxPool2D(*_window_arguments(attributes))


def _load_avg_pool(attributes, weights, shape):
    return AvgPool2D(*_window_arguments(attributes),
                     count_include_pad=bool(attributes.get("count_include_pad", 0)))


def _load_reduce_mean(attributes, weights, shape):
    axes = attributes.get("axes", weights[0].tolist() if weights else None)
    axes = sorted(a % len(shape) for a in axes or ())
    if len(shape) != 4 or axes != [2, 3] or attributes.get("keepdims", 1) != 0:
        raise ValueError(f"only the mean over H and W of (N, C, H, W) without keepdims "
                         f"(GlobalAvgPool2D) is supported; got axes {axes} of a "
                         f"{len(shape)}-D input, keepdims={attributes.get('keepdims', 1)}")
    return GlobalAvgPool2D()


def _load_flatten(attributes, weights, shape):
    _expect(attributes, axis=1)
    return Flatten()


def _load_batch_norm(attributes, weights, shape):
    _expect(attributes, training_mode=0)
    kind = BatchNorm2D if len(shape) == 4 else BatchNorm1D
    layer = kind(len(weights[0]), momentum=_decimal(1.0 - attributes.get("momentum", 0.9)),
                 eps=_decimal(attributes.get("epsilon", 1e-5)))
    keys = ("weight", "bias", "running_mean", "running_var")
    layer.load_state_dict({**dict(zip(keys, weights)),
                           "num_batches_tracked": backend.get_module("cpu").zeros((), "int64")})
    return layer


def _load_dropout(attributes, weights, shape):
    if len(weights) > 1 and bool(weights[1]):
        raise ValueError("training_mode=True: minidl reads inference graphs")
    return Dropout(_decimal(float(weights[0])) if weights else 0.5)


def _load_softmax(attributes, weights, shape):
    axis = attributes.get("axis", -1)
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} is out of range for a {len(shape)}-D input")
    return Softmax(axis)


def _load_elementwise(kind):
    return lambda attributes, weights, shape: kind()


def _load_residual(attributes, branches, shape):
    """An Add of two branches: the block and the shortcut. An empty branch (the split
    tensor itself) is the identity, so it becomes the shortcut, None."""
    block, shortcut = branches if branches[0] else branches[::-1]
    return Residual(_branch(block), _branch(shortcut) if shortcut else None)


def _load_concat(attributes, branches, shape):
    return Concat([_branch(layers) for layers in branches], attributes["axis"])


def _branch(layers):
    """One branch as one layer: Identity when empty, the layer itself when alone."""
    if len(layers) <= 1:
        return layers[0] if layers else Identity()
    return Sequential(layers)


# -- the converters, kept in the layer registry --------------------------------------
register(Sequential, _export_sequential)
register(Conv2D, _export_conv, ["Conv"], _load_conv)
register(ConvTranspose2D, _export_conv, ["ConvTranspose"], _load_conv_transpose)
register(Dense, _export_dense, ["Gemm"], _load_gemm)
register(MaxPool2D, _export_pool("MaxPool"), ["MaxPool"], _load_max_pool)
register(AvgPool2D, _export_pool("AveragePool"), ["AveragePool"], _load_avg_pool)
register(GlobalAvgPool2D, _export_op("ReduceMean", axes=[2, 3], keepdims=0), ["ReduceMean"],
         _load_reduce_mean)
register(Flatten, _export_op("Flatten", axis=1), ["Flatten"], _load_flatten)
register(BatchNorm1D, _export_batch_norm)
register(BatchNorm2D, _export_batch_norm, ["BatchNormalization"], _load_batch_norm)
register(Dropout, _export_dropout, ["Dropout"], _load_dropout)
for _cls, _op in ((ReLU, "Relu"), (Sigmoid, "Sigmoid"), (Tanh, "Tanh"), (Identity, "Identity")):
    register(_cls, _export_op(_op), [_op], _load_elementwise(_cls))
register(LeakyReLU, _export_leaky_relu, ["LeakyRelu"],
         lambda a, w, s: LeakyReLU(_decimal(a.get("alpha", 0.01))))
register(Softmax, _export_softmax, ["Softmax"], _load_softmax)
register(Residual, _export_residual, ["Add"], _load_residual, join=True)
register(Concat, _export_concat, ["Concat"], _load_concat, join=True)
