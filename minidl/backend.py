"""The backend seam: the one place that chooses the array module, NumPy (CPU) or CuPy.

New arrays (parameters, data batches) go to the *active* backend, chosen by
``set_backend``. Layers compute with ``get_array_module(x)``, the module that owns
their data, so a layer runs wherever its arrays live.

    minidl.set_backend("cupy")          # from now on
    with minidl.set_backend("numpy"):   # only inside the block
        ...
"""
import functools

import numpy

_BACKENDS = ("numpy", "cupy")
_DEVICES = ("cpu", "gpu")
_GPU_HELP = ("Install the GPU extra (pip install 'minidl[gpu]', which brings "
             "cupy-cuda12x) on a machine with an NVIDIA GPU and CUDA driver.")

float32 = numpy.float32     # dtype names for layer signatures: layers do not import numpy
float64 = numpy.float64

_active = "numpy"  # the only global mutable state in minidl besides the RNG seed


@functools.cache
def _import_cupy():
    """cupy, once it imports and a CUDA device answers; RuntimeError otherwise. Cached:
    layers ask for the module of every array, and asking CUDA each time costs a call."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(f"the cupy backend needs CuPy, which failed to import "
                           f"({exc}). {_GPU_HELP}") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy raises CUDARuntimeError and others here
        raise RuntimeError(f"CuPy imported, but no CUDA device could be used ({exc}). "
                           f"{_GPU_HELP}") from exc
    if count < 1:
        raise RuntimeError(f"CuPy imported, but no CUDA device is present. {_GPU_HELP}")
    return cupy


def gpu_available():
    """True when CuPy imports and at least one CUDA device answers."""
    try:
        _import_cupy()
    except RuntimeError:
        return False
    return True


class _BackendContext:
    """Returned by set_backend: the switch has happened; `with` restores the old one."""

    def __init__(self, previous):
        self.previous = previous

    def __enter__(self):
        return get_backend()

    def __exit__(self, *exc_info):
        set_backend(self.previous)


def set_backend(name):
    """Make ``name`` ("numpy" or "cupy") the active backend; usable as a context manager."""
    global _active
    if name not in _BACKENDS:
        raise ValueError(f"set_backend: expected one of {_BACKENDS}, got {name!r}")
    if name == "cupy":
        _import_cupy()
    previous, _active = _active, name
    return _BackendContext(previous)


def backend_name():
    """The active backend's name: "numpy" or "cupy"."""
    return _active


def get_backend():
    """The active array module (numpy or cupy): where new arrays are created."""
    return get_module(default_device())


def default_device():
    """The device new arrays go to: "cpu" for numpy, "gpu" for cupy."""
    return "gpu" if _active == "cupy" else "cpu"


def is_array(a):
    """True for a numpy or cupy ndarray."""
    return isinstance(a, numpy.ndarray) or _is_cupy_array(a)


def _is_cupy_array(a):
    module = type(a).__module__
    return module.startswith("cupy") and hasattr(a, "__cuda_array_interface__")


def device_of(a):
    """ "gpu" for a cupy array, "cpu" for anything else."""
    return "gpu" if _is_cupy_array(a) else "cpu"


def get_array_module(a):
    """The module (numpy or cupy) that owns array ``a``: compute with this."""
    return _import_cupy() if _is_cupy_array(a) else numpy


def get_module(device):
    """The array module for ``device``: numpy for "cpu", cupy for "gpu"."""
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")
    return _import_cupy() if device == "gpu" else numpy


def to_numpy(a):
    """A numpy array with the contents of ``a`` (copied off the GPU if needed)."""
    return a.get() if _is_cupy_array(a) else numpy.asarray(a)


def to_device(a, device):
    """``a`` as an array on ``device`` ("cpu" or "gpu"); no copy when already there."""
    xp = get_module(device)
    return to_numpy(a) if xp is numpy else xp.asarray(a)


def to_backend(a):
    """``a`` as an array of the active backend (what data loaders use)."""
    return to_device(a, default_device())


def zeros(shape, dtype, device):
    return get_module(device).zeros(shape, dtype=dtype)


def check_input(owner, x, device):
    """TypeError, naming ``owner``, unless ``x`` is an array of real numbers (ints or
    floats: a cast would drop an imaginary part or turn None into NaN) on ``device``,
    so that a numpy batch fed to a GPU layer (or the reverse) fails clearly."""
    if not is_array(x):
        raise TypeError(f"{owner}: expected a numpy or cupy array, got {type(x).__name__}")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{owner}: expected an array of real numbers (float or int), "
                        f"got dtype {x.dtype}")
    where = device_of(x)
    if where != device:
        how = ("minidl.to_device(x, 'gpu') or build the model on the cpu"
               if device == "gpu" else "minidl.to_numpy(x) or model.to('gpu')")
        raise TypeError(f"{owner}: its parameters are on the {device} but the input is a "
                        f"{where} array; move one of them ({how})")


def to_floats(values):
    """Python floats of ``values`` (floats, or 0-d arrays on one device), read from
    the GPU in one copy: each copy waits for the device, so a step makes one."""
    on_gpu = [v for v in values if _is_cupy_array(v)]
    if not on_gpu:
        return [float(v) for v in values]
    cupy = _import_cupy()
    read = iter(cupy.stack([v.astype(cupy.float64).reshape(()) for v in on_gpu]).get().tolist())
    return [next(read) if _is_cupy_array(v) else float(v) for v in values]
