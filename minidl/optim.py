"""Optimizers: turn each ``Parameter.grad`` into an in-place update of ``Parameter.data``.

    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()                 # grads accumulate, so clear them first
        ...forward, loss, backward...   # fills p.grad
        opt.step()                      # p.data changes in place

Every update rule follows PyTorch's documented algorithm, so the same start and
the same gradients give the same numbers as ``torch.optim`` (tests/test_optim.py
checks this). As in PyTorch:

* a parameter whose ``grad`` is None is skipped, and its step count ``t`` does not
  advance (the count is per parameter, which matters for Adam's bias correction);
* per-parameter state (moment buffers) is created by the update that first needs it,
  so momentum or amsgrad may be switched on between steps.

Hyper-parameters are attributes (``opt.lr``, ``opt.momentum``, ...), checked by the
constructor; ``lr``, which schedulers set between epochs, is checked on assignment too.

Updates keep the parameter's dtype and device: state is made with
``xp.zeros_like(p.data)`` and hyper-parameters are Python floats, so float32 stays
float32 and cupy arrays stay on the GPU.

``state_dict()`` is flat and pickle-free, ready for ``numpy.savez``: hyper-parameters
under their constructor names ("lr", "momentum", "betas", ...), "num_params", and
per-parameter state as "state.<index>.<name>" ("state.3.t" is a step count, the
other names are numpy arrays of the parameter's shape, named as in the update
equations: "b" momentum buffer, "m"/"v" first/second moments, "v_max", "g_avg").
"""
import math

from . import backend
from .checks import check_bool, check_real, check_real_pair
from .layers.base import Parameter


