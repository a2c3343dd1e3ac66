"""Ready-made networks for 28x28 grey images (MNIST, Fashion-MNIST)."""
from ..layers import (BatchNorm2D, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, MaxPool2D,
                     ReLU, Residual, Tanh)
from ..model import Sequential


def lenet5(num_classes=10):
    """LeNet-5 (LeCun et al., 1998) with max pooling: 28x28 -> 6@28x28 -> 16@10x10 -> 120-84-10."""
    return Sequential([
        Conv2D(1, 6, 5, padding=2, activation="tanh"), MaxPool2D(2),
        Conv2D(6, 16, 5, activation="tanh"), MaxPool2D(2),
        Flatten(), Dense(16 * 5 * 5, 120), Tanh(), Dense(120, 84), Tanh(),
        Dense(84, num_classes),
    ])


def mnist_cnn(num_classes=10):
    """Two conv blocks (3x3 conv, batch norm, ReLU, 2x2 max pool) and an MLP head with
    dropout: the default model of ``minidl train`` (>= 99.3% test accuracy on MNIST).

    The convolutions have no bias: the batch norm after each subtracts the channel
    mean, which would cancel any bias (its gradient is zero), and adds its own.
    """
    return Sequential([
        Conv2D(1, 32, 3, padding=1, bias=False), BatchNorm2D(32), ReLU(), MaxPool2D(2),
        Conv2D(32, 64, 3, padding=1, bias=False), BatchNorm2D(64), ReLU(), MaxPool2D(2),
        Flatten(), Dense(64 * 7 * 7, 128, activation="relu"), Dropout(0.3),
        Dense(128, num_classes),
    ])


def basic_block(in_channels, out_channels, stride=1):
    """A ResNet basic block without its final ReLU: y = BN(conv3x3(ReLU(BN(conv3x3(x))))) + s(x),
    where the shortcut s is the identity, or a strided 1x1 conv and batch norm (He et al.'s
    "option B") when the block changes the size or the number of channels."""
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = Sequential(Conv2D(in_channels, out_channels, 1, stride=stride, bias=False),
                              BatchNorm2D(out_channels))
    return Residual(Sequential(
        Conv2D(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        BatchNorm2D(out_channels), ReLU(),
        Conv2D(out_channels, out_channels, 3, padding=1, bias=False), BatchNorm2D(out_channels),
    ), shortcut)


def resnet_small(num_classes=10, width=16, in_channels=1):
    """A small ResNet: a 3x3 stem, three stages of two basic blocks (``width``, 2 ``width``
    and 4 ``width`` channels; the second and third start with stride 2: 28 -> 14 -> 7),
    global average pooling and one Dense layer. Each block is followed by a ReLU."""
    layers = [Conv2D(in_channels, width, 3, padding=1, bias=False), BatchNorm2D(width), ReLU()]
    channels = width
    for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
        layers += [basic_block(channels, out_channels, stride=2 if stage else 1), ReLU(),
                   basic_block(out_channels, out_channels), ReLU()]
        channels = out_channels
    return Sequential(layers + [GlobalAvgPool2D(), Dense(channels, num_classes)])


def separable_block(in_channels, out_channels, stride=1):
    """A depthwise-separable convolution (MobileNet, Howard et al., 2017): a 3x3 depthwise
    conv (``groups=in_channels``: one filter per channel) filters space, then a 1x1 conv
    mixes the channels, each followed by batch norm and ReLU. Per output pixel that is
    9*C + C*F multiply-adds, against 9*C*F for a full 3x3 conv."""
    return Sequential(
        Conv2D(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels,
               bias=False), BatchNorm2D(in_channels), ReLU(),
        Conv2D(in_channels, out_channels, 1, bias=False), BatchNorm2D(out_channels), ReLU())


def mobilenet_small(num_classes=10, width=16, in_channels=1):
    """A small MobileNet: a 3x3 stem, five depthwise-separable blocks (``width`` -> 2, 4,
    4, 8, 8 ``width`` channels; the second and fourth with stride 2: 28 -> 14 -> 7),
    global average pooling and one Dense layer."""
    layers = [Conv2D(in_channels, width, 3, padding=1, bias=False), BatchNorm2D(width), ReLU()]
    channels = width
    for factor, stride in ((2, 1), (4, 2), (4, 1), (8, 2), (8, 1)):
        layers.append(separable_block(channels, factor * width, stride))
        channels = factor * width
    return Sequential(layers + [GlobalAvgPool2D(), Dense(channels, num_classes)])


MODELS = {"cnn": mnist_cnn, "lenet5": lenet5, "resnet": resnet_small,
          "mobilenet": mobilenet_small}


def build_model(name, num_classes=10):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes)
