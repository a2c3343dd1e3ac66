"""``minidl lr-find``: the LR range test (minidl/ext/lr_finder.py) on the training
images; prints the suggested rate and writes lr_find.png."""
import os

from ..ext import plots
from ..ext.lr_finder import lr_find, suggest_lr
from ..ext.zoo import build_model
from ..losses import SoftmaxCrossEntropy
from ..random import manual_seed
from ..trainer import Trainer
from .recipe import (OPTIMIZERS, POSITIVE, make_output_folder, train_images, train_loader,
                     use_device)


def add_parser(sub, parents):
    finder = sub.add_parser("lr-find", parents=parents,
                            help="plot the loss against a growing learning rate")
    finder.add_argument("--start-lr", type=float, default=1e-7)
    finder.add_argument("--end-lr", type=float, default=10.0)
    finder.add_argument("--steps", type=POSITIVE, default=100)
    finder.set_defaults(func=run)


def run(args):
    manual_seed(args.seed)
    out = args.out or os.path.join("runs", args.dataset)
    make_output_folder(out)
    with use_device(args):
        x_train, y_train = train_images(args)
        model = build_model(args.model)
        optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=args.start_lr)
        trainer = Trainer(model, SoftmaxCrossEntropy(args.label_smoothing), optimizer, verbose=0)
        train = train_loader(args, x_train, y_train, args.batch_size)
        lrs, losses = lr_find(trainer, train, args.start_lr, args.end_lr, args.steps)
    suggestion = suggest_lr(lrs, losses)
    print(f"{len(lrs)} steps from lr {lrs[0]:.3g} to {lrs[-1]:.3g}; the loss fell fastest "
          f"at lr {suggestion if suggestion is None else format(suggestion, '.3g')}")
    if plots.available():
        plot = plots.plot_lr_find(lrs, losses, os.path.join(out, "lr_find.png"), suggestion)
        print(f"plot: {plot}")
    return 0