class Optimizer:
    """Base class: holds the parameters, their state and the hyper-parameters.

    A subclass implements ``_update(theta, g, state)`` (one parameter's rule, which
    creates the buffers it uses in ``state``), lists those buffers in ``buffer_names``
    and extends ``_checked(h)`` to validate its hyper-parameters.
    """

    buffer_names = ()   # the per-parameter state arrays _update may create

    def __init__(self, params, lr, **hyperparameters):
        self.params = _parameter_list(type(self).__name__, params)
        self.state = {}  # parameter index -> {"t": step count, buffer name: array}
        self._names = ("lr", *hyperparameters)
        self._set(self._checked(dict(lr=lr, **hyperparameters)))

    @property
    def lr(self):
        """The learning rate; schedulers set it, so an assignment is checked."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = check_real(value, "lr", type(self).__name__, minimum=0)

    # -- training ------------------------------------------------------------
    def step(self):
        """Update every parameter that has a gradient (in place)."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if p.grad.shape != p.data.shape:
                raise ValueError(f"{type(self).__name__}.step: parameter {i} "
                                 f"({p.name or 'unnamed'}) has shape {tuple(p.data.shape)} "
                                 f"but its grad has shape {tuple(p.grad.shape)}")
            state = self.state.setdefault(i, {"t": 0})
            state["t"] += 1
            # never write into g: it may be p.grad itself
            self._update(p.data, p.grad.astype(p.data.dtype, copy=False), state)

    def zero_grad(self):
        """Drop every gradient (set to None), so the next backward starts afresh."""
        for p in self.params:
            p.zero_grad()

    def _update(self, theta, g, state):
        raise NotImplementedError(f"{type(self).__name__} must implement _update")

    # -- hyper-parameters ----------------------------------------------------
    def hyperparameters(self):
        """The constructor's hyper-parameters, by name (lr included)."""
        return {name: getattr(self, name) for name in self._names}

    def _checked(self, h):
        """``h`` validated and normalised (floats, bools): TypeError for a value of the
        wrong kind, ValueError for one out of range."""
        h = dict(h)
        h["lr"] = check_real(h["lr"], "lr", type(self).__name__, minimum=0)
        return h

    def _set(self, h):
        for name, value in h.items():
            setattr(self, name, value)

    # -- saving --------------------------------------------------------------
    def state_dict(self):
        """Hyper-parameters and per-parameter state as numpy arrays and Python scalars."""
        out = {"num_params": len(self.params)}
        for name, value in self.hyperparameters().items():
            # a tuple (Adam's betas) is saved as an array so numpy.savez needs no pickle
            out[name] = backend.to_numpy(value) if isinstance(value, tuple) else value
        for i, state in sorted(self.state.items()):
            for name, value in state.items():
                out[f"state.{i}.{name}"] = (value if name == "t"
                                            else backend.to_numpy(value).copy())
        return out

    def load_state_dict(self, state_dict):
        """Load what ``state_dict`` saved (also after a numpy.savez/load round trip).

        Everything is checked first (keys, parameter count, hyper-parameter ranges,
        buffer shapes), so a mismatch raises ValueError and changes nothing.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        saved = dict(state_dict)
        expected = set(self._names) | {"num_params"}
        per_param_keys = {key for key in saved if key.startswith("state.")}
        missing = sorted(expected - set(saved))
        unexpected = sorted(set(saved) - expected - per_param_keys)
        if missing or unexpected:
            raise ValueError(f"{owner}: missing keys {missing}, unexpected keys {unexpected} "
                             f"(was it saved by another optimizer?)")
        if _saved_int(owner, "num_params", saved["num_params"]) != len(self.params):
            raise ValueError(f"{owner}: saved for {int(saved['num_params'])} parameters, "
                             f"this optimizer has {len(self.params)}")
        h = self._checked({name: _like(owner, name, value, saved[name])
                           for name, value in self.hyperparameters().items()})
        state = self._loaded_state(owner, saved, per_param_keys)
        self._set(h)
        self.state = state

    def _loaded_state(self, owner, saved, keys):
        """Group "state.<i>.<name>" entries by parameter, check them, move them on device."""
        grouped = {}
        for key in keys:
            i, name = _split_state_key(owner, key, len(self.params))
            grouped.setdefault(i, {})[name] = saved[key]
        state = {}
        for i, entries in grouped.items():
            # a buffer may be missing (its option was switched on after the last step)
            if "t" not in entries or not set(entries) <= {"t", *self.buffer_names}:
                raise ValueError(f"{owner}: parameter {i} has state {sorted(entries)}, "
                                 f"expected 't' and some of {sorted(self.buffer_names)}")
            theta = self.params[i].data
            state[i] = {"t": _saved_int(owner, f"state.{i}.t", entries["t"])}
            for name in set(entries) - {"t"}:
                value = backend.to_numpy(entries[name])
                if tuple(value.shape) != tuple(theta.shape):
                    raise ValueError(f"{owner}: 'state.{i}.{name}' has shape "
                                     f"{tuple(value.shape)}, parameter {i} has shape "
                                     f"{tuple(theta.shape)}")
                on_device = backend.to_device(value, backend.device_of(theta))
                state[i][name] = on_device.astype(theta.dtype, copy=True)
        return state

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args}; {len(self.params)} params)"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (PyTorch's formulation).

        g     <- g + weight_decay * theta                 (L2 penalty)
        b     <- g                                         on the first step with momentum
        b     <- momentum * b + (1 - dampening) * g        afterwards
        g     <- g + momentum * b   (nesterov)   or   b   (plain momentum)
        theta <- theta - lr * g
    """

    buffer_names = ("b",)

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0):
        super().__init__(params, lr, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, weight_decay=weight_decay)

    def _checked(self, h):
        h = super()._checked(h)
        owner = type(self).__name__
        for name in ("momentum", "weight_decay"):
            h[name] = check_real(h[name], name, owner, minimum=0)
        h["dampening"] = check_real(h["dampening"], "dampening", owner, minimum=0, maximum=1)
        h["nesterov"] = check_bool(h["nesterov"], "nesterov", owner)
        if h["nesterov"] and (h["momentum"] == 0 or h["dampening"] != 0):
            raise ValueError(f"{owner}: nesterov=True needs momentum > 0 and dampening == 0")
        return h

    def _update(self, theta, g, state):
        mu = self.momentum
        if self.weight_decay:
            g = g + self.weight_decay * theta
        if mu:
            first = "b" not in state  # the first step with momentum: b starts as g
            b = _zeros(state, "b", theta)
            b[...] = g if first else mu * b + (1 - self.dampening) * g
            g = g + mu * b if self.nesterov else b
        theta -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba), with PyTorch's L2 weight decay and optional AMSGrad.

        g     <- g + weight_decay * theta            (L2 penalty, folded into g)
        m     <- beta1 * m + (1 - beta1) * g         first moment
        v     <- beta2 * v + (1 - beta2) * g^2       second moment
        m_hat =  m / (1 - beta1^t)                   bias corrections, t = this
        v_hat =  v / (1 - beta2^t)                   parameter's step count
        (amsgrad: v_max <- max(v_max, v), and v_hat uses v_max instead of v)
        theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)
    """

    buffer_names = ("m", "v", "v_max")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False):
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)

    def _checked(self, h):
        h = super()._checked(h)
        owner = type(self).__name__
        h["betas"] = check_real_pair(h["betas"], "betas", owner, minimum=0, below=1)
        for name in ("eps", "weight_decay"):
            h[name] = check_real(h[name], name, owner, minimum=0)
        h["amsgrad"] = check_bool(h["amsgrad"], "amsgrad", owner)
        return h

    def _decay(self, theta, g):
        """Adam's weight decay: an L2 penalty added to the gradient."""
        return g + self.weight_decay * theta if self.weight_decay else g

    def _update(self, theta, g, state):
        xp = backend.get_array_module(theta)
        beta1, beta2 = self.betas
        t, m, v = state["t"], _zeros(state, "m", theta), _zeros(state, "v", theta)
        g = self._decay(theta, g)
        m[...] = beta1 * m + (1 - beta1) * g
        v[...] = beta2 * v + (1 - beta2) * g * g
        if self.amsgrad:
            v_max = _zeros(state, "v_max", theta)
            v_max[...] = xp.maximum(v_max, v)
            v = v_max  # only the bias-corrected estimate below sees the maximum
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        theta -= self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW.

    The decay shrinks the parameter directly instead of entering the moments:

        theta <- theta * (1 - lr * weight_decay)
        then Adam's update (see Adam) with the raw gradient g.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False):
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)

    def _decay(self, theta, g):
        if self.weight_decay:
            theta *= 1 - self.lr * self.weight_decay
        return g


