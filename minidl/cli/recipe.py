"""What the sub-commands share: the datasets, models, optimizers and schedules they
offer, the data pipeline (validation split, augmentation, uint8 -> float), the output
folder and run.json, the argument types, and the checks every run makes first."""
import argparse
import json
import os
import tempfile

import numpy

from .. import backend
from ..data import DataLoader, datasets
from ..ext.transforms import Compose, RandomHorizontalFlip, RandomShift
from ..ext import dataset_sources
from ..ext.zoo import MODELS
from ..layers import Parameter
from ..optim import SGD, Adam, AdamW, RMSprop
from ..schedulers import CosineAnnealingLR, OneCycleLR
from ..serialization import atomic_write, open_regular

DATASETS = {"mnist": datasets.mnist, "fashion-mnist": datasets.fashion_mnist}
CLASS_NAMES = {"mnist": [str(digit) for digit in range(10)],
               "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
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
# Environment variables that give the size of an MPI job (Open MPI, MPICH / Intel MPI /
# Slurm's PMI, MVAPICH): more than 1 means mpiexec started several copies of the command.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def int_option(low, requirement):
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


POSITIVE = int_option(1, "a positive integer")


def folder_option(text):
    """An argparse type: a folder path, not empty (an empty one used to mean "none")."""
    if not text:
        raise argparse.ArgumentTypeError("must be a folder, got ''")
    return text


def refuse_mpi_copies(args):
    """ValueError when mpiexec started this command several times without --distributed:
    each copy would run alone, into the same files."""
    for name in MPI_SIZE_VARIABLES:
        size = os.environ.get(name, "")
        if size.isdigit() and int(size) > 1 and not getattr(args, "distributed", False):
            fix = ("add --distributed to train over them" if hasattr(args, "distributed")
                   else "run it as one process")
            raise ValueError(f"mpiexec started {size} copies of 'minidl {args.command}' "
                             f"({name}={size}); each would run alone, into the same --out: "
                             f"{fix}")


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with the signal's number and, once known, where it stopped."""

    def __init__(self, signum, where=""):
        super().__init__(where)
        self.signum = signum


def use_device(args):
    """The backend of --device, as a context manager."""
    return backend.set_backend("cupy" if args.device == "gpu" else "numpy")


# -- data -----------------------------------------------------------------------------
def load_split(dataset, split, root):
    """One split of ``dataset``, fetched (mirrors, then minidl/ext/dataset_sources.py) and
    cached under ``root``; ValueError when a file stands where the cache folder goes."""
    folder = datasets.dataset_dir(dataset, root)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"the dataset cache {folder} cannot be made: {path} is a "
                                 f"file, not a folder (--data-root or $MINIDL_DATA)")
            break
    return DATASETS[dataset](split=split, root=root, fallbacks=dataset_sources.fallbacks(dataset))


def train_images(args):
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


def checkpoint_metadata(dataset):
    """What a checkpoint of these models records beside its weights: the input, its
    preprocessing (x = (pixels * scale - mean) / std, as to_float does) and the classes."""
    return {"dataset": dataset, "input": {"shape": [1, 28, 28], "dtype": "uint8"},
            "preprocessing": {"scale": 1 / 255, "mean": [0.0], "std": [1.0]},
            "class_names": CLASS_NAMES[dataset]}


def train_transform(dataset, augment):
    """to_float, after (when ``augment``) a random shift of up to 2 pixels for digits,
    or a horizontal flip for clothes. A mirrored 2 is no digit; Fashion-MNIST centres
    every item, and in runs of a few epochs shifts cost it more than they teach."""
    if not augment:
        return to_float
    step = RandomShift(2) if dataset == "mnist" else RandomHorizontalFlip()
    return Compose([step, to_float])


def train_loader(args, x, y, batch_size, loader=DataLoader, **kwargs):
    """The training batches (``loader``: DataLoader, or a data-parallel job's
    ShardedLoader with its ``comm`` in ``kwargs``)."""
    return loader(x, y, batch_size, seed=args.seed,
                  transform=train_transform(args.dataset, args.augment), **kwargs)


def predict_labels(model, images, batch_size=500):
    logits = [model.predict(to_float(images[i:i + batch_size]), batch_size)
              for i in range(0, len(images), batch_size)]
    return numpy.concatenate(logits).argmax(axis=1)


# -- files ----------------------------------------------------------------------------
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


