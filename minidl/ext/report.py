"""One self-contained HTML page about a trained model: ``write_report``.

The page holds the run's settings, the model summary, the curves (loss, accuracy,
learning rate per step), per-layer activation statistics and gradient norms over the
epochs (``GradientRecorder``'s keys in the History), the first conv layer's filters,
feature maps of one test image, the confusion matrix, the most confidently
misclassified test images with their Grad-CAM (``minidl.ext.explain``), and the
accuracy per class. Everything is inside the one file: pictures are PNGs in ``data:``
URIs, the style sheet is inline, there is no script and no font to fetch, so it opens
offline and can be mailed. The layout reflows from a phone's width to a laptop's.
Needs matplotlib.
"""
import base64
import html
import io
import math

import numpy

from .. import backend
from ..serialization import atomic_write
from . import explain, plots
from .recorder import activation_table

GALLERY_SIZE = 12
_STYLE = """
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; }
body { margin: 0 auto; max-width: 1120px; padding: 1rem 1.25rem 3rem; line-height: 1.45; }
h1 { font-size: 1.5rem; margin-bottom: .25rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
nav { display: flex; flex-wrap: wrap; gap: .3rem .9rem; font-size: .9rem; }
section { border-top: 1px solid #d8dce4; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
.cards { display: grid; gap: .75rem;
         grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); }
figure { margin: 0; } figcaption { font-size: .85rem; text-align: center; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { padding: .25rem .7rem; border-bottom: 1px solid #e4e7ee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { font-size: .78rem; background: #f5f6f9; padding: .6rem; overflow-x: auto; }
.bar { background: #3b6fd8; height: .7rem; border-radius: 2px; }
.note { color: #566; font-size: .9rem; }
@media (max-width: 600px) { body { padding: .6rem; } pre { font-size: .62rem; } }
"""
# (id, heading) of every section, in order: the table of contents and the page.
SECTIONS = [("settings", "Settings"), ("model", "Model"), ("curves", "Training curves"),
            ("activations", "Activations per layer"), ("gradients", "Gradient norms"),
            ("filters", "First-layer filters"), ("feature-maps", "Feature maps"),
            ("confusion", "Confusion matrix"), ("misclassified", "Most confident mistakes"),
            ("per-class", "Accuracy per class")]


def write_report(path, model, history, images, labels, settings=None, lrs=None,
                 steps_per_epoch=None, class_names=None, title="minidl report"):
    """Write the page to ``path`` atomically. ``model``: a trained Sequential;
    ``history``: a ``History`` or its dict of lists; ``images`` (N, C, H, W) floats
    and ``labels`` (N,) ints: the test set; ``settings``: a dict shown as a table
    (run.json); ``lrs``: the learning rate of every step (None: not shown).
    Returns the page's size in bytes."""
    page = build_report(model, history, images, labels, settings, lrs, steps_per_epoch,
                        class_names, title).encode()
    with atomic_write(path) as tmp:
        tmp.write_bytes(page)
    return len(page)


def build_report(model, history, images, labels, settings=None, lrs=None,
                 steps_per_epoch=None, class_names=None, title="minidl report"):
    """The page's HTML text (``write_report`` explains the arguments)."""
    logs = getattr(history, "history", history)
    labels = backend.to_numpy(labels).astype(numpy.int64)
    logits = model.predict(images)
    if logits.ndim != 2:
        raise ValueError(f"report: the model gives outputs of shape {logits.shape}, not "
                         f"class scores (N, classes)")
    classes = logits.shape[1]
    if len(labels) and labels.max() >= classes:
        raise ValueError(f"report: the labels go up to {labels.max()}, but the model gives "
                         f"{classes} class scores")
    names = class_names or [str(k) for k in range(classes)]
    predictions = logits.argmax(axis=1)
    counts = plots.confusion_matrix(labels, predictions, classes)
    accuracy = numpy.trace(counts) / max(len(labels), 1)
    body = {
        "settings": _table(["setting", "value"], sorted((settings or {}).items())),
        "model": f"<pre>{_text(model.summary(images.shape[1:], print_fn=None))}</pre>",
        "curves": _curves(logs, lrs, steps_per_epoch),
        "activations": _activations(logs),
        "gradients": _gradients(logs),
        "filters": _filters(model),
        "feature-maps": _img(plots.plot_feature_maps, model, backend.to_numpy(images[0]),
                             alt="feature maps of the first test image"),
        "confusion": _img(plots.plot_confusion_matrix, counts, class_names=class_names,
                          alt="confusion matrix"),
        "misclassified": _gallery(model, images, labels, logits, names),
        "per-class": _per_class(counts, names),
    }
    nav = "".join(f'<a href="#{key}">{heading}</a>' for key, heading in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{heading}</h2>{body[key]}</section>'
                       for key, heading in SECTIONS)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{_text(title)}</h1><p>test accuracy <b>{accuracy:.4f}</b> on {len(labels)} "
            f"images, after {_epochs(logs)} epochs</p><nav>{nav}</nav>{sections}"
            f"</body></html>\n")


# -- the sections ---------------------------------------------------------------------------
def _curves(logs, lrs, steps_per_epoch):
    parts = [_img(plots.plot_history, logs, alt="loss and accuracy per epoch")]
    if lrs:
        parts.append(_img(plots.plot_lr, lrs, steps_per_epoch=steps_per_epoch,
                          alt="learning rate per step"))
    return "".join(parts)


