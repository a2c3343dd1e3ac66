"""``minidl report RUN_DIR``: the run in RUN_DIR (the --out folder of ``minidl train``)
as one self-contained page, RUN_DIR/report.html (minidl/ext/report.py). ``train``
writes it too, at the end of every run (``after_training``).

Everything the page shows is read from the folder (run.json, history.csv, model.npz)
and the test split of the run's dataset, and checked, before the page is written:
a missing or damaged file is one clear error, and nothing is written.
"""
import argparse
import csv
import io
import math
import os
import stat

from ..checkpoint import load_model
from ..checks import check_int, check_real
from ..ext import plots
from ..ext import report as page
from ..ext.zoo import MODELS
from ..serialization import open_regular
from .recipe import (CLASS_NAMES, DATASETS, OPTIMIZERS, SCHEDULES, checked_legs, load_split,
                     read_json, scheduled_rates, split_validation, to_float, train_images,
                     use_device)

MAX_SETTINGS_BYTES = 1 << 20
MAX_HISTORY_BYTES = 64 << 20


def add_parser(sub, parents):
    report = sub.add_parser("report", parents=parents,
                            help="write a run's report.html: settings, curves, filters, "
                                 "confusion matrix, mistakes with their Grad-CAM")
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="the --out folder of a 'minidl train' run")
    report.add_argument("--out", default=None,
                        help="the page to write (default: RUN_DIR/report.html)")
    report.set_defaults(func=run)


def run(args):
    if not plots.available():
        raise RuntimeError("the report needs matplotlib: pip install 'minidl[viz]'")
    with use_device(args):
        path, size = write(args.run_dir, args.out, args.data_root)
    print(f"report written to {path} ({size / 1024:.0f} KiB)")
    return 0


def after_training(out):
    """What ``minidl train`` calls when a run ends: the report of ``out``, with one line
    saying where (nothing without matplotlib: train has said that plots are skipped)."""
    if plots.available():
        path, size = write(out)
        print(f"report in {path} ({size / 1024:.0f} KiB)")


def write(run_dir, out=None, data_root=None):
    """Read and check the run in ``run_dir``, then write its page to ``out`` (default
    RUN_DIR/report.html); returns (path, bytes)."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"RUN_DIR {run_dir!r} is not a folder; pass the --out folder of a "
                         f"'minidl train' run")
    settings = read_settings(os.path.join(run_dir, "run.json"))
    history = read_history(os.path.join(run_dir, "history.csv"))
    checkpoint = os.path.join(run_dir, "model.npz")
    checked_file(checkpoint, "checkpoint", None)
    model = load_model(checkpoint).eval()
    root = data_root or settings["data_root"]
    images, labels = load_split(settings["dataset"], "test", root)
    lrs, steps = learning_rates(settings, len(history["epoch"]), root)
    out = out or os.path.join(run_dir, "report.html")
    title = f"{settings['model']} on {settings['dataset']}: {run_dir}"
    size = page.write_report(out, model, history, to_float(images), labels, settings=settings,
                             lrs=lrs, steps_per_epoch=steps, title=title,
                             class_names=CLASS_NAMES.get(settings["dataset"]))
    return out, size


# -- the files of a run, checked ---------------------------------------------------------------
def checked_file(path, what, limit):
    """ValueError unless ``path`` is a regular file (not a folder, a pipe or a device) of
    at most ``limit`` bytes (None: any size)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no {what} there; is it the folder of a 'minidl train' "
                         f"run that finished an epoch?") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: the {what} is not a regular file")
    if limit is not None and info.st_size > limit:
        raise ValueError(f"{path}: the {what} is {info.st_size} bytes, more than the "
                         f"{limit} such a file can hold")


def read_settings(path):
    """run.json's settings, each checked as ``minidl train`` would have accepted it."""
    checked_file(path, "run.json", MAX_SETTINGS_BYTES)
    saved = read_json(path)
    settings = dict(saved)
    for key, choices in (("dataset", DATASETS), ("schedule", SCHEDULES),
                         ("optimizer", OPTIMIZERS), ("model", MODELS)):
        value = saved.get(key)
        if not (isinstance(value, str) and value in choices):
            raise ValueError(f"{path}: {key} must be one of {sorted(choices)}, got {value!r:.80}")
    try:        # a wrong kind of value is bad data here, not a bug: one ValueError
        settings["epochs"] = check_int(saved.get("epochs"), "epochs", path, minimum=1)
        settings["batch_size"] = check_int(saved.get("batch_size"), "batch_size", path,
                                           minimum=1)
        settings["lr"] = check_real(saved.get("lr"), "lr", path, above=0)
        if saved.get("limit") is not None:
            settings["limit"] = check_int(saved["limit"], "limit", path, minimum=2)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    settings.setdefault("limit", None)
    if not isinstance(saved.get("data_root"), (str, type(None))):
        raise ValueError(f"{path}: data_root must be a folder name or null, got "
                         f"{saved['data_root']!r:.80}")
    settings.setdefault("data_root", None)
    checked_legs(settings, path)
    return settings


def read_history(path):
    """history.csv as {column: [float per epoch]} (an empty cell: NaN); the epoch column
    must count 1, 2, ..."""
    checked_file(path, "history.csv", MAX_HISTORY_BYTES)
    with open_regular(path) as f:            # the one way minidl opens what it reads
        rows = list(csv.reader(io.StringIO(f.read().decode("utf-8", errors="replace"))))
    if not rows or "epoch" not in rows[0] or len(rows) < 2:
        raise ValueError(f"{path}: expected a header with 'epoch' and a row per epoch, as "
                         f"'minidl train' writes it")
    header = rows[0]
    history = {key: [] for key in header}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}: line {number} has {len(row)} values for "
                             f"{len(header)} columns")
        for key, text in zip(header, row):
            try:
                history[key].append(float(text) if text else math.nan)
            except ValueError:
                raise ValueError(f"{path}: line {number}, column {key!r}: "
                                 f"{text!r:.40} is not a number") from None
    if history["epoch"] != list(range(1, len(rows))):
        raise ValueError(f"{path}: the epoch column should count 1, 2, ... "
                         f"{len(rows) - 1}")
    return history


def learning_rates(settings, epochs, data_root):
    """The learning rate of each step of the ``epochs`` that ran, from the run's schedule
    rebuilt with its settings (each part of an extended run under the schedule it had),
    and the steps per epoch (the training split, without its validation part, in
    batches of batch_size)."""
    images, labels = train_images(argparse.Namespace(**{**settings, "data_root": data_root}))
    (train, _), _ = split_validation(images, labels)
    steps = -(-len(train) // settings["batch_size"])
    return scheduled_rates(settings, steps, epochs), steps
