"""``minidl explain``: what a checkpoint's model looks at in some test images, as one PNG
grid: each image with its true and predicted labels, then its saliency, SmoothGrad,
Grad-CAM and occlusion maps laid over it (minidl/ext/explain.py)."""
import io
import os

import numpy

from .. import backend
from ..ext import explain, plots
from ..serialization import atomic_write
from .evaluate import load_checkpoint
from .recipe import CLASS_NAMES, DATASETS, checkpoint_settings, int_option, load_split, \
    to_float, use_device
from .report import MAX_SETTINGS_BYTES, checked_file

# --method: (the map's name in the picture, how it is computed)
METHODS = {"saliency": ("saliency", explain.saliency),
           "smoothgrad": ("SmoothGrad", explain.smoothgrad),
           "gradcam": ("Grad-CAM", explain.grad_cam),
           "occlusion": ("occlusion", explain.occlusion)}
INDEX = int_option(0, "a non-negative integer")


def add_parser(sub, parents, from_run_json):
    parser = sub.add_parser("explain", parents=parents,
                            help="draw what a checkpoint's model looks at in test images "
                                 "(saliency, SmoothGrad, Grad-CAM, occlusion) as a PNG")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=None, help=from_run_json)
    parser.add_argument("--index", type=INDEX, nargs="+", default=list(range(8)), metavar="N",
                        help="which test images (default: the first 8)")
    parser.add_argument("--method", choices=[*METHODS, "all"], default="all",
                        help="which map to draw (default: %(default)s, every one)")
    parser.add_argument("--target", type=INDEX, default=None, metavar="CLASS",
                        help="the class to explain (default: each image's predicted class)")
    parser.add_argument("--out", default=None,
                        help="the PNG to write (default: explain.png beside the checkpoint)")
    parser.set_defaults(func=run)


def run(args):
    if not plots.available():
        raise RuntimeError("explain draws with matplotlib: pip install 'minidl[viz]'")
    checked_file(args.checkpoint, "checkpoint", None)
    settings = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "run.json")
    if os.path.lexists(settings):       # read by checkpoint_settings: no pipe, no giant
        checked_file(settings, "run.json", MAX_SETTINGS_BYTES)
    dataset, _ = checkpoint_settings(args, "dataset", "model")
    dataset = dataset or "mnist"
    methods = list(METHODS) if args.method == "all" else [args.method]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   "explain.png")
    with use_device(args):
        model = load_checkpoint(args).eval()
        images, labels = load_split(dataset, "test", args.data_root)
        wrong = [k for k in args.index if k >= len(images)]
        if wrong:
            raise ValueError(f"--index {wrong[0]} is out of range: the {dataset} test set has "
                             f"{len(images)} images (0 to {len(images) - 1})")
        x = backend.to_device(to_float(images[args.index]), model.device)
        scores = model.predict(x)
        if scores.ndim != 2:
            raise ValueError(f"{args.checkpoint}: the model gives outputs of shape "
                             f"{scores.shape}, not class scores (N, classes)")
        maps = {METHODS[m][0]: METHODS[m][1](model, x, target=args.target) for m in methods}
    names = CLASS_NAMES.get(dataset) or [str(k) for k in range(scores.shape[1])]
    e = numpy.exp(scores - scores.max(axis=1, keepdims=True))
    p, predicted = e / e.sum(axis=1, keepdims=True), scores.argmax(axis=1)
    titles = [f"#{k} true {names[labels[k]] if labels[k] < len(names) else labels[k]}\n"
              f"predicted {names[c]} ({p[i, c]:.0%})"
              for i, (k, c) in enumerate(zip(args.index, predicted))]
    buffer = io.BytesIO()
    explain.plot_explanations(x, maps, buffer, titles=titles)
    with atomic_write(out) as tmp:
        tmp.write_bytes(buffer.getvalue())
    target = "each image's predicted class" if args.target is None else f"class {args.target}"
    print(f"{', '.join(maps)} of {dataset} test images {', '.join(map(str, args.index))} "
          f"({target}) written to {out}")
    return 0
