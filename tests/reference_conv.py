"""A slow, obviously-correct Conv2D and ConvTranspose2D: the equations as plain Python loops.

Everything is float64 NumPy, one sample and one output position at a time, so
each line can be read against docs/conv2d.md ("The seed's equations", and the sections
on dilation, groups and the transposed convolution). The fast layers must match these
to 1e-10. ConvTranspose2D is written from its own definition (each input value spreads
over a window of the output), not from Conv2D's backward, so that the tests check that
the two are the same.
"""
import numpy as np


def pad(a, p1, p2):
    """A_pad: p1 rows of zeros above and below, p2 columns left and right."""
    n, c, h, w = a.shape
    a_pad = np.zeros((n, c, h + 2 * p1, w + 2 * p2))
    a_pad[:, :, p1:p1 + h, p2:p2 + w] = a
    return a_pad


def output_size(h, w, k1, k2, s1, s2, p1, p2, d1=1, d2=1):
    """floor((H + 2p - d*(k - 1) - 1) / s) + 1: the windows that fit, dilated by d."""
    return (h + 2 * p1 - d1 * (k1 - 1) - 1) // s1 + 1, (w + 2 * p2 - d2 * (k2 - 1) - 1) // s2 + 1


def first_channel(f, f_out, c_in, groups):
    """c0(f): the first input channel of filter f's group (its C/G channels follow)."""
    return f // (f_out // groups) * (c_in // groups)


def conv_forward(a_prev, w, b, stride, padding, dilation=(1, 1), groups=1):
    """Eq. [1] with dilation and groups:
    Z[n,f,i,j] = b[f] + sum_{c,m,l} W[f,c,m,l] * A_pad[n, c0(f)+c, i*s1+m*d1, j*s2+l*d2]."""
    (s1, s2), (p1, p2), (d1, d2) = stride, padding, dilation
    n_samples, c_total, h, wd = a_prev.shape
    f_out, c_in, k1, k2 = w.shape            # c_in: the channels of one group
    h_out, w_out = output_size(h, wd, k1, k2, s1, s2, p1, p2, d1, d2)
    a_pad = pad(a_prev, p1, p2)
    z = np.zeros((n_samples, f_out, h_out, w_out))
    for n in range(n_samples):
        for f in range(f_out):
            c0 = first_channel(f, f_out, c_total, groups)
            for i in range(h_out):
                for j in range(w_out):
                    total = b[f]
                    for c in range(c_in):
                        for m in range(k1):
                            for l in range(k2):
                                total += (w[f, c, m, l]
                                          * a_pad[n, c0 + c, i * s1 + m * d1, j * s2 + l * d2])
                    z[n, f, i, j] = total
    return z


def conv_backward(dz, a_prev, w, stride, padding, dilation=(1, 1), groups=1):
    """dW, db and dA_prev from dZ, each straight from its definition.

    dW[f,c,m,l] = sum_{n,i,j} dZ[n,f,i,j] * A_pad[n,c0(f)+c,i*s1+m*d1,j*s2+l*d2]
    db[f]       = sum_{n,i,j} dZ[n,f,i,j]
    dA_pad[n,c0(f)+c,i*s1+m*d1,j*s2+l*d2] += dZ[n,f,i,j] * W[f,c,m,l]     (Eq. [9])
    dA_prev     = dA_pad without its padding
    """
    (s1, s2), (p1, p2), (d1, d2) = stride, padding, dilation
    n_samples, c_total, h, wd = a_prev.shape
    f_out, c_in, k1, k2 = w.shape
    _, _, h_out, w_out = dz.shape
    a_pad = pad(a_prev, p1, p2)
    dw = np.zeros_like(w)
    db = np.zeros(f_out)
    da_pad = np.zeros_like(a_pad)
    for n in range(n_samples):
        for f in range(f_out):
            c0 = first_channel(f, f_out, c_total, groups)
            for i in range(h_out):
                for j in range(w_out):
                    db[f] += dz[n, f, i, j]
                    for c in range(c_in):
                        for m in range(k1):
                            for l in range(k2):
                                y, x = i * s1 + m * d1, j * s2 + l * d2
                                dw[f, c, m, l] += dz[n, f, i, j] * a_pad[n, c0 + c, y, x]
                                da_pad[n, c0 + c, y, x] += dz[n, f, i, j] * w[f, c, m, l]
    da_prev = da_pad[:, :, p1:p1 + h, p2:p2 + wd]
    return dw, db, da_prev


