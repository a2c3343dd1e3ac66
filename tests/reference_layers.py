"""Slow, obviously correct loop versions of the layers whose vectorised code is not.

Plain Python loops over float64 numpy arrays, one element at a time, written from
the definitions (the equations in each docstring) rather than from minidl's code.
Tests compare minidl against these at 1e-10. Keep inputs small: these are O(size).
"""
import math

import numpy


# -- pooling -----------------------------------------------------------------------

def _pool_geometry(x, kernel, stride, padding, ceil_mode=False):
    """Output size for an (N, C, H, W) input: floor((H + 2p - k) / s) + 1, or with
    ceil_mode the ceiling, less one if the last window would start past the input and
    its left padding (PyTorch's rule)."""
    def size(n, k, s, p):
        if not ceil_mode:
            return (n + 2 * p - k) // s + 1
        out = math.ceil((n + 2 * p - k) / s) + 1
        return out - 1 if (out - 1) * s >= n + p else out
    (k1, k2), (s1, s2), (p1, p2) = kernel, stride, padding
    _, _, h, w = x.shape
    return size(h, k1, s1, p1), size(w, k2, s2, p2)


def _window(i, j, kernel, stride, padding, h, w):
    """Window (i, j)'s positions (r, q) in row-major order, each with where it lies:
    "input", "padding", or "beyond" the padding (a ceil_mode window's overhang).

    Window (i, j) covers rows i*s1 - p1 + m and columns j*s2 - p2 + l, 0 <= m < k1,
    0 <= l < k2, in unpadded coordinates."""
    (k1, k2), (s1, s2), (p1, p2) = kernel, stride, padding
    for m in range(k1):
        for l in range(k2):
            r, q = i * s1 - p1 + m, j * s2 - p2 + l
            if 0 <= r < h and 0 <= q < w:
                yield (r, q), "input"
            elif -p1 <= r < h + p1 and -p2 <= q < w + p2:
                yield (r, q), "padding"
            else:
                yield (r, q), "beyond"


def maxpool_forward_backward(x, dy, kernel, stride, padding, ceil_mode=False):
    """y[n,c,i,j] = max over window (i, j) (padding = -inf);
    dx[n,c,r,q] = sum over windows whose FIRST maximum (row-major) is (r, q) of dy."""
    n_, c_, h, w = x.shape
    ho, wo = _pool_geometry(x, kernel, stride, padding, ceil_mode)
    y = numpy.zeros((n_, c_, ho, wo))
    dx = numpy.zeros_like(x, dtype=numpy.float64)
    for n in range(n_):
        for c in range(c_):
            for i in range(ho):
                for j in range(wo):
                    best, where = -math.inf, None
                    for pos, kind in _window(i, j, kernel, stride, padding, h, w):
                        value = x[n, c, pos[0], pos[1]] if kind == "input" else -math.inf
                        if value > best:              # strictly: ties keep the first
                            best, where = value, pos
                    y[n, c, i, j] = best
                    if dy is not None and where is not None:
                        dx[n, c, where[0], where[1]] += dy[n, c, i, j]
    return y, dx


def avgpool_forward_backward(x, dy, kernel, stride, padding, ceil_mode=False,
                             count_include_pad=True):
    """y[n,c,i,j] = (sum of window (i, j), padding = 0) / D[i, j];
    dx[n,c,r,q] = sum over windows containing (r, q) of dy / D.
    D counts the window's positions in the input, and in the padding when
    count_include_pad; never those beyond the padding."""
    n_, c_, h, w = x.shape
    ho, wo = _pool_geometry(x, kernel, stride, padding, ceil_mode)
    counted = ("input", "padding") if count_include_pad else ("input",)
    y = numpy.zeros((n_, c_, ho, wo))
    dx = numpy.zeros_like(x, dtype=numpy.float64)
    for n in range(n_):
        for c in range(c_):
            for i in range(ho):
                for j in range(wo):
                    window = list(_window(i, j, kernel, stride, padding, h, w))
                    size = sum(kind in counted for _, kind in window)
                    total = 0.0
                    for pos, kind in window:
                        if kind == "input":
                            total += x[n, c, pos[0], pos[1]]
                            if dy is not None:
                                dx[n, c, pos[0], pos[1]] += dy[n, c, i, j] / size
                    y[n, c, i, j] = total / size
    return y, dx


