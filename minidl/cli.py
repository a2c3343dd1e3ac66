"""The ``minidl`` command: train a CNN on MNIST or Fashion-MNIST, evaluate a checkpoint.

    minidl train [--dataset mnist] [--model cnn] [--epochs 8] [--out runs/mnist] ...
    minidl evaluate --checkpoint runs/mnist/model.npz

``train`` prints the model summary, shows a progress bar per epoch, writes the
checkpoint, history.csv and PNG plots to --out, and ends with the line
``test accuracy: 0.99xx``. Ctrl-C or SIGTERM stops it with one line saying where,
and exit status 128 + the signal's number (130, 143).
"""
import argparse
import json
import os
import signal
import sys
import tempfile
import threading

import numpy

from . import backend, viz
from .callbacks import CSVLogger, ModelCheckpoint
from .data import DataLoader, datasets
from .losses import SoftmaxCrossEntropy
from .models import MODELS, build_model
from .optim import SGD, Adam, AdamW, RMSprop
from .random import manual_seed
from .recorder import GradientRecorder
from .schedulers import CosineAnnealingLR
from .trainer import Trainer

DATASETS = {"mnist": datasets.mnist, "fashion-mnist": datasets.fashion_mnist}
CLASS_NAMES = {"fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                 "Shirt", "Sneaker", "Bag", "Boot"]}
OPTIMIZERS = {"adam": Adam, "adamw": AdamW, "sgd": SGD, "rmsprop": RMSprop}
VALIDATION_SIZE = 5000


def build_parser():
    parser = argparse.ArgumentParser(prog="minidl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="train a CNN and write checkpoint, history and plots")
    train.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    train.add_argument("--model", choices=sorted(MODELS), default="cnn")
    train.add_argument("--epochs", type=_positive_int, default=8)
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--lr", type=float, default=2e-3,
                       help="initial learning rate, annealed to 0 by a cosine schedule")
    train.add_argument("--label-smoothing", type=float, default=0.1)
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    train.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    train.add_argument("--seed", type=_non_negative_int, default=0)
    train.add_argument("--limit", type=_limit, default=None,
                       help="train on the first N training images only (N >= 2)")
    train.add_argument("--data-root", default=None,
                       help="dataset cache folder (default: $MINIDL_DATA or ~/.cache/minidl)")
    train.add_argument("--out", default=None, help="output folder (default: runs/DATASET)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=train_command)

    evaluate = sub.add_parser("evaluate", help="reload a checkpoint and report test accuracy")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                          help="default: the one recorded in run.json beside the checkpoint")
    evaluate.add_argument("--model", choices=sorted(MODELS), default=None)
    evaluate.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    evaluate.add_argument("--data-root", default=None)
    evaluate.add_argument("--batch-size", type=_positive_int, default=500)
    evaluate.set_defaults(func=evaluate_command)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return run_stoppable(args.func, args)
    # Bad data, a diverging run (FloatingPointError), a folder that cannot be written:
    # the message says what to do; a traceback would only hide it.
    except (RuntimeError, ValueError, OSError, FloatingPointError) as exc:
        print(f"minidl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:       # Ctrl-C, or SIGTERM (see run_stoppable)
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"minidl {args.command}: stopped by {_signal_name(signum)}"
              f"{': ' if str(stop) else ''}{stop}", file=sys.stderr)
        return 128 + signum


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with the signal's number and, once known, where it stopped."""

    def __init__(self, signum, where=""):
        super().__init__(where)
        self.signum = signum


def run_stoppable(func, args):
    """func(args), with SIGTERM (what `kill` and job schedulers send) raising Stopped as
    Ctrl-C raises KeyboardInterrupt, so both end the same way."""
    def stop(signum, frame):
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        return func(args)       # handlers can only be set from the main thread
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return func(args)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _signal_name(signum):
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


# -- train ----------------------------------------------------------------------
def train_command(args):
    manual_seed(args.seed)
    out = args.out or os.path.join("runs", args.dataset)
    created = make_output_folder(out)
    try:
        with backend.set_backend("cupy" if args.device == "gpu" else "numpy"):
            predictions, y_test = train_and_test(args, out)
    except BaseException:   # e.g. no data, or stopped in epoch 1: no empty folder left
        remove_empty_folders(created)
        raise
    print(f"checkpoint and plots in {out}")
    print(f"test accuracy: {numpy.mean(predictions == y_test):.4f}")
    return 0


def train_and_test(args, out):
    """Train, write everything to ``out``; returns the test predictions and labels."""
    x_train, y_train = load_split(args.dataset, "train", args.data_root)
    x_test, y_test = load_split(args.dataset, "test", args.data_root)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train)

    model = build_model(args.model)
    model.summary(x_train.shape[1:])
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=args.lr)
    trainer = Trainer(model, SoftmaxCrossEntropy(args.label_smoothing), optimizer,
                      scheduler=CosineAnnealingLR(optimizer, T_max=args.epochs),
                      verbose=0 if args.quiet else 1)
    checkpoint = os.path.join(out, "model.npz")
    recorder = GradientRecorder(model)
    saver = ModelCheckpoint(checkpoint, monitor="val_accuracy")
    train = DataLoader(x_train, y_train, args.batch_size, seed=args.seed, transform=to_float)
    print(f"training on {len(x_train)} images, validating on {len(x_val)}, "
          f"testing on {len(x_test)} ({args.device})", flush=True)
    try:
        history = trainer.fit(
            train, epochs=args.epochs,
            val=DataLoader(x_val, y_val, 500, shuffle=False, transform=to_float),
            # The recorder first: it adds its statistics to the logs the others see.
            callbacks=[recorder, saver, CSVLogger(os.path.join(out, "history.csv"))])
    except BaseException as error:
        if saver.saved_epoch is not None:   # `minidl evaluate` can use what is kept
            write_run_json(out, args, error.history.epochs)
        if isinstance(error, KeyboardInterrupt):
            kept = (f"kept {checkpoint} from epoch {saver.saved_epoch} (the best "
                    f"validation accuracy so far)" if saver.saved_epoch is not None
                    else "no checkpoint saved (the first epoch did not end)")
            raise Stopped(getattr(error, "signum", signal.SIGINT),
                          f"in epoch {trainer.epoch + 1}/{args.epochs}, batch "
                          f"{trainer.batch + 1}/{len(train)}; {kept}") from None
        raise
    write_run_json(out, args, history.epochs)
    model.load(checkpoint)  # the best epoch by validation accuracy
    predictions = predict_labels(model, x_test)
    write_plots(out, args.dataset, model, history, recorder, x_test, y_test, predictions)
    return predictions, y_test


