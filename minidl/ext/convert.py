"""What the two bridges, minidl/ext/onnx.py and minidl/ext/pytorch.py, share: the model
check, the optional package, and the activation a Conv2D, ConvTranspose2D or Dense carries
inside that both formats write as a node (a module) of its own.

Each bridge keeps its converter of each layer class in the layer registry
(``register_converter``), so a user's own layer plugs in as a built-in one does
(docs/interop.md, "Adding a layer").
"""
import importlib

from ..layers import Container, Conv2D, ConvTranspose2D, Dense, Identity, Layer
from ..layers.activations import Activation
from ..model import Sequential

# Models nested deeper are refused: each level of nesting costs the converters (and
# minidl's own passes) a few Python frames, and Python allows about a thousand.
MAX_DEPTH = 100


def as_sequential(model, caller):
    """``model`` (a minidl Sequential or Layer) as a Sequential; TypeError otherwise."""
    if not isinstance(model, Layer):
        raise TypeError(f"{caller}: model must be a minidl Sequential or Layer, "
                        f"got {type(model).__name__}")
    check_depth(model, lambda layer: [sub for _, sub in layer.named_layers()]
                if isinstance(layer, Container) else [], caller)
    return model if isinstance(model, Sequential) else Sequential([model])


def add_layer(layers, layer, split_off):
    """Append ``layer``; or, when it is an activation that to_torch or onnx.export split off
    the Conv2D or Dense before it (``split_off``: named so), put it back inside that layer."""
    if (split_off and isinstance(layer, Activation)
            and isinstance(layers[-1], (Conv2D, ConvTranspose2D, Dense))
            and type(layers[-1].activation) is Identity):
        layers[-1].activation = layer
    else:
        layers.append(layer)


def check_depth(root, children, caller):
    """ValueError when layers (or modules) nest more than MAX_DEPTH levels below ``root``;
    ``children(x)``: those right inside x. A loop, not a recursion, and a layer used
    twice is walked once per depth: a crafted model cannot make it slow."""
    todo, seen = [(root, 0)], set()
    while todo:
        item, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{caller}: layers nested more than {MAX_DEPTH} levels deep; "
                             f"minidl converts at most {MAX_DEPTH}")
        if (id(item), depth) not in seen:
            seen.add((id(item), depth))
            todo += [(child, depth + 1) for child in children(item)]


def require(package, caller, install):
    """The optional ``package``, imported; without it an ImportError saying how to get it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"{caller} needs {install}") from None
