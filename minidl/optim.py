"""Optimizers: turn each ``Parameter.grad`` into an in-place update of ``Parameter.data``.

    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad(); ...forward, loss, backward...; opt.step()

Each rule is torch.optim's algorithm, with its numbers (tests/core/test_optim.py). As there,
a parameter whose grad is None is skipped and its step count ``t`` (Adam's bias
correction) does not advance, and a buffer (``zeros_like(p.data)``: dtype and device
kept) is made by the first update that needs it, so momentum or amsgrad may be
switched on between steps.

``state_dict()`` is flat and pickle-free (for ``numpy.savez``): the hyper-parameters
by constructor name, "num_params", and "state.<i>.<name>": "t" and the buffers named
as in the equations ("b" momentum, "m"/"v" moments, "v_max", "g_avg").
"""
import math

from . import backend
from .checks import check_bool, check_real, check_real_pair, is_int
from .layers.base import Parameter

_NON_NEGATIVE = (check_real, {"minimum": 0})
_FRACTION = (check_real, {"minimum": 0, "maximum": 1})
_FLAG = (check_bool, {})


class Optimizer:
    """Base class: the parameters, their state and the hyper-parameters (attributes).

    A subclass implements ``_update(theta, g, state)`` (one parameter's rule; it creates
    the buffers it uses, listed in ``buffer_names``) and adds to ``_checks``: a
    hyper-parameter -> (check, bounds) from minidl.checks, for whichever the rule has.
    """

    buffer_names = ()
    _checks = {name: _NON_NEGATIVE for name in ("lr", "eps", "momentum", "weight_decay")}

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

    def synchronize(self):
        """Make each ``.grad`` the gradient ``step`` will apply: here they already are.
        (A DistributedOptimizer, minidl/ext/distributed.py, averages them over the
        ranks here, so that clipping between this and ``step`` sees the mean.)"""

    def zero_grad(self):
        """Drop every gradient (set to None), so the next backward starts afresh."""
        for p in self.params:
            p.zero_grad()

    def _update(self, theta, g, state):
        raise NotImplementedError(f"{type(self).__name__} must implement _update")

    def _decay(self, theta, g):
        """L2 weight decay, folded into the gradient: g + weight_decay * theta."""
        return g + self.weight_decay * theta if self.weight_decay else g

    def hyperparameters(self):
        """The constructor's hyper-parameters, by name (lr included)."""
        return {name: getattr(self, name) for name in self._names}

    def _checked(self, h):
        """``h`` normalised by ``_checks``: TypeError (wrong kind) or ValueError."""
        owner = type(self).__name__
        return {**h, **{name: check(h[name], name, owner, **bounds)
                        for name, (check, bounds) in self._checks.items() if name in h}}

    def _set(self, h):
        for name, value in h.items():
            setattr(self, name, value)

    def state_dict(self):
        """Hyper-parameters and per-parameter state as numpy arrays and Python scalars."""
        out = {"num_params": len(self.params)}
        for name, value in self.hyperparameters().items():
            # a tuple (Adam's betas) is saved as an array so numpy.savez needs no pickle
            out[name] = backend.to_numpy(value) if isinstance(value, tuple) else value
        for i, state in sorted(self.state.items()):
            for name, value in state.items():
                out[f"state.{i}.{name}"] = value if name == "t" else backend.to_numpy(value).copy()
        return out

    def load_state_dict(self, state_dict):
        """Load what ``state_dict`` saved (also after numpy.savez/load). Everything is
        checked first, so a mismatch raises ValueError and changes nothing."""
        owner, n = f"{type(self).__name__}.load_state_dict", len(self.params)
        saved = dict(state_dict)
        expected = {*self._names, "num_params"}
        per_param = sorted(key for key in saved if key.startswith("state."))
        missing = sorted(expected - set(saved))
        unexpected = sorted(set(saved) - expected - set(per_param))
        if missing or unexpected:
            raise ValueError(f"{owner}: missing keys {missing}, unexpected keys {unexpected} "
                             f"(was it saved by another optimizer?)")
        if _saved_int(owner, "num_params", saved["num_params"]) != n:
            raise ValueError(f"{owner}: saved for {int(saved['num_params'])} parameters, "
                             f"this optimizer has {n}")
        # numpy.load gives 0-d or 1-d arrays: tolist() makes them Python data again
        h = self._checked({name: backend.to_numpy(saved[name]).tolist() for name in self._names})
        grouped = {}
        for key in per_param:
            index, _, name = key[len("state."):].partition(".")
            if not index.isdigit() or int(index) >= n:
                raise ValueError(f"{owner}: key {key!r} is not 'state.<index>.<name>' with an "
                                 f"index < {n}, the number of parameters")
            grouped.setdefault(int(index), {})[name] = saved[key]
        state = {}
        for i, entries in grouped.items():
            # a buffer may be missing (its option was switched on after the last step)
            if "t" not in entries or not set(entries) <= {"t", *self.buffer_names}:
                raise ValueError(f"{owner}: parameter {i} has state {sorted(entries)}, "
                                 f"expected 't' and some of {sorted(self.buffer_names)}")
            theta = self.params[i].data
            state[i] = {"t": _saved_int(owner, f"state.{i}.t", entries.pop("t"))}
            for name, value in entries.items():
                value = backend.to_numpy(value)
                if tuple(value.shape) != tuple(theta.shape):
                    raise ValueError(f"{owner}: 'state.{i}.{name}' has shape {tuple(value.shape)},"
                                     f" parameter {i} has shape {tuple(theta.shape)}")
                on_device = backend.to_device(value, backend.device_of(theta))
                state[i][name] = on_device.astype(theta.dtype, copy=True)
        self._set(h)
        self.state = state

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
    _checks = {**Optimizer._checks, "dampening": _FRACTION, "nesterov": _FLAG}

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0):
        super().__init__(params, lr, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, weight_decay=weight_decay)

    def _checked(self, h):
        h = super()._checked(h)
        if h["nesterov"] and (h["momentum"] == 0 or h["dampening"] != 0):
            raise ValueError("SGD: nesterov=True needs momentum > 0 and dampening == 0")
        return h

    def _update(self, theta, g, state):
        mu, g = self.momentum, self._decay(theta, g)
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
    _checks = {**Optimizer._checks, "betas": (check_real_pair, {"minimum": 0, "below": 1}),
               "amsgrad": _FLAG}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False):
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)

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
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW:
    theta <- theta * (1 - lr * weight_decay), then Adam's update with the raw g."""

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
    _checks = {**Optimizer._checks, "alpha": _FRACTION, "centered": _FLAG}

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False):
        super().__init__(params, lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered)

    def _update(self, theta, g, state):
        xp = backend.get_array_module(theta)
        alpha, v, g = self.alpha, _zeros(state, "v", theta), self._decay(theta, g)
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
    """Scale all gradients together, in place, so that their joint norm (over all grads as
    one vector) is at most ``max_norm``: by max_norm / (total + 1e-6) when that is < 1,
    as torch.nn.utils.clip_grad_norm_. Returns the norm before clipping (a float)."""
    owner = "clip_grad_norm_"
    params = [params] if isinstance(params, Parameter) else _parameter_list(owner, params,
                                                                           allow_empty=True)
    max_norm = check_real(max_norm, "max_norm", owner, minimum=0, finite=False)
    norm_type = check_real(norm_type, "norm_type", owner, above=0, finite=False)
    grads = [p.grad for p in params if p.grad is not None]
    # the norm of the per-grad norms equals the norm of everything concatenated
    norms = [float(backend.get_array_module(g).linalg.norm(g.ravel(), ord=norm_type))
             for g in grads]
    total = (max(norms, default=0.0) if math.isinf(norm_type)
             else math.fsum(n ** norm_type for n in norms) ** (1.0 / norm_type))
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


def _parameter_list(owner, params, allow_empty=False):
    """``params`` as a list of distinct Parameters, or a clear TypeError/ValueError."""
    try:
        params = list(params)
    except TypeError:  # a single Parameter included: it is not iterable
        raise TypeError(f"{owner}: params must be an iterable of Parameters (e.g. "
                        f"model.parameters() or [p]), got {type(params).__name__}") from None
    if not params and not allow_empty:
        raise ValueError(f"{owner}: got an empty parameter list; nothing to optimize")
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"{owner}: params[{i}] is a {type(p).__name__}, expected a Parameter")
    if len({id(p) for p in params}) != len(params):
        # state is kept per position, so one array would be updated twice per step
        raise ValueError(f"{owner}: a Parameter appears more than once in params")
    return params


def _saved_int(owner, key, value):
    """A saved count (a Python int or a 0-d numpy array) as a non-negative int."""
    number = backend.to_numpy(value).tolist()
    if not is_int(number) or number < 0:
        raise ValueError(f"{owner}: '{key}' must be a non-negative integer, got {value!r}")
    return number
