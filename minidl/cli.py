"""The ``minidl`` command: train, evaluate or export a CNN for (Fashion-)MNIST; lr-find.

    minidl train [--dataset mnist] [--model cnn] [--epochs 8] [--out runs/mnist] ...
    minidl lr-find [--steps 100] ...
    minidl evaluate --checkpoint runs/mnist/model.npz
    minidl export --checkpoint runs/mnist/model.npz --onnx model.onnx

Options and outputs: docs/api.md. An error prints one line and exits 1; Ctrl-C or
SIGTERM stops with one line saying where, and exit 128 + the signal's number (130, 143).
"""
import argparse
import json
import os
import signal
import sys
import tempfile
import threading

import numpy

from . import backend, distributed, viz
from .callbacks import CSVLogger, ModelCheckpoint
from .data import DataLoader, datasets
from .data.transforms import Compose, RandomHorizontalFlip, RandomShift
from .losses import SoftmaxCrossEntropy
from .lr_finder import lr_find, suggest_lr
from .model import load_model
from .models import MODELS, build_model
from .optim import SGD, Adam, AdamW, RMSprop
from .random import manual_seed
from .recorder import GradientRecorder
from .schedulers import CosineAnnealingLR, OneCycleLR
from .serialization import atomic_write
from .trainer import Trainer

DATASETS = {"mnist": datasets.mnist, "fashion-mnist": datasets.fashion_mnist}
CLASS_NAMES = {"fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                 "Shirt", "Sneaker", "Bag", "Boot"]}
OPTIMIZERS = {"adam": Adam, "adamw": AdamW, "sgd": SGD, "rmsprop": RMSprop}
SCHEDULES = {
    "cosine": lambda opt, args, steps: CosineAnnealingLR(opt, T_max=args.epochs),
    "onecycle": lambda opt, args, steps: OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                    steps_per_epoch=steps),
}
# What run.json records, and --resume reads back.
SETTINGS = ("dataset", "model", "epochs", "batch_size", "lr", "label_smoothing", "optimizer",
            "augment", "schedule", "device", "seed", "limit", "data_root")
VALIDATION_SIZE = 5000
FROM_RUN_JSON = "default: the one recorded in run.json beside the checkpoint"


