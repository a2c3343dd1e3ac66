"""All layers of minidl, one file per family."""
from .activations import Identity, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh, get_activation
from .base import Layer, Parameter
from .conv import Conv2D