class RMSprop(Optimizer):
    """RMSprop (Hinton), as torch.optim.RMSprop, optionally centered and with momentum.

        g     <- g + weight_decay * theta                  (L2 penalty)
        v     <- alpha * v + (1 - alpha) * g^2             mean square of g
        g_avg <- alpha * g_avg + (1 - alpha) * g           (centered only)
        d     =  sqrt(v) + eps     or, centered,   sqrt(v - g_avg^2) + eps
        b     <- momentum * b + g / d,   theta <- theta - lr * b     (momentum > 0;
                                                                      b starts at 0)
        theta <- theta - lr * g / d                                   (otherwise)
    """

    buffer_names = ("v", "g_avg", "b")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False):
        super().__init__(params, lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered)

    def _checked(self, h):
        h = super()._checked(h)
        owner = type(self).__name__
        h["alpha"] = check_real(h["alpha"], "alpha", owner, minimum=0, maximum=1)
        for name in ("eps", "weight_decay", "momentum"):
            h[name] = check_real(h[name], name, owner, minimum=0)
        h["centered"] = check_bool(h["centered"], "centered", owner)
        return h

    def _update(self, theta, g, state):
        xp = backend.get_array_module(theta)
        alpha, v = self.alpha, _zeros(state, "v", theta)
        if self.weight_decay:
            g = g + self.weight_decay * theta
        v[...] = alpha * v + (1 - alpha) * g * g
        if self.centered:
            g_avg = _zeros(state, "g_avg", theta)
            g_avg[...] = alpha * g_avg + (1 - alpha) * g
            d = xp.sqrt(v - g_avg * g_avg) + self.eps
        else:
            d = xp.sqrt(v) + self.eps
        if self.momentum:
            b = _zeros(state, "b", theta)
            b[...] = self.momentum * b + g / d
            theta -= self.lr * b
        else:
            theta -= self.lr * g / d


