"""Residual and Concat: one input fanned out to several branches (docs/layers.md,
"Residual and Concat", derives the backward).

    Residual:  y = block(x) + shortcut(x)          (shortcut = identity by default)
               dx = block.backward(dy) + shortcut.backward(dy)
    Concat:    y = [b_1(x), ..., b_K(x)] joined along ``axis``
               dx = sum_k b_k.backward(dy_k),  dy_k = the slice of dy that b_k produced

``x`` feeds every branch, so dL/dx sums the gradients that come back along each one.
Branches run through ``__call__`` and ``backward_with_hooks``: their hooks fire.
"""
import itertools
import math

from .. import backend
from .base import Container, Layer, layer_spec, sub_layer_shapes
from .registry import register_layer


class _Branches(Container):
    """A Container whose sub-layers all see the same input: ``branches``, named by
    ``branch_names``."""

    in_parallel = True
    state_shapes = classmethod(sub_layer_shapes)

    def __init__(self, branches):
        super().__init__()
        owner = type(self).__name__
        for name, branch in branches:
            if not isinstance(branch, Layer):
                raise TypeError(f"{owner}: {name} must be a Layer, got {type(branch).__name__}")
        if len({id(b) for _, b in branches}) != len(branches):
            # a layer keeps one cache: the second forward would overwrite the first's
            raise ValueError(f"{owner}: the same layer object is used in two branches; "
                             f"make a separate layer for each")
        self.branch_names = [name for name, _ in branches]
        self.branches = [branch for _, branch in branches]

    def named_layers(self):
        return list(zip(self.branch_names, self.branches))

    # Messages name the whole key ("shortcut.0.weight"), not "layer shortcut (...)".
    check_state_dict = Layer.check_state_dict

    def flops(self, input_shape):
        return sum(branch.flops(input_shape) for branch in self.branches)


@register_layer
class Residual(_Branches):
    """``y = block(x) + shortcut(x)``: a residual connection (He et al., 2016).

    ``shortcut=None`` is the identity, which needs ``block`` to keep the shape; when
    the block changes it (more channels, stride 2), pass a projection such as
    ``Conv2D(c_in, c_out, 1, stride=2)``. Follow with ``ReLU()`` in a Sequential for
    the post-addition activation of a ResNet basic block.
    """

    def __init__(self, block, shortcut=None):
        super().__init__([("block", block)]
                         + ([] if shortcut is None else [("shortcut", shortcut)]))
        self.block = block
        self.shortcut = shortcut

    def forward(self, x, training=True):
        y = self.block(x, training=training)
        s = x if self.shortcut is None else self.shortcut(x, training=training)
        self._check_shapes(x.shape, y.shape, s.shape)
        self.cache = {"y_shape": y.shape}
        return y + s

    def backward(self, dy):
        """A sum passes dy unchanged to each term; the identity shortcut's term is dy."""
        self._checked_cache(dy)
        dx = self.block.backward_with_hooks(dy)
        return dx + (dy if self.shortcut is None else self.shortcut.backward_with_hooks(dy))

    def output_shape(self, input_shape):
        y = self.block.output_shape(input_shape)
        s = tuple(input_shape) if self.shortcut is None else self.shortcut.output_shape(input_shape)
        self._check_shapes(input_shape, y, s)
        return tuple(y)

    def flops(self, input_shape):
        """The branches' FLOPs plus one addition per output value."""
        return super().flops(input_shape) + math.prod(self.output_shape(input_shape)[1:])

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


@register_layer
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

    def forward(self, x, training=True):
        ys = [branch(x, training=training) for branch in self.branches]
        self._joined_shape([y.shape for y in ys])
        axis = self.axis % ys[0].ndim
        y = backend.get_array_module(ys[0]).concatenate(ys, axis=axis)
        # where each branch's slice of dy starts along axis
        starts = list(itertools.accumulate(y_k.shape[axis] for y_k in ys))[:-1]
        self.cache = {"starts": starts, "axis": axis, "y_shape": y.shape}
        return y

    def backward(self, dy):
        """dx = sum_k b_k.backward(dy_k), dy_k the slice of dy along axis from b_k."""
        cache = self._checked_cache(dy)
        dy_ks = backend.get_array_module(dy).split(dy, cache["starts"], axis=cache["axis"])
        return sum(b.backward_with_hooks(dy_k) for b, dy_k in zip(self.branches, dy_ks))

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

    def extra_repr(self):
        return f"axis={self.axis}," + super().extra_repr()

    def get_config(self):
        return {"branches": [layer_spec(b) for b in self.branches], "axis": self.axis}
