"""All layers of minidl, one file per family, and the registry that knows them by name."""
from .activations import Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh, get_activation
from .base import Container, Layer, Parameter
from .blocks import Concat, Residual
from .conv import Conv2D, ConvTranspose2D
from .dense import Dense
from .dropout import Dropout
from .normalization import BatchNorm1D, BatchNorm2D
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from .registry import register_layer
from .reshape import Flatten
