"""Weights to and from PyTorch: the equivalent torch.nn.Sequential, and back
(docs/interop.md). torch is optional: it is imported only when these are called.

    module = minidl.ext.pytorch.to_torch(model)    # torch.nn.Sequential, weights copied
    model = minidl.ext.pytorch.from_torch(module)  # minidl Sequential, weights copied

    Conv2D <-> nn.Conv2d            padding "same" <-> padding="same" (uneven alike);
                                    dilation, groups
    ConvTranspose2D <-> nn.ConvTranspose2d   output_padding, dilation, groups
    Dense <-> nn.Linear             weight (in, out) <-> weight (out, in): transposed
    MaxPool2D <-> nn.MaxPool2d      AvgPool2D <-> nn.AvgPool2d; ceil_mode, count_include_pad
    GlobalAvgPool2D <-> nn.AdaptiveAvgPool2d(1) followed by nn.Flatten()
    BatchNorm1D/2D <-> nn.BatchNorm1d/2d with running_mean, running_var,
                       num_batches_tracked; momentum and eps as they are (same meaning)
    Flatten, Dropout, ReLU, LeakyReLU, Sigmoid, Tanh, Softmax(axis) <-> Softmax(dim),
    Identity, Sequential: the namesakes
    Residual, Concat <-> two small modules of this file, made when torch is first
                         used: Residual(block, shortcut), Concat (branches "0", "1", ...)
    the activation of Conv2D "3" <-> a module of its own, "3_activation"

Each layer class's ``TorchConverter`` is kept in the layer registry (the calls to
``register`` at the end of this file).
"""
import functools
from collections import OrderedDict
from types import SimpleNamespace

from ..layers import (AvgPool2D, BatchNorm1D, BatchNorm2D, Concat, Conv2D, ConvTranspose2D,
                      Dense, Dropout, Flatten, GlobalAvgPool2D, Identity, LeakyReLU, MaxPool2D,
                      ReLU, Residual, Sigmoid, Softmax, Tanh)
from ..layers.registry import converters, register_converter
from ..model import Sequential
from .convert import add_layer, as_sequential, check_depth, require

_INSTALL = "PyTorch: pip install torch"


class TorchConverter:
    """How one layer class maps to PyTorch: ``to_torch(torch, layer, name)`` returns
    [(name suffix, module)] (usually one; the split-off activation of a Conv2D or
    Dense is a second); ``from_torch(torch, module, name)`` builds the layer from a
    module whose class is named in ``torch_classes`` (torch.nn's, or this file's
    Residual and Concat)."""

    def __init__(self, to_torch, torch_classes=(), from_torch=None):
        self.to_torch, self.torch_classes, self.from_torch = to_torch, tuple(torch_classes), \
            from_torch


def register(cls, to_torch, torch_classes=(), from_torch=None):
    """Make the registered layer class ``cls`` convertible to (and from) PyTorch."""
    register_converter("torch", cls, TorchConverter(to_torch, torch_classes, from_torch))


# -- to PyTorch ----------------------------------------------------------------------
def to_torch(model):
    """A ``torch.nn.Sequential`` computing what ``model`` (a Sequential or a Layer)
    computes, with copies of its weights and buffers in the same dtypes, on the CPU,
    in the same train/eval mode. Raises ImportError without torch, TypeError for a
    layer that has no PyTorch equivalent (naming it)."""
    torch = require("torch", "minidl.ext.pytorch.to_torch", _INSTALL)
    model = as_sequential(model, "minidl.ext.pytorch.to_torch")
    return _torch_sequential(torch, model, "").train(model.training)


def _torch_sequential(torch, model, prefix):
    modules = OrderedDict()
    for i, layer in enumerate(model.layers):
        for suffix, module in _torch_modules(torch, layer, f"{prefix}{i}"):
            modules[f"{i}{suffix}"] = module
    return torch.nn.Sequential(modules)


def _torch_modules(torch, layer, name):
    """[(name suffix, module)] for one layer, from its class's converter."""
    found = converters("torch").get(type(layer))
    if found is None:
        raise TypeError(f"minidl.ext.pytorch.to_torch: layer {name} ({type(layer).__name__}) "
                        f"has no PyTorch equivalent")
    return found.to_torch(torch, layer, name)


def _conv_to_torch(torch, layer, name):
    (top, bottom), (left, right) = layer.pads
    padding = (top, left) if (top, left) == (bottom, right) else "same"
    module = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                             layer.stride, padding, layer.dilation, layer.groups,
                             bias=layer.bias is not None, dtype=_torch_dtype(torch, layer.dtype))
    _copy_into(torch, module, layer)
    return [("", module)] + _activation_modules(torch, layer.activation, name)


