"""``GradientRecorder``: activation and gradient statistics recorded through the
layers' hooks while a Trainer fits (docs/architecture.md, "Inspection")."""
from .. import backend
from ..callbacks import Callback


class GradientRecorder(Callback):
    """Records, during ``Trainer.fit``, per-layer activation statistics (every ``every``-th
    training batch: each costs a reduction over an output) and every parameter's gradient
    norm (every training batch), through hooks on the top-level layers of ``model`` (a
    Sequential), and adds their epoch means to the logs, so to the History (the keys:
    docs/architecture.md, "Inspection"). The sums stay on the device until the epoch ends.
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

    # -- hooks -------------------------------------------------------------------
    def on_train_begin(self, trainer):
        self.remove()
        self._sums, self._counts, self._batch = {}, {}, 0
        for i, layer in enumerate(self.model.layers):
            name = f"{i}:{type(layer).__name__}"
            self._removers.append(layer.register_hook(self._forward_hook(name), "forward"))
            self._removers.append(layer.register_hook(self._backward_hook(i), "backward"))

    def _forward_hook(self, name):
        def hook(layer, x, y):
            if not layer.training or self._batch % self.every:
                return
            self._add(f"act_mean/{name}", y.mean())
            self._add(f"act_std/{name}", y.std())
            if _is_relu(layer):
                self._add(f"dead_relu/{name}", (y == 0).mean())
        return hook

    def _backward_hook(self, index):
        def hook(layer, dy, dx):
            for pname, p in layer.named_parameters():
                if p.grad is not None:
                    self._add(f"grad_norm/{index}.{pname}", _norm(p.grad))
            if index == 0:          # the last backward of a step
                self._batch += 1    # (counted within the epoch: see on_epoch_end)
        return hook

    def _add(self, key, value):
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts[key] = self._counts.get(key, 0) + 1

    # -- epochs ------------------------------------------------------------------
    def on_epoch_end(self, trainer, epoch, logs):
        sums = backend.to_floats(list(self._sums.values()))
        means = {k: s / self._counts[k] for k, s in zip(self._sums, sums)}
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
        """{parameter name: [mean gradient norm in epoch 1, 2, ...]} of this fit's epochs."""
        return grad_norms(self.epoch_logs)


def grad_norms(history):
    """{parameter name: [mean gradient norm per epoch]} from the "grad_norm/" numbers of
    a ``History`` (a resumed run's earlier epochs included) or a list of epoch logs."""
    rows = history.rows() if hasattr(history, "rows") else list(history)
    names = sorted({k for logs in rows for k in logs if k.startswith("grad_norm/")}, key=_natural)
    return {k[len("grad_norm/"):]: [logs.get(k, float("nan")) for logs in rows] for k in names}


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
    return float(_norm(g))


def _norm(g):
    """sqrt(sum(g**2)) as a 0-d float64 array on g's device (a dot product: no
    temporary array, and no wait for the device)."""
    xp = backend.get_array_module(g)
    return xp.sqrt(xp.asarray(xp.vdot(g, g), dtype=xp.float64))


def _is_relu(layer):
    activation = getattr(layer, "activation", layer)
    return type(activation).__name__ == "ReLU"


def _natural(key):
    name = key.split("/", 1)[1]
    index, _, rest = name.partition(".")
    return (int(index) if index.isdigit() else 0, rest)