def conv_transpose_forward(x, w, b, stride, padding, output_padding, dilation=(1, 1),
                           groups=1):
    """Each input value x[n,c,i,j] spreads over the output, weighted by its filters:

    Y[n, f, i*s1 + m*d1 - p1, j*s2 + l*d2 - p2] += x[n, c, i, j] * W[c, f - f0(c), m, l]

    for every f of c's group (f0(c) its first output channel) and every (m, l) that lands
    inside the output; then Y += b. Ho = (H - 1)*s1 - 2*p1 + d1*(k1 - 1) + op1 + 1.
    W is (C_in, C_out/G, k1, k2)."""
    (s1, s2), (p1, p2), (o1, o2), (d1, d2) = stride, padding, output_padding, dilation
    n_samples, c_in, h, wd = x.shape
    _, f_group, k1, k2 = w.shape
    h_out = (h - 1) * s1 - 2 * p1 + d1 * (k1 - 1) + o1 + 1
    w_out = (wd - 1) * s2 - 2 * p2 + d2 * (k2 - 1) + o2 + 1
    y = np.zeros((n_samples, f_group * groups, h_out, w_out)) + b[:, None, None]
    for n, c, i, j, f, m, l, r, q in _transposed_terms(x.shape, w.shape, stride, padding,
                                                       dilation, groups, (h_out, w_out)):
        y[n, f, r, q] += x[n, c, i, j] * w[c, f % f_group, m, l]
    return y


def conv_transpose_backward(dy, x, w, stride, padding, dilation=(1, 1), groups=1):
    """dx, dW and db of conv_transpose_forward, one term at a time: each term
    x[n,c,i,j] * W[c,f',m,l] of Y[n,f,r,q] gives dy[n,f,r,q] * W to dx and
    dy[n,f,r,q] * x to dW; db[f] = sum of dy[:, f]."""
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    f_group = w.shape[1]
    for n, c, i, j, f, m, l, r, q in _transposed_terms(x.shape, w.shape, stride, padding,
                                                       dilation, groups, dy.shape[2:]):
        dx[n, c, i, j] += dy[n, f, r, q] * w[c, f % f_group, m, l]
        dw[c, f % f_group, m, l] += dy[n, f, r, q] * x[n, c, i, j]
    return dx, dw, dy.sum(axis=(0, 2, 3))


def _transposed_terms(x_shape, w_shape, stride, padding, dilation, groups, out_hw):
    """(n, c, i, j, f, m, l, r, q) of every term: input (i, j) of channel c, output
    channel f of c's group, kernel offset (m, l), landing on output (r, q)."""
    (s1, s2), (p1, p2), (d1, d2) = stride, padding, dilation
    n_samples, c_in, h, wd = x_shape
    _, f_group, k1, k2 = w_shape
    for n in range(n_samples):
        for c in range(c_in):
            f0 = c // (c_in // groups) * f_group
            for i in range(h):
                for j in range(wd):
                    for f in range(f0, f0 + f_group):
                        for m in range(k1):
                            for l in range(k2):
                                r, q = i * s1 + m * d1 - p1, j * s2 + l * d2 - p2
                                if 0 <= r < out_hw[0] and 0 <= q < out_hw[1]:
                                    yield n, c, i, j, f, m, l, r, q
