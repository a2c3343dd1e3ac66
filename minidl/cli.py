"""The ``minidl`` command: train a CNN on MNIST or Fashion-MNIST, evaluate a checkpoint.

    minidl train [--dataset mnist] [--model cnn] [--epochs 8] [--out runs/mnist] ...
    minidl evaluate --checkpoint runs/mnist/model.npz
    minidl export --checkpoint runs/mnist/model.npz --onnx model.onnx

``train`` prints the model summary, shows a progress bar per epoch, writes the
checkpoint, history.csv and PNG plots to --out, and ends with the line
``test accuracy: 0.99xx``.
"""
import argparse
import json
import os
import sys

import numpy

from . import backend, distributed, viz
from .callbacks import CSVLogger, ModelCheckpoint
from .data import DataLoader, datasets
from .inspect import GradientRecorder
from .losses import SoftmaxCrossEntropy
from .model import load_model
from .models import MODELS, build_model
from .optim import SGD, Adam, AdamW, RMSprop
from .random import manual_seed
from .schedulers import CosineAnnealingLR
from .serialization import atomic_write
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
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel over MPI ranks (mpiexec -n N python -m mpi4py -m "
                            "minidl train --distributed); --batch-size is the global batch")
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

    export = sub.add_parser("export", help="write a checkpoint as an ONNX model")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--onnx", required=True, help="the .onnx file to write")
    export.add_argument("--model", choices=sorted(MODELS), default=None,
                        help="default: the one recorded in run.json beside the checkpoint")
    export.set_defaults(func=export_command)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    # Bad data, a diverging run (FloatingPointError), a folder that cannot be written:
    # the message says what to do; a traceback would only hide it.
    except (RuntimeError, ValueError, OSError, FloatingPointError) as exc:
        print(f"minidl {args.command}: error: {exc}", file=sys.stderr)
        return 1


# -- train ----------------------------------------------------------------------
def train_command(args):
    manual_seed(args.seed)
    out = args.out or os.path.join("runs", args.dataset)
    comm = _communicator(args)
    batch_size = _batch_per_rank(args.batch_size, comm.size)
    root = comm.rank == 0   # the one rank that prints and writes files
    if root:
        make_output_folder(out)
    with backend.set_backend("cupy" if args.device == "gpu" else "numpy"):
        x_train, y_train, x_test, y_test = _load_train_test(args, comm)
        (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train)

        model = build_model(args.model)
        distributed.broadcast_parameters(model, comm=comm)
        if comm.size > 1:   # the weights are rank 0's; Dropout masks should differ per rank
            manual_seed(args.seed + comm.rank)
        if root:
            model.summary(x_train.shape[1:])
        optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=args.lr)
        trainer = Trainer(model, SoftmaxCrossEntropy(args.label_smoothing), optimizer,
                          scheduler=CosineAnnealingLR(optimizer, T_max=args.epochs),
                          verbose=0 if args.quiet else 1, comm=comm)
        checkpoint = os.path.join(out, "model.npz")
        recorder = GradientRecorder(model)
        if root:
            print(f"training on {len(x_train)} images, validating on {len(x_val)}, "
                  f"testing on {len(x_test)} ({args.device}"
                  f"{f', {comm.size} ranks' if comm.size > 1 else ''})", flush=True)
        shard = dict(rank=comm.rank, world_size=comm.size)
        history = trainer.fit(
            DataLoader(x_train, y_train, batch_size, seed=args.seed, transform=to_float, **shard),
            epochs=args.epochs,
            val=DataLoader(x_val, y_val, 500, shuffle=False, transform=to_float, **shard),
            # The recorder first: it adds its statistics to the logs the others see.
            callbacks=[recorder, ModelCheckpoint(checkpoint, monitor="val_accuracy"),
                       CSVLogger(os.path.join(out, "history.csv"))] if root else [])
        comm.barrier()
        if not root:
            return 0
        _write_json(os.path.join(out, "run.json"), {
            "dataset": args.dataset, "model": args.model, "epochs": history.epochs,
            "seed": args.seed, "checkpoint": "model.npz"})
        model.load(checkpoint)  # the best epoch by validation accuracy
        predictions = predict_labels(model, x_test)
        write_plots(out, args.dataset, model, history, recorder, x_test, y_test, predictions)
    print(f"checkpoint and plots in {out}")
    print(f"test accuracy: {numpy.mean(predictions == y_test):.4f}")
    return 0


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


def _load_train_test(args, comm):
    """The train (first --limit) and test arrays; rank 0 first, so that only one
    rank downloads into the cache while the others wait."""
    if comm.rank != 0:
        comm.barrier()
    x_train, y_train = load_split(args.dataset, "train", args.data_root)
    x_test, y_test = load_split(args.dataset, "test", args.data_root)
    if comm.rank == 0:
        comm.barrier()
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    return x_train, y_train, x_test, y_test


def make_output_folder(out):
    """Create the folder ``out``; ValueError saying why when that is impossible."""
    try:
        os.makedirs(out, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"--out {out!r} is a file, not a folder") from None
    except OSError as exc:  # e.g. a file where a parent folder should be
        raise ValueError(f"cannot create the output folder --out {out!r}: "
                         f"{exc.strerror}") from None


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
    """Rebuild the model from the checkpoint alone (or build --model and load into it),
    and report its test accuracy on the dataset named by --dataset or run.json."""
    run_json = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "run.json")
    run = _read_json(run_json)
    dataset = args.dataset or _setting(run, "dataset", DATASETS, run_json) or "mnist"
    model_name = args.model or _setting(run, "model", MODELS, run_json) or "model"
    with backend.set_backend("cupy" if args.device == "gpu" else "numpy"):
        model = (build_model(args.model).load(args.checkpoint) if args.model
                 else load_model(args.checkpoint))
        x_test, y_test = load_split(dataset, "test", args.data_root)
        predictions = predict_labels(model, x_test, args.batch_size)
    print(f"{model_name} on {dataset} ({len(x_test)} test images)")
    print(f"test accuracy: {numpy.mean(predictions == y_test):.4f}")
    return 0


# -- export -----------------------------------------------------------------------
def export_command(args):
    from . import onnx
    run_json = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "run.json")
    model_name = args.model or _setting(_read_json(run_json), "model", MODELS, run_json) or "model"
    model = (build_model(args.model).load(args.checkpoint) if args.model
             else load_model(args.checkpoint))
    try:
        onnx.export(model, args.onnx, input_shape=(1, 28, 28))   # the models take MNIST images
    except ImportError as exc:        # main() reports RuntimeErrors without a traceback
        raise RuntimeError(str(exc)) from None
    print(f"{model_name} from {args.checkpoint} written to {args.onnx}")
    return 0


def _setting(run, key, choices, path):
    """run.json's ``key`` (None if absent); ValueError naming the file unless it is one
    of ``choices``."""
    value = run.get(key)
    if value is not None and not (isinstance(value, str) and value in choices):
        raise ValueError(f"{path}: unknown {key} {value!r}; pass --{key} "
                         f"({', '.join(sorted(choices))})")
    return value


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
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)


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
