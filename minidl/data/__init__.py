"""Datasets and the file formats they come in (CPU-side NumPy arrays)."""
from .datasets import fashion_mnist, mnist
from .idx import read_idx, write_idx

__all__ = ["read_idx", "write_idx", "mnist", "fashion_mnist"]