def make_output_folder(out):
    """Create the folder ``out`` and write a file in it, so that a folder that cannot
    take the checkpoint is found before training, not after the first epoch. Returns
    the folders it created, outermost first; ValueError saying why on failure."""
    created = []
    path = os.path.abspath(out)
    while not os.path.lexists(path):
        created.insert(0, path)
        path = os.path.dirname(path)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".minidl-write-check-"):
            pass
    except FileExistsError:
        raise ValueError(f"--out {out!r} is a file, not a folder") from None
    except OSError as exc:  # a file where a parent folder should be, no permission...
        remove_empty_folders(created)
        raise ValueError(f"cannot write to the output folder --out {out!r}: "
                         f"{exc.strerror}") from None
    return created


def remove_empty_folders(created):
    """Remove the folders make_output_folder created, innermost first, while empty."""
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            return


def write_run_json(out, args, epochs):
    """run.json: what `minidl evaluate` needs to rebuild the model of the checkpoint."""
    _write_json(os.path.join(out, "run.json"), {
        "dataset": args.dataset, "model": args.model, "epochs": epochs,
        "seed": args.seed, "checkpoint": "model.npz"})


def split_validation(x, y):
    """The last VALIDATION_SIZE images (10% for small sets) become the validation set."""
    n_val = min(VALIDATION_SIZE, max(1, len(x) // 10))
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])


def to_float(images):
    """uint8 pixels -> float32 in [0, 1] (done per batch, so the set stays small)."""
    return images.astype(numpy.float32) * numpy.float32(1 / 255)


def load_split(dataset, split, root):
    return DATASETS[dataset](split=split, root=root)


def predict_labels(model, images, batch_size=500):
    logits = [model.predict(to_float(images[i:i + batch_size]), batch_size)
              for i in range(0, len(images), batch_size)]
    return numpy.concatenate(logits).argmax(axis=1)


def write_plots(out, dataset, model, history, recorder, x_test, y_test, predictions):
    if not viz.available():
        print("plots skipped: matplotlib is not installed (pip install 'minidl[viz]')")
        return
    first_conv = next(layer for layer in model.layers if hasattr(layer, "kernel_size"))
    viz.plot_history(history, os.path.join(out, "curves.png"))
    viz.plot_filters(first_conv.weight.data, os.path.join(out, "filters.png"))
    viz.plot_feature_maps(model, to_float(x_test[0]), os.path.join(out, "feature_maps.png"))
    counts = viz.confusion_matrix(y_test, predictions, 10)
    viz.plot_confusion_matrix(counts, os.path.join(out, "confusion_matrix.png"),
                              CLASS_NAMES.get(dataset))
    viz.plot_gradient_norms(recorder.norms_per_epoch(), os.path.join(out, "gradients.png"))


# -- evaluate ---------------------------------------------------------------------
def evaluate_command(args):
    run = _read_json(os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "run.json"))
    dataset = args.dataset or run.get("dataset", "mnist")
    if dataset not in DATASETS:  # only run.json can name another
        raise ValueError(f"run.json names an unknown dataset {dataset!r}; pass --dataset")
    model_name = args.model or run.get("model", "cnn")
    with backend.set_backend("cupy" if args.device == "gpu" else "numpy"):
        model = build_model(model_name).load(args.checkpoint)
        x_test, y_test = load_split(dataset, "test", args.data_root)
        predictions = predict_labels(model, x_test, args.batch_size)
    print(f"{model_name} on {dataset} ({len(x_test)} test images)")
    print(f"test accuracy: {numpy.mean(predictions == y_test):.4f}")
    return 0


def _positive_int(text):
    return _int_at_least(text, 1, "a positive integer")


def _non_negative_int(text):
    return _int_at_least(text, 0, "a non-negative integer")


def _limit(text):
    # split_validation holds out at least one image, and training needs one more
    return _int_at_least(text, 2, "at least 2 (one image is held out for validation)")


def _int_at_least(text, low, requirement):
    """``text`` as an int >= low. ArgumentTypeError (not ValueError) makes argparse
    print this message after the option's name: "argument --seed: must be ..."."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
    return value


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _read_json(path):
    """The settings in ``path`` ({} if there is none); ValueError if it is not a JSON object."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object like "
                         f'{{"dataset": "mnist", "model": "cnn"}}, got {type(data).__name__}')
    return data


if __name__ == "__main__":
    sys.exit(main())
