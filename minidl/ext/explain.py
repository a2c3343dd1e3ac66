"""What a network looks at: saliency, SmoothGrad, Grad-CAM and occlusion maps
(docs/explain.md derives them and says how to read them).

The lesson of this module: the gradient of a class score with respect to the input is
the backward pass that trains the model, started from a one-hot ``dy`` instead of the
loss's gradient. With y = model(x) the class scores (logits, N x K) and t_n the class
to explain for sample n:

    dy[n, k] = 1 if k == t_n else 0      d y[n, t_n] / d y: a one-hot row per sample
    dx = model.backward(dy)              = d y[n, t_n] / d x[n], by the chain rule
                                           through every layer's own backward

In eval mode the samples of a batch do not interact (batch norm uses its running
statistics, dropout is off), so one backward gives every sample's gradient at once.

Every function takes a ``Sequential`` (Residual and Concat blocks included) in float32
or float64, on numpy or cupy, and an input batch ``x`` of floats on the model's device;
``target`` is None (each sample's predicted class), one class for all, or one per
sample. Each runs in eval mode and leaves the model as it found it: every layer's
cache and training flag, and every parameter's ``.grad``. Maps come back on the
model's device.
"""
import contextlib

from .. import backend
from ..checks import check_int, check_pair, check_real, check_seed, is_int
from ..layers.activations import Softmax
from ..layers.base import Container, Layer
from ..model import Sequential
from ..random import new_rng


# -- the four maps ---------------------------------------------------------------------
def saliency(model, x, target=None):
    """The gradient of the target class's score (its logit) with respect to the input,
    of the shape of ``x`` (Simonyan et al., 2014):

        S[n] = d y[n, t_n] / d x[n]           computed as model.backward(one_hot(t))

    Signed: show |S| (its maximum over channels) as a heat map."""
    x = _checked_input(model, x, "saliency")
    with _untouched(model):
        y = _scores(model, x, "saliency")                   # the forward, in eval mode
        dy = _one_hot(y, _targets(y, target, "saliency"))   # d y[n, t_n] / d y
        return model.backward(dy)                           # the backward that trains


def smoothgrad(model, x, target=None, n=25, sigma=0.15, seed=0):
    """The mean saliency over ``n`` noisy copies of each input (Smilkov et al., 2017):

        SG[n] = (1/n) sum_i S(x[n] + eps_i),   eps_i ~ N(0, (sigma (max x[n] - min x[n]))^2)

    ``sigma`` is the noise's standard deviation as a fraction of each image's range
    (10-20% works best in the paper). ``target`` defaults to the class predicted for
    the clean input, so that every copy explains the same class. The noise is drawn
    on the CPU from ``seed`` and moved: the same numbers on numpy and cupy."""
    x = _checked_input(model, x, "smoothgrad")
    n = check_int(n, "n", "smoothgrad", minimum=1)
    sigma = check_real(sigma, "sigma", "smoothgrad", minimum=0)
    rng = new_rng(check_seed(seed, "seed", "smoothgrad"))
    xp = backend.get_array_module(x)
    axes = tuple(range(1, x.ndim))
    spread = sigma * (x.max(axis=axes, keepdims=True) - x.min(axis=axes, keepdims=True))
    with _untouched(model):
        targets = _targets(_scores(model, x, "smoothgrad"), target, "smoothgrad")
        total = xp.zeros(x.shape, dtype=x.dtype)
        for _ in range(n):
            noise = backend.to_device(rng.standard_normal(x.shape), backend.device_of(x))
            scores = _scores(model, x + (noise * spread).astype(x.dtype), "smoothgrad")
            total += model.backward(_one_hot(scores, targets))
        return total / n