def clip_grad_norm_(params, max_norm, norm_type=2.0):
    """Scale all gradients together so their joint norm is at most ``max_norm``.

    The norm is taken over all grads as if concatenated into one vector (params
    without a grad are ignored). When it exceeds ``max_norm`` every grad is
    multiplied in place by max_norm / (total + 1e-6), as
    torch.nn.utils.clip_grad_norm_ does (the 1e-6 guards a zero norm).
    Returns the total norm before clipping, as a Python float.
    """
    params = [params] if isinstance(params, Parameter) else _parameter_list(
        "clip_grad_norm_", params, allow_empty=True)
    max_norm = check_real(max_norm, "max_norm", "clip_grad_norm_", minimum=0, finite=False)
    norm_type = check_real(norm_type, "norm_type", "clip_grad_norm_", above=0, finite=False)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    # the norm of the per-grad norms equals the norm of everything concatenated
    norms = [float(backend.get_array_module(g).linalg.norm(g.ravel(), ord=norm_type))
             for g in grads]
    if math.isinf(norm_type):
        total = max(norms)
    else:
        total = math.fsum(n ** norm_type for n in norms) ** (1.0 / norm_type)
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g *= scale
    return total


def _zeros(state, name, theta):
    """``state[name]``, created as zeros like ``theta`` by the first update that uses it."""
    if name not in state:
        state[name] = backend.get_array_module(theta).zeros_like(theta)
    return state[name]


# -- argument checking --------------------------------------------------------
def _parameter_list(owner, params, allow_empty=False):
    """``params`` as a list of distinct Parameters, or a clear TypeError/ValueError."""
    if isinstance(params, Parameter):
        raise TypeError(f"{owner}: params must be an iterable of Parameters (e.g. "
                        f"model.parameters() or [p]), got a single Parameter")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"{owner}: params must be an iterable of Parameters (e.g. "
                        f"model.parameters()), got {type(params).__name__}") from None
    if not params and not allow_empty:
        raise ValueError(f"{owner}: got an empty parameter list; nothing to optimize")
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"{owner}: params[{i}] is a {type(p).__name__}, expected a "
                            f"Parameter")
    if len({id(p) for p in params}) != len(params):
        # state is kept per position, so one array would be updated twice per step
        raise ValueError(f"{owner}: a Parameter appears more than once in params")
    return params


def _like(owner, name, current, saved):
    """A saved hyper-parameter converted to the Python type of the current one."""
    try:
        if isinstance(current, tuple):
            return tuple(float(x) for x in backend.to_numpy(saved).ravel())
        if isinstance(current, bool):
            return bool(backend.to_numpy(saved).item())
        return float(backend.to_numpy(saved).item())
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: '{name}' = {saved!r} is not a valid value") from None


def _saved_int(owner, key, value):
    """A saved count (a Python int or a 0-d numpy array) as a non-negative int."""
    try:
        number = backend.to_numpy(value).item()
        ok = (not isinstance(number, bool) and float(number).is_integer()
              and number >= 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{owner}: '{key}' must be a non-negative integer, got {value!r}")
    return int(number)


def _split_state_key(owner, key, num_params):
    """"state.3.m" -> (3, "m"), checking the index."""
    parts = key.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        raise ValueError(f"{owner}: malformed key {key!r}; expected 'state.<index>.<name>'")
    i = int(parts[1])
    if i >= num_params:
        raise ValueError(f"{owner}: key {key!r} refers to parameter {i}, but there are "
                         f"only {num_params}")
    return i, parts[2]
