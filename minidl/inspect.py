"""Looking inside a network: the summary table (shapes, parameters, receptive
field, FLOPs).

Receptive field: a layer with kernel k and stride s seen through the layers
before it, whose outputs are ``jump`` input pixels apart, sees
``rf + (k - 1) * jump`` input pixels, and its outputs are ``jump * s`` apart.

``GradientRecorder`` uses the layers' hooks (``Layer.register_hook``) to record
activation and gradient statistics while a Trainer fits.
"""
from .callbacks import Callback


def summary_table(model, input_shape):
    """The text of ``model.summary(input_shape)`` (input_shape without the batch)."""
    shape = (1,) + tuple(input_shape)
    rf, jump = (1, 1), (1, 1)
    rows = []
    total_params = total_flops = 0
    for i, layer in enumerate(model.layers):
        in_shape = shape
        try:
            shape = layer.output_shape(shape)
        except ValueError as exc:
            raise ValueError(f"summary: layer {i} ({type(layer).__name__}) cannot take input "
                             f"of shape {in_shape[1:]}: {exc}") from exc
        rf, jump = receptive_field_step(layer, rf, jump)
        params, flops = layer.num_parameters(), layer.flops(in_shape)
        total_params += params
        total_flops += flops
        rows.append((f"{i}: {type(layer).__name__}", str(shape[1:]), f"{params:,}",
                     f"{rf[0]}x{rf[1]}", _human(flops)))
    header = ("Layer", "Output shape", "Params", "Recept. field", "FLOPs/sample")
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "-" * len(line(header))
    trainable = sum(p.size for p in model.parameters())
    return "\n".join([f"Input shape: {tuple(input_shape)}", rule, line(header), rule]
                     + [line(r) for r in rows]
                     + [rule, f"Total params: {total_params:,} (trainable: {trainable:,})",
                        f"Total FLOPs per sample (forward): {_human(total_flops)}"])


def receptive_field_step(layer, rf, jump):
    """(rf, jump) after ``layer``, for layers with ``kernel_size`` and ``stride``."""
    kernel, stride = getattr(layer, "kernel_size", None), getattr(layer, "stride", None)
    if kernel is None or stride is None:
        return rf, jump
    new_rf = tuple(r + (k - 1) * j for r, k, j in zip(rf, kernel, jump))
    new_jump = tuple(j * s for j, s in zip(jump, stride))
    return new_rf, new_jump


def _human(flops):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f}{unit}"
    return str(int(flops))


class GradientRecorder(Callback):
    """Records, during ``Trainer.fit``, per-layer activation statistics and the
    gradient norm of every parameter, and adds their epoch means to the logs
    (so they land in the History): ``grad_norm/<param>``, ``act_mean/<layer>``,
    ``act_std/<layer>``, ``dead_relu/<layer>`` (fraction of ReLU outputs that are 0).

    Activations are sampled every ``every`` training batches (they cost a reduction
    over each output); gradient norms are taken on every batch, right after each
    layer's backward, so they are exactly the norms of ``.grad`` that the optimizer
    then uses.
    """

    def __init__(self, model, every=10):
        self.model = model
        self.every = every
        self.epoch_logs = []        # one dict per epoch
        self._removers = []
        self._sums = {}
        self._counts = {}
        self._batch = 0

    # -- hooks -------------------------------------------------------------------
    def on_train_begin(self, trainer):
        self.remove()
        prefixes = {id(layer): f"{i}:{type(layer).__name__}"
                    for i, layer in enumerate(self.model.layers)}
        for i, layer in enumerate(self.model.layers):
            name = prefixes[id(layer)]
            self._removers.append(layer.register_hook(self._forward_hook(name), "forward"))
            self._removers.append(layer.register_hook(self._backward_hook(i), "backward"))

    def _forward_hook(self, name):
        def hook(layer, x, y):
            if not layer.training or self._batch % self.every:
                return
            self._add(f"act_mean/{name}", float(y.mean()))
            self._add(f"act_std/{name}", float(y.std()))
            if _is_relu(layer):
                self._add(f"dead_relu/{name}", float((y == 0).mean()))
        return hook

    def _backward_hook(self, index):
        def hook(layer, dy, dx):
            for pname, p in layer.named_parameters():
                if p.grad is not None:
                    self._add(f"grad_norm/{index}.{pname}", grad_norm(p.grad))
            if index == 0:          # the last backward of a step
                self._batch += 1
        return hook

    def _add(self, key, value):
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts[key] = self._counts.get(key, 0) + 1

    # -- epochs ------------------------------------------------------------------
    def on_epoch_end(self, trainer, epoch, logs):
        means = {k: self._sums[k] / self._counts[k] for k in self._sums}
        self.epoch_logs.append(means)
        logs.update(means)
        self._sums, self._counts = {}, {}

    def on_train_end(self, trainer):
        self.remove()

    def remove(self):
        for remove in self._removers:
            remove()
        self._removers = []

    def norms_per_epoch(self):
        """{parameter name: [mean gradient norm in epoch 1, 2, ...]}."""
        names = sorted({k for logs in self.epoch_logs for k in logs if k.startswith("grad_norm/")},
                       key=_natural)
        return {k[len("grad_norm/"):]: [logs.get(k, float("nan")) for logs in self.epoch_logs]
                for k in names}


def grad_norm(g):
    """The L2 norm of a gradient array, as a float."""
    return float((g * g).sum()) ** 0.5


def _is_relu(layer):
    activation = getattr(layer, "activation", layer)
    return type(activation).__name__ == "ReLU"


def _natural(key):
    name = key.split("/", 1)[1]
    index, _, rest = name.partition(".")
    return (int(index) if index.isdigit() else 0, rest)