def grad_cam(model, x, target=None, layer=None):
    """Grad-CAM (Selvaraju et al., 2017) on a layer whose output A (N, C, h, w) is a
    stack of feature maps, from A and the gradient dA = d y[n, t_n] / dA that reaches it
    in the backward pass (both caught with the layer's hooks):

        alpha[n, c] = (1 / (h w)) sum_ij dA[n, c, i, j]     how much map c matters
        L[n] = ReLU(sum_c alpha[n, c] A[n, c])              (N, h, w)

    upsampled to the input's height and width (bilinear, half-pixel centres, as
    ``torch.nn.functional.interpolate(..., align_corners=False)``): shape (N, H, W).

    ``layer``: None (the last top-level layer whose output is 4-D), an index into
    ``model.layers``, a name of ``model.named_layers()`` nested with dots ("6.block.0"),
    or a layer of the model."""
    x = _checked_input(model, x, "grad_cam", images=True)
    name, chosen = _cam_layer(model, layer, x)
    caught = {"A": [], "dA": []}
    removers = [chosen.register_hook(lambda _, inp, out: caught["A"].append(out)),
                chosen.register_hook(lambda _, dy, dx: caught["dA"].append(dy), "backward")]
    try:
        with _untouched(model):
            scores = _scores(model, x, "grad_cam")
            model.backward(_one_hot(scores, _targets(scores, target, "grad_cam")),
                           input_grad=False)      # dA is all we need: not dL/dx
    finally:
        for remove in removers:
            remove()
    if len(caught["A"]) != 1 or len(caught["dA"]) != 1:
        raise ValueError(f"grad_cam: layer {name} ({type(chosen).__name__}) ran "
                         f"{len(caught['A'])} times in one forward; choose a layer used once")
    a, da = caught["A"][0], caught["dA"][0]
    if a.ndim != 4:
        raise ValueError(f"grad_cam: layer {name} ({type(chosen).__name__}) gives an output "
                         f"of shape {tuple(a.shape)}; Grad-CAM needs a 4-D one (N, C, h, w): "
                         f"{_choices(model, x)}")
    xp = backend.get_array_module(a)
    alpha = da.mean(axis=(2, 3), keepdims=True)             # global average of dA
    cam = xp.maximum((alpha * a).sum(axis=1), 0)            # ReLU(sum_c alpha_c A_c)
    return upsample(cam, x.shape[2:])


def occlusion(model, x, target=None, window=4, stride=2, fill=None, batch_size=256):
    """The drop of the target class's probability when a ``window`` patch of the input
    is covered (Zeiler and Fergus, 2014): a check of the gradient maps that uses no
    gradient at all. With p(x) = softmax(model(x))[t] and x^W the input with the patch
    W (all channels) set to ``fill``:

        D[n, i, j] = mean over the patches W that contain (i, j) of p(x[n]) - p(x[n]^W)

    Patches step by ``stride`` (int or (h, w)); the last row and column of patches
    touch the border, so every pixel is covered. ``fill``: None for each image's mean
    value (a neutral grey), or a number. Shape (N, H, W); positive where covering
    hurts the prediction. Runs N times as many forwards as there are patches, in
    batches of ``batch_size``. A model that ends in ``Softmax`` gives p directly."""
    x = _checked_input(model, x, "occlusion", images=True)
    window = check_pair(window, "window", "occlusion", minimum=1)
    stride = check_pair(stride, "stride", "occlusion", minimum=1)
    batch_size = check_int(batch_size, "batch_size", "occlusion", minimum=1)
    if fill is not None:
        fill = check_real(fill, "fill", "occlusion")
    h, w = x.shape[2:]
    if window[0] > h or window[1] > w:
        raise ValueError(f"occlusion: window {window} is larger than the images ({h}, {w})")
    xp = backend.get_array_module(x)
    patches = _patches(xp, (h, w), window, stride, x.dtype)       # (P, H, W): 1 inside
    covered = patches.reshape(len(patches), -1)
    maps = []
    with _untouched(model):
        scores = _scores(model, x, "occlusion")
        targets = _targets(scores, target, "occlusion")
        p_clean = _probabilities(model, scores)[xp.arange(len(x)), targets]
        for k in range(len(x)):
            grey = x[k].mean() if fill is None else fill
            drops = []
            for start in range(0, len(patches), batch_size):
                m = patches[start:start + batch_size, None]          # (B, 1, H, W)
                x_w = x[k] * (1 - m) + grey * m
                p = _probabilities(model, model.forward(x_w, training=False))[:, targets[k]]
                drops.append(p_clean[k] - p)
            drop = xp.concatenate(drops)                             # (P,)
            maps.append((drop @ covered / covered.sum(axis=0)).reshape(h, w))
    return xp.stack(maps)


# -- pictures ----------------------------------------------------------------------------
def heatmap(maps):
    """Maps as pictures, (N, H, W) numpy arrays in [0, 1], or in [-1, 1] for signed maps
    (occlusion): a gradient (N, C, H, W) becomes its largest |value| over channels; each
    map is divided by its largest |value|."""
    maps = backend.to_numpy(maps)
    if maps.ndim == 4:
        maps = abs(maps).max(axis=1)
    scale = abs(maps).max(axis=(1, 2), keepdims=True)
    return maps / scale.clip(min=1e-30)