# -- batch norm ----------------------------------------------------------------------

def _channel_positions(shape, c):
    """Every index of channel c in an (N, C, ...) array."""
    rest = [range(s) for s in shape[2:]]
    return [(n, c) + tail for n in range(shape[0]) for tail in _product(rest)]


def _product(ranges):
    if not ranges:
        return [()]
    return [(a,) + tail for a in ranges[0] for tail in _product(ranges[1:])]


def batchnorm_train_forward_backward(x, gamma, beta, dy, eps):
    """Training-mode batch norm of an (N, C, ...) input, channel by channel.

    With the m values x_i of a channel: mu = 1/m sum x_i, var = 1/m sum (x_i - mu)^2,
    x_hat_i = (x_i - mu) / sqrt(var + eps), y_i = gamma x_hat_i + beta.

    The gradient is dx_j = sum_i dy_i gamma d(x_hat_i)/d(x_j), with the derivatives
    written out rather than the compact formula:

        d mu / d x_j = 1/m
        d var / d x_j = 2/m (x_j - mu)     (the d mu term vanishes: sum_i (x_i - mu) = 0)
        d x_hat_i / d x_j = (delta_ij - 1/m) s - (x_i - mu) (x_j - mu) s^3 / m,
                            s = 1 / sqrt(var + eps)

    Returns y, dx, dgamma = sum dy_i x_hat_i, dbeta = sum dy_i, and the per-channel
    batch mean and biased variance.
    """
    y = numpy.zeros(x.shape)
    dx = numpy.zeros(x.shape)
    channels = x.shape[1]
    dgamma, dbeta = numpy.zeros(channels), numpy.zeros(channels)
    means, variances = numpy.zeros(channels), numpy.zeros(channels)
    for c in range(channels):
        pos = _channel_positions(x.shape, c)
        m = len(pos)
        mu = sum(x[p] for p in pos) / m
        var = sum((x[p] - mu) ** 2 for p in pos) / m
        s = 1.0 / math.sqrt(var + eps)
        x_hat = {p: (x[p] - mu) * s for p in pos}
        for p in pos:
            y[p] = gamma[c] * x_hat[p] + beta[c]
            dgamma[c] += dy[p] * x_hat[p]
            dbeta[c] += dy[p]
        for pj in pos:
            total = 0.0
            for pi in pos:
                delta = 1.0 if pi == pj else 0.0
                dxhat_i_dx_j = (delta - 1.0 / m) * s - (x[pi] - mu) * (x[pj] - mu) * s**3 / m
                total += dy[pi] * gamma[c] * dxhat_i_dx_j
            dx[pj] = total
        means[c], variances[c] = mu, var
    return y, dx, dgamma, dbeta, means, variances


# -- softmax cross-entropy -------------------------------------------------------------

def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """L = 1/N sum_n -sum_k q[n,k] log p[n,k] with p = softmax(logits[n]) and
    q = (1 - eps) onehot(labels[n]) + eps/K;  dL/dlogits[n,k] = (p[n,k] - q[n,k]) / N.

    log p[n,k] = z_k - max_z - log(sum_j exp(z_j - max_z)): shifting by the max keeps
    every exp <= 1 and the sum >= 1. Returns (L, dlogits).
    """
    n_, k_ = logits.shape
    eps = label_smoothing
    total = 0.0
    grad = numpy.zeros((n_, k_))
    for n in range(n_):
        z = [float(v) for v in logits[n]]
        top = max(z)
        log_sum = math.log(sum(math.exp(v - top) for v in z))
        for k in range(k_):
            log_p = z[k] - top - log_sum
            q = (1 - eps) * (k == labels[n]) + eps / k_
            total -= q * log_p
            grad[n, k] = (math.exp(log_p) - q) / n_
    return total / n_, grad
