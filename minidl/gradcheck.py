"""Check a layer's backward against central finite differences.

    err = minidl.gradcheck(layer, x)          # worst relative error, float64
    assert err < 1e-6

For a layer, the scalar checked is L = sum(dy * layer.forward(x)) with a fixed
random ``dy``; its exact gradients are what ``layer.backward(dy)`` returns (for
x) and accumulates (for each Parameter). For a loss (pass ``target=``), L is
``loss.forward(x, target)`` and its gradient is ``loss.backward()``.

Each entry's numeric derivative is (L(v + eps) - L(v - eps)) / (2 eps). Its error
is the truncation, ~eps^2, plus the rounding of L, ~1e-16 |L| / eps; eps = 1e-4
keeps both far below 1e-6 for layers and losses of test size (a loss over 64 rows
failed at 1e-6: its gradient entries are |L| / 64 small). The relative error of an entry is |exact - numeric| / max(|exact|, |numeric|, floor),
where ``floor`` is 1e-3 of the largest magnitude in that tensor, so entries that
are ~0 are compared on the tensor's scale instead of their own.
"""
import math
import numbers

from . import backend
from .random import new_rng


def gradcheck(layer, x, target=None, eps=1e-4, training=True, seed=0,
              max_entries=None, check_input=True):
    """Worst relative error between ``layer``'s gradients and finite differences.

    ``layer`` and ``x`` must be float64. ``max_entries`` checks that many randomly
    chosen entries per tensor (None: all). Returns a float; < 1e-6 means agreement.
    TypeError/ValueError for an ``eps`` that is not a positive finite number.
    """
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"gradcheck: eps must be a number, got {eps!r}")
    if not 0 < eps < math.inf:
        raise ValueError(f"gradcheck: eps must be a positive finite step, got {eps!r} "
                         f"(1e-4 suits float64)")
    _require_float64(layer, x)
    # Forward passes in training mode update BatchNorm's running statistics: keep a
    # copy of the state and put it back at the end.
    state = layer.state_dict() if hasattr(layer, "state_dict") else None
    try:
        return _gradcheck(layer, x, target, eps, training, seed, max_entries, check_input)
    finally:
        if state is not None:
            layer.load_state_dict(state)


def _gradcheck(layer, x, target, eps, training, seed, max_entries, check_input):
    xp = backend.get_array_module(x)
    # numpy, so the checks are the same on either backend; a stream of its own, so
    # dy never equals an input the caller drew with the same seed.
    rng = new_rng([seed, 0x67726164])
    x = x.copy()

    def loss_value():
        if target is not None:
            return float(layer.forward(x, target))
        return float((dy * layer.forward(x, training=training)).sum())

    dy = None
    if target is None:
        y = layer.forward(x, training=training)
        dy = backend.to_device(rng.standard_normal(y.shape), backend.device_of(x))
    exact = _exact_gradients(layer, x, target, dy, training)

    if check_input and exact["input"] is None:
        raise ValueError(f"gradcheck: {type(layer).__name__}.backward returned no input "
                         f"gradient (is input_grad False?); pass check_input=False")
    tensors = ([("input", x)] if check_input else [])
    tensors += [(name, p.data) for name, p in _named_parameters(layer)]
    worst = 0.0
    for name, value in tensors:
        numeric, picked = _numeric_gradient(loss_value, value, eps, rng, max_entries)
        exact_picked = exact[name].reshape(-1)[xp.asarray(picked)]
        worst = max(worst, _relative_error(exact_picked, xp.asarray(numeric), xp))
    return worst


def _exact_gradients(layer, x, target, dy, training):
    """Run forward and backward once; collect d(loss)/d(input) and each param's grad."""
    for _, p in _named_parameters(layer):
        p.grad = None
    if target is not None:
        layer.forward(x, target)
        dx = layer.backward()
    else:
        layer.forward(x, training=training)
        dx = layer.backward(dy)
    grads = {"input": dx}
    for name, p in _named_parameters(layer):
        if p.grad is None:
            raise ValueError(f"gradcheck: {type(layer).__name__}.backward left the gradient "
                             f"of parameter '{name}' unset")
        if p.grad.shape != p.data.shape:
            raise ValueError(f"gradcheck: the gradient of parameter '{name}' has shape "
                             f"{tuple(p.grad.shape)}, expected {tuple(p.data.shape)}")
        grads[name] = p.grad.copy()
    return grads


def _numeric_gradient(loss_value, value, eps, rng, max_entries):
    """Central differences of loss_value() w.r.t. entries of ``value`` (changed in place)."""
    if not value.flags.c_contiguous:            # reshape would copy, and the nudges be lost
        raise ValueError("gradcheck: a parameter is not C-contiguous; make it so with "
                         "p.data = xp.ascontiguousarray(p.data)")
    flat = value.reshape(-1)
    if max_entries is None or max_entries >= flat.size:
        picked = list(range(flat.size))
    else:
        picked = sorted(rng.choice(flat.size, size=max_entries, replace=False).tolist())
    numeric = [0.0] * len(picked)
    for k, i in enumerate(picked):
        original = float(flat[i])
        flat[i] = original + eps
        plus = loss_value()
        flat[i] = original - eps
        minus = loss_value()
        flat[i] = original
        numeric[k] = (plus - minus) / (2 * eps)
    return numeric, picked


def _relative_error(exact, numeric, xp):
    if exact.size == 0:
        return 0.0
    scale = max(float(xp.abs(exact).max()), float(xp.abs(numeric).max()))
    floor = max(1e-3 * scale, 1e-12)
    denom = xp.maximum(xp.maximum(xp.abs(exact), xp.abs(numeric)), floor)
    return float((xp.abs(exact - numeric) / denom).max())


def _named_parameters(layer):
    if hasattr(layer, "named_parameters"):
        return list(layer.named_parameters())
    return []


def _require_float64(layer, x):
    if x.dtype.name != "float64":
        raise ValueError(f"gradcheck: the input must be float64 for finite differences "
                         f"to be meaningful, got {x.dtype}")
    dtype = getattr(layer, "dtype", None)
    if dtype is not None and dtype != backend.float64:
        raise ValueError(f"gradcheck: {type(layer).__name__} computes in {dtype}; build the "
                         f"layer with dtype=numpy.float64")
    for name, p in _named_parameters(layer):
        if p.data.dtype.name != "float64":
            raise ValueError(f"gradcheck: parameter '{name}' of {type(layer).__name__} is "
                             f"{p.data.dtype}; build the layer with dtype=numpy.float64")
