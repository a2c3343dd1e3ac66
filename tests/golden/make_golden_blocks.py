"""Record PyTorch's numbers for Residual and Concat into tests/golden/blocks.npz.

    PYTHONPATH=. python tests/golden/make_golden_blocks.py     # needs torch

For each case below: the input x, an upstream gradient dy, the minidl parameters
(float64, from a fixed seed), and what torch computes from them in training mode:
the output y, dx, every parameter's gradient and the batch-norm running statistics
after the step. tests/core/layers/test_blocks.py builds the same minidl model, loads
the parameters and compares (no torch needed); with torch installed it also runs the
comparison live through ``torch_model``.
"""
import os

import numpy

import minidl
from minidl import (BatchNorm2D, Concat, Conv2D, MaxPool2D, ReLU, Residual, Sequential)

F64 = numpy.float64
PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blocks.npz")


def residual_projection():
    """A ResNet basic block that halves the size and doubles the channels."""
    return Sequential(
        Residual(Sequential(Conv2D(3, 6, 3, stride=2, padding=1, bias=False, dtype=F64),
                            BatchNorm2D(6, dtype=F64), ReLU(),
                            Conv2D(6, 6, 3, padding=1, bias=False, dtype=F64),
                            BatchNorm2D(6, dtype=F64)),
                 shortcut=Sequential(Conv2D(3, 6, 1, stride=2, bias=False, dtype=F64),
                                     BatchNorm2D(6, dtype=F64))),
        ReLU())


def residual_identity():
    return Residual(Sequential(Conv2D(3, 3, 3, padding=1, dtype=F64), ReLU(),
                               Conv2D(3, 3, 3, padding=1, dtype=F64)))


def concat():
    """Inception-like: a 1x1 conv, a 3x3 conv with ReLU and a max pool, side by side."""
    return Concat([Conv2D(3, 2, 1, dtype=F64),
                   Sequential(Conv2D(3, 4, 3, padding=1, dtype=F64), ReLU()),
                   MaxPool2D(3, stride=1, padding=1)], axis=1)


CASES = {"residual_projection": residual_projection, "residual_identity": residual_identity,
         "concat": concat}
X_SHAPE = (3, 3, 6, 6)


def inputs(case):
    """x, and dy shaped like the model's output, from a seed of their own."""
    minidl.manual_seed(7)
    model = CASES[case]()
    rng = numpy.random.default_rng(11)
    x = rng.standard_normal(X_SHAPE)
    dy = rng.standard_normal(model.output_shape(X_SHAPE))
    for name, p in model.named_parameters():     # biases and BatchNorm's scale off 0 and 1
        if p.data.ndim == 1:
            p.data[...] = rng.uniform(-1, 1, p.shape) + name.endswith("weight")
    return model, x, dy


# -- the same networks in torch --------------------------------------------------
def torch_model(layer):
    """The torch.nn module that computes what the minidl ``layer`` computes, with its
    parameters and buffers copied."""
    import torch
    nn = torch.nn

    class TorchResidual(nn.Module):
        def __init__(self, block, shortcut):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    class TorchConcat(nn.Module):
        def __init__(self, branches, axis):
            super().__init__()
            self.branches, self.axis = nn.ModuleList(branches), axis

        def forward(self, x):
            return torch.cat([b(x) for b in self.branches], dim=self.axis)

    def tensor(a):
        return torch.tensor(numpy.asarray(a))

    def convert(m):
        if isinstance(m, Sequential):
            return nn.Sequential(*[convert(inner) for inner in m.layers])
        if isinstance(m, Residual):
            return TorchResidual(convert(m.block),
                                 None if m.shortcut is None else convert(m.shortcut))
        if isinstance(m, Concat):
            return TorchConcat([convert(b) for b in m.branches], m.axis)
        if isinstance(m, Conv2D):
            t = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                          m.padding, bias=m.bias is not None).double()
            t.weight.data = tensor(m.weight.data)
            if m.bias is not None:
                t.bias.data = tensor(m.bias.data)
            return t
        if isinstance(m, BatchNorm2D):
            t = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum).double()
            t.weight.data, t.bias.data = tensor(m.weight.data), tensor(m.bias.data)
            t.running_mean.data = tensor(m.running_mean)
            t.running_var.data = tensor(m.running_var)
            return t
        if isinstance(m, ReLU):
            return nn.ReLU()
        if isinstance(m, MaxPool2D):
            return nn.MaxPool2d(m.kernel_size, m.stride, m.padding)
        raise TypeError(f"torch_model: no torch equivalent for {type(m).__name__}")

    return convert(layer)


def torch_results(model, x, dy):
    """y, dx, {param name: grad} and {buffer name: value} from torch, in training mode.
    Parameters and buffers are matched by their order, which both libraries share."""
    import torch
    module = torch_model(model).train()
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    yt.backward(torch.tensor(dy))
    names = [name for name, _ in model.named_parameters()]
    grads = {name: p.grad.numpy() for name, p in zip(names, module.parameters())}
    running = [b.numpy() for key, b in module.named_buffers() if "running" in key]
    buffers = dict(zip([name for name, _ in model.named_buffers() if "running" in name],
                       running))
    return yt.detach().numpy(), xt.grad.numpy(), grads, buffers


def main():
    arrays = {}
    for case in CASES:
        model, x, dy = inputs(case)
        y, dx, grads, buffers = torch_results(model, x, dy)
        arrays.update({f"{case}/x": x, f"{case}/dy": dy, f"{case}/y": y, f"{case}/dx": dx})
        arrays.update({f"{case}/param/{k}": v for k, v in model.state_dict().items()})
        arrays.update({f"{case}/grad/{k}": v for k, v in grads.items()})
        arrays.update({f"{case}/buffer/{k}": v for k, v in buffers.items()})
    numpy.savez(PATH, **arrays)
    print(f"wrote {PATH} ({len(arrays)} arrays)")


if __name__ == "__main__":
    main()