def _int_option(low, requirement):
    """An argparse type: an int >= low (raising ArgumentTypeError, whose text argparse shows)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value
    return parse


POSITIVE = _int_option(1, "a positive integer")


def build_parser():
    parser = argparse.ArgumentParser(prog="minidl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")

    # Where to run and find the data: every command that loads images.
    machine = argparse.ArgumentParser(add_help=False)
    machine.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    machine.add_argument("--data-root", default=None,
                         help="dataset cache folder (default: $MINIDL_DATA or ~/.cache/minidl)")
    # What to train on, and how: train and lr-find.
    setup = argparse.ArgumentParser(add_help=False, parents=[machine])
    setup.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    setup.add_argument("--model", choices=sorted(MODELS), default="cnn")
    setup.add_argument("--batch-size", type=POSITIVE, default=64)
    setup.add_argument("--label-smoothing", type=float, default=0.1)
    setup.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    setup.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="random shifts of up to 2 pixels for mnist, horizontal flips "
                            "for fashion-mnist (default: on; --no-augment turns it off)")
    setup.add_argument("--seed", type=_int_option(0, "a non-negative integer"), default=0)
    setup.add_argument("--limit", default=None, help="train on the first N training images, N >= 2",
                       type=_int_option(2, "at least 2 (one image is held out for validation)"))
    setup.add_argument("--out", default=None, help="output folder (default: runs/DATASET)")
    # A checkpoint to read: evaluate and export.
    checkpoint = argparse.ArgumentParser(add_help=False)
    checkpoint.add_argument("--checkpoint", required=True)
    checkpoint.add_argument("--model", choices=sorted(MODELS), default=None, help=FROM_RUN_JSON)

    train = sub.add_parser("train", parents=[setup],
                           help="train a CNN and write checkpoint, history and plots")
    train.add_argument("--epochs", type=POSITIVE, default=8)
    train.add_argument("--lr", type=float, default=4e-3,
                       help="the peak learning rate of onecycle; the initial one of cosine")
    train.add_argument("--schedule", choices=sorted(SCHEDULES), default="onecycle",
                       help="cosine: annealed to 0 per epoch; onecycle: warm-up to --lr, "
                            "then down, per batch (plotted in lr.png)")
    train.add_argument("--resume", metavar="DIR", default=None,
                       help="continue the stopped run whose --out was DIR, with its settings")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel over MPI ranks (mpiexec -n N python -m mpi4py -m "
                            "minidl train --distributed); --batch-size is the global batch")
    train.set_defaults(func=train_command)

    finder = sub.add_parser("lr-find", parents=[setup],
                            help="plot the loss against a growing learning rate")
    finder.add_argument("--start-lr", type=float, default=1e-7)
    finder.add_argument("--end-lr", type=float, default=10.0)
    finder.add_argument("--steps", type=POSITIVE, default=100)
    finder.set_defaults(func=lr_find_command)

    evaluate = sub.add_parser("evaluate", parents=[checkpoint, machine],
                              help="reload a checkpoint and report test accuracy")
    evaluate.add_argument("--dataset", choices=sorted(DATASETS), default=None, help=FROM_RUN_JSON)
    evaluate.add_argument("--batch-size", type=POSITIVE, default=500)
    evaluate.set_defaults(func=evaluate_command)

    export = sub.add_parser("export", parents=[checkpoint],
                            help="write a checkpoint as an ONNX model")
    export.add_argument("--onnx", required=True, help="the .onnx file to write")
    export.set_defaults(func=export_command)
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
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"minidl {args.command}: stopped by {name}{': ' if str(stop) else ''}{stop}",
              file=sys.stderr)
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


# -- train and lr-find --------------------------------------------------------------
def train_command(args):
    if args.resume:
        args = resumed_args(args)
    out = _start(args)
    comm = _communicator(args)
    batch_size = _batch_per_rank(args.batch_size, comm.size)
    created = make_output_folder(out) if comm.rank == 0 else []
    try:
        with _backend(args):
            train_and_test(args, out, comm, batch_size)
    except BaseException:   # e.g. no data, or stopped in epoch 1: no empty folder left
        remove_empty_folders(created)
        raise
    return 0


def train_and_test(args, out, comm, batch_size):
    """Train, then (rank 0 only) write everything to ``out`` and print the test accuracy."""
    root = comm.rank == 0   # the one rank that prints and writes files
    # Rank 0 loads first, so that only one rank downloads into the cache.
    if not root:
        comm.barrier()
    x_train, y_train = _train_images(args)
    x_test, y_test = load_split(args.dataset, "test", args.data_root)
    if root:
        comm.barrier()
    (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train)

    model = build_model(args.model)
    distributed.broadcast_parameters(model, comm=comm)
    if comm.size > 1:   # the weights are rank 0's; Dropout masks should differ per rank
        manual_seed(args.seed + comm.rank)
    if root:
        model.summary(x_train.shape[1:])
    shard = dict(rank=comm.rank, world_size=comm.size)
    train = _train_loader(args, x_train, y_train, batch_size, **shard)
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=args.lr)
    scheduler = SCHEDULES[args.schedule](optimizer, args, len(train))
    trainer = Trainer(model, SoftmaxCrossEntropy(args.label_smoothing), optimizer,
                      scheduler=scheduler, verbose=0 if args.quiet else 1, comm=comm)
    checkpoint, state = os.path.join(out, "model.npz"), os.path.join(out, "state.npz")
    recorder = GradientRecorder(model)
    saver = ModelCheckpoint(checkpoint, monitor="val_accuracy")
    # The recorder first: it adds its statistics to the logs the others see.
    callbacks = [recorder, saver, CSVLogger(os.path.join(out, "history.csv"))] if root else []
    if root:
        write_run_json(out, args)       # what --resume and `minidl evaluate` read
        print(f"training on {len(x_train)} images, validating on {len(x_val)}, "
              f"testing on {len(x_test)} ({args.device}"
              f"{f', {comm.size} ranks' if comm.size > 1 else ''})", flush=True)
    try:
        history = trainer.fit(
            train, epochs=args.epochs,
            val=DataLoader(x_val, y_val, 500, shuffle=False, transform=to_float, **shard),
            callbacks=callbacks,
            resume=state if args.resume else None, save_state=state if root else None)
    except KeyboardInterrupt as error:
        kept = (f"kept {checkpoint} from epoch {saver.saved_epoch} (the best "
                f"validation accuracy so far)" if saver.saved_epoch is not None
                else "no checkpoint saved (the first epoch did not end)")
        raise Stopped(getattr(error, "signum", signal.SIGINT),
                      f"in epoch {trainer.epoch + 1}/{args.epochs}, batch "
                      f"{trainer.batch + 1}/{len(train)}; {kept}") from None
    comm.barrier()
    if not root:
        return
    model.load(checkpoint)  # the best epoch by validation accuracy
    predictions = predict_labels(model, x_test)
    write_plots(out, args.dataset, model, history, recorder, x_test, y_test, predictions)
    if scheduler.per_batch and viz.available():
        viz.plot_lr([scheduler.lr_at(t) for t in range(scheduler.last_epoch)],
                    os.path.join(out, "lr.png"), steps_per_epoch=len(train))
    print(f"checkpoint and plots in {out}")
    print(f"test accuracy: {numpy.mean(predictions == y_test):.4f}")


def lr_find_command(args):
    """The LR range test on the training images; writes lr_find.png, prints a rate."""
    out = _start(args)
    make_output_folder(out)
    with _backend(args):
        x_train, y_train = _train_images(args)
        model = build_model(args.model)
        optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=args.start_lr)
        trainer = Trainer(model, SoftmaxCrossEntropy(args.label_smoothing), optimizer, verbose=0)
        train = _train_loader(args, x_train, y_train, args.batch_size)
        lrs, losses = lr_find(trainer, train, args.start_lr, args.end_lr, args.steps)
    suggestion = suggest_lr(lrs, losses)
    print(f"{len(lrs)} steps from lr {lrs[0]:.3g} to {lrs[-1]:.3g}; the loss fell fastest "
          f"at lr {suggestion if suggestion is None else format(suggestion, '.3g')}")
    if viz.available():
        plot = viz.plot_lr_find(lrs, losses, os.path.join(out, "lr_find.png"), suggestion)
        print(f"plot: {plot}")
    return 0


def _start(args):
    """Seed the generators; returns the output folder."""
    manual_seed(args.seed)
    return args.out or os.path.join("runs", args.dataset)


def _backend(args):
    return backend.set_backend("cupy" if args.device == "gpu" else "numpy")


def _communicator(args):
    """The job's ranks with --distributed (an error without MPI: N copies of one
    process would each train alone and overwrite each other's files), else one."""
    if not args.distributed:
        return distributed.Communicator()
    comm = distributed.init(args.device)
    if comm.host is None:
        raise ValueError("--distributed needs MPI: pip install 'minidl[dist]' (mpi4py, mpich)")
    if comm.size > 1 and comm.rank == 0 and "mpi4py.run" not in sys.modules:
        print("warning: run as 'mpiexec -n N python -m mpi4py -m minidl ...', so that an "
              "error on one rank ends the job instead of leaving the others waiting",
              file=sys.stderr)
    return comm


