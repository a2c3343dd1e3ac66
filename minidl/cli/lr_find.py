"""``minidl lr-find``: the LR range test (minidl/ext/lr_finder.py) on the training
images; prints the suggested rate and writes lr_find.png."""
import math
import os

from ..ext import plots
from ..ext.lr_finder import lr_find, suggest_lr
from ..ext.zoo import build_model
from ..losses import SoftmaxCrossEntropy
from ..random import manual_seed
from ..trainer import Trainer
from .recipe import (OPTIMIZERS, int_option, make_output_folder, refuse_mpi_copies,
                     remove_empty_folders, train_images, train_loader, use_device)


def add_parser(sub, parents):
    finder = sub.add_parser("lr-find", parents=parents,
                            help="plot the loss against a growing learning rate")
    finder.add_argument("--start-lr", type=float, default=1e-7,
                        help="the first rate (default: %(default)s)")
    finder.add_argument("--end-lr", type=float, default=10.0,
                        help="the last rate, if the loss has not diverged before "
                             "(default: %(default)s)")
    finder.add_argument("--steps", type=int_option(2, "at least 2"), default=100,
                        help="batches, one rate each (default: %(default)s)")
    finder.set_defaults(func=run)


def run(args):
    refuse_mpi_copies(args)
    # checked before --out is made: a refused option leaves no folder behind
    if not 0 < args.start_lr < args.end_lr < math.inf:
        raise ValueError(f"--start-lr {args.start_lr:g} and --end-lr {args.end_lr:g}: the "
                         f"range must be finite, with 0 < --start-lr < --end-lr")
    manual_seed(args.seed)
    out = args.out or os.path.join("runs", args.dataset)
    created = make_output_folder(out)
    try:
        lrs, losses = range_test(args)
    except BaseException:   # no data, out of memory, Ctrl-C: no empty folder left
        remove_empty_folders(created)
        raise
    suggestion = suggest_lr(lrs, losses)
    print(f"{len(lrs)} steps from lr {lrs[0]:.3g} to {lrs[-1]:.3g}; the loss fell fastest "
          f"at lr {suggestion if suggestion is None else format(suggestion, '.3g')}")
    if plots.available():
        plot = plots.plot_lr_find(lrs, losses, os.path.join(out, "lr_find.png"), suggestion)
        print(f"plot: {plot}")
    return 0


def range_test(args):
    """(rates, smoothed losses) of the range test on --dataset with --model."""
    with use_device(args):
        x_train, y_train = train_images(args)
        model = build_model(args.model)
        optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=args.start_lr)
        trainer = Trainer(model, SoftmaxCrossEntropy(args.label_smoothing), optimizer, verbose=0)
        train = train_loader(args, x_train, y_train, args.batch_size)
        return lr_find(trainer, train, args.start_lr, args.end_lr, args.steps)
