"""minidl: a minimal, from-scratch deep learning framework on NumPy or CuPy.

The public names, grouped by module (docs/api.md lists them all):
backend seam, layers, losses, Sequential, optimizers and schedulers, data,
the Trainer and its callbacks, gradcheck; minidl.onnx and minidl.interop (to PyTorch).
"""
import os as _os
import sys as _sys

# Idle OpenBLAS threads spin for ~0.1 s after every product, taking the cores of the
# threaded passes (layers/parallel.py); 4 makes them sleep at once. Read only when numpy
# loads, so set here first, unless numpy is loaded already or the user chose a value.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import interop, losses, onnx, optim, schedulers
from .backend import (backend_name, device_of, get_array_module, get_backend, gpu_available,
                      set_backend, to_device, to_numpy)
from .callbacks import Callback, CSVLogger, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from .data import DataLoader
from .gradcheck import gradcheck
from .recorder import GradientRecorder
from .layers import (AvgPool2D, BatchNorm1D, BatchNorm2D, Concat, Conv2D, Dense, Dropout,
                     Flatten, GlobalAvgPool2D, Identity, Layer, LeakyReLU, MaxPool2D, Parameter,
                     ReLU, Residual, Sigmoid, Softmax, Tanh)
from .losses import MSE, Loss, SoftmaxCrossEntropy
from .model import Sequential, load_model
from .optim import SGD, Adam, AdamW, RMSprop, clip_grad_norm_
from .random import manual_seed
from .schedulers import (CosineAnnealingLR, ExponentialLR, LinearLR, MultiStepLR, OneCycleLR,
                         ReduceLROnPlateau, StepLR)
from .trainer import History, Trainer

__version__ = "0.1.0"
