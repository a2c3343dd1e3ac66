"""SyncBatchNorm: batch norm over the global batch of a data-parallel job, as
torch.nn.SyncBatchNorm, Horovod's SyncBatchNorm and Chainer's
MultiNodeBatchNormalization (docs/distributed.md, "SyncBatchNorm", derives it).

Rank r holds m_r values x_i of a channel; the job holds M = sum_r m_r. Per channel:

    forward (training): two sums over all ranks, each one allreduce
        mu  = (1/M) sum_ranks sum_i x_i                     (M rides along in that sum)
        var = (1/M) sum_ranks sum_i (x_i - mu)^2            (biased; two passes, as in
        s = 1 / sqrt(var + eps),  x_hat_i = (x_i - mu) s     one process)
        y_i = gamma x_hat_i + beta
        running statistics as BatchNorm's, with M values (unbiased var M/(M-1))
    backward (training): the two gradient sums over all ranks, one allreduce
        Dbeta = sum_ranks sum_i dy_i,   Dgamma = sum_ranks sum_i dy_i x_hat_i
        dx_i = gamma s (dy_i - Dbeta/M - x_hat_i Dgamma/M)
        dgamma, dbeta: this rank's own sums (DistributedOptimizer averages them)

so p ranks with m values each compute what one BatchNorm computes over the p m
values. Eval mode uses the running statistics and talks to no one, as BatchNorm.
"""
from .. import backend
from ..layers.normalization import BatchNorm1D, BatchNorm2D, _BatchNorm, _channel_dot
from ..layers.base import Container
from ..layers.registry import layer_class, register_layer
from .distributed import Communicator

_STANDS_FOR = ("BatchNorm1D", "BatchNorm2D")


@register_layer
class SyncBatchNorm(_BatchNorm):
    """Batch norm whose batch statistics span the ranks of ``comm`` (None: this process
    alone, where it is BatchNorm). ``saved_as``: the BatchNorm class it stands for,
    "BatchNorm2D" (N, C, H, W) or "BatchNorm1D" (N, C) or (N, C, L); a checkpoint names
    that class, so it loads in one process without minidl.ext. Other arguments:
    BatchNorm's."""

    synchronized = True     # its buffers are equal on every rank: RankSync leaves them

    def __init__(self, num_features, comm=None, momentum=0.1, eps=1e-5, affine=True,
                 dtype=backend.float32, saved_as="BatchNorm2D"):
        super().__init__(num_features, momentum, eps, affine, dtype)
        if saved_as not in _STANDS_FOR:
            raise ValueError(f"SyncBatchNorm: saved_as must be one of {list(_STANDS_FOR)}, "
                             f"got {saved_as!r}")
        self.comm = Communicator() if comm is None else comm
        self.saved_as = saved_as
        like = layer_class(saved_as)
        self.input_ranks, self.input_layout = like.input_ranks, like.input_layout

    # -- forward: mu and var over every rank's values --------------------------------
    def forward(self, x, training=True):
        if not training:        # the running statistics: nothing to share
            return super().forward(x, training=False)
        x = self._as_input(x)
        self.output_shape(x.shape)                       # checks rank and C
        xp, (axes, shape) = backend.get_array_module(x), self._per_channel(x.ndim)
        c = self.num_features
        sums = xp.empty(c + 1, dtype=xp.float64)         # [sum_i x_i per channel, m_r],
        sums[:c] = x.sum(axis=axes)                      # float64: m_r stays exact
        sums[c] = x.size // c
        self.comm.allreduce_(sums)
        m = int(sums[c])
        if m < 2:
            raise ValueError(f"SyncBatchNorm: training needs more than one value per "
                             f"channel over the {self.comm.size} ranks, got {m} (input of "
                             f"shape {tuple(x.shape)} here); use eval mode, or bigger batches")
        mu = (sums[:c] / m).astype(x.dtype).reshape(shape)
        xc = x - mu
        var = self.comm.allreduce_(_channel_dot(xc, xc)) * (1.0 / m)
        s = (1.0 / xp.sqrt(var + self.eps)).reshape(shape)
        gamma, beta = self._affine(shape, xp)
        y = xc * (gamma * s)
        y += beta
        self._update_running_stats(mu, var, m)
        self.cache = {"xc": xc, "s": s, "m": m, "training": True, "y_shape": y.shape}
        return y

    # -- backward: the two gradient sums over every rank -----------------------------
    def backward(self, dy):
        cache = self._checked_cache(dy)
        if not cache["training"]:
            return super().backward(dy)
        xc, s, m = cache["xc"], cache["s"], cache["m"]
        xp, (axes, shape) = backend.get_array_module(dy), self._per_channel(dy.ndim)
        c = self.num_features
        sums = xp.empty(2 * c, dtype=s.dtype)
        sums[:c] = dy.sum(axis=axes)                         # dbeta: sum_i dy_i
        sums[c:] = _channel_dot(dy, xc) * s.reshape(-1)      # dgamma: sum_i dy_i x_hat_i
        dbeta, dgamma = sums[:c].copy(), sums[c:].copy()     # this rank's, for the grads
        self.comm.allreduce_(sums)                           # the job's: Dbeta, Dgamma
        dbeta_job, dgamma_job = sums[:c].reshape(shape), sums[c:].reshape(shape)
        gamma, _ = self._affine(shape, xp)
        gamma_s = gamma * s
        dx = dy * gamma_s                                    # gamma s dy
        dx -= xc * (gamma_s * s * dgamma_job * (1.0 / m))    # - gamma s x_hat Dgamma/M
        dx -= gamma_s * dbeta_job * (1.0 / m)                # - gamma s Dbeta/M
        if self.affine:
            self.weight.accumulate_grad(dgamma)
            self.bias.accumulate_grad(dbeta)
        return dx

    def extra_repr(self):
        return f"{super().extra_repr()}, ranks={self.comm.size}, saved_as={self.saved_as}"


def convert_sync_batchnorm(model, comm):
    """Replace every BatchNorm1D and BatchNorm2D in ``model``, nested ones too, by a
    SyncBatchNorm over ``comm`` that keeps its state: the same Parameter objects (an
    optimizer made before still updates them), running statistics, settings, mode,
    device and hooks. Returns ``model`` (given a BatchNorm itself: its replacement),
    as torch.nn.SyncBatchNorm.convert_sync_batchnorm."""
    if isinstance(model, (BatchNorm1D, BatchNorm2D)):
        sync = SyncBatchNorm(model.num_features, comm, model.momentum, model.eps, model.affine,
                             model.dtype, saved_as=type(model).__name__)
        for name in ("weight", "bias", *model.buffer_names, "device", "training",
                     "forward_hooks", "backward_hooks"):
            setattr(sync, name, getattr(model, name))
        return sync
    if isinstance(model, Container):
        for _, child in model.named_layers():
            new = convert_sync_batchnorm(child, comm)
            if new is not child:
                _replace(model, child, new)
    return model


def _replace(container, old, new):
    """Put ``new`` wherever ``container`` holds ``old``: in an attribute, or in a list
    (Sequential's layers, Residual's block and branches)."""
    found = False
    for name, value in vars(container).items():
        if value is old:
            setattr(container, name, new)
            found = True
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    value[i], found = new, True
    if not found:
        raise TypeError(f"convert_sync_batchnorm: {type(container).__name__} holds its "
                        f"layer {type(old).__name__} neither in an attribute nor in a list; "
                        f"replace it by hand with SyncBatchNorm")