def _activations(logs):
    layers = _layer_keys(logs, "act_mean/")
    if not layers:
        return _note("No activation statistics in the history (GradientRecorder records them).")
    last = {key: values[-1] for key, values in logs.items() if values}
    return (_img(_plot_activations, logs, layers, alt="activation mean and std per layer")
            + f"<p class='note'>The last epoch; a ReLU's dead share is the fraction of "
              f"outputs that are exactly 0:</p><pre>{_text(activation_table(last))}</pre>")


def _gradients(logs):
    norms = {key.split("/", 1)[1]: values for key, values in logs.items()
             if key.startswith("grad_norm/")}
    if not norms:
        return _note("No gradient norms in the history (GradientRecorder records them).")
    return _img(plots.plot_gradient_norms, norms, alt="gradient norm per parameter")


def _filters(model):
    conv = next((layer for layer in model.layers
                 if getattr(getattr(layer, "weight", None), "data", None) is not None
                 and layer.weight.data.ndim == 4), None)
    if conv is None:
        return _note("The model's top level has no convolution.")
    return _img(plots.plot_filters, conv.weight.data, alt="first-layer filters")


def _gallery(model, images, labels, logits, names):
    """The most confidently misclassified images, each with the Grad-CAM of the class it
    was mistaken for: where the network looked to decide so."""
    probabilities = _softmax(logits)
    predicted = probabilities.argmax(axis=1)
    wrong = numpy.count_nonzero(predicted != labels)
    if not wrong:
        return _note("No test image is misclassified.")
    chosen = most_confident_mistakes(probabilities, labels, GALLERY_SIZE)
    x = backend.to_device(images[chosen], model.device)
    cams = {}
    if explain.feature_map_layers(model, images.shape[1:]):
        cams["Grad-CAM"] = explain.grad_cam(model, x, target=predicted[chosen].tolist())
    titles = [f"#{k}: {names[labels[k]]} as {names[predicted[k]]} "
              f"({probabilities[k, predicted[k]]:.0%})" for k in chosen]
    how = ("with the Grad-CAM of the predicted class: where the network looked to decide so"
           if cams else "without Grad-CAM: no layer of the model gives feature maps")
    cards = []
    for i, title in enumerate(titles):
        picture = _img(explain.plot_explanations, x[i:i + 1],
                       {name: m[i:i + 1] for name, m in cams.items()}, titles=["input"],
                       alt=title)
        cards.append(f"<figure>{picture}<figcaption>{_text(title)}</figcaption></figure>")
    return (_note(f"{wrong} of {len(labels)} test images are misclassified. The "
                  f"{len(chosen)} the model was surest of, as 'true as predicted "
                  f"(probability)', {how}.") + f'<div class="cards">{"".join(cards)}</div>')


def most_confident_mistakes(probabilities, labels, k):
    """The indices of the at most ``k`` misclassified samples whose predicted class had
    the highest probability, highest first (ties: in order)."""
    predicted = probabilities.argmax(axis=1)
    wrong = numpy.flatnonzero(predicted != labels)
    return wrong[numpy.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:k]


def _per_class(counts, names):
    rows = []
    for k, name in enumerate(names):
        total, right = int(counts[k].sum()), int(counts[k, k])
        share = right / total if total else math.nan
        bar = _Html(f'<div class="bar" style="width:{0 if total == 0 else 100 * share:.1f}%">'
                    f'</div>')
        rows.append((name, total, right, f"{share:.4f}", bar))
    return _table(["class", "images", "correct", "accuracy", ""], rows)


# -- pictures ---------------------------------------------------------------------------------
def _plot_activations(logs, layers, path):
    """Mean and standard deviation of each layer's output per epoch, and the dead share of
    the ReLU layers."""
    dead = [name for name in layers if f"dead_relu/{name}" in logs]
    panels = [("act_mean/", "mean", layers), ("act_std/", "std", layers)]
    panels += [("dead_relu/", "dead ReLU share", dead)] if dead else []
    fig, axes = plots._subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    colors = plots._pyplot().get_cmap("tab20").colors
    for ax, (prefix, label, names) in zip(axes[0], panels):
        for name in names:      # a layer keeps its colour from panel to panel
            values = logs[prefix + name]
            ax.plot(range(1, len(values) + 1), values, "-o", markersize=3, label=name,
                    color=colors[layers.index(name) % len(colors)])
        plots._epoch_axis(ax, title=f"activation {label}")
    handles, names = axes[0, 0].get_legend_handles_labels()      # every layer
    axes[0, -1].legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return plots._save(fig, path)


def _img(plot, *args, alt, **kwargs):
    """``plot(*args, <file>, **kwargs)`` drawn into memory, as an <img> with a data: URI."""
    buffer = io.BytesIO()
    plot(*args, buffer, **kwargs)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{data}">'


# -- small pieces -----------------------------------------------------------------------------
def _table(header, rows):
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'


class _Html(str):
    """Markup made here, put in a cell as it is (any other text is escaped)."""


def _cell(value):
    if isinstance(value, _Html):
        return f'<td style="min-width:6rem">{value}</td>'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{_text(value)}</td>"


def _text(value):
    return html.escape(str(value))


def _note(text):
    return f'<p class="note">{_text(text)}</p>'


def _layer_keys(logs, prefix):
    """The layer names ("2:ReLU") logged under ``prefix``, by layer index."""
    names = [key[len(prefix):] for key in logs if key.startswith(prefix)]
    return sorted(names, key=lambda name: int(name.partition(":")[0])
                  if name.partition(":")[0].isdigit() else math.inf)


def _epochs(logs):
    return max((len(values) for values in logs.values()), default=0)


def _softmax(logits):
    e = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
