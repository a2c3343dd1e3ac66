"""Datasets and the file formats they come in (CPU-side NumPy arrays), and the
DataLoader that turns arrays into mini-batches on the active backend."""
from .datasets import fashion_mnist, mnist
from .idx import read_idx, write_idx
from .loader import DataLoader

__all__ = ["read_idx", "write_idx", "mnist", "fashion_mnist", "DataLoader"]