def plot_explanations(images, maps, path, titles=None):
    """One row per image of ``images`` (N, C, H, W): the image, then each map of ``maps``
    ({name: (N, H, W) or (N, C, H, W) array}) laid over it (``heatmap``: jet, or blue to
    red for a signed map). ``titles``: one per image. ``path``: a file name or a binary
    file object (PNG). Needs matplotlib."""
    from .plots import _save, _subplots        # pyplot is imported on first use
    images = backend.to_numpy(images)
    pictures = {name: heatmap(m) for name, m in maps.items()}
    rows, cols = len(images), 1 + len(pictures)
    fig, axes = _subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows), squeeze=False)
    for k, (image, panels) in enumerate(zip(images, axes)):
        shown = image[0] if len(image) == 1 else image.transpose(1, 2, 0)
        panels[0].imshow(shown, cmap="gray")
        panels[0].set_title(titles[k] if titles else f"input {k}", fontsize=7)
        for ax, (name, picture) in zip(panels[1:], pictures.items()):
            signed = picture.min() < 0
            ax.imshow(shown, cmap="gray")
            ax.imshow(picture[k], cmap="RdBu_r" if signed else "jet", alpha=0.5,
                      vmin=-1 if signed else 0, vmax=1)
            ax.set_title(name, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    return _save(fig, path)


# -- pieces ------------------------------------------------------------------------------
def upsample(maps, size):
    """Bilinear resize of ``maps`` (N, h, w) to ``size`` (H, W), with half-pixel
    centres as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``:
    output = R_H @ maps @ R_W.T, one weight matrix per axis (``_resize_matrix``)."""
    xp = backend.get_array_module(maps)
    rows = _resize_matrix(xp, size[0], maps.shape[1], maps.dtype)
    cols = _resize_matrix(xp, size[1], maps.shape[2], maps.dtype)
    return rows @ maps @ cols.T


def _resize_matrix(xp, n_out, n_in, dtype):
    """R (n_out, n_in): output i reads input s = (i + 1/2) n_in / n_out - 1/2 (clamped
    at 0), as (1 - f) in[floor s] + f in[floor s + 1], f = s - floor s (the last input
    repeated past the edge)."""
    s = xp.maximum((xp.arange(n_out, dtype=xp.float64) + 0.5) * (n_in / n_out) - 0.5, 0)
    i0 = xp.minimum(xp.floor(s).astype(xp.int64), n_in - 1)
    i1 = xp.minimum(i0 + 1, n_in - 1)
    f = (s - i0)[:, None]
    k = xp.arange(n_in)[None, :]
    return ((1 - f) * (k == i0[:, None]) + f * (k == i1[:, None])).astype(dtype)


def _patches(xp, size, window, stride, dtype):
    """(P, H, W): 1 inside each patch, 0 outside; the last patch of each axis ends at
    the border."""
    starts = []
    for n, k, s in zip(size, window, stride):
        first = list(range(0, n - k + 1, s))
        starts.append(first + ([n - k] if first[-1] != n - k else []))
    rows, cols = xp.arange(size[0])[:, None], xp.arange(size[1])[None, :]
    return xp.stack([((rows >= i) & (rows < i + window[0]) & (cols >= j)
                      & (cols < j + window[1])).astype(dtype)
                     for i in starts[0] for j in starts[1]])


def _checked_input(model, x, where, images=False):
    """``x`` once ``model`` is a Sequential and ``x`` a non-empty float batch on its
    device; of images (N, C, H, W) when ``images``."""
    if not isinstance(model, Sequential):
        raise TypeError(f"{where}: expected a minidl Sequential, got {type(model).__name__}")
    backend.check_input(where, x, model.device)
    if x.dtype.kind != "f":
        raise TypeError(f"{where}: expected a float input (scale images to [0, 1] first), "
                        f"got dtype {x.dtype}")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{where}: expected a batch x of shape (N, ...) with N >= 1, got "
                         f"shape {tuple(x.shape)}")
    if images and x.ndim != 4:
        raise ValueError(f"{where}: expected images x of shape (N, C, H, W), got "
                         f"{tuple(x.shape)}")
    return x


def _scores(model, x, where):
    """The model's outputs for ``x`` in eval mode, once they are class scores (N, K)."""
    scores = model.forward(x, training=False)
    if scores.ndim != 2:
        raise ValueError(f"{where}: expected the model to give class scores of shape "
                         f"(N, classes), got an output of shape {tuple(scores.shape)}")
    return scores


