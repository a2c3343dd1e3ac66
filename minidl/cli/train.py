"""``minidl train``: train a CNN, write its checkpoint, history and plots, print the test
accuracy; ``--resume`` continues a stopped run; ``--distributed`` trains data-parallel
over MPI ranks (minidl/ext/distributed.py)."""
import argparse
import os
import signal
import sys

import numpy

from ..callbacks import CSVLogger, ModelCheckpoint
from ..data import DataLoader
from ..ext import distributed, plots
from ..ext.recorder import GradientRecorder
from ..ext.resume import TrainingState
from ..ext.zoo import build_model
from ..losses import SoftmaxCrossEntropy
from ..random import manual_seed
from ..trainer import Trainer
from .report import after_training as write_report
from .recipe import (CLASS_NAMES, OPTIMIZERS, POSITIVE, SCHEDULES, SETTINGS, Stopped, load_split, make_output_folder, predict_labels, read_json,
                     remove_empty_folders, split_validation, to_float, train_images,
                     train_loader, use_device, write_run_json)


def add_parser(sub, parents):
    train = sub.add_parser("train", parents=parents,
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
    train.set_defaults(func=run)


def run(args):
    if args.resume:
        args = resumed_args(args)
    manual_seed(args.seed)
    out = args.out or os.path.join("runs", args.dataset)
    comm = communicator(args)
    batch_size = batch_per_rank(args.batch_size, comm.size)
    created = make_output_folder(out) if comm.rank == 0 else []
    try:
        with use_device(args):
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
    x_train, y_train = train_images(args)
    x_test, y_test = load_split(args.dataset, "test", args.data_root)
    if root:
        comm.barrier()
    (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train)

    model = build_model(args.model)
    parallel = comm.size > 1
    if parallel:
        distributed.broadcast_parameters(model, comm=comm)
        manual_seed(args.seed + comm.rank)  # the weights are rank 0's; Dropout masks differ
    if root:
        model.summary(x_train.shape[1:])
    loader = dict(loader=distributed.ShardedLoader, comm=comm) if parallel else {}
    train = train_loader(args, x_train, y_train, batch_size, **loader)
    val = (distributed.ShardedLoader(x_val, y_val, 500, comm, shuffle=False, transform=to_float)
           if parallel else DataLoader(x_val, y_val, 500, shuffle=False, transform=to_float))
    optimizer = OPTIMIZERS[args.optimizer](model.parameters(), lr=args.lr)
    scheduler = SCHEDULES[args.schedule](optimizer, args, len(train))
    trainer = Trainer(model, SoftmaxCrossEntropy(args.label_smoothing),
                      distributed.DistributedOptimizer(optimizer, comm) if parallel else optimizer,
                      scheduler=scheduler, verbose=0 if args.quiet else 1)
    checkpoint, state = os.path.join(out, "model.npz"), os.path.join(out, "state.npz")
    recorder = GradientRecorder(model)
    saver = ModelCheckpoint(checkpoint, monitor="val_accuracy")
    callbacks = [TrainingState(state, resume=bool(args.resume), save=root)]
    if parallel:
        callbacks.append(distributed.RankSync(comm))
    if root:    # the recorder first: it adds its statistics to the logs the others see
        callbacks += [recorder, saver, CSVLogger(os.path.join(out, "history.csv"))]
        write_run_json(out, args)       # what --resume and `minidl evaluate` read
        print(f"training on {len(x_train)} images, validating on {len(x_val)}, "
              f"testing on {len(x_test)} ({args.device}"
              f"{f', {comm.size} ranks' if parallel else ''})", flush=True)
    try:
        history = trainer.fit(train, epochs=args.epochs, val=val, callbacks=callbacks)
    except KeyboardInterrupt as error:
        saved = saver.saved_epoch or _best_epoch(trainer.history, "val_accuracy")
        kept = (f"kept {checkpoint} from epoch {saved} (the best validation accuracy so "
                f"far)" if saved is not None else "no checkpoint saved (the first epoch "
                                                  "did not end)")
        raise Stopped(getattr(error, "signum", signal.SIGINT),
                      f"in epoch {trainer.epoch + 1}/{args.epochs}, batch "
                      f"{trainer.batch + 1}/{len(train)}; {kept}") from None
    comm.barrier()
    if not root:
        return
    model.load(checkpoint)  # the best epoch by validation accuracy
    predictions = predict_labels(model, x_test)
    write_plots(out, args.dataset, model, history, recorder, x_test, y_test, predictions)
    if scheduler.per_batch and plots.available():
        plots.plot_lr([scheduler.lr_at(t) for t in range(scheduler.last_epoch)],
                      os.path.join(out, "lr.png"), steps_per_epoch=len(train))
    write_report(out)       # report.html, read back from out as `minidl report` does
    print(f"checkpoint and plots in {out}")
    print(f"test accuracy: {numpy.mean(predictions == y_test):.4f}")


def _best_epoch(history, key):
    """The epoch (from 1) of the first highest ``key`` in ``history``, or None."""
    values = history.history.get(key, [])
    return values.index(max(values)) + 1 if values else None


def communicator(args):
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


def batch_per_rank(batch_size, size):
    """--batch-size is the global batch: each of ``size`` ranks takes an equal part."""
    if batch_size % size:
        raise ValueError(f"--batch-size {batch_size} does not split evenly over {size} "
                         f"ranks; pass a multiple of {size}")
    return batch_size // size


def resumed_args(args):
    """The settings of the run in ``args.resume`` (its run.json), to continue it there."""
    folder = args.resume
    saved = read_json(os.path.join(folder, "run.json"))
    if not os.path.exists(os.path.join(folder, "state.npz")) or not saved:
        raise ValueError(f"--resume {folder!r}: no run.json and state.npz there; is it the "
                         f"--out folder of a 'minidl train' run that finished an epoch?")
    kept = {key: saved[key] for key in SETTINGS if key in saved}
    return argparse.Namespace(**{**vars(args), **kept, "out": folder})


def write_plots(out, dataset, model, history, recorder, x_test, y_test, predictions):
    if not plots.available():
        print("plots skipped: matplotlib is not installed (pip install 'minidl[viz]')")
        return
    first_conv = next(layer for layer in model.layers if hasattr(layer, "kernel_size"))
    plots.plot_history(history, os.path.join(out, "curves.png"))
    plots.plot_filters(first_conv.weight.data, os.path.join(out, "filters.png"))
    plots.plot_feature_maps(model, to_float(x_test[0]), os.path.join(out, "feature_maps.png"))
    counts = plots.confusion_matrix(y_test, predictions, 10)
    plots.plot_confusion_matrix(counts, os.path.join(out, "confusion_matrix.png"),
                                CLASS_NAMES.get(dataset))
    plots.plot_gradient_norms(recorder.norms_per_epoch(), os.path.join(out, "gradients.png"))
