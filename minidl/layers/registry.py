"""The layer registry: the one table of layer classes, by name.

A layer class registers once, where it is defined:

    @register_layer
    class Scale(Layer):
        ...

Everything that turns a name into a layer reads this table: ``load_model`` rebuilds a
checkpoint's layers from it and from nothing else (a file names a class, and only a
registered one can be built: nothing is imported by name from a file). The bridges
of minidl/ext (ONNX, PyTorch) keep their converter of each class here too, beside the
class, so a user's own layer is saved, rebuilt, exported and converted as a built-in
one is (docs/extending.md, "Saving and rebuilding your layer").
"""
from .base import Layer

_CLASSES = {}       # name -> layer class
_CONVERTERS = {}    # format ("onnx", "torch") -> {layer class: converter}


def register_layer(cls):
    """Class decorator: make ``cls`` (a Layer subclass) known by its name; returns it.

    A second class of the same name is refused (a checkpoint could not tell them
    apart), unless it is the same class defined again (a reloaded module)."""
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise TypeError(f"register_layer: expected a subclass of minidl's Layer, got {cls!r}")
    known = _CLASSES.get(cls.__name__)
    if known is not None and _origin(known) != _origin(cls):
        raise ValueError(f"register_layer: a layer class named {cls.__name__!r} is already "
                         f"registered ({_origin(known)}); give {_origin(cls)} another name")
    _CLASSES[cls.__name__] = cls
    return cls


def layer_class(name):
    """The registered class called ``name``; ValueError naming the registered ones."""
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown layer class {name!r:.100} (registered: "
                         f"{', '.join(sorted(_CLASSES))}; a class of your own needs "
                         f"@minidl.register_layer)")
    return cls


def registered_layers():
    """{name: class} of every registered layer (a copy)."""
    return dict(_CLASSES)


def register_converter(fmt, cls, converter):
    """Keep ``converter`` as the way format ``fmt`` ("onnx", "torch") handles the
    registered class ``cls``; what a converter is, is the format's business
    (minidl/ext/onnx.py, minidl/ext/pytorch.py)."""
    if _CLASSES.get(getattr(cls, "__name__", None)) is not cls:
        raise ValueError(f"register_converter: register the layer class {cls!r} first "
                         f"(@minidl.register_layer)")
    _CONVERTERS.setdefault(fmt, {})[cls] = converter


def converters(fmt):
    """{layer class: converter} of format ``fmt`` (a copy)."""
    return dict(_CONVERTERS.get(fmt, {}))


def _origin(cls):
    return f"{cls.__module__}.{cls.__qualname__}"
