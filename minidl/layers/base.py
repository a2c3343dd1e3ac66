"""Parameter and Layer: the contract every layer of minidl fulfils.

A layer has an explicit ``forward(x, training)`` that caches what its backward
needs, and ``backward(dy)`` that returns dL/dx and *accumulates* dL/dparam into
each ``Parameter.grad`` (as PyTorch does; an optimizer's ``zero_grad`` clears it).
See docs/architecture.md for how layers, losses and optimizers fit together.
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
        """Add ``g`` to ``.grad`` (allocated on first use, like PyTorch). The gradient
        keeps the parameter's dtype even when ``g`` comes from a float64 ``dy``."""
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
    """Base class: subclasses implement ``forward`` and ``backward`` side by side.

    Parameters are found as ``Parameter`` attributes (in the order they were set);
    non-trainable state that must be saved (BatchNorm's running statistics) is
    listed by name in the class attribute ``buffer_names``.

    ``dtype`` is the float type of the parameters, and inputs are cast to it. A layer
    without parameters may leave it None: it then keeps a float input's dtype (so a
    float64 gradient check stays float64) and casts other inputs to float32.

    ``cache`` holds what forward keeps for backward: a dict whose "y_shape" is the
    shape of the output, which backward's ``dy`` must have (see ``_checked_cache``).
    """

    buffer_names = ()
    # True for layers whose every output depends on every input position (Dense,
    # GlobalAvgPool2D): the summary's receptive field is "all" from them on.
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
        """``forward`` with the hooks. ``training=None`` uses the mode set by ``train()``
        or ``eval()``; True or False overrides it for this call only (forward hooks
        read it as ``layer.training``; the mode is restored afterwards)."""
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
        """``backward`` followed by the backward hooks: what a model calls."""
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

    # -- inputs --------------------------------------------------------------
    def _as_input(self, x, ndim=None):
        """Check device (and rank), and cast ``x`` to the layer's dtype."""
        name = type(self).__name__
        backend.check_input(name, x, self.device)
        if ndim is not None and x.ndim != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D input, got shape {tuple(x.shape)}")
        dtype = self.dtype or (x.dtype if x.dtype.kind == "f" else backend.float32)
        return x.astype(dtype, copy=False)

    def _check_grad(self, dy, expected_shape):
        """Check the ``dy`` given to backward: a float array on the layer's device with
        the shape of the output of the last forward pass. Raises RuntimeError before any
        forward (``expected_shape`` None), TypeError or ValueError on a bad ``dy``."""
        name = f"{type(self).__name__}.backward"
        if expected_shape is None:
            raise RuntimeError(f"{name} called before forward")
        backend.check_input(name, dy, self.device)
        if dy.dtype.kind != "f":
            raise TypeError(f"{name}: expected a float dy, got dtype {dy.dtype}")
        if tuple(dy.shape) != tuple(expected_shape):
            raise ValueError(f"{name}: expected dy of shape {tuple(expected_shape)} "
                             f"(the output of the last forward), got {tuple(dy.shape)}")
        return dy

    def _checked_cache(self, dy):
        """The cache of the last forward, once ``dy`` is checked against the shape of
        that forward's output, ``cache["y_shape"]`` (see ``_check_grad``)."""
        self._check_grad(dy, None if self.cache is None else self.cache["y_shape"])
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
        state = {name: backend.to_numpy(p.data).copy() for name, p in self.named_parameters()}
        for name, value in self.named_buffers():
            state[name] = backend.to_numpy(value).copy()
        return state

    def check_state_dict(self, state, where=None):
        """Raise ValueError (TypeError for a non-array) unless ``state`` has exactly this
        layer's names and shapes, in dtypes that load without loss of kind."""
        where = where or f"{type(self).__name__}.load_state_dict"
        current = self._state_arrays()
        expected = {key: tuple(value.shape) for key, value in current.items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        for key, shape in expected.items():
            value = state[key]
            if not backend.is_array(value):
                raise TypeError(f"{where}: '{key}' must be a numpy or cupy array, "
                                f"got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(f"{where}: '{key}' has shape {tuple(value.shape)}, "
                                 f"expected {shape}")
            # Integers load into floats; floats into integer buffers would be truncated.
            allowed = "iu" if current[key].dtype.kind in "iu" else "fiu"
            if value.dtype.kind not in allowed:
                raise ValueError(f"{where}: '{key}' has dtype {value.dtype}, which cannot be "
                                 f"loaded into {current[key].dtype}")

    def load_state_dict(self, state):
        """Load arrays saved by ``state_dict``; every name, shape and dtype is checked
        first, so a mismatch raises ValueError (or TypeError) and leaves the layer
        untouched. The arrays are copied, C-contiguous, in the layer's dtypes."""
        self.check_state_dict(state)
        for key, p in self.named_parameters():
            p.data = self._loaded(state[key], p.data.dtype)
        for key, value in self.named_buffers():
            setattr(self, key, self._loaded(state[key], value.dtype))

    def _state_arrays(self):
        """Parameters and buffers by name, as they are (no copies)."""
        arrays = {name: p.data for name, p in self.named_parameters()}
        arrays.update(self.named_buffers())
        return arrays

    def _loaded(self, value, dtype):
        return backend.to_device(value, self.device).astype(dtype, order="C", copy=True)

    # -- description ---------------------------------------------------------
    def extra_repr(self):
        """The constructor arguments shown by repr; subclasses override."""
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def get_config(self):
        """The constructor arguments as plain JSON values, as Keras layers give them: a
        checkpoint stores them, ``minidl.load_model`` rebuilds the layer from them.
        Subclasses add theirs to this dict."""
        return {} if self.dtype is None else {"dtype": self.dtype.name}

    @classmethod
    def from_config(cls, config):
        """The layer built from ``get_config()``'s dict (nested layers already built)."""
        return cls(**config)

    def flops(self, input_shape):
        """Multiply-adds x 2 of one forward pass for one sample (0: not counted)."""
        return 0

    def output_shape(self, input_shape):
        """Shape of the output for an input of ``input_shape`` (batch included).

        The default runs a forward pass on zeros, on a deep copy of the layer so that
        what the layer and the layers it holds cached for backward stays as it was;
        layers override it with arithmetic."""
        x = backend.zeros(input_shape, self.dtype or backend.float32, self.device)
        return tuple(copy.deepcopy(self).forward(x, training=False).shape)


def layer_spec(layer):
    """``{"class": name, "config": get_config()}``: a layer as a checkpoint stores it."""
    return {"class": type(layer).__name__, "config": layer.get_config()}