def _batch_per_rank(batch_size, size):
    """--batch-size is the global batch: each of ``size`` ranks takes an equal part."""
    if batch_size % size:
        raise ValueError(f"--batch-size {batch_size} does not split evenly over {size} "
                         f"ranks; pass a multiple of {size}")
    return batch_size // size


def resumed_args(args):
    """The settings of the run in ``args.resume`` (its run.json), to continue it there."""
    folder = args.resume
    saved = _read_json(os.path.join(folder, "run.json"))
    if not os.path.exists(os.path.join(folder, "state.npz")) or not saved:
        raise ValueError(f"--resume {folder!r}: no run.json and state.npz there; is it the "
                         f"--out folder of a 'minidl train' run that finished an epoch?")
    kept = {key: saved[key] for key in SETTINGS if key in saved}
    return argparse.Namespace(**{**vars(args), **kept, "out": folder})


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


def write_run_json(out, args):
    """run.json: the run's settings, what `minidl evaluate` and --resume read."""
    with atomic_write(os.path.join(out, "run.json")) as tmp, open(tmp, "w") as f:
        json.dump({**{key: getattr(args, key) for key in SETTINGS}, "checkpoint": "model.npz"},
                  f, indent=2)


def load_split(dataset, split, root):
    return DATASETS[dataset](split=split, root=root)


