"""Sequential: a model that is a list of layers run one after another.

    model = Sequential([Conv2D(1, 32, 3, padding=1, activation="relu"), ...])
    logits = model.forward(x)            # each layer's forward, in order
    dx = model.backward(dlogits)         # each layer's backward, in reverse

A Sequential is itself a Layer, so it nests and ``minidl.gradcheck`` applies to it.
"""
import json

from . import backend
from .checks import check_int
from .layers import (AvgPool2D, BatchNorm1D, BatchNorm2D, Concat, Conv2D, Dense, Dropout,
                     Flatten, GlobalAvgPool2D, Identity, LeakyReLU, MaxPool2D, ReLU, Residual,
                     Sigmoid, Softmax, Tanh)
from .layers.base import Container, Layer, layer_spec
from .serialization import NpzReader, save_npz
from .summary import summary_table

_CONFIG_KEY = "__model__"          # the model's layer_spec, as JSON text
_MAX_CONFIG_CHARS = 1 << 20


class Sequential(Container):
    """Layers applied in order: ``Sequential([a, b, c])`` or ``Sequential(a, b, c)``."""

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        self.layers = []
        for layer in layers:
            self.add(layer)

    def add(self, layer):
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add: expected a Layer, got {type(layer).__name__}")
        self.layers.append(layer)
        return self

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(self.layers[index])
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    # -- the two passes ------------------------------------------------------
    def forward(self, x, training=None):
        """Each layer in order. ``training=None`` uses the mode set by ``train()`` /
        ``eval()`` (a new model trains); True or False overrides it for this call."""
        if training is None:
            training = self.training
        for layer in self.layers:
            x = layer(x, training=training)
        return x

    def backward(self, dy, input_grad=True):
        """Each layer's backward, last to first; returns dL/dx. ``input_grad=False`` (x is
        data) returns None, and a first layer with an ``input_grad`` switch (Conv2D, Dense)
        skips that product for this call: its backward hooks see dx = None."""
        first = self.layers[0] if self.layers else None
        saved = getattr(first, "input_grad", None)
        if saved is not None and not input_grad:
            first.input_grad = False
        try:
            for layer in reversed(self.layers):
                dy = layer.backward_with_hooks(dy)
        finally:
            if saved is not None:
                first.input_grad = saved
        return dy if input_grad else None

    def predict(self, x, batch_size=256):
        """Outputs for ``x`` in eval mode, batch by batch, as a numpy array; ValueError for
        an empty ``x``."""
        batch_size = check_int(batch_size, "batch_size", "Sequential.predict", minimum=1)
        xp_out = []
        for start in range(0, len(x), batch_size):
            batch = backend.to_device(x[start:start + batch_size], self.device)
            xp_out.append(backend.to_numpy(self.forward(batch, training=False)))
        if not xp_out:
            raise ValueError("Sequential.predict: got an empty input")
        return backend.get_module("cpu").concatenate(xp_out, axis=0)

    # -- parameters and state ------------------------------------------------
    def named_layers(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def save(self, path):
        """Write parameters, buffers and the model's config (every layer's class and
        constructor arguments, as JSON) to ``path`` (.npz), atomically."""
        state = self.state_dict()
        state[_CONFIG_KEY] = backend.get_module("cpu").array([_config_text(self)])
        save_npz(path, state)

    def load(self, path):
        """Load a checkpoint written by ``save``; all or nothing (the errors: docs/api.md,
        "Errors of checkpoints")."""
        with NpzReader(path) as npz:
            self._load(npz)
        return self

    def _load(self, npz):
        saved, mine = _read_config(npz), json.loads(_config_text(self))
        if _comparable(saved) != _comparable(mine):
            raise npz.error(f"it was saved from a different model structure "
                            f"({_difference(saved, mine)})")
        expected = {name: (a.shape, a.dtype) for name, a in self._state_arrays().items()}
        expected[_CONFIG_KEY] = npz.headers[_CONFIG_KEY]
        state = npz.read_all(expected)
        del state[_CONFIG_KEY]
        self.load_state_dict(state)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(*config.pop("layers", ()), **config)

    def get_config(self):
        return {"layers": [layer_spec(layer) for layer in self.layers]}

    # -- description ---------------------------------------------------------
    def output_shape(self, input_shape):
        for layer in self.layers:
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def flops(self, input_shape):
        """The layers' FLOPs for one sample, each at the shape it receives."""
        total = 0
        for layer in self.layers:
            total += layer.flops(input_shape)
            input_shape = layer.output_shape(input_shape)
        return total

    def summary(self, input_shape, print_fn=print):
        """Print (with ``print_fn``, unless None) and return the text of the summary table
        (``summary.py``); ``input_shape`` excludes the batch, e.g. (1, 28, 28)."""
        text = summary_table(self, input_shape)
        if print_fn is not None:
            print_fn(text)
        return text


# The classes a checkpoint may name: load_model builds nothing else.
LAYER_CLASSES = {cls.__name__: cls for cls in (
    AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D,
    Identity, LeakyReLU, MaxPool2D, ReLU, Sigmoid, Softmax, Tanh, Residual, Concat,
    Sequential)}


def load_model(path):
    """The model saved at ``path`` by ``Sequential.save``, rebuilt from the file alone (only
    classes in ``LAYER_CLASSES``; nothing is unpickled), then loaded."""
    with NpzReader(path) as npz:
        spec = _read_config(npz)
        try:
            model = _from_spec(spec)
        except (TypeError, ValueError, KeyError, MemoryError, RecursionError) as exc:
            raise npz.error(f"cannot rebuild the model from its config: {exc}") from None
        if not isinstance(model, Sequential):
            raise npz.error(f"its config describes a {spec['class']}, not a Sequential")
        model._load(npz)
    return model


def _from_spec(spec):
    if not (isinstance(spec, dict) and set(spec) == {"class", "config"}
            and isinstance(spec["config"], dict)):
        raise ValueError(f"expected {{'class': name, 'config': {{...}}}}, got {spec!r:.200}")
    cls = LAYER_CLASSES.get(spec["class"])
    if cls is None:
        raise ValueError(f"unknown layer class {spec['class']!r:.100} (allowed: "
                         f"{', '.join(LAYER_CLASSES)})")
    try:
        return cls.from_config({key: _from_value(value) for key, value in spec["config"].items()})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{spec['class']}: {exc}") from None


def _from_value(value):
    """A config value with the layer specs in it (dicts) built into layers."""
    if isinstance(value, dict):
        return _from_spec(value)
    if isinstance(value, list):
        return [_from_value(item) for item in value]
    return value


def _config_text(model):
    try:
        return json.dumps(layer_spec(model), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Sequential.save: a layer's get_config() must return plain JSON "
                        f"values: {exc}") from None


def _read_config(npz):
    """The model config stored in the checkpoint, as JSON values."""
    if _CONFIG_KEY not in npz.headers:
        raise npz.error(f"it has no {_CONFIG_KEY!r} entry: it was not written by "
                        f"Sequential.save (or by an older minidl)")
    text = npz.read(_CONFIG_KEY, (1,), f"<U{_MAX_CONFIG_CHARS}")[0]
    try:
        config = json.loads(text)
        _comparable(config)   # nested too deep for that: not a model's config
        return config
    except (ValueError, RecursionError) as exc:
        raise npz.error(f"its {_CONFIG_KEY!r} entry is not valid JSON ({exc})") from None


def _comparable(config):
    """``config`` without what does not change the model: dtypes (arrays are cast on
    loading) and Dropout seeds."""
    if isinstance(config, dict):
        return {k: _comparable(v) for k, v in config.items() if k not in ("dtype", "seed")}
    if isinstance(config, list):
        return [_comparable(v) for v in config]
    return config


def _difference(saved, mine):
    """Where two model configs differ: the first differing layer, else the layer counts."""
    try:
        saved_layers, my_layers = saved["config"]["layers"], mine["config"]["layers"]
        pairs = list(zip(saved_layers, my_layers))
    except (TypeError, KeyError):   # not a Sequential's config at all
        return f"saved {_short(saved)}, this model {_short(mine)}"
    for i, (a, b) in enumerate(pairs):
        if _comparable(a) != _comparable(b):
            return f"layer {i}: saved {_short(a)}, this model {_short(b)}"
    return f"saved {len(saved_layers)} layers, this model has {len(my_layers)}"


def _short(config, limit=1000):
    text = json.dumps(config)
    return text if len(text) <= limit else text[:limit] + " ..."
