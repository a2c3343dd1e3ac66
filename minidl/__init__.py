"""minidl: a minimal, from-scratch deep learning framework on NumPy or CuPy.

The public names of the core, grouped by module (docs/api.md lists them all): the
backend seam, layers and their registry, losses, Sequential and checkpoints,
optimizers and schedulers, data, the Trainer and its callbacks, gradcheck. The edges
(ONNX, PyTorch, MPI, resume, plots, ...) are ``minidl.ext.*`` and the command line
``minidl.cli``: reachable after ``import minidl``, imported only when first used.
"""
import importlib as _importlib
import os as _os
import sys as _sys

# Idle OpenBLAS threads spin for ~0.1 s after every product, taking the cores of the
# threaded passes (layers/parallel.py); 4 makes them sleep at once. Read only when numpy
# loads, so set here first, unless numpy is loaded already or the user chose a value.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import losses, optim, schedulers
from .backend import (backend_name, device_of, get_array_module, get_backend, gpu_available,
                      set_backend, to_device, to_numpy)
from .callbacks import Callback, CSVLogger, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from .checkpoint import load_model
from .data import DataLoader
from .gradcheck import gradcheck
from .layers import (AvgPool2D, BatchNorm1D, BatchNorm2D, Concat, Conv2D, ConvTranspose2D,
                     Dense, Dropout, Flatten, GlobalAvgPool2D, Identity, Layer, LeakyReLU,
                     MaxPool2D, Parameter, ReLU, Residual, Sigmoid, Softmax, Tanh, register_layer)
from .losses import MSE, Loss, SoftmaxCrossEntropy
from .model import Sequential
from .optim import SGD, Adam, AdamW, RMSprop, clip_grad_norm_
from .random import manual_seed
from .schedulers import (ChainedScheduler, CosineAnnealingLR, ExponentialLR, LinearLR,
                         MultiStepLR, OneCycleLR, ReduceLROnPlateau, SequentialLR, StepLR)
from .trainer import History, Trainer

__version__ = "0.1.0"


def __getattr__(name):
    """``minidl.ext`` and ``minidl.cli``, imported on first use (the core never needs them)."""
    if name in ("ext", "cli"):
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
