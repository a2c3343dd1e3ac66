"""Residual and Concat: layers whose input fans out to several branches
(docs/layers.md, "Residual and Concat" derives the backward).

    Residual:  y = block(x) + shortcut(x)          (shortcut = identity by default)
               dx = block.backward(dy) + shortcut.backward(dy)
    Concat:    y = [b_1(x), ..., b_K(x)] joined along ``axis``
               dx = sum_k b_k.backward(dy_k),  dy_k = the slice of dy that b_k produced

``x`` feeds every branch, so by the multivariate chain rule dL/dx is the sum of the
gradients that come back along each branch: the fan-out point sums them.
Branches are run through ``__call__`` and ``backward_with_hooks``, so the hooks of
every layer inside fire as in a Sequential.
"""
from .. import backend
from .base import Layer, layer_spec


class _Branches(Layer):
    """A layer made of named sub-layers (the branches): their parameters, buffers,
    device, mode and state are its own, under "<branch name>.<inner name>"."""

    def __init__(self, branches):
        super().__init__(dtype=None)          # each branch has its own dtype
        owner = type(self).__name__
        for name, branch in branches:
            if not isinstance(branch, Layer):
                raise TypeError(f"{owner}: {name} must be a Layer, got {type(branch).__name__}")
        if len({id(b) for _, b in branches}) != len(branches):
            # a layer keeps one cache: the second forward would overwrite the first's
            raise ValueError(f"{owner}: the same layer object is used in two branches; "
                             f"make a separate layer for each")
        self.branches = [branch for _, branch in branches]
        self.branch_names = [name for name, _ in branches]
        self.y_shape = None

    def named_parameters(self):
        return [(f"{name}.{key}", p) for name, branch in zip(self.branch_names, self.branches)
                for key, p in branch.named_parameters()]

    def named_buffers(self):
        return [(f"{name}.{key}", value)
                for name, branch in zip(self.branch_names, self.branches)
                for key, value in branch.named_buffers()]

    def load_state_dict(self, state):
        """Every name and shape is checked before any branch changes (ValueError)."""
        self.check_state_dict(state)
        for name, branch in zip(self.branch_names, self.branches):
            prefix = name + "."
            branch.load_state_dict({key[len(prefix):]: value for key, value in state.items()
                                    if key.startswith(prefix)})

    def to(self, device):
        for branch in self.branches:
            branch.to(device)
        self.device = device
        self._clear_cache()
        return self

    def train(self, mode=True):
        self.training = mode
        for branch in self.branches:
            branch.train(mode)
        return self

    def _clear_cache(self):
        self.y_shape = None

    def backward(self, dy):
        """dx = the sum over branches of branch.backward(its part of dy)."""
        self._check_grad(dy, self.y_shape)
        dx = None
        for branch, dy_k in zip(self.branches, self._split_grad(dy)):
            dx_k = branch.backward_with_hooks(dy_k)
            dx = dx_k if dx is None else dx + dx_k   # the fan-out point: gradients add
        return dx

    def flops(self, input_shape):
        """The branches' FLOPs, plus one per output value for joining them (the sum of
        a Residual; none for a Concat, which only copies)."""
        return sum(branch.flops(input_shape) for branch in self.branches)

    def extra_repr(self):
        inner = ",\n".join(f"  ({name}) {branch!r}".replace("\n", "\n  ")
                           for name, branch in zip(self.branch_names, self.branches))
        return f"\n{inner}\n"


