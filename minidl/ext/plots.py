"""Pictures of training and of what a network learned, as PNG files.

Needs matplotlib (``pip install 'minidl[viz]'``); ``available()`` tells whether it
imports. Every function takes NumPy arrays or a model and writes one PNG, to a file
atomically (a kill never leaves half a picture, nor loses the previous one), or to a
file object.
"""
import numpy

from .. import backend
from ..layers.base import Container
from ..serialization import atomic_write


def available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no screen needed
    import matplotlib.pyplot as plt
    return plt


def _subplots(*args, **kwargs):
    return _pyplot().subplots(*args, **kwargs)


def _save(fig, path, layout=True):
    """``fig`` as a PNG: to a file name atomically; a file object (the report's
    io.BytesIO) takes the bytes as they come."""
    if layout:
        fig.tight_layout()
    try:
        if hasattr(path, "write"):
            fig.savefig(path, dpi=110, format="png")
        else:
            with atomic_write(path) as tmp:
                fig.savefig(tmp, dpi=110, format="png")
    finally:
        _pyplot().close(fig)
    return path


def plot_history(history, path):
    """Loss and accuracy per epoch, train and validation (``History`` or its dict)."""
    logs = getattr(history, "history", history)
    fig, axes = _subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            values = logs.get(prefix + metric)
            if values:
                ax.plot(range(1, len(values) + 1), values, style,
                        label=(prefix or "train_") + metric)
        _epoch_axis(ax, title=metric)
        if ax.lines:        # a metric not logged: no empty legend (a matplotlib warning)
            ax.legend()
    return _save(fig, path)


def plot_filters(weight, path, title="First-layer filters"):
    """Each filter's first input channel as a small image (weight: F, C, k1, k2)."""
    weight = backend.to_numpy(weight)
    cols = min(8, len(weight))
    rows = -(-len(weight) // cols)
    fig, axes = _subplots(rows, cols, figsize=(cols * 1.2 + 1.0, rows * 1.2 + 0.4),
                          squeeze=False, layout="constrained")
    limit = float(numpy.abs(weight).max()) or 1.0
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(weight):
            image = ax.imshow(weight[k, 0], cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(image, ax=axes, shrink=0.9, label="weight")
    fig.suptitle(title)
    return _save(fig, path, layout=False)


def plot_feature_maps(model, image, path, max_maps=16):
    """The input and, after each layer with a kernel (conv, pool) or branches (Residual,
    Concat), its first channels."""
    x = backend.to_device(image[None], model.device)
    stages = [("input", backend.to_numpy(x)[0])]
    for layer in model.layers:
        x = layer.forward(x, training=False)
        if x.ndim == 4 and (hasattr(layer, "kernel_size") or isinstance(layer, Container)):
            stages.append((type(layer).__name__, backend.to_numpy(x)[0]))
    rows, cols = len(stages), min(max_maps, max(len(maps) for _, maps in stages))
    fig, axes = _subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25), squeeze=False)
    for row, (name, maps) in zip(axes, stages):
        for k, ax in enumerate(row):
            ax.axis("off")
            if k < len(maps):
                ax.imshow(maps[k], cmap="viridis")
        row[0].set_title(name, fontsize=8, loc="left")
    fig.suptitle("Feature maps for one input")
    return _save(fig, path)


def confusion_matrix(labels, predictions, num_classes):
    """counts[true, predicted]; labels and predictions are integers in [0, num_classes)."""
    labels, predictions = backend.to_numpy(labels), backend.to_numpy(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"confusion_matrix: labels have shape {labels.shape} but "
                         f"predictions have shape {predictions.shape}")
    for name, values in (("labels", labels), ("predictions", predictions)):
        # checked: numpy would count a label of -1 in the last row, without a word
        if values.dtype.kind not in "iu":
            raise ValueError(f"confusion_matrix: {name} must be integers, got {values.dtype}")
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} must be in [0, {num_classes}), got "
                             f"values from {values.min()} to {values.max()}")
    counts = numpy.zeros((num_classes, num_classes), dtype=numpy.int64)
    numpy.add.at(counts, (labels, predictions), 1)
    return counts


def plot_confusion_matrix(counts, path, class_names=None):
    n = len(counts)
    names = class_names or [str(k) for k in range(n)]
    fig, ax = _subplots(figsize=(0.55 * n + 2.5, 0.55 * n + 2))
    ax.imshow(numpy.log1p(counts), cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_xticks(range(n), names, rotation=45)
    ax.set_yticks(range(n), names)
    accuracy = numpy.trace(counts) / max(counts.sum(), 1)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix (accuracy {accuracy:.4f})")
    return _save(fig, path)


def plot_gradient_norms(norms, path, model=None):
    """Gradient norm per parameter per epoch: ``norms`` maps a name ("9.weight", as
    GradientRecorder keys it) to a list; with the ``model`` (a Sequential) the legend
    names the layer's class ("Dense 9 weight")."""
    fig, ax = _subplots(figsize=(8, 4.5))
    ax.set_prop_cycle(color=_pyplot().get_cmap("tab20").colors)  # distinct for ~20 parameters
    for name, values in norms.items():
        index, _, param = name.partition(".")
        layer = (type(model.layers[int(index)]).__name__
                 if model is not None and index.isdigit() and int(index) < len(model.layers)
                 else "layer")
        ax.plot(range(1, len(values) + 1), values, "-o", label=f"{layer} {index} {param}",
                markersize=3)
    _epoch_axis(ax, ylabel="mean gradient L2 norm", title="Gradient norm per parameter")
    if norms:
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:       # an empty legend is a matplotlib warning; say why the plot is empty
        ax.text(0.5, 0.5, "no gradient norms recorded", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_lr(lrs, path, steps_per_epoch=None):
    """The learning rate of every optimizer step (``LearningRateMonitor.lrs``), with a
    dotted line at each epoch boundary when ``steps_per_epoch`` is given."""
    fig, ax = _subplots(figsize=(7, 3.5))
    ax.plot(range(len(lrs)), lrs, "-")
    if steps_per_epoch:
        for step in range(steps_per_epoch, len(lrs), steps_per_epoch):
            ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate per step")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_lr_find(lrs, losses, path, suggestion=None):
    """The LR range test: smoothed loss against learning rate (log scale), with the
    suggested rate marked."""
    fig, ax = _subplots(figsize=(7, 4))
    ax.plot(lrs, losses, "-")
    if suggestion is not None:
        ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested {suggestion:.2g}")
        ax.legend()
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)",
           title="Learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _epoch_axis(ax, **labels):
    """x: whole epochs; a light grid; ``labels``: what ``ax.set`` takes (title...)."""
    from matplotlib.ticker import MaxNLocator
    # min_n_ticks=1: with one epoch the default (2) falls back to fractional ticks
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set(xlabel="epoch", **labels)
    ax.grid(alpha=0.3)
