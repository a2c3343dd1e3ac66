"""``minidl train``: train a CNN, write its checkpoint, history and plots, print the test
accuracy; ``--resume`` continues a stopped run (or extends a finished one with a larger
``--epochs``); ``--distributed`` trains data-parallel over MPI ranks
(minidl/ext/distributed.py). Every refusal: docs/training.md."""
import argparse
import math
import os
import shlex
import signal
import sys

import numpy

from ..callbacks import Callback, CSVLogger, ModelCheckpoint
from ..data import DataLoader
from ..ext import distributed, plots, resume
from ..ext.recorder import GradientRecorder, grad_norms
from ..ext.resume import TrainingState
from ..ext.sync_batchnorm import convert_sync_batchnorm
from ..ext.zoo import build_model
from ..losses import SoftmaxCrossEntropy
from ..random import manual_seed
from ..trainer import Trainer
from .report import after_training as write_report
from .recipe import (CLASS_NAMES, OPTIMIZERS, POSITIVE, SCHEDULES, SETTINGS, Stopped,
                     checked_settings, checkpoint_metadata, folder_option, load_split,
                     make_output_folder, predict_labels, read_json, refuse_mpi_copies,
                     remove_empty_folders, scheduled_rates, split_validation, to_float,
                     train_images, train_loader, use_device, write_run_json)

# What a run writes to --out (RESULTS at its end); a folder holding one of EARLIER_RUN
# holds a run that ended an epoch, which a new run may replace only with --overwrite.
RESULTS = ("curves.png", "filters.png", "feature_maps.png", "confusion_matrix.png",
           "gradients.png", "lr.png", "report.html")
EARLIER_RUN = ("state.npz", "model.npz", "history.csv")
# The settings --resume takes from the command line: where to run, not what to train.
WHERE_TO_RUN = ("device", "data_root")

DOWNLOAD_SECONDS = 3600     # the other ranks wait this long for rank 0 to fetch the data


def add_parser(sub, parents):
    train = sub.add_parser("train", parents=parents,
                           help="train a CNN and write checkpoint, history and plots")
    train.add_argument("--epochs", type=POSITIVE, default=8,
                       help="epochs in all; with --resume, more than the run's extends it "
                            "(default: %(default)s)")
    train.add_argument("--lr", type=float, default=4e-3,
                       help="the peak learning rate of onecycle; the initial one of cosine "
                            "(default: %(default)s)")
    train.add_argument("--schedule", choices=sorted(SCHEDULES), default="onecycle",
                       help="cosine: annealed to 0 per epoch; onecycle: warm-up to --lr, "
                            "then down, per batch (plotted in lr.png) (default: %(default)s)")
    train.add_argument("--resume", metavar="DIR", type=folder_option, default=None,
                       help="continue the run whose --out was DIR, with its settings "
                            "(default: a new run)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the earlier run in --out (default: refuse to)")
    train.add_argument("--quiet", action="store_true",
                       help="no progress bars, one line per epoch")
    add_distributed_options(train)
    train.set_defaults(func=run, parser=train)


def add_distributed_options(train):
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel over MPI ranks (mpiexec -n N python -m mpi4py -m "
                            "minidl train --distributed); --batch-size is the global batch")
    train.add_argument("--sync-batchnorm", action=argparse.BooleanOptionalAction, default=True,
                       help="with --distributed: BatchNorm statistics over the global batch "
                            "(SyncBatchNorm), so N ranks train as one process (default: on)")
    train.add_argument("--collective-timeout", type=_seconds, default=300.0, metavar="SECONDS",
                       help="with --distributed: how long a rank waits for the others before "
                            "the job ends, naming the rank that did not arrive (default: 300)")


def run(args):
    refuse_mpi_copies(args)
    legs = None
    if args.resume is not None:
        args, legs = resumed_args(args)
        if args is None:
            return 0                    # a finished run: said so, nothing to do
    out = args.out or os.path.join("runs", args.dataset)
    if args.resume is None:     # on every rank: all of them stop alike
        refuse_earlier_run(out, args.overwrite)
    comm = communicator(args)
    manual_seed(args.seed)
    batch_size = batch_per_rank(args.batch_size, comm.size)
    created = make_output_folder(out) if comm.rank == 0 else []
    try:
        with use_device(args):
            train_and_test(args, out, comm, batch_size, legs)
    except BaseException:   # e.g. no data, or stopped in epoch 1: no empty folder left
        remove_empty_folders(created)
        raise
    return 0


