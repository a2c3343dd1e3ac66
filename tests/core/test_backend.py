"""The backend seam: switching, device moves, clear errors without a GPU."""
import ast
import pathlib

import numpy as np
import pytest

import minidl
from minidl import backend

from conftest import GPU


def test_default_is_numpy():
    assert minidl.get_backend() is np
    assert minidl.backend_name() == "numpy"


def test_set_backend_as_context_manager_restores():
    with minidl.set_backend("numpy") as xp:
        assert xp is np
    assert minidl.backend_name() == "numpy"


def test_unknown_backend():
    with pytest.raises(ValueError, match="expected one of"):
        minidl.set_backend("jax")


@pytest.mark.skipif(GPU, reason="checks the no-GPU error path")
def test_cupy_without_gpu_is_a_clear_runtime_error():
    with pytest.raises(RuntimeError, match=r"minidl\[gpu\]") as info:
        minidl.set_backend("cupy")
    assert info.value.__cause__ is not None or "no CUDA device" in str(info.value)
    assert minidl.backend_name() == "numpy"
    with pytest.raises(RuntimeError, match=r"minidl\[gpu\]"):
        minidl.to_device(np.zeros(3), "gpu")


def test_cupy_import_error_keeps_cause(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="libcudart.so.12") as info:
        minidl.set_backend("cupy")
    assert isinstance(info.value.__cause__, ImportError)
    assert not minidl.gpu_available()


def test_to_numpy_and_device_of():
    a = np.arange(3)
    assert minidl.to_numpy(a) is a
    assert minidl.device_of(a) == "cpu"
    assert minidl.to_device(a, "cpu") is a
    with pytest.raises(ValueError, match="device must be one of"):
        minidl.to_device(a, "tpu")


def test_check_input_messages():
    with pytest.raises(TypeError, match="Conv2D: expected a numpy or cupy array, got list"):
        backend.check_input("Conv2D", [1, 2], "cpu")
    with pytest.raises(TypeError, match="parameters are on the gpu but the input is a cpu array"):
        backend.check_input("Conv2D", np.zeros(2), "gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device")
def test_device_mismatch_on_gpu():
    layer = minidl.Conv2D(1, 2, 3).to("gpu")
    with pytest.raises(TypeError, match="on the gpu but the input is a cpu array"):
        layer.forward(np.zeros((1, 1, 5, 5), np.float32))
    x = minidl.to_device(np.zeros((1, 1, 5, 5), np.float32), "gpu")
    assert minidl.device_of(layer.forward(x)) == "gpu"
    layer.to("cpu")
    with pytest.raises(TypeError, match="on the cpu but the input is a gpu array"):
        layer.forward(x)


def test_layers_never_import_numpy_or_cupy():
    """Only the seam (and CPU-side I/O) may import an array module."""
    root = pathlib.Path(minidl.__file__).parent
    allowed = {"backend.py", "random.py", "checks.py", "serialization.py"}
    allowed_dirs = {"data", "ext", "cli"}      # CPU-side I/O, plots and the edges
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.name in allowed or rel.parts[0] in allowed_dirs:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{rel}: {n}" for n in names if n.split(".")[0] in ("numpy", "cupy")]
    assert not offenders, offenders


def test_get_array_module_asks_cuda_for_the_device_count_once(monkeypatch):
    """Layers ask for the module of every array they touch (about 50 times a step)."""
    import sys
    import types
    calls = []
    fake_cupy = types.ModuleType("cupy")
    fake_cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=lambda: calls.append(1) or 1))
    fake_array = type("ndarray", (), {"__module__": "cupy", "__cuda_array_interface__": {}})()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    forget = getattr(backend._import_cupy, "cache_clear", lambda: None)
    forget()
    try:
        for _ in range(50):
            assert backend.get_array_module(fake_array) is fake_cupy
    finally:
        forget()                       # the fake must not outlive this test
    assert len(calls) == 1
