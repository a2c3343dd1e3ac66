"""Parameter, Layer and Container: the contract every layer of minidl fulfils.

``forward(x, training)`` caches what backward needs in ``self.cache``; ``backward(dy)``
returns dL/dx and *accumulates* dL/dparam into each ``Parameter.grad`` (as PyTorch;
an optimizer's ``zero_grad`` clears it). See docs/architecture.md, "The contracts".
"""
import copy

from .. import backend
from ..checks import check_float_dtype


class Parameter:
    """A trainable array (``.data``, on the layer's device) and its gradient ``.grad``."""

    def __init__(self, data, name=""):
        self.data = data
        self.grad = None
        self.name = name

    @property
    def shape(self):
        return self.data.shape

    @property
    def size(self):
        return int(self.data.size)

    def accumulate_grad(self, g):
        """``.grad += g``, allocated on first use in the parameter's dtype (even when
        ``g`` comes from a float64 ``dy``)."""
        if self.grad is None:
            self.grad = g.astype(self.data.dtype, copy=True)
        else:
            self.grad += g

    def zero_grad(self):
        self.grad = None

    def to(self, device):
        self.data = backend.to_device(self.data, device)
        if self.grad is not None:
            self.grad = backend.to_device(self.grad, device)
        return self

    def __repr__(self):
        return f"Parameter(name={self.name!r}, shape={tuple(self.shape)}, dtype={self.data.dtype})"


class Layer:
    """Base class: subclasses write ``forward`` and ``backward`` side by side.

    Parameters are the ``Parameter`` attributes, in the order they were set; state
    that is saved but not trained (BatchNorm's running statistics) is named in
    ``buffer_names``. ``dtype`` is the parameters' float type, and inputs are cast to
    it; a layer without parameters may pass None to keep a float input's dtype.
    ``cache`` is None or a dict with the output's shape under "y_shape".
    """

    buffer_names = ()
    # The registered class a checkpoint names instead of this one (a stand-in such as
    # minidl.ext's SyncBatchNorm, saved as the BatchNorm2D it is in one process).
    saved_as = None
    # True when every output depends on every input position (Dense, GlobalAvgPool2D):
    # the summary's receptive field is "all" from such a layer on.
    sees_whole_input = False

    def __init__(self, dtype=backend.float32):
        self.dtype = None if dtype is None else check_float_dtype(dtype, type(self).__name__)
        self.device = backend.default_device()
        self.training = True
        self.forward_hooks = []
        self.backward_hooks = []
        self.cache = None

    # -- the two passes ------------------------------------------------------
    def forward(self, x, training=True):
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, training)")

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__} must implement backward(dy)")

    def __call__(self, x, training=None):
        """``forward``, then the forward hooks. ``training=None`` uses the mode of
        ``train()``/``eval()``; True or False holds for this call only."""
        mode = self.training
        self.training = mode if training is None else training
        try:
            y = self.forward(x, training=self.training)
            for hook in self.forward_hooks:
                hook(self, x, y)
        finally:
            self.training = mode
        return y

    def backward_with_hooks(self, dy):
        """``backward``, then the backward hooks: what a model calls."""
        dx = self.backward(dy)
        for hook in self.backward_hooks:
            hook(self, dy, dx)
        return dx

    def register_hook(self, fn, kind="forward"):
        """Call ``fn(layer, input, output)`` after each forward ("forward"), or
        ``fn(layer, dy, dx)`` after each backward ("backward"). Returns a remover."""
        hooks = {"forward": self.forward_hooks, "backward": self.backward_hooks}.get(kind)
        if hooks is None:
            raise ValueError(f"{type(self).__name__}.register_hook: kind must be "
                             f"'forward' or 'backward', got {kind!r}")
        hooks.append(fn)
        return lambda: hooks.remove(fn) if fn in hooks else None

    # -- checks of what the passes receive -------------------------------------
    def _as_input(self, x, ndim=None):
        """``x`` checked (device, real dtype, rank) and cast to the layer's dtype."""
        name = type(self).__name__
        backend.check_input(name, x, self.device)
        if ndim is not None and x.ndim != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D input, got shape {tuple(x.shape)}")
        dtype = self.dtype or (x.dtype if x.dtype.kind == "f" else backend.float32)
        return x.astype(dtype, copy=False)

    def _checked_cache(self, dy):
        """The last forward's cache, once ``dy`` is a float array on the layer's device of
        its output's shape: RuntimeError before any forward, TypeError or ValueError for bad dy."""
        name = f"{type(self).__name__}.backward"
        if self.cache is None:
            raise RuntimeError(f"{name} called before forward")
        backend.check_input(name, dy, self.device)
        if dy.dtype.kind != "f":
            raise TypeError(f"{name}: expected a float dy, got dtype {dy.dtype}")
        expected = tuple(self.cache["y_shape"])
        if tuple(dy.shape) != expected:
            raise ValueError(f"{name}: expected dy of shape {expected} "
                             f"(the output of the last forward), got {tuple(dy.shape)}")
        return self.cache

    # -- parameters and state ------------------------------------------------
    def named_parameters(self):
        return [(name, value) for name, value in vars(self).items()
                if isinstance(value, Parameter)]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        return [(name, getattr(self, name)) for name in self.buffer_names]

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    def to(self, device):
        """Move parameters and buffers to ``device`` ("cpu" or "gpu"); returns self."""
        for p in self.parameters():
            p.to(device)
        for name, value in self.named_buffers():
            setattr(self, name, backend.to_device(value, device))
        self.device = device
        self._clear_cache()
        return self

    def _clear_cache(self):
        """Drop cached forward state (it may live on the old device)."""
        self.cache = None

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        """Parameters and buffers as numpy arrays, by name."""
        return {name: backend.to_numpy(value).copy()
                for name, value in self._state_arrays().items()}

    def _state_arrays(self):
        """Parameters and buffers by name, as they are (no copies)."""
        return {name: p.data for name, p in self.named_parameters()} | dict(self.named_buffers())

    def check_state_dict(self, state, where=None):
        """Raise ValueError (TypeError for a non-array) unless ``state`` has exactly this
        layer's names and shapes, in dtypes that load without loss of kind."""
        where = where or f"{type(self).__name__}.load_state_dict"
        current = self._state_arrays()
        missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        if missing or unexpected:
            raise ValueError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        for key, value in state.items():
            if not backend.is_array(value):
                raise TypeError(f"{where}: '{key}' must be a numpy or cupy array, "
                                f"got {type(value).__name__}")
            if value.shape != current[key].shape:
                raise ValueError(f"{where}: '{key}' has shape {tuple(value.shape)}, "
                                 f"expected {tuple(current[key].shape)}")
            # Integers load into floats; floats into integer buffers would be truncated.
            if value.dtype.kind not in ("iu" if current[key].dtype.kind in "iu" else "fiu"):
                raise ValueError(f"{where}: '{key}' has dtype {value.dtype}, which cannot be "
                                 f"loaded into {current[key].dtype}")

    def load_state_dict(self, state):
        """Load ``state_dict``'s arrays as C-contiguous copies in the layer's dtypes, all
        checked first (``check_state_dict``): a mismatch leaves the layer untouched."""
        self.check_state_dict(state)
        for key, p in self.named_parameters():
            p.data = self._loaded(state[key], p.data.dtype)
        for key, value in self.named_buffers():
            setattr(self, key, self._loaded(state[key], value.dtype))

    def _loaded(self, value, dtype):
        return backend.to_device(value, self.device).astype(dtype, order="C", copy=True)

    # -- description ---------------------------------------------------------
    def extra_repr(self):
        """What repr shows: by default ``get_config()``'s values but dtype and None."""
        return ", ".join(f"{key}={value}" for key, value in self.get_config().items()
                         if key != "dtype" and value is not None)

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def get_config(self):
        """The constructor arguments as plain JSON values (as Keras' get_config): what a
        checkpoint stores and ``minidl.load_model`` rebuilds the layer from."""
        return {} if self.dtype is None else {"dtype": self.dtype.name}

    @classmethod
    def from_config(cls, config):
        """The layer built from ``get_config()``'s dict (nested layers already built)."""
        return cls(**config)

    def flops(self, input_shape):
        """Multiply-adds x 2 of one forward pass for one sample (0: not counted)."""
        return 0

    def output_shape(self, input_shape):
        """The output's shape for an input of ``input_shape`` (batch included). This
        default runs a forward on zeros, on a deep copy so that no cache changes."""
        x = backend.zeros(input_shape, self.dtype or backend.float32, self.device)
        return tuple(copy.deepcopy(self).forward(x, training=False).shape)