def train_and_test(args, out, comm, batch_size, legs):
    """Train, then (rank 0 only) write everything to ``out`` and print the test accuracy."""
    root = comm.rank == 0   # the one rank that prints and writes files
    # Rank 0 loads first, so that only one rank downloads into the cache (for as long
    # as a download may take).
    if not root:
        comm.barrier(timeout=DOWNLOAD_SECONDS)
    x_train, y_train = train_images(args)
    x_test, y_test = load_split(args.dataset, "test", args.data_root)
    if root:
        comm.barrier(timeout=DOWNLOAD_SECONDS)
    (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train)

    model = build_model(args.model)
    parallel = comm.size > 1
    if parallel:
        model = data_parallel_model(model, args, comm)
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
                      scheduler=scheduler, verbose=2 if args.quiet else 1)
    checkpoint, state = os.path.join(out, "model.npz"), os.path.join(out, "state.npz")
    recorder = GradientRecorder(model)
    saver = ModelCheckpoint(checkpoint, monitor="val_accuracy",
                            metadata=checkpoint_metadata(args.dataset))
    callbacks = [TrainingState(state, resume=args.resume is not None,
                               reschedule=legs is not None, comm=comm if parallel else None)]
    if parallel:
        callbacks.append(distributed.RankSync(comm))
    if root:    # the recorder first: it adds its statistics to the logs the others see
        callbacks += [recorder, saver, CSVLogger(os.path.join(out, "history.csv")),
                      _Begun(lambda: start_writing(out, args, legs))]
        print(f"training on {len(x_train)} images, validating on {len(x_val)}, "
              f"testing on {len(x_test)} ({args.device}"
              f"{f', {comm.size} ranks' if parallel else ''})", flush=True)
    try:
        history = trainer.fit(train, epochs=args.epochs, val=val, callbacks=callbacks)
    except KeyboardInterrupt as error:
        raise Stopped(getattr(error, "signum", signal.SIGINT),
                      stopped_where(trainer, saver, args, out, len(train))) from None
    comm.barrier()
    if not root:
        return
    model.load(checkpoint)  # the best epoch by validation accuracy
    predictions = predict_labels(model, x_test)
    write_plots(out, args.dataset, model, history, x_test, y_test, predictions)
    if scheduler.per_batch and plots.available():
        rates = scheduled_rates({**vars(args), "schedule_legs": legs}, len(train), args.epochs)
        plots.plot_lr(rates, os.path.join(out, "lr.png"), steps_per_epoch=len(train))
    write_report(out)       # report.html, read back from out as `minidl report` does
    print(f"checkpoint and plots in {out}")
    print(f"test accuracy: {numpy.mean(predictions == y_test):.4f}")


class _Begun(Callback):
    """Calls ``begin()`` once the run has begun: after a resume has put the state back
    (TrainingState's priority is -100), before the first step."""

    priority = -200

    def __init__(self, begin):
        self.begin = begin

    def on_train_begin(self, trainer):
        self.begin()


def start_writing(out, args, legs):
    """What a run writes before its first epoch: run.json (the settings that Ctrl-C's
    checkpoint and --resume need), after removing the earlier run's files when it
    replaces one (--overwrite); a resumed run rewrites run.json only when extended."""
    if args.resume is None:
        for name in ("run.json",) + EARLIER_RUN + RESULTS:
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    if args.resume is None or legs is not None:
        write_run_json(out, args, legs)


def stopped_where(trainer, saver, args, out, batches):
    """Where a stopped run stopped, which checkpoint it keeps, and how to resume it."""
    saved = saver.saved_epoch or _best_epoch(trainer.history, "val_accuracy")
    if saved is None:
        kept = "no checkpoint saved (the first epoch did not end)"
    else:
        resume_with = f"minidl train --resume {shlex.quote(out)}"
        kept = (f"kept {os.path.join(out, 'model.npz')} from epoch {saved} (the best "
                f"validation accuracy so far); continue with: {resume_with}"
                f"{' --distributed' if args.distributed else ''}")
    return (f"in epoch {trainer.epoch + 1}/{args.epochs}, batch {trainer.batch + 1}/{batches}; "
            f"{kept}")


def _best_epoch(history, key):
    """The epoch (from 1) of the first highest ``key`` in ``history``, or None."""
    values = history.history.get(key, [])
    return values.index(max(values)) + 1 if values else None


def refuse_earlier_run(out, overwrite):
    """ValueError when ``out`` holds a run that ended an epoch, unless ``overwrite``."""
    earlier = [name for name in EARLIER_RUN if os.path.exists(os.path.join(out, name))]
    if earlier and not overwrite:
        raise ValueError(f"--out {out!r} holds an earlier run ({', '.join(earlier)}): continue "
                         f"it with --resume {shlex.quote(out)}, replace it with --overwrite, "
                         f"or pass another --out")


