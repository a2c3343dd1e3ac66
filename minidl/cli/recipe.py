"""What the sub-commands share: the datasets, models, optimizers and schedules they
offer, the data pipeline (validation split, augmentation, uint8 -> float), the output
folder and run.json, and the argument types."""
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
from ..optim import SGD, Adam, AdamW, RMSprop
from ..schedulers import CosineAnnealingLR, OneCycleLR
from ..serialization import atomic_write

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
    cached under ``root``."""
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


def write_run_json(out, args):
    """run.json: the run's settings, what `minidl evaluate` and --resume read."""
    with atomic_write(os.path.join(out, "run.json")) as tmp, open(tmp, "w") as f:
        json.dump({**{key: getattr(args, key) for key in SETTINGS}, "checkpoint": "model.npz"},
                  f, indent=2)


def read_json(path):
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
