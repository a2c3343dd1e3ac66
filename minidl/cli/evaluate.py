"""``minidl evaluate``: rebuild a checkpoint's model and print its test accuracy."""
import numpy

from ..checkpoint import load_model
from ..ext.zoo import build_model
from .recipe import DATASETS, POSITIVE, checkpoint_settings, load_split, predict_labels, use_device


def add_parser(sub, parents, from_run_json):
    evaluate = sub.add_parser("evaluate", parents=parents,
                              help="reload a checkpoint and report test accuracy")
    evaluate.add_argument("--dataset", choices=sorted(DATASETS), default=None, help=from_run_json)
    evaluate.add_argument("--batch-size", type=POSITIVE, default=500,
                          help="images per forward pass (default: %(default)s)")
    evaluate.set_defaults(func=run)


def run(args):
    """Rebuild the model from the checkpoint alone (or build --model and load into it),
    and report its test accuracy on the dataset named by --dataset or run.json."""
    dataset, model_name = checkpoint_settings(args, "dataset", "model")
    with use_device(args):
        model = load_checkpoint(args)
        x_test, y_test = load_split(dataset or "mnist", "test", args.data_root)
        predictions = predict_labels(model, x_test, args.batch_size)
    print(f"{model_name or 'model'} on {dataset or 'mnist'} ({len(x_test)} test images)")
    print(f"test accuracy: {numpy.mean(predictions == y_test):.4f}")
    return 0


def load_checkpoint(args):
    """--model built and loaded from --checkpoint, or the model the checkpoint describes."""
    if args.model:
        return build_model(args.model).load(args.checkpoint)
    return load_model(args.checkpoint)