def _seconds(text):
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def data_parallel_model(model, args, comm):
    """Rank 0's weights on every rank, and (unless --no-sync-batchnorm) BatchNorm over
    the global batch. Each rank's random streams are RankSync's business."""
    distributed.broadcast_parameters(model, comm=comm)
    return convert_sync_batchnorm(model, comm) if args.sync_batchnorm else model


def communicator(args):
    """The job's ranks with --distributed (an error without MPI: N copies of one
    process would each train alone and overwrite each other's files), else one."""
    if not args.distributed:
        return distributed.Communicator()
    comm = distributed.init(args.device, timeout=args.collective_timeout)
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
    """(the settings of the run in ``args.resume``, from its checked run.json, to continue
    it there; its schedule legs when --epochs extends it), or (None, None) when the run
    is finished (said on stdout). ValueError for an option that contradicts the run."""
    folder = args.resume
    run_json, state = os.path.join(folder, "run.json"), os.path.join(folder, "state.npz")
    if not os.path.exists(state) or not os.path.exists(run_json):
        raise ValueError(f"--resume {folder!r}: no run.json and state.npz there; is it the "
                         f"--out folder of a 'minidl train' run that finished an epoch?")
    saved = checked_settings(args.parser, read_json(run_json), run_json)
    given = getattr(args, "given", set())
    conflicts = [f"--{key.replace('_', '-')} {getattr(args, key)} (the run's: {saved[key]})"
                 for key in SETTINGS if key in given and key not in WHERE_TO_RUN + ("epochs",)
                 and getattr(args, key) != saved[key]]
    if "out" in given and os.path.abspath(args.out) != os.path.abspath(folder):
        conflicts.append(f"--out {args.out} (the run's: {folder})")
    if args.overwrite:
        conflicts.append("--overwrite (a resumed run continues its files)")
    if conflicts:
        raise ValueError(f"--resume {folder!r} continues the run with its own settings "
                         f"(run.json); refusing {', '.join(conflicts)}: drop them, or start "
                         f"a new run with another --out")
    epochs = args.epochs if "epochs" in given else saved["epochs"]
    done = resume.saved_epochs(state)
    if done > saved["epochs"]:
        raise ValueError(f"{state} holds {done} epochs done, more than the run's "
                         f"{saved['epochs']} (run.json): it is not this run's state")
    if epochs < saved["epochs"]:
        raise ValueError(f"--epochs {epochs} is fewer than the run's {saved['epochs']} "
                         f"epochs; a run can be extended, not shortened")
    if done >= epochs:
        print(f"the run in {folder} is finished ({done} of {epochs} epochs; model.npz, "
              f"history.csv and the plots are there, `minidl report {folder}` writes its "
              f"report again); pass --epochs N with N > {epochs} to train it further")
        return None, None
    legs = saved.get("schedule_legs", [[0, saved["epochs"]]])
    if epochs > saved["epochs"]:
        legs = legs + [[done, epochs]]
        print(f"extending the run in {folder} from {saved['epochs']} to {epochs} epochs: "
              f"its {saved['schedule']} schedule is recomputed for {epochs} epochs from "
              f"epoch {done + 1} on")
    kept = {key: getattr(args, key) if key in given else saved[key] for key in WHERE_TO_RUN}
    settings = {**{key: saved[key] for key in SETTINGS}, **kept, "epochs": epochs}
    extended = legs if epochs > saved["epochs"] else None
    return argparse.Namespace(**{**vars(args), **settings, "out": folder}), extended


def write_plots(out, dataset, model, history, x_test, y_test, predictions):
    """The plots of the run, from its whole History (a resumed run's earlier epochs too)."""
    if not plots.available():
        print("plots skipped: matplotlib is not installed (pip install 'minidl[viz]')")
        return
    first_conv = next(layer for layer in model.layers if hasattr(layer, "kernel_size"))
    plots.plot_history(history, os.path.join(out, "curves.png"))
    plots.plot_filters(first_conv.weight.data, os.path.join(out, "filters.png"))
    plots.plot_feature_maps(model, to_float(x_test[0]), os.path.join(out, "feature_maps.png"))
    counts = plots.confusion_matrix(y_test, predictions, 10)
    plots.plot_confusion_matrix(counts, os.path.join(out, "confusion_matrix.png"),
                                CLASS_NAMES[dataset])
    plots.plot_gradient_norms(grad_norms(history), os.path.join(out, "gradients.png"),
                              model=model)
