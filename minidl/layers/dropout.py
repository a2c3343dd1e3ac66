"""Dropout: inverted dropout (docs/layers.md, "Dropout").

Training, with keep_i ~ Bernoulli(1 - p) drawn afresh on every forward:

    mask_i = keep_i / (1 - p)          (scaled now, so E[y] = x and eval needs nothing)
    y = x * mask,   dx = dy * mask     (the same mask: backward reuses it)

Evaluation (``training=False``) and p = 0: y = x, dx = dy.

Each Dropout owns a generator, ``minidl.random.new_rng(seed)``, apart from the
initialisation stream. On the GPU masks are drawn there (a copy from the host each
step would cost more than the layer), by a cupy RandomState seeded once from that
generator: a seed repeats the masks on one backend, but numpy's and cupy's differ.
"""
from .. import backend
from ..checks import check_real, check_seed
from ..random import new_rng
from .base import Layer
from .registry import register_layer


@register_layer
class Dropout(Layer):
    """Zero each element with probability ``p`` in training, scale the rest by 1/(1-p)."""

    def __init__(self, p=0.5, seed=None, dtype=None):
        super().__init__(dtype)
        self.p = check_real(p, "p", "Dropout", minimum=0, below=1)
        self.seed = check_seed(seed, "seed", "Dropout")
        self.rng = new_rng(seed)
        self.gpu_rng = None          # made on the first GPU forward, seeded from self.rng

    def forward(self, x, training=True):
        x = self._as_input(x)
        mask = None                                   # eval, or p = 0: y = x
        if training and self.p > 0:
            keep = self._uniform(x.shape, backend.device_of(x)) >= self.p
            mask = keep.astype(x.dtype) * (1.0 / (1.0 - self.p))
        self.cache = {"mask": mask, "y_shape": x.shape}
        return x if mask is None else x * mask

    def backward(self, dy):
        mask = self._checked_cache(dy)["mask"]
        return dy if mask is None else dy * mask

    def _uniform(self, shape, device):
        """Uniform [0, 1) float32 draws on ``device`` from this layer's generators."""
        if device == "cpu":
            return self.rng.random(shape, dtype=backend.float32)
        if self.gpu_rng is None:
            cupy = backend.get_module("gpu")
            self.gpu_rng = cupy.random.RandomState(int(self.rng.integers(2**63)))
        return self.gpu_rng.random_sample(shape, dtype=backend.float32)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "p": self.p, "seed": self.seed}
