"""Looking inside a network: the summary table (shapes, parameters, receptive
field, FLOPs) and ``GradientRecorder`` (docs/architecture.md, "Inspection").

Receptive field: a layer with kernel k and stride s seen through the layers
before it, whose outputs are ``jump`` input pixels apart, sees
``rf + (k - 1) * jump`` input pixels, and its outputs are ``jump * s`` apart.
Layers without a kernel keep (rf, jump), except those that mix every position
(Dense, GlobalAvgPool2D): from them on each output sees the whole input, "all".
A nested Sequential is followed through its own layers, so it counts as they would;
through a Residual or Concat, an output sees what its widest branch sees.

``GradientRecorder`` uses the layers' hooks (``Layer.register_hook``) to record
activation and gradient statistics while a Trainer fits.
"""
from .callbacks import Callback
from .layers.dense import Dense
from .layers.pooling import GlobalAvgPool2D
from .model import Sequential

ALL = None  # the receptive field of a layer that sees the whole input


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
                     "all" if rf is ALL else f"{rf[0]}x{rf[1]}",
                     _human(flops) if flops else "-"))
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
    """(rf, jump) after ``layer``: grown for layers with ``kernel_size`` and ``stride``,
    ``ALL`` from a layer that mixes every position on, unchanged otherwise."""
    if rf is ALL or isinstance(layer, (Dense, GlobalAvgPool2D)):
        return ALL, jump
    if isinstance(layer, Sequential):
        for inner in layer.layers:
            rf, jump = receptive_field_step(inner, rf, jump)
        return rf, jump
    if hasattr(layer, "branches"):      # Residual, Concat: the widest branch decides
        ends = [receptive_field_step(branch, rf, jump) for branch in layer.branches]
        if any(end_rf is ALL for end_rf, _ in ends):
            return ALL, jump
        widest = tuple(max(sizes) for sizes in zip(*(end_rf for end_rf, _ in ends)))
        return widest, tuple(max(steps) for steps in zip(*(end_jump for _, end_jump in ends)))
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

    Activations are sampled on batches 0, ``every``, 2 ``every``, ... of each epoch
    (they cost a reduction over each output), never in evaluation (``training=False``);
    gradient norms are taken on every training batch, right after each layer's
    backward, so they are the norms of the ``.grad`` the optimizer then uses (before
    any ``clip_grad_norm``). ``model`` is a Sequential; its top-level layers are hooked.
    """

    def __init__(self, model, every=10):
        if not hasattr(model, "layers"):
            raise TypeError(f"GradientRecorder: expected a Sequential (a model with .layers), "
                            f"got {type(model).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"GradientRecorder: every must be a positive int, got {every!r}")
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
        self._sums, self._counts, self._batch = {}, {}, 0
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
                self._batch += 1    # (counted within the epoch: see on_epoch_end)
        return hook

    def _add(self, key, value):
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts[key] = self._counts.get(key, 0) + 1

    # -- epochs ------------------------------------------------------------------
    def on_epoch_end(self, trainer, epoch, logs):
        means = {k: self._sums[k] / self._counts[k] for k in self._sums}
        self.epoch_logs.append(means)
        logs.update(means)
        # Restart the count, so every epoch samples batch 0 and logs the same keys
        # (History lists stay aligned with epochs).
        self._sums, self._counts, self._batch = {}, {}, 0

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


def activation_table(logs):
    """One epoch's activation statistics (a ``logs`` dict, e.g. ``history`` rows or
    ``recorder.epoch_logs[-1]``) as text: one row per layer."""
    layers = sorted({k.split("/", 1)[1] for k in logs if k.startswith("act_mean/")},
                    key=lambda name: int(name.split(":")[0]))
    rows = [("Layer", "act mean", "act std", "dead ReLU")]
    for name in layers:
        dead = logs.get(f"dead_relu/{name}")
        rows.append((name, f"{logs[f'act_mean/{name}']:.4f}", f"{logs[f'act_std/{name}']:.4f}",
                     "-" if dead is None else f"{dead:.1%}"))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


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