def write_run_json(out, args, legs=None):
    """run.json: the run's settings, what `minidl evaluate` and --resume read; ``legs``:
    [first epoch, epochs of its schedule] of each part of a run that was extended."""
    extended = {"schedule_legs": legs} if legs else {}
    with atomic_write(os.path.join(out, "run.json")) as tmp, open(tmp, "w") as f:
        json.dump({**{key: getattr(args, key) for key in SETTINGS}, "checkpoint": "model.npz",
                   **extended}, f, indent=2)


def checked_settings(parser, saved, path):
    """The settings of run.json (``saved``), each checked by the rule of its option in
    ``parser`` (type, choices or flag), and its schedule legs; ValueError naming the key."""
    missing = [key for key in SETTINGS if key not in saved]
    if missing:
        raise ValueError(f"{path} lacks the settings {missing}: was it written by minidl train?")
    actions = {action.dest: action for action in parser._actions}
    for key in SETTINGS:
        value, action, reason = saved[key], actions[key], ""
        try:
            if isinstance(action, argparse.BooleanOptionalAction):
                ok, reason = isinstance(value, bool), "true or false"
            elif value is None:
                ok = action.default is None
            elif action.type is None:
                ok = isinstance(value, str) and (not action.choices or value in action.choices)
            else:
                ok = not isinstance(value, (bool, list, dict)) and action.type(str(value)) == value
        except (argparse.ArgumentTypeError, ValueError) as exc:
            ok, reason = False, str(exc)
        if not ok:
            reason = reason or (f"one of {', '.join(sorted(action.choices))}" if action.choices
                                else "a number" if action.type else "a string")
            raise ValueError(f"{path}: {key!r} is {value!r}, which {action.option_strings[0]} "
                             f"does not take ({reason})")
    checked_legs(saved, path)
    return saved


def checked_legs(saved, path):
    """ValueError unless run.json's ``schedule_legs``, if any, are [first epoch, epochs]
    pairs from epoch 0 on, ending with the run's ``epochs``."""
    legs = saved.get("schedule_legs", [[0, saved["epochs"]]])
    try:
        firsts, totals = zip(*legs)
        ok = (all(type(n) is int for n in firsts + totals) and firsts[0] == 0
              and totals[-1] == saved["epochs"] and list(firsts) == sorted(set(firsts))
              and list(totals) == sorted(set(totals)) and all(f < t for f, t in legs))
    except (TypeError, ValueError):         # not pairs
        ok = False
    if not ok:
        raise ValueError(f"{path}: 'schedule_legs' must be [first epoch, epochs] pairs from "
                         f"epoch 0 on, ending with the run's epochs, got {legs!r:.200}")


def scheduled_rates(settings, steps, epochs):
    """The learning rate of every step of a run's first ``epochs`` epochs of ``steps``
    batches, its schedule rebuilt from its ``settings`` (run.json's): each part of an
    extended run (``schedule_legs``) under the schedule it had."""
    legs = settings.get("schedule_legs") or [[0, settings["epochs"]]]
    rates = []
    for k, (first, total) in enumerate(legs):
        end = legs[k + 1][0] if k + 1 < len(legs) else epochs
        weight = Parameter(backend.zeros((1,), backend.float32, backend.default_device()))
        scheduler = SCHEDULES[settings["schedule"]](
            OPTIMIZERS[settings["optimizer"]]([weight], lr=settings["lr"]),
            argparse.Namespace(**{**settings, "epochs": total}), steps)
        rates += [scheduler.lr_at(t if scheduler.per_batch else t // steps)
                  for t in range(first * steps, end * steps)]
    return rates


def read_json(path):
    """The settings in ``path`` ({} if there is none); ValueError if it is not a JSON object."""
    if not os.path.exists(path):
        return {}
    with open_regular(path) as f:     # ValueError for a FIFO or a device
        try:
            data = json.load(f)
        except (ValueError, RecursionError) as exc:   # not JSON, not UTF-8, or too deep
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object like "
                         f'{{"dataset": "mnist", "model": "cnn"}}, got {type(data).__name__}')
    return data


def checkpoint_settings(args, *keys):
    """Each option of ``keys`` ("dataset", "model"), else its value in the run.json beside
    --checkpoint, else None; ValueError naming the file for an unknown value there."""
    path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "run.json")
    run = read_json(path)
    values = []
    for key in keys:
        choices = DATASETS if key == "dataset" else MODELS
        value = getattr(args, key) or run.get(key)
        if value is not None and not (isinstance(value, str) and value in choices):
            raise ValueError(f"{path}: unknown {key} {value!r}; pass --{key} "
                             f"({', '.join(sorted(choices))})")
        values.append(value)
    return values
