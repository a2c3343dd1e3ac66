"""The checkpoint format: a model's arrays and its config in one pickle-free .npz.

    model.save("cnn.npz")                # Sequential.save -> save_model
    model.load("cnn.npz")                # into a model of the same structure
    model = minidl.load_model("cnn.npz") # rebuilt from the file alone

Members: every parameter and buffer under its ``state_dict`` name, "__model__", the
model's ``layer_spec`` ({"class": name, "config": get_config()}, nested for containers)
as JSON text, and "__metadata__" (JSON the caller gives: preprocessing, class names;
``load_metadata``). ``load_model`` builds only classes of the layer registry
(layers/registry.py), and only once their arrays fit in memory and are in the file (as
``state_shapes`` says); nothing is unpickled. Every refusal is a CheckpointError naming
the file (docs/api.md, "Errors of checkpoints"), raised before the model changes.
"""
import json
import math

from . import backend
from .checks import check_float_dtype, machine_memory
from .layers.base import Container, layer_spec
from .layers.registry import layer_class
from .serialization import CheckpointError, NpzReader, save_npz

CONFIG_KEY = "__model__"          # the model's layer_spec, as JSON text
METADATA_KEY = "__metadata__"     # what the caller says about the model, as JSON text
_MAX_CONFIG_CHARS = 1 << 20


def save_model(model, path, metadata=None):
    """Write ``model``'s parameters, buffers and config, and the JSON-able dict
    ``metadata`` if given, to ``path`` (.npz), atomically."""
    state = model.state_dict()
    state[CONFIG_KEY] = backend.get_module("cpu").array([_config_text(model)])
    if metadata is not None:
        state[METADATA_KEY] = backend.get_module("cpu").array([json.dumps(dict(metadata))])
    save_npz(path, state)


def load_metadata(path):
    """The ``metadata`` dict saved with the model at ``path`` ({} if none)."""
    with NpzReader(path) as npz:
        return _read_json(npz, METADATA_KEY) if METADATA_KEY in npz.headers else {}


def load_weights(model, path):
    """Load the checkpoint at ``path`` into ``model``, whose structure must be the saved
    one (dtypes and Dropout seeds aside) as the constructors read it ("SAME" is "same");
    all or nothing."""
    with NpzReader(path) as npz:
        saved, mine = _read_config(npz), _comparable(json.loads(_config_text(model)))
        if _comparable(saved) != mine:
            try:    # spelled otherwise ("SAME")? the structure as the constructors read it
                built = _comparable(json.loads(_config_text(_rebuilt(npz))))
            except ValueError:      # a class of one's own, unregistered: as it was saved
                built = None
            if built != mine:
                raise npz.error(f"it was saved from a different model structure "
                                f"({_difference(saved, mine)})")
        _load_into(model, npz)
    return model


def load_model(path):
    """The model saved at ``path`` by ``Sequential.save``, rebuilt from the file alone
    (registered classes only; nothing is unpickled), then loaded. Nothing is built before
    its arrays are known to fit in memory and to be in the file."""
    with NpzReader(path) as npz:
        model = _rebuilt(npz)
        _load_into(model, npz)
    return model


def _rebuilt(npz):
    """The Sequential the checkpoint's config describes, built once its arrays are known
    to fit in memory and to be in the file (``state_shapes``)."""
    spec, total = _read_config(npz), [0]
    try:
        planned = _planned(spec, total)
        if total[0] > (machine_memory() or math.inf):
            raise ValueError(f"its layers would hold {total[0] / 2**30:.3g} GiB, more than "
                             f"this machine's memory ({machine_memory() / 2**30:.3g} GiB)")
        for name, (shape, dtype) in planned.items():
            npz.check(name, shape, dtype)
        model = build_layer(spec)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, MemoryError, RecursionError) as exc:
        raise npz.error(f"cannot rebuild the model from its config: {exc}") from None
    if type(model) is not layer_class("Sequential"):
        raise npz.error(f"its config describes a {spec['class']}, not a Sequential")
    return model


def build_layer(spec):
    """The layer a ``layer_spec`` describes, nested layers built first."""
    cls, config = _parts(spec)
    try:
        return cls.from_config(_nested(config, build_layer))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{spec['class']}: {exc}") from None


def _planned(spec, total):
    """{name: (shape, dtype)} of layer ``spec``'s arrays, from the config alone; bytes: total."""
    cls, config = _parts(spec)
    config = _nested(config, lambda inner: _planned(inner, total))
    sizes = getattr(cls, "state_shapes", None)       # a class of one's own may not say
    if sizes is None or issubclass(cls, Container):  # a container's arrays are its layers'
        return sizes(config) if sizes else {}
    if any(isinstance(plan, dict) and plan for plan in config.values()):   # not saved
        raise ValueError(f"{spec['class']}: its activation has arrays, which checkpoints omit")
    try:
        dtype = check_float_dtype(config.get("dtype") or backend.float32, cls.__name__)
        shapes = sizes(config)
    except (TypeError, ValueError, KeyError):   # its constructor refuses it, saying why
        return {}
    total[0] += sum(map(math.prod, shapes.values())) * dtype.itemsize
    return {name: (shape, dtype) for name, shape in shapes.items()}


def _parts(spec):
    """(registered class, config) of a ``layer_spec``; ValueError for anything else."""
    if not (isinstance(spec, dict) and set(spec) == {"class", "config"}
            and isinstance(spec["config"], dict)):
        raise ValueError(f"expected {{'class': name, 'config': {{...}}}}, got {spec!r:.200}")
    return layer_class(spec["class"]), spec["config"]


def _nested(config, fn):
    """``config`` with ``fn(spec)`` for each layer spec in it (a dict, alone or in a list)."""
    def each(value):
        return fn(value) if isinstance(value, dict) else \
            [each(item) for item in value] if isinstance(value, list) else value
    return {key: each(value) for key, value in config.items()}


def _load_into(model, npz):
    expected = {name: (a.shape, a.dtype) for name, a in model._state_arrays().items()}
    texts = {key: npz.headers[key] for key in (CONFIG_KEY, METADATA_KEY) if key in npz.headers}
    state = npz.read_all({**expected, **texts})
    model.load_state_dict({key: state[key] for key in expected})


def _config_text(model):
    try:
        return json.dumps(layer_spec(model), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Sequential.save: a layer's get_config() must return plain JSON "
                        f"values: {exc}") from None


def _read_config(npz):
    """The model config stored in the checkpoint, as JSON values."""
    if CONFIG_KEY not in npz.headers:
        raise npz.error(f"it has no {CONFIG_KEY!r} entry: it was not written by "
                        f"Sequential.save (or by an older minidl)")
    return _read_json(npz, CONFIG_KEY)


def _read_json(npz, key):
    try:
        value = json.loads(npz.read(key, (1,), f"<U{_MAX_CONFIG_CHARS}")[0])
        _comparable(value)   # nested too deep for that: not a config
        return value
    except (ValueError, RecursionError) as exc:
        raise npz.error(f"its {key!r} entry is not valid JSON ({exc})") from None


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