def _conv_transpose_to_torch(torch, layer, name):
    module = torch.nn.ConvTranspose2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.output_padding, layer.groups, layer.bias is not None, layer.dilation,
        dtype=_torch_dtype(torch, layer.dtype))
    _copy_into(torch, module, layer)
    return [("", module)] + _activation_modules(torch, layer.activation, name)


def _dense_to_torch(torch, layer, name):
    module = torch.nn.Linear(layer.in_features, layer.out_features,
                             bias=layer.bias is not None, dtype=_torch_dtype(torch, layer.dtype))
    _copy_into(torch, module, layer, transpose="weight")
    return [("", module)] + _activation_modules(torch, layer.activation, name)


def _batch_norm_to_torch(torch, layer, name):
    kind = torch.nn.BatchNorm2d if type(layer) is BatchNorm2D else torch.nn.BatchNorm1d
    module = kind(layer.num_features, layer.eps, layer.momentum, layer.affine,
                  dtype=_torch_dtype(torch, layer.dtype))
    _copy_into(torch, module, layer)
    return [("", module)]


def _residual_to_torch(torch, layer, name):
    shortcut = (None if layer.shortcut is None
                else _torch_branch(torch, layer.shortcut, f"{name}.shortcut"))
    block = _torch_branch(torch, layer.block, f"{name}.block")
    return [("", _torch_blocks(torch).Residual(block, shortcut))]


def _concat_to_torch(torch, layer, name):
    branches = [_torch_branch(torch, branch, f"{name}.{i}")
                for i, branch in enumerate(layer.branches)]
    return [("", _torch_blocks(torch).Concat(branches, layer.axis))]


def _module(make):
    """The to_torch of a layer that is one module: ``make(nn, layer)``."""
    return lambda torch, layer, name: [("", make(torch.nn, layer))]


def _torch_branch(torch, layer, name):
    """One module for one branch: an nn.Sequential when the layer needs several."""
    modules = _torch_modules(torch, layer, name)
    if len(modules) == 1:
        return modules[0][1]
    return torch.nn.Sequential(OrderedDict((f"0{suffix}", module) for suffix, module in modules))


@functools.cache
def _torch_blocks(torch):
    """The torch modules for Residual and Concat. They need torch, which is optional,
    so they are made here, once: from_torch recognises them by their class."""
    nn = torch.nn

    class Residual(nn.Module):
        """``block(x) + shortcut(x)``, the shortcut None for the identity (minidl's Residual)."""

        def __init__(self, block, shortcut=None):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    class Concat(nn.Module):
        """Branches "0", "1", ... on one input, joined along ``axis`` (minidl's Concat)."""

        def __init__(self, branches, axis=1):
            super().__init__()
            for i, branch in enumerate(branches):
                self.add_module(str(i), branch)
            self.axis = axis

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.children()], dim=self.axis)

        def extra_repr(self):
            return f"axis={self.axis}"

    return SimpleNamespace(Residual=Residual, Concat=Concat)


def _activation_modules(torch, activation, name):
    if type(activation) is Identity:
        return []
    return [("_activation", module) for _, module in
            _torch_modules(torch, activation, f"{name}.activation")]


def _torch_dtype(torch, dtype):
    return getattr(torch, dtype.name)          # float16, float32, float64: the same names