class Residual(_Branches):
    """``y = block(x) + shortcut(x)``: a residual connection (He et al., 2016).

    ``shortcut=None`` is the identity, which needs ``block`` to keep the shape; when
    the block changes it (more channels, stride 2), pass a projection such as
    ``Conv2D(c_in, c_out, 1, stride=2)``. Follow with ``ReLU()`` in a Sequential for
    the post-addition activation of a ResNet basic block.
    """

    def __init__(self, block, shortcut=None):
        branches = [("block", block)] + ([] if shortcut is None else [("shortcut", shortcut)])
        super().__init__(branches)
        self.block = block
        self.shortcut = shortcut

    def forward(self, x, training=True):
        y = self.block(x, training=training)
        s = x if self.shortcut is None else self.shortcut(x, training=training)
        self._check_shapes(x.shape, y.shape, s.shape)
        self.y_shape = y.shape
        return y + s

    def backward(self, dy):
        """dx = block.backward(dy) + shortcut.backward(dy) (dy itself for the identity)."""
        dx = super().backward(dy)
        return dx + dy if self.shortcut is None else dx

    def _split_grad(self, dy):
        return [dy] * len(self.branches)     # a sum passes dy unchanged to each term

    def output_shape(self, input_shape):
        y = self.block.output_shape(input_shape)
        s = tuple(input_shape) if self.shortcut is None else self.shortcut.output_shape(input_shape)
        self._check_shapes(input_shape, y, s)
        return tuple(y)

    def flops(self, input_shape):
        n_out = 1
        for size in self.output_shape(input_shape)[1:]:
            n_out *= size
        return super().flops(input_shape) + n_out

    def _check_shapes(self, x_shape, y_shape, s_shape):
        if tuple(y_shape) != tuple(s_shape):
            what = "the input (identity shortcut)" if self.shortcut is None else "the shortcut"
            hint = (" pass shortcut=Conv2D(in_channels, out_channels, 1, stride=...) to "
                    "project the input" if self.shortcut is None else "")
            raise ValueError(f"Residual: for input of shape {tuple(x_shape)} the block gives "
                             f"{tuple(y_shape)} but {what} gives {tuple(s_shape)}; they must "
                             f"match to be added;{hint}")

    def get_config(self):
        shortcut = None if self.shortcut is None else layer_spec(self.shortcut)
        return {"block": layer_spec(self.block), "shortcut": shortcut}


class Concat(_Branches):
    """``y = concatenate([b(x) for b in branches], axis)``: parallel branches on one
    input, joined along ``axis`` (1: channels, as in Inception). Every other axis of
    the branch outputs must agree."""

    def __init__(self, branches, axis=1):
        branches = list(branches)
        if not branches:
            raise ValueError("Concat: expected at least one branch, got none")
        if isinstance(axis, bool) or not isinstance(axis, int) or axis == 0:
            raise ValueError(f"Concat: axis must be a non-zero int (axis 0 is the batch), "
                             f"got {axis!r}")
        super().__init__([(str(i), b) for i, b in enumerate(branches)])
        self.axis = axis
        self.sizes = None

    def forward(self, x, training=True):
        ys = [branch(x, training=training) for branch in self.branches]
        self._joined_shape([y.shape for y in ys])
        axis = self.axis % ys[0].ndim
        self.sizes = [y.shape[axis] for y in ys]
        y = backend.get_array_module(ys[0]).concatenate(ys, axis=axis)
        self.y_shape = y.shape
        return y

    def _split_grad(self, dy):
        """dy_k: the slice of dy along ``axis`` that branch k produced."""
        axis = self.axis % dy.ndim
        parts, start = [], 0
        for size in self.sizes:
            index = [slice(None)] * dy.ndim
            index[axis] = slice(start, start + size)
            parts.append(dy[tuple(index)])
            start += size
        return parts

    def output_shape(self, input_shape):
        return self._joined_shape([b.output_shape(input_shape) for b in self.branches])

    def _joined_shape(self, shapes):
        shapes = [tuple(s) for s in shapes]
        ndim = len(shapes[0])
        if not -ndim < self.axis < ndim:
            raise ValueError(f"Concat: axis {self.axis} is out of range for branch outputs "
                             f"of rank {ndim}")
        axis = self.axis % ndim
        others = {s[:axis] + s[axis + 1:] for s in shapes}
        if len(others) != 1 or len({len(s) for s in shapes}) != 1:
            raise ValueError(f"Concat: branch outputs {shapes} must agree on every axis "
                             f"except {self.axis}")
        return shapes[0][:axis] + (sum(s[axis] for s in shapes),) + shapes[0][axis + 1:]

    def _clear_cache(self):
        super()._clear_cache()
        self.sizes = None

    def extra_repr(self):
        return f"axis={self.axis}," + super().extra_repr()

    def get_config(self):
        return {"branches": [layer_spec(b) for b in self.branches], "axis": self.axis}