class Container(Layer):
    """A layer made of named sub-layers (a Sequential's layers, a Residual's branches).
    Their parameters and buffers are its own, named "<sub-layer>.<name>"; ``to``,
    ``train`` and ``load_state_dict`` reach every one of them."""

    in_parallel = False     # True: the sub-layers all read the input (Residual, Concat)

    def __init__(self):
        super().__init__(dtype=None)          # each sub-layer has its own dtype

    def named_layers(self):
        """``(name, layer)`` for each sub-layer, in order."""
        raise NotImplementedError(f"{type(self).__name__} must implement named_layers()")

    def named_parameters(self):
        return [(f"{name}.{key}", p) for name, layer in self.named_layers()
                for key, p in layer.named_parameters()]

    def named_buffers(self):
        return [(f"{name}.{key}", value) for name, layer in self.named_layers()
                for key, value in layer.named_buffers()]

    def to(self, device):
        for _, layer in self.named_layers():
            layer.to(device)
        self.device = device
        self._clear_cache()
        return self

    def train(self, mode=True):
        for _, layer in self.named_layers():
            layer.train(mode)
        return super().train(mode)

    def check_state_dict(self, state, where=None):
        """As ``Layer.check_state_dict``, sub-layer by sub-layer, so that the message
        names the sub-layer at fault."""
        where = where or f"{type(self).__name__}.load_state_dict"
        names = {name for name, _ in self.named_layers()}
        unexpected = sorted(key for key in state if key.partition(".")[0] not in names)
        if unexpected:
            raise ValueError(f"{where}: unexpected keys {unexpected}")
        for name, layer in self.named_layers():
            layer.check_state_dict(_part(state, name),
                                   f"{where}: layer {name} ({type(layer).__name__})")

    def load_state_dict(self, state):
        self.check_state_dict(state)          # before any sub-layer changes
        for name, layer in self.named_layers():
            layer.load_state_dict(_part(state, name))

    def extra_repr(self):
        inner = ",\n".join(f"  ({name}) {layer!r}".replace("\n", "\n  ")
                           for name, layer in self.named_layers())
        return f"\n{inner}\n" if inner else ""


def _part(state, name):
    """The entries of ``state`` under "<name>.", without that prefix."""
    prefix = name + "."
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def sub_layer_shapes(cls, config):
    """``state_shapes`` of a container naming a sub-layer by its key or place in a list."""
    subs = [(k, v) for key, value in config.items()
            for k, v in (enumerate(value) if isinstance(value, list) else [(key, value)])]
    return {f"{k}.{name}": shape for k, v in subs if isinstance(v, dict)
            for name, shape in v.items()}


def layer_spec(layer):
    """``{"class": name, "config": get_config()}``: a layer as a checkpoint stores it."""
    return {"class": layer.saved_as or type(layer).__name__, "config": layer.get_config()}