def _copy_into(torch, module, layer, transpose=None):
    """Copy the layer's parameters and buffers into the module's tensors of the same
    names, the one named ``transpose`` transposed."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    with torch.no_grad():
        for name, array in layer.state_dict().items():
            tensors[name].copy_(torch.from_numpy(array.T if name == transpose else array))


# -- from PyTorch --------------------------------------------------------------------
def from_torch(module):
    """A minidl Sequential computing what the torch ``module`` (an nn.Sequential or a
    single module of the table in this module's docstring) computes, with copies of
    its weights, in the module's dtype (float32 or float64) and train/eval mode.
    Raises ImportError without torch, TypeError for a module minidl has no layer for,
    ValueError for settings minidl does not have (padding_mode, a pool's dilation, ...)."""
    torch = require("torch", "minidl.ext.pytorch.from_torch", _INSTALL)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"minidl.ext.pytorch.from_torch: expected a torch.nn.Module, "
                        f"got {type(module).__name__}")
    check_depth(module, lambda m: list(m.children()), "minidl.ext.pytorch.from_torch")
    return _sequential_from(torch, module, "").train(module.training)


def _sequential_from(torch, module, prefix):
    """The layers of an nn.Sequential (or of one module) as a Sequential; ``prefix``
    names where it sits in the module that from_torch was given ("3.block.")."""
    nn = torch.nn
    children = (list(module.named_children()) if isinstance(module, nn.Sequential)
                else [("0", module)])
    layers, i = [], 0
    while i < len(children):
        name, child = children[i]
        following = children[i + 1][1] if i + 1 < len(children) else None
        if (isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1), [1, 1])
                and isinstance(following, nn.Flatten) and following.start_dim == 1
                and following.end_dim in (-1, 3)):       # (N, C, 1, 1) -> (N, C), no other
            layers.append(GlobalAvgPool2D())
            i += 2
            continue
        add_layer(layers, _layer_from(torch, child, prefix + name),
                  i > 0 and name == f"{children[i - 1][0]}_activation")
        i += 1
    return Sequential(layers)


def _branch_from(torch, module, name):
    """One branch of a Residual or Concat: its one layer, or a Sequential of several."""
    if not isinstance(module, torch.nn.Sequential):
        return _layer_from(torch, module, name)
    layers = _sequential_from(torch, module, f"{name}.")
    return layers[0] if len(layers) == 1 else layers


def _layer_from(torch, child, name):
    """The minidl layer of one torch module (not a global-pool pair), from the converter
    that names the module's class."""
    found = _readers(torch).get(type(child))
    where = f"minidl.ext.pytorch.from_torch: module {name} ({type(child).__name__})"
    if found is None:
        raise _located(TypeError(f"{where} has no minidl layer" + (
            "; AdaptiveAvgPool2d(1) is read when a Flatten() follows it (GlobalAvgPool2D)"
            if isinstance(child, torch.nn.AdaptiveAvgPool2d) else "")))
    try:
        if any(t.is_meta for t in [*child.parameters(False), *child.buffers(False)]):
            raise ValueError("its parameters or buffers are meta tensors, which hold no "
                             "values: materialise them first (module.to_empty(...), then "
                             "load them)")
        return found.from_torch(torch, child, name)
    except (TypeError, ValueError) as exc:
        if getattr(exc, "located", False):      # from a module inside this one
            raise
        raise _located(ValueError(f"{where}: {exc}")) from None


def _located(error):
    """``error``, marked as naming the module at fault (containers pass it on as is)."""
    error.located = True
    return error


def _readers(torch):
    """{torch module class: converter} of every registered converter that reads one."""
    blocks = _torch_blocks(torch)
    return {getattr(torch.nn, n, None) or getattr(blocks, n): c
            for c in converters("torch").values() if c.from_torch for n in c.torch_classes}


def _conv_from_torch(torch, child, name):
    _expect(child, padding_mode="zeros")
    padding = child.padding if isinstance(child.padding, str) else tuple(child.padding)
    layer = Conv2D(child.in_channels, child.out_channels, tuple(child.kernel_size),
                   tuple(child.stride), padding, tuple(child.dilation), child.groups,
                   bias=child.bias is not None, dtype=_numpy_dtype(child.weight))
    return _loaded(layer, child)


def _conv_transpose_from_torch(torch, child, name):
    _expect(child, padding_mode="zeros")
    layer = ConvTranspose2D(child.in_channels, child.out_channels, tuple(child.kernel_size),
                            tuple(child.stride), tuple(child.padding),
                            tuple(child.output_padding), tuple(child.dilation), child.groups,
                            bias=child.bias is not None, dtype=_numpy_dtype(child.weight))
    return _loaded(layer, child)


def _dense_from_torch(torch, child, name):
    layer = Dense(child.in_features, child.out_features, bias=child.bias is not None,
                  dtype=_numpy_dtype(child.weight))
    return _loaded(layer, child, transpose="weight")


def _batch_norm_from_torch(torch, child, name):
    if not child.track_running_stats:
        raise ValueError("track_running_stats=False: minidl's BatchNorm keeps running "
                         "statistics")
    norm = BatchNorm2D if isinstance(child, torch.nn.BatchNorm2d) else BatchNorm1D
    return _loaded(norm(child.num_features, child.momentum, child.eps, child.affine,
                        dtype=_numpy_dtype(child.running_mean)), child)


def _max_pool_from_torch(torch, child, name):
    _expect(child, dilation=1, return_indices=False)
    return MaxPool2D(child.kernel_size, child.stride, child.padding, child.ceil_mode)