def _train_images(args):
    """The training images and labels (the first --limit of them)."""
    x, y = load_split(args.dataset, "train", args.data_root)
    return (x[:args.limit], y[:args.limit]) if args.limit else (x, y)


def split_validation(x, y):
    """The last VALIDATION_SIZE images (10% for small sets) become the validation set."""
    n_val = min(VALIDATION_SIZE, max(1, len(x) // 10))
    return (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])


def to_float(images):
    """uint8 pixels -> float32 in [0, 1] (done per batch, so the set stays small)."""
    return images.astype(numpy.float32) * numpy.float32(1 / 255)


def train_transform(dataset, augment):
    """to_float, after (when ``augment``) a random shift of up to 2 pixels for digits,
    or a horizontal flip for clothes. A mirrored 2 is no digit; Fashion-MNIST centres
    every item, and in runs of a few epochs shifts cost it more than they teach."""
    if not augment:
        return to_float
    step = RandomShift(2) if dataset == "mnist" else RandomHorizontalFlip()
    return Compose([step, to_float])


def _train_loader(args, x, y, batch_size, **shard):
    return DataLoader(x, y, batch_size, seed=args.seed,
                      transform=train_transform(args.dataset, args.augment), **shard)


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


# -- evaluate and export --------------------------------------------------------------
def evaluate_command(args):
    """Rebuild the model from the checkpoint alone (or build --model and load into it),
    and report its test accuracy on the dataset named by --dataset or run.json."""
    dataset, model_name = _checkpoint_settings(args, "dataset", "model")
    with _backend(args):
        model = _load_checkpoint(args)
        x_test, y_test = load_split(dataset or "mnist", "test", args.data_root)
        predictions = predict_labels(model, x_test, args.batch_size)
    print(f"{model_name or 'model'} on {dataset or 'mnist'} ({len(x_test)} test images)")
    print(f"test accuracy: {numpy.mean(predictions == y_test):.4f}")
    return 0


def export_command(args):
    from . import onnx
    model_name, = _checkpoint_settings(args, "model")
    model = _load_checkpoint(args)
    try:
        onnx.export(model, args.onnx, input_shape=(1, 28, 28))   # the models take MNIST images
    except ImportError as exc:        # main() reports RuntimeErrors without a traceback
        raise RuntimeError(str(exc)) from None
    print(f"{model_name or 'model'} from {args.checkpoint} written to {args.onnx}")
    return 0


def _checkpoint_settings(args, *keys):
    """Each option of ``keys`` ("dataset", "model"), else its value in the run.json beside
    --checkpoint, else None; ValueError naming the file for an unknown value there."""
    path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "run.json")
    run = _read_json(path)
    values = []
    for key in keys:
        choices = DATASETS if key == "dataset" else MODELS
        value = getattr(args, key) or run.get(key)
        if value is not None and not (isinstance(value, str) and value in choices):
            raise ValueError(f"{path}: unknown {key} {value!r}; pass --{key} "
                             f"({', '.join(sorted(choices))})")
        values.append(value)
    return values


def _load_checkpoint(args):
    """--model built and loaded from --checkpoint, or the model the checkpoint describes."""
    if args.model:
        return build_model(args.model).load(args.checkpoint)
    return load_model(args.checkpoint)


def _read_json(path):
    """The settings in ``path`` ({} if there is none); ValueError if it is not a JSON object."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            data = json.load(f)
        except (ValueError, RecursionError) as exc:   # not JSON, not UTF-8, or too deep
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object like "
                         f'{{"dataset": "mnist", "model": "cnn"}}, got {type(data).__name__}')
    return data


if __name__ == "__main__":
    sys.exit(main())
