"""A slow, obviously-correct Conv2D: the seed's equations as plain Python loops.

Everything is float64 NumPy, one sample and one output position at a time, so
each line can be read against docs/conv2d.md ("The seed's equations"). The fast layer must
match these to 1e-10.
"""
import numpy as np


def pad(a, p1, p2):
    """A_pad: p1 rows of zeros above and below, p2 columns left and right."""
    n, c, h, w = a.shape
    a_pad = np.zeros((n, c, h + 2 * p1, w + 2 * p2))
    a_pad[:, :, p1:p1 + h, p2:p2 + w] = a
    return a_pad


def output_size(h, w, k1, k2, s1, s2, p1, p2):
    return (h + 2 * p1 - k1) // s1 + 1, (w + 2 * p2 - k2) // s2 + 1


def conv_forward(a_prev, w, b, stride, padding):
    """Eq. [1]: Z[n,f,i,j] = b[f] + sum_{c,m,l} W[f,c,m,l] * A_pad[n,c,i*s1+m,j*s2+l]."""
    (s1, s2), (p1, p2) = stride, padding
    n_samples, c_in, h, wd = a_prev.shape
    f_out, _, k1, k2 = w.shape
    h_out, w_out = output_size(h, wd, k1, k2, s1, s2, p1, p2)
    a_pad = pad(a_prev, p1, p2)
    z = np.zeros((n_samples, f_out, h_out, w_out))
    for n in range(n_samples):
        for f in range(f_out):
            for i in range(h_out):
                for j in range(w_out):
                    total = b[f]
                    for c in range(c_in):
                        for m in range(k1):
                            for l in range(k2):
                                total += w[f, c, m, l] * a_pad[n, c, i * s1 + m, j * s2 + l]
                    z[n, f, i, j] = total
    return z


def conv_backward(dz, a_prev, w, stride, padding):
    """dW, db and dA_prev from dZ, each straight from its definition.

    dW[f,c,m,l] = sum_{n,i,j} dZ[n,f,i,j] * A_pad[n,c,i*s1+m,j*s2+l]
    db[f]       = sum_{n,i,j} dZ[n,f,i,j]
    dA_pad[n,c,i*s1+m,j*s2+l] += dZ[n,f,i,j] * W[f,c,m,l]     (Eq. [9])
    dA_prev     = dA_pad without its padding
    """
    (s1, s2), (p1, p2) = stride, padding
    n_samples, c_in, h, wd = a_prev.shape
    f_out, _, k1, k2 = w.shape
    _, _, h_out, w_out = dz.shape
    a_pad = pad(a_prev, p1, p2)
    dw = np.zeros_like(w)
    db = np.zeros(f_out)
    da_pad = np.zeros_like(a_pad)
    for n in range(n_samples):
        for f in range(f_out):
            for i in range(h_out):
                for j in range(w_out):
                    db[f] += dz[n, f, i, j]
                    for c in range(c_in):
                        for m in range(k1):
                            for l in range(k2):
                                y, x = i * s1 + m, j * s2 + l
                                dw[f, c, m, l] += dz[n, f, i, j] * a_pad[n, c, y, x]
                                da_pad[n, c, y, x] += dz[n, f, i, j] * w[f, c, m, l]
    da_prev = da_pad[:, :, p1:p1 + h, p2:p2 + wd]
    return dw, db, da_prev
