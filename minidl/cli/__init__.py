"""The ``minidl`` command: train a CNN for (Fashion-)MNIST; evaluate, explain, export, report.

    minidl train [--dataset mnist] [--model cnn] [--epochs 8] [--out runs/mnist] ...
    minidl lr-find [--steps 100] ...
    minidl evaluate --checkpoint runs/mnist/model.npz
    minidl export --checkpoint runs/mnist/model.npz --onnx model.onnx
    minidl explain --checkpoint runs/mnist/model.npz [--index 0 1 2] [--method gradcam]
    minidl report runs/mnist

One module per sub-command (train.py, lr_find.py, evaluate.py, export.py, explain.py,
report.py), what they share in recipe.py. Options and outputs: docs/api.md; runs and
their refusals: docs/training.md. An error prints one line and exits 1 (a bad option:
the usage and 2); Ctrl-C or SIGTERM stops with one line saying where and how to resume,
and exit 128 + the signal's number (130, 143).
"""
import argparse
import signal
import sys
import threading

from .. import __version__
from ..ext.zoo import MODELS
from . import evaluate, explain, export, lr_find, report, train
from .recipe import DATASETS, OPTIMIZERS, POSITIVE, Stopped, folder_option, int_option

FROM_RUN_JSON = "default: the one recorded in run.json beside the checkpoint"
DEFAULT = " (default: %(default)s)"


def build_parser():
    parser = argparse.ArgumentParser(prog="minidl", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"minidl {__version__}")
    sub = parser.add_subparsers(dest="command")

    # Where to run and find the data: every command that loads images.
    machine = argparse.ArgumentParser(add_help=False)
    machine.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                         help="where to compute (gpu: CuPy)" + DEFAULT)
    machine.add_argument("--data-root", default=None,
                         help="dataset cache folder (default: $MINIDL_DATA or ~/.cache/minidl)")
    # What to train on, and how: train and lr-find.
    setup = argparse.ArgumentParser(add_help=False, parents=[machine])
    setup.add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                       help="what to train on" + DEFAULT)
    setup.add_argument("--model", choices=sorted(MODELS), default="cnn",
                       help="which network of minidl.ext.zoo" + DEFAULT)
    setup.add_argument("--batch-size", type=POSITIVE, default=64, help="images per step" + DEFAULT)
    setup.add_argument("--label-smoothing", type=float, default=0.1,
                       help="of the cross-entropy loss" + DEFAULT)
    setup.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam",
                       help="the update rule" + DEFAULT)
    setup.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="random shifts of up to 2 pixels for mnist, horizontal flips "
                            "for fashion-mnist (default: on; --no-augment turns it off)")
    setup.add_argument("--seed", type=int_option(0, "a non-negative integer"), default=0,
                       help="for weights, shuffles and augmentation" + DEFAULT)
    setup.add_argument("--limit", default=None,
                       help="train on the first N training images, N >= 2 (default: all)",
                       type=int_option(2, "at least 2 (one image is held out for validation)"))
    setup.add_argument("--out", default=None, type=folder_option,
                       help="output folder (default: runs/DATASET)")
    # A checkpoint to read: evaluate and export.
    checkpoint = argparse.ArgumentParser(add_help=False)
    checkpoint.add_argument("--checkpoint", required=True, help="a model.npz of minidl train")
    checkpoint.add_argument("--model", choices=sorted(MODELS), default=None, help=FROM_RUN_JSON)

    train.add_parser(sub, [setup])
    lr_find.add_parser(sub, [setup])
    evaluate.add_parser(sub, [checkpoint, machine], FROM_RUN_JSON)
    export.add_parser(sub, [checkpoint])
    explain.add_parser(sub, [checkpoint, machine], FROM_RUN_JSON)
    report.add_parser(sub, [machine])
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.given = given_options(args, sys.argv[1:] if argv is None else list(argv))
    try:
        return run_stoppable(args.func, args)
    # Bad data, a diverging run (FloatingPointError), a folder that cannot be written:
    # the message says what to do; a traceback would only hide it.
    except (RuntimeError, ValueError, OSError, FloatingPointError) as exc:
        print(f"minidl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except MemoryError as exc:
        print(f"minidl {args.command}: error: out of memory ({exc or 'MemoryError'}); a "
              f"smaller --batch-size (or --limit) needs less", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:       # Ctrl-C, or SIGTERM (see run_stoppable)
        signum = getattr(stop, "signum", signal.SIGINT)
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"minidl {args.command}: stopped by {name}{': ' if str(stop) else ''}{stop}",
              file=sys.stderr)
        return 128 + signum


def given_options(args, argv):
    """The destinations of the options that ``argv`` writes out for ``args.command``
    (parsed again over a namespace that already holds every one: argparse fills in only
    the defaults of those it lacks). ``train --resume`` refuses those that contradict
    the run."""
    parser = getattr(args, "parser", None)
    if parser is None:
        return set()
    unset = object()
    seen = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parser.parse_known_args(argv[argv.index(args.command) + 1:], seen)
    return {dest for dest, value in vars(seen).items() if value is not unset}


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
