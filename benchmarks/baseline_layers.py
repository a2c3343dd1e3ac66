"""minidl's Conv2D and MaxPool2D as they were before issue #7, frozen for comparison.

bench_conv.py times these next to the current layers in the same process, so the
"before" column and the speed-ups in docs/performance.md are measured side by side
rather than taken from an old run. The code is a verbatim copy of the forward and
backward passes (and the im2col helpers) at commit 7c602f2; only the class names
differ. Not part of the package: nothing imports it but the benchmark.
"""
from minidl import backend
from minidl.layers.conv import Conv2D
from minidl.layers.pooling import MaxPool2D


def pad_channels_first(x, pads):
    (top, bottom), (left, right) = pads
    n, c, h, w = x.shape
    x_t = x.transpose(1, 0, 2, 3)
    if top == bottom == left == right == 0:
        return x_t
    xp = backend.get_array_module(x)
    x_pad_t = xp.zeros((c, n, h + top + bottom, w + left + right), dtype=x.dtype)
    x_pad_t[:, :, top:top + h, left:left + w] = x_t
    return x_pad_t


def im2col(x_pad_t, kernel, stride, out_hw, out=None):
    xp = backend.get_array_module(x_pad_t)
    c, n = x_pad_t.shape[:2]
    (k1, k2), (s1, s2), (ho, wo) = kernel, stride, out_hw
    if out is None:
        out = xp.empty((c, k1, k2, n, ho, wo), dtype=x_pad_t.dtype)
    for m in range(k1):
        for l in range(k2):
            out[:, m, l] = x_pad_t[:, :, m:m + s1 * (ho - 1) + 1:s1, l:l + s2 * (wo - 1) + 1:s2]
    return out.reshape(c * k1 * k2, n * ho * wo)


def col2im_add(dcols, dx_pad_t, kernel, stride, out_hw):
    c, n = dx_pad_t.shape[:2]
    (k1, k2), (s1, s2), (ho, wo) = kernel, stride, out_hw
    dcols = dcols.reshape(c, k1, k2, n, ho, wo)
    for m in range(k1):
        for l in range(k2):
            dx_pad_t[:, :, m:m + s1 * (ho - 1) + 1:s1, l:l + s2 * (wo - 1) + 1:s2] += dcols[:, m, l]
    return dx_pad_t


class BaselineConv2D(Conv2D):
    """Conv2D at commit 7c602f2 (channels-first im2col, col2im adds, fresh buffers)."""

    def forward(self, x, training=True):
        x = self._as_input(x, ndim=4)
        xp = backend.get_array_module(x)
        n = x.shape[0]
        ho, wo = self._check_and_output_hw(x.shape)
        f = self.out_channels
        x_pad_t = pad_channels_first(x, self.pads)
        w2 = self.weight.data.reshape(f, -1)
        z_t = xp.empty((f, n, ho * wo), dtype=self.dtype)
        chunks = self._batch_chunks(n, ho * wo)
        cols = None
        for n0, n1 in chunks:
            cols = im2col(x_pad_t[:, n0:n1], self.kernel_size, self.stride, (ho, wo))
            xp.matmul(w2, cols, out=z_t[:, n0:n1].reshape(f, -1))
        if self.bias is not None:
            z_t += self.bias.data[:, None, None]
        self.cache = {"x_shape": x.shape, "x_pad_t": x_pad_t,
                      "cols": cols if len(chunks) == 1 else None}
        z = z_t.reshape(f, n, ho, wo).transpose(1, 0, 2, 3)
        return self.activation.forward(z, training=training)

    def backward(self, da):
        dz = self.activation.backward(da)
        n, c, h, w = self.cache["x_shape"]
        x_pad_t, cols = self.cache["x_pad_t"], self.cache["cols"]
        xp = backend.get_array_module(dz)
        f = self.out_channels
        ho, wo = dz.shape[2:]
        dz_t = dz.transpose(1, 0, 2, 3).reshape(f, n, ho * wo)
        w2 = self.weight.data.reshape(f, -1)
        if self.bias is not None:
            self.bias.accumulate_grad(dz_t.sum(axis=(1, 2)))
        dw2 = None
        dx_pad_t = xp.zeros((c,) + x_pad_t.shape[1:], dtype=self.dtype)
        for n0, n1 in self._batch_chunks(n, ho * wo):
            if cols is None or n1 - n0 != n:
                cols = im2col(x_pad_t[:, n0:n1], self.kernel_size, self.stride, (ho, wo))
            dz2 = dz_t[:, n0:n1].reshape(f, -1)
            part = dz2 @ cols.T
            dw2 = part if dw2 is None else dw2 + part
            col2im_add(w2.T @ dz2, dx_pad_t[:, n0:n1], self.kernel_size, self.stride, (ho, wo))
        self.weight.accumulate_grad(dw2.reshape(self.weight.shape))
        (top, _), (left, _) = self.pads
        return dx_pad_t[:, :, top:top + h, left:left + w].transpose(1, 0, 2, 3)


class BaselineMaxPool2D(MaxPool2D):
    """MaxPool2D at commit 7c602f2 (slab loop, unclaimed mask in backward)."""

    def forward(self, x, training=True):
        x = self._as_input(x, ndim=4)
        xp = backend.get_array_module(x)
        out_hw = self._check_and_output_hw(x.shape)
        x_pad = self._pad(x, float("-inf"))
        offsets = self._offsets()
        y = self._slab(x_pad, *offsets[0], out_hw).copy()
        for m, l in offsets[1:]:
            xp.maximum(y, self._slab(x_pad, m, l, out_hw), out=y)
        self.cache = {"x_pad": x_pad, "y": y, "out_hw": out_hw}
        return y

    def backward(self, dy):
        x_pad, y, out_hw = self.cache["x_pad"], self.cache["y"], self.cache["out_hw"]
        xp = backend.get_array_module(dy)
        dx_pad = self._new_dx_pad(xp, x_pad.shape, x_pad.dtype, out_hw)
        overlapping = self._overlapping()
        unclaimed = xp.ones(y.shape, dtype=bool)
        for m, l in self._offsets():
            first_max = self._slab(x_pad, m, l, out_hw) == y
            first_max &= unclaimed
            unclaimed ^= first_max
            dx_slab = self._slab(dx_pad, m, l, out_hw)
            if overlapping:
                dx_slab += dy * first_max
            else:
                xp.multiply(dy, first_max, out=dx_slab)
        return self._crop(dx_pad)
