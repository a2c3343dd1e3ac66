"""``minidl export``: write a checkpoint as an ONNX model (minidl/ext/onnx.py), its
metadata (preprocessing, class names) carried over as the ONNX model's."""
from ..checkpoint import load_metadata
from ..ext import onnx
from .evaluate import load_checkpoint
from .recipe import checkpoint_settings


def add_parser(sub, parents):
    export = sub.add_parser("export", parents=parents, help="write a checkpoint as an ONNX model")
    export.add_argument("--onnx", required=True, help="the .onnx file to write")
    export.set_defaults(func=run)


def run(args):
    model_name, = checkpoint_settings(args, "model")
    model = load_checkpoint(args)
    try:
        onnx.export(model, args.onnx, input_shape=(1, 28, 28),   # the models take MNIST images
                    metadata=load_metadata(args.checkpoint))
    except ImportError as exc:        # main() reports RuntimeErrors without a traceback
        raise RuntimeError(str(exc)) from None
    print(f"{model_name or 'model'} from {args.checkpoint} written to {args.onnx}")
    return 0