def _avg_pool_from_torch(torch, child, name):
    _expect(child, divisor_override=None)
    return AvgPool2D(child.kernel_size, child.stride, child.padding, child.ceil_mode,
                     child.count_include_pad)


def _flatten_from_torch(torch, child, name):
    _expect(child, start_dim=1, end_dim=-1)
    return Flatten()


def _softmax_from_torch(torch, child, name):
    if child.dim is None:
        raise ValueError("dim=None: give the axis (minidl's Softmax takes one)")
    return Softmax(axis=child.dim)


def _residual_from_torch(torch, child, name):
    shortcut = (None if child.shortcut is None
                else _branch_from(torch, child.shortcut, f"{name}.shortcut"))
    return Residual(_branch_from(torch, child.block, f"{name}.block"), shortcut)


def _concat_from_torch(torch, child, name):
    return Concat([_branch_from(torch, branch, f"{name}.{i}")
                   for i, branch in child.named_children()], child.axis)


def _layer(make):
    """The from_torch of a layer made from the module alone: ``make(module)``."""
    return lambda torch, child, name: make(child)


def _expect(child, **supported):
    """ValueError unless each setting of ``child`` has the value minidl supports."""
    for key, value in supported.items():
        actual = getattr(child, key)
        if actual != value and not (isinstance(actual, (tuple, list))
                                    and set(actual) == {value}):
            raise ValueError(f"{key}={actual!r} is not supported (only {value!r})")


def _loaded(layer, child, transpose=None):
    """``layer`` holding copies of the module's parameters and buffers, the one named
    ``transpose`` transposed."""
    arrays = {}
    for key, tensor in list(child.named_parameters()) + list(child.named_buffers()):
        value = tensor.detach().cpu().numpy()
        arrays[key] = value.T if key == transpose else value
    layer.load_state_dict(arrays)
    return layer


def _numpy_dtype(tensor):
    return str(tensor.dtype).replace("torch.", "")


# -- the converters, kept in the layer registry --------------------------------------
register(Sequential, lambda torch, layer, name: [("", _torch_sequential(torch, layer,
                                                                         f"{name}."))],
         ["Sequential"], lambda torch, child, name: _sequential_from(torch, child, f"{name}."))
register(Conv2D, _conv_to_torch, ["Conv2d"], _conv_from_torch)
register(ConvTranspose2D, _conv_transpose_to_torch, ["ConvTranspose2d"],
         _conv_transpose_from_torch)
register(Dense, _dense_to_torch, ["Linear"], _dense_from_torch)
register(BatchNorm1D, _batch_norm_to_torch, ["BatchNorm1d"], _batch_norm_from_torch)
register(BatchNorm2D, _batch_norm_to_torch, ["BatchNorm2d"], _batch_norm_from_torch)
register(Residual, _residual_to_torch, ["Residual"], _residual_from_torch)
register(Concat, _concat_to_torch, ["Concat"], _concat_from_torch)
register(GlobalAvgPool2D, lambda torch, layer, name: [
    ("", torch.nn.AdaptiveAvgPool2d(1)), ("_flatten", torch.nn.Flatten())])
register(MaxPool2D, _module(lambda nn, layer: nn.MaxPool2d(
    layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)),
    ["MaxPool2d"], _max_pool_from_torch)
register(AvgPool2D, _module(lambda nn, layer: nn.AvgPool2d(
    layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode, layer.count_include_pad)),
    ["AvgPool2d"], _avg_pool_from_torch)
register(Flatten, _module(lambda nn, layer: nn.Flatten()), ["Flatten"], _flatten_from_torch)
register(Dropout, _module(lambda nn, layer: nn.Dropout(layer.p)), ["Dropout"],
         _layer(lambda child: Dropout(child.p)))
register(LeakyReLU, _module(lambda nn, layer: nn.LeakyReLU(layer.negative_slope)),
         ["LeakyReLU"], _layer(lambda child: LeakyReLU(child.negative_slope)))
register(Softmax, _module(lambda nn, layer: nn.Softmax(dim=layer.axis)), ["Softmax"],
         _softmax_from_torch)
for _cls, _name in ((ReLU, "ReLU"), (Sigmoid, "Sigmoid"), (Tanh, "Tanh"),
                    (Identity, "Identity")):
    register(_cls, _module(lambda nn, layer, _name=_name: getattr(nn, _name)()), [_name],
             _layer(lambda child, _cls=_cls: _cls()))
