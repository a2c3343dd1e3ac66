"""minidl: a minimal, from-scratch deep learning framework on NumPy or CuPy."""
from .backend import (backend_name, device_of, get_array_module, get_backend, gpu_available,
                      set_backend, to_device, to_numpy)
from .gradcheck import gradcheck
from .layers import (Conv2D, Identity, Layer, LeakyReLU, Parameter, ReLU, Sigmoid,
                     Softmax, Tanh)
from .random import manual_seed

__version__ = "0.1.0"
