"""Check a layer's backward against central finite differences (docs/extending.md).

    err = minidl.gradcheck(layer, x)          # worst relative error, float64
    assert err < 1e-6

For a layer L = sum(dy * layer.forward(x)) with a fixed random ``dy``; for a loss (pass
``target=``) L = ``loss.forward(x, target)``. Each numeric derivative is
(L(v + eps) - L(v - eps)) / (2 eps): its error, ~eps^2 truncation plus ~1e-16 |L| / eps
rounding, stays far below 1e-6 at eps = 1e-4 for layers and losses of test size (a loss
over 64 rows failed at eps = 1e-6). An entry's relative error is |exact - numeric| /
max(|exact|, |numeric|, floor), with ``floor`` 1e-3 of the tensor's largest magnitude,
so entries ~0 are compared on the tensor's scale instead of their own.
"""
from . import backend
from .checks import check_real
from .random import new_rng


def gradcheck(layer, x, target=None, eps=1e-4, training=True, seed=0,
              max_entries=None, check_input=True):
    """Worst relative error between ``layer``'s gradients and finite differences.

    ``layer`` and ``x`` must be float64. ``max_entries`` checks that many randomly
    chosen entries per tensor (None: all). Returns a float; < 1e-6 means agreement.
    """
    eps = check_real(eps, "eps", "gradcheck", above=0)
    params = list(layer.named_parameters()) if hasattr(layer, "named_parameters") else []
    _require_float64(layer, x, params)
    # training-mode forwards update BatchNorm's running statistics: put them back after
    state = layer.state_dict() if hasattr(layer, "state_dict") else None
    try:
        return _gradcheck(layer, x.copy(), params, target, eps, training, seed, max_entries,
                          check_input)
    finally:
        if state is not None:
            layer.load_state_dict(state)


def _gradcheck(layer, x, params, target, eps, training, seed, max_entries, check_input):
    xp = backend.get_array_module(x)
    # numpy, so the checks are the same on either backend; a stream of its own, so
    # dy never equals an input the caller drew with the same seed.
    rng = new_rng([seed, 0x67726164])
    for _, p in params:
        p.grad = None
    if target is None:
        y = layer.forward(x, training=training)
        dy = backend.to_device(rng.standard_normal(y.shape), backend.device_of(x))
        exact = {"input": layer.backward(dy)}
    else:
        layer.forward(x, target)
        exact = {"input": layer.backward()}
    for name, p in params:
        if p.grad is None:
            raise ValueError(f"gradcheck: {type(layer).__name__}.backward left the gradient "
                             f"of parameter '{name}' unset")
        if p.grad.shape != p.data.shape:
            raise ValueError(f"gradcheck: the gradient of parameter '{name}' has shape "
                             f"{tuple(p.grad.shape)}, expected {tuple(p.data.shape)}")
        exact[name] = p.grad.copy()
    if check_input and exact["input"] is None:
        raise ValueError(f"gradcheck: {type(layer).__name__}.backward returned no input "
                         f"gradient (is input_grad False?); pass check_input=False")

    def loss_value():
        if target is not None:
            return float(layer.forward(x, target))
        return float((dy * layer.forward(x, training=training)).sum())

    worst = 0.0
    for name, value in ([("input", x)] if check_input else []) + [(n, p.data) for n, p in params]:
        numeric, picked = _numeric_gradient(loss_value, value, eps, rng, max_entries)
        exact_picked = exact[name].reshape(-1)[xp.asarray(picked)]
        worst = max(worst, _relative_error(exact_picked, xp.asarray(numeric), xp))
    return worst


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
    numeric = []
    for i in picked:
        original = float(flat[i])
        flat[i] = original + eps
        plus = loss_value()
        flat[i] = original - eps
        minus = loss_value()
        flat[i] = original
        numeric.append((plus - minus) / (2 * eps))
    return numeric, picked


def _relative_error(exact, numeric, xp):
    if exact.size == 0:
        return 0.0
    scale = max(float(xp.abs(exact).max()), float(xp.abs(numeric).max()))
    floor = max(1e-3 * scale, 1e-12)
    denom = xp.maximum(xp.maximum(xp.abs(exact), xp.abs(numeric)), floor)
    return float((xp.abs(exact - numeric) / denom).max())


def _require_float64(layer, x, params):
    if x.dtype.name != "float64":
        raise ValueError(f"gradcheck: the input must be float64 for finite differences "
                         f"to be meaningful, got {x.dtype}")
    dtype = getattr(layer, "dtype", None)
    if dtype is not None and dtype != backend.float64:
        raise ValueError(f"gradcheck: {type(layer).__name__} computes in {dtype}; build the "
                         f"layer with dtype=numpy.float64")
    for name, p in params:
        if p.data.dtype.name != "float64":
            raise ValueError(f"gradcheck: parameter '{name}' of {type(layer).__name__} is "
                             f"{p.data.dtype}; build the layer with dtype=numpy.float64")
