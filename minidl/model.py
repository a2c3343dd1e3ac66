"""Sequential: a model that is a list of layers run one after another.

    model = Sequential([Conv2D(1, 32, 3, padding=1, activation="relu"), ...])
    logits = model.forward(x)            # each layer's forward, in order
    dx = model.backward(dlogits)         # each layer's backward, in reverse

A Sequential is itself a Layer, so it nests and ``minidl.gradcheck`` applies to it.
"""
from . import backend
from .layers.arguments import as_positive_int
from .layers.base import Layer
from .serialization import load_npz, save_npz
from .summary import summary_table

_STRUCTURE_KEY = "__structure__"


class Sequential(Layer):
    """Layers applied in order: ``Sequential([a, b, c])`` or ``Sequential(a, b, c)``."""

    def __init__(self, *layers):
        super().__init__(dtype=None)          # each layer has its own dtype
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
        """Each layer's backward, last to first; returns dL/dx.

        ``input_grad=False`` says the caller has no use for dL/dx (x is data, as in a
        training step): it returns None, and a first layer with an ``input_grad``
        switch (Conv2D, Dense) skips that product for this call, as PyTorch does for
        an input that does not require grad. Its backward hooks then see dx = None."""
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
        """Outputs for ``x`` in eval mode, batch by batch, as a numpy array.

        TypeError/ValueError unless ``batch_size`` is an int >= 1; ValueError for an
        empty ``x``."""
        batch_size = as_positive_int(batch_size, "batch_size", "Sequential.predict")
        xp_out = []
        for start in range(0, len(x), batch_size):
            batch = backend.to_device(x[start:start + batch_size], self.device)
            xp_out.append(backend.to_numpy(self.forward(batch, training=False)))
        if not xp_out:
            raise ValueError("Sequential.predict: got an empty input")
        return _concatenate(xp_out)

    # -- parameters and state ------------------------------------------------
    def named_parameters(self):
        return [(f"{i}.{name}", p) for i, layer in enumerate(self.layers)
                for name, p in layer.named_parameters()]

    def named_buffers(self):
        return [(f"{i}.{name}", value) for i, layer in enumerate(self.layers)
                for name, value in layer.named_buffers()]

    def to(self, device):
        for layer in self.layers:
            layer.to(device)
        self.device = device
        return self

    def train(self, mode=True):
        self.training = mode
        for layer in self.layers:
            layer.train(mode)
        return self

    def state_dict(self):
        state = {}
        for i, layer in enumerate(self.layers):
            state.update({f"{i}.{k}": v for k, v in layer.state_dict().items()})
        return state

    def load_state_dict(self, state):
        """Load every layer's arrays; all names and shapes are checked before any
        layer changes, so a mismatch raises ValueError and leaves the model as it was."""
        per_layer = [{} for _ in self.layers]
        unexpected = []
        for key, value in state.items():
            index, _, name = key.partition(".")
            if index.isdigit() and int(index) < len(self.layers):
                per_layer[int(index)][name] = value
            else:
                unexpected.append(key)
        if unexpected:
            raise ValueError(f"Sequential.load_state_dict: unexpected keys {sorted(unexpected)}")
        for i, (layer, sub) in enumerate(zip(self.layers, per_layer)):
            layer.check_state_dict(sub, f"Sequential.load_state_dict: layer {i} "
                                        f"({type(layer).__name__})")
        for layer, sub in zip(self.layers, per_layer):
            layer.load_state_dict(sub)

    def save(self, path):
        """Write parameters, buffers and a structure description to ``path`` (.npz)."""
        state = self.state_dict()
        state[_STRUCTURE_KEY] = _structure(self)
        save_npz(path, state)

    def load(self, path):
        """Load a checkpoint written by ``save``; the model is untouched on any error."""
        state = load_npz(path)
        saved = state.pop(_STRUCTURE_KEY, None)
        mine = _structure(self)
        if saved is None or list(saved) != list(mine):
            raise ValueError(f"Sequential.load: {path!r} was saved from a different model "
                             f"structure:\n  saved: {_describe(saved)}\n  this:  {_describe(mine)}")
        self.load_state_dict(state)
        return self

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
        """A Keras-like table: each layer, its output shape and parameter count.

        ``input_shape`` excludes the batch, e.g. (1, 28, 28). Returns the text."""
        text = summary_table(self, input_shape)
        if print_fn is not None:
            print_fn(text)
        return text

    def extra_repr(self):
        inner = ",\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"\n{inner}\n" if inner else ""


def _structure(model):
    """One string per layer: its class and the shapes of its arrays."""
    rows = []
    for i, layer in enumerate(model.layers):
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in layer.state_dict().items())
        rows.append(f"{i}:{type(layer).__name__}[{shapes}]")
    return backend.get_module("cpu").array(rows if rows else [""], dtype=str)


def _describe(structure):
    return "none" if structure is None else " ".join(str(s) for s in structure)


def _concatenate(arrays):
    return backend.get_module("cpu").concatenate(arrays, axis=0)
