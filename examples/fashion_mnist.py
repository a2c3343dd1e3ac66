"""Fashion-MNIST with the tools a longer run wants: a validation split, a learning-rate
schedule, early stopping, the best checkpoint, and a confusion matrix.

    python examples/fashion_mnist.py                 # 10 epochs at most: ~0.92
    python examples/fashion_mnist.py --epochs 2 --limit 10000 --out /tmp/fashion
"""
import argparse
import os

import numpy

import minidl
from minidl import (CosineAnnealingLR, DataLoader, EarlyStopping, ModelCheckpoint,
                    SoftmaxCrossEntropy, Trainer)
from minidl.data import fashion_mnist
from minidl.ext import dataset_sources, plots
from minidl.ext.zoo import mnist_cnn

CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Boot"]


def to_float(images):
    return images.astype(numpy.float32) / 255


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a CNN on Fashion-MNIST.")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images")
    parser.add_argument("--data-root", default=None,
                        help="default: $MINIDL_DATA or ~/.cache/minidl")
    parser.add_argument("--out", default="runs/fashion_mnist")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    minidl.manual_seed(0)

    fallbacks = dataset_sources.fallbacks("fashion-mnist")    # Debian, when mirrors fail
    x, y = fashion_mnist("train", root=args.data_root, fallbacks=fallbacks)
    x_test, y_test = fashion_mnist("test", root=args.data_root, fallbacks=fallbacks)
    x, y = x[:args.limit], y[:args.limit]
    n_val = max(1, len(x) // 10)                          # the last 10% validate
    train = DataLoader(x[:-n_val], y[:-n_val], 64, transform=to_float)
    val = DataLoader(x[-n_val:], y[-n_val:], 500, shuffle=False, transform=to_float)

    model = mnist_cnn()
    optimizer = minidl.Adam(model.parameters(), lr=1e-3)
    trainer = Trainer(model, SoftmaxCrossEntropy(label_smoothing=0.1), optimizer,
                      scheduler=CosineAnnealingLR(optimizer, T_max=args.epochs))
    checkpoint = os.path.join(args.out, "best.npz")
    history = trainer.fit(train, epochs=args.epochs, val=val, callbacks=[
        EarlyStopping(monitor="val_accuracy", patience=3),
        ModelCheckpoint(checkpoint, monitor="val_accuracy")])
    print(f"stopped after {history.epochs} epochs; best val_accuracy "
          f"{max(history['val_accuracy']):.4f}")

    model.load(checkpoint)                                # the best epoch's weights
    predictions = model.predict(to_float(x_test)).argmax(axis=1)
    counts = plots.confusion_matrix(y_test, predictions, len(CLASSES))
    plots.plot_confusion_matrix(counts, os.path.join(args.out, "confusion_matrix.png"), CLASSES)
    plots.plot_history(history, os.path.join(args.out, "curves.png"))
    accuracy = float(numpy.mean(predictions == y_test))
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