def _targets(scores, target, where):
    """One class per sample, on the scores' device: the predicted ones for None."""
    xp = backend.get_array_module(scores)
    n, classes = scores.shape
    if target is None:
        return scores.argmax(axis=1)
    if is_int(target):
        target = [target] * n
    t = xp.asarray(target)
    if t.ndim != 1 or t.dtype.kind not in "iu":
        raise TypeError(f"{where}: target must be None (the predicted class), one class "
                        f"(an int) or one int per input, got {target!r:.80}")
    if len(t) != n:
        raise ValueError(f"{where}: target has {len(t)} classes for {n} inputs; pass one "
                         f"per input, one int for all, or None (the predicted class)")
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= classes:
        raise ValueError(f"{where}: target {low if low < 0 else high} is out of range: the "
                         f"model has {classes} classes (0 to {classes - 1})")
    return t.astype(xp.int64)


def _one_hot(scores, targets):
    """dy: 1 at [n, t_n], 0 elsewhere, in the scores' dtype."""
    xp = backend.get_array_module(scores)
    dy = xp.zeros(scores.shape, dtype=scores.dtype)
    dy[xp.arange(len(dy)), targets] = 1
    return dy


def _probabilities(model, scores):
    if isinstance(model.layers[-1], Softmax):
        return scores
    xp = backend.get_array_module(scores)
    e = xp.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _cam_layer(model, layer, x):
    """(name, layer) that Grad-CAM reads, from ``layer`` as ``grad_cam`` takes it."""
    named = _named_layers(model)
    if layer is None:
        found = feature_map_layers(model, x.shape[1:])
        if not found:
            raise ValueError(f"grad_cam: no layer of the model gives a 4-D output (N, C, h, "
                             f"w) for input of shape {tuple(x.shape)}; Grad-CAM needs one")
        return str(found[-1]), model.layers[found[-1]]
    if isinstance(layer, Layer):
        for name, candidate in named.items():
            if candidate is layer:
                return name, layer
        raise ValueError(f"grad_cam: the layer {type(layer).__name__} given is not in the "
                         f"model; {_choices(model, x)}")
    if is_int(layer):
        if not -len(model.layers) <= layer < len(model.layers):
            raise ValueError(f"grad_cam: layer {layer} is out of range: the model has "
                             f"{len(model.layers)} layers; {_choices(model, x)}")
        layer = str(layer % len(model.layers))
    if not isinstance(layer, str):
        raise TypeError(f"grad_cam: layer must be None, an int, a name such as '3' or "
                        f"'6.block.0', or a Layer of the model, got {layer!r:.80}")
    if layer not in named:
        raise ValueError(f"grad_cam: no layer named {layer!r}; {_choices(model, x)}")
    return layer, named[layer]


def _choices(model, x):
    """The top-level layers with a 4-D output, as an error message lists them."""
    found = [f"{i} ({type(model.layers[i]).__name__})"
             for i in feature_map_layers(model, x.shape[1:])]
    return (f"the layers with a 4-D output are {', '.join(found)}" if found
            else "no layer of this model gives a 4-D output")


def feature_map_layers(model, input_shape):
    """The indices of ``model``'s top-level layers whose output is a stack of feature maps
    (4-D) for inputs of ``input_shape`` (one sample: (C, H, W)): what ``grad_cam`` can
    read, the last one by default."""
    shape, found = (1,) + tuple(input_shape), []
    for i, layer in enumerate(model.layers):
        shape = layer.output_shape(shape)
        if len(shape) == 4:
            found.append(i)
    return found


def _named_layers(container, prefix=""):
    """{dotted name: layer} of every layer inside ``container``, depth first."""
    named = {}
    for name, layer in container.named_layers():
        named[prefix + name] = layer
        if isinstance(layer, Container):
            named.update(_named_layers(layer, f"{prefix}{name}."))
    return named


def _every_layer(layer, found):
    """``found`` ({id: layer}) with ``layer`` and every layer it holds: sub-layers,
    branches, and the activation inside a Conv2D or Dense."""
    if id(layer) not in found:
        found[id(layer)] = layer
        for value in vars(layer).values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, Layer):
                    _every_layer(item, found)
    return found


@contextlib.contextmanager
def _untouched(model):
    """Run the block, then put back every layer's cache and training flag and every
    parameter's gradient: a model explained between a training step's forward and
    backward still gives that step's gradients."""
    layers = list(_every_layer(model, {}).values())
    saved = [(layer, layer.cache, layer.training) for layer in layers]
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None           # the backward here accumulates into fresh arrays
    try:
        yield
    finally:
        for layer, cache, training in saved:
            layer.cache, layer.training = cache, training
        for p, grad in grads:
            p.grad = grad
