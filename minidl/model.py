"""Sequential: a model that is a list of layers run one after another.

    model = Sequential([Conv2D(1, 32, 3, padding=1, activation="relu"), ...])
    logits = model.forward(x)            # each layer's forward, in order
    dx = model.backward(dlogits)         # each layer's backward, in reverse

A Sequential is itself a Layer, so it nests and ``minidl.gradcheck`` applies to it.
"""
from . import backend
from .checkpoint import load_weights, save_model
from .checks import check_int
from .layers.base import Container, Layer, layer_spec, sub_layer_shapes
from .layers.registry import register_layer
from .summary import summary_table


@register_layer
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

    def save(self, path, metadata=None):
        """Write parameters, buffers and the model's config (every layer's class and
        constructor arguments, as JSON) to ``path`` (.npz), atomically (checkpoint.py);
        ``metadata``: a JSON-able dict about the model, for ``load_metadata``."""
        save_model(self, path, metadata)

    def load(self, path):
        """Load a checkpoint written by ``save``; all or nothing (the errors: docs/api.md,
        "Errors of checkpoints")."""
        return load_weights(self, path)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(*config.pop("layers", ()), **config)

    def get_config(self):
        return {"layers": [layer_spec(layer) for layer in self.layers]}

    state_shapes = classmethod(sub_layer_shapes)

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
