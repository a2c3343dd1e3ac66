"""Learning-rate schedulers: set ``optimizer.lr`` from the epoch (or step) number.

    sched = CosineAnnealingLR(opt, T_max=50)
    for epoch in range(50):
        train_one_epoch(model, opt)
        sched.step()                    # once per epoch, after the optimizer's steps

A scheduler is a Callback that ``Trainer(scheduler=sched)`` steps after each epoch, or
after every batch when ``per_batch`` (``last_epoch`` then counts optimizer steps). Most
give the rate in closed form from ``base_lr`` (the lr before any scheduler changed it:
torch's ``initial_lr``) and ``last_epoch``: torch.optim.lr_scheduler's values up to
rounding. The scheduler made last sets the rate; SequentialLR, ChainedScheduler combine.
"""
import bisect
import math

from .backend import to_numpy
from .callbacks import Callback, _Monitor
from .checks import check_bool, check_int, check_real
from .optim import Optimizer


def _check_choice(value, name, owner, options):
    """``value`` if it is one of the strings ``options``, else ValueError."""
    if value not in options:
        raise ValueError(f"{owner}: {name} must be {' or '.join(map(repr, options))}, "
                         f"got {value!r}")
    return str(value)


def _check_milestones(value, name, owner):
    """``value`` (an iterable of epochs >= 0) as a sorted tuple."""
    try:
        milestones = list(value)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be a list of epochs, got {value!r}") from None
    return tuple(sorted(check_int(m, name, owner, minimum=0) for m in milestones))


_POSITIVE = (check_real, {"above": 0})
_NON_NEGATIVE = (check_real, {"minimum": 0})
_COUNT = (check_int, {"minimum": 0})
_POSITIVE_INT = (check_int, {"minimum": 1})


class LRScheduler(Callback):
    """Base class: a subclass implements ``lr_at(epoch)`` and maps each hyper-parameter
    to (check, bounds) from minidl.checks in ``_checks`` (its hyper-parameters), applied
    when made and when loaded; ``_counters`` (the state that changes) likewise."""

    per_batch = False
    priority = 100      # stepped before the other callbacks, which then see the new rate
    _checks = {}
    _counters = {"base_lr": _NON_NEGATIVE, "last_epoch": _COUNT}

    def __init__(self, optimizer, **hyperparameters):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected a minidl Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer      # base_lr: the rate before any scheduler changed it
        self.base_lr = vars(optimizer).setdefault("initial_lr", optimizer.lr)
        self.last_epoch = 0
        vars(self).update(self._checked(hyperparameters))
        optimizer._scheduler = self     # the one that sets its rate from now on
        self._apply(0)

    def on_batch_end(self, trainer, batch, logs):
        if self.per_batch:
            self.step()

    def on_epoch_end(self, trainer, epoch, logs):
        if not self.per_batch:
            self.step()

    def lr_at(self, epoch):
        """The learning rate of ``epoch`` (0 is the start, before any step)."""
        raise NotImplementedError(f"{type(self).__name__} must implement lr_at(epoch)")

    def _checked(self, h):
        """``h`` normalised by ``_checks`` and ``_counters``: TypeError (kind) or ValueError."""
        return {**h, **{name: check(h[name], name, type(self).__name__, **bounds)
                        for name, (check, bounds) in {**self._checks, **self._counters}.items()
                        if name in h}}

    def step(self):
        """End an epoch: advance ``last_epoch`` and set the optimizer's lr for the next."""
        if self.optimizer._scheduler is not self:   # two would overwrite each other's rate
            raise ValueError(f"{type(self).__name__}: {self.optimizer._scheduler!r}, made "
                             f"later, sets this optimizer's rate; combine schedulers with "
                             f"SequentialLR or ChainedScheduler")
        self.last_epoch += 1
        self._apply(self.last_epoch)

    def _apply(self, t):
        """Set the optimizer's hyper-parameters for step (or epoch) ``t``."""
        self.optimizer.lr = self.lr_at(t)

    def get_last_lr(self):
        """The rate this scheduler set last (a float: minidl has no parameter groups)."""
        return self.lr_at(self.last_epoch)

    def hyperparameters(self):
        """The constructor's hyper-parameters, by name."""
        return {name: getattr(self, name) for name in self._checks}

    def state_dict(self):
        """The hyper-parameters and counters (base_lr, last_epoch...): Python scalars, tuples."""
        return {**self.hyperparameters(), **{name: getattr(self, name) for name in self._counters}}

    def load_state_dict(self, state):
        """Restore ``state_dict()``'s output (numpy.load's arrays are fine), all checked
        first, and set the optimizer's rate for ``last_epoch`` (load the optimizer first)."""
        expected = {*self._checks, *self._counters}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        # numpy.load gives 0-d or 1-d arrays: tolist() makes them Python data again
        vars(self).update(self._checked({name: to_numpy(state[name]).tolist()
                                         for name in expected}))
        self._apply(self.last_epoch)

    def __repr__(self):
        values = {**self.hyperparameters(), "base_lr": self.base_lr, "last_epoch": self.last_epoch}
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in values.items())})"


class StepLR(LRScheduler):
    """lr(epoch) = base_lr * gamma ** (epoch // step_size)"""

    _checks = {"step_size": _POSITIVE_INT, "gamma": _POSITIVE}

    def __init__(self, optimizer, step_size, gamma=0.1):
        super().__init__(optimizer, step_size=step_size, gamma=gamma)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(LRScheduler):
    """lr(epoch) = base_lr * gamma ** epoch"""

    _checks = {"gamma": _POSITIVE}

    def __init__(self, optimizer, gamma):
        super().__init__(optimizer, gamma=gamma)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** epoch


class CosineAnnealingLR(LRScheduler):
    """Half a cosine from ``base_lr`` down to ``eta_min`` over ``T_max`` epochs:

        lr(epoch) = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2

    Past ``T_max`` the cosine continues (period 2 * T_max), as in PyTorch.
    """

    _checks = {"T_max": _POSITIVE_INT, "eta_min": _NON_NEGATIVE}

    def __init__(self, optimizer, T_max, eta_min=0.0):
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min)

    def lr_at(self, epoch):
        cosine = (1 + math.cos(math.pi * epoch / self.T_max)) / 2
        return self.eta_min + (self.base_lr - self.eta_min) * cosine


class MultiStepLR(LRScheduler):
    """lr(epoch) = base_lr * gamma ** (number of milestones <= epoch)"""

    _checks = {"gamma": _POSITIVE, "milestones": (_check_milestones, {})}

    def __init__(self, optimizer, milestones, gamma=0.1):
        super().__init__(optimizer, milestones=milestones, gamma=gamma)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, epoch)


class LinearLR(LRScheduler):
    """A linear ramp of the rate's factor from ``start_factor`` to ``end_factor`` over
    ``total_iters`` steps, then constant (a warm-up, stepped per batch by default):

        lr(t) = base_lr * (start + (end - start) * min(t, total_iters) / total_iters)
    """

    _checks = {"start_factor": (check_real, {"above": 0, "maximum": 1}),
               "end_factor": (check_real, {"minimum": 0, "maximum": 1}),
               "total_iters": _POSITIVE_INT}

    def __init__(self, optimizer, start_factor=1 / 3, end_factor=1.0, total_iters=5,
                 per_batch=True):
        self.per_batch = check_bool(per_batch, "per_batch", type(self).__name__)
        super().__init__(optimizer, start_factor=start_factor, end_factor=end_factor,
                         total_iters=total_iters)

    def lr_at(self, t):
        ramp = min(t, self.total_iters) / self.total_iters
        return self.base_lr * (self.start_factor + (self.end_factor - self.start_factor) * ramp)


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin), as PyTorch's, stepped after every batch.

    The rate rises from ``max_lr / div_factor`` to ``max_lr`` over the first
    ``pct_start`` of ``total_steps`` (default epochs * steps_per_epoch), then anneals to
    ``max_lr / div_factor / final_div_factor`` (``three_phase``: back down to the start
    first). With ``cycle_momentum`` the momentum (Adam's beta1) moves the other way,
    between ``max_momentum`` and ``base_momentum``. Within a phase, pct its part done:

        cos:     v = end + (start - end) * (1 + cos(pi * pct)) / 2
        linear:  v = start + (end - start) * pct

    After the last step the values stay final (torch extrapolates one step further).
    """

    per_batch = True
    _checks = {"max_lr": _POSITIVE, "total_steps": _POSITIVE_INT,
               "pct_start": (check_real, {"minimum": 0, "maximum": 1}),
               "anneal_strategy": (_check_choice, {"options": ("cos", "linear")}),
               "cycle_momentum": (check_bool, {}), "base_momentum": _NON_NEGATIVE,
               "max_momentum": _NON_NEGATIVE, "div_factor": _POSITIVE,
               "final_div_factor": _POSITIVE, "three_phase": (check_bool, {})}

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85,
                 max_momentum=0.95, div_factor=25.0, final_div_factor=1e4, three_phase=False):
        owner = type(self).__name__
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError(f"{owner}: pass total_steps, or epochs and steps_per_epoch")
            total_steps = (check_int(epochs, "epochs", owner, minimum=1)
                           * check_int(steps_per_epoch, "steps_per_epoch", owner, minimum=1))
        super().__init__(optimizer, max_lr=max_lr, total_steps=total_steps,
                         pct_start=pct_start, anneal_strategy=anneal_strategy,
                         cycle_momentum=cycle_momentum, base_momentum=base_momentum,
                         max_momentum=max_momentum, div_factor=div_factor,
                         final_div_factor=final_div_factor, three_phase=three_phase)

    def _checked(self, h):
        h, hyper = super()._checked(h), set(self.optimizer.hyperparameters())
        if h["cycle_momentum"] and not {"momentum", "betas"} & hyper:
            raise ValueError(f"OneCycleLR: {type(self.optimizer).__name__} has no momentum or "
                             f"betas to cycle; pass cycle_momentum=False")
        return h

    def _phases(self):
        """(end step, (start lr, end lr), (start momentum, end momentum)) of each phase."""
        initial = self.max_lr / self.div_factor
        low = initial / self.final_div_factor
        up, last = self.pct_start * self.total_steps - 1, self.total_steps - 1
        m_high, m_low = self.max_momentum, self.base_momentum
        rise = (up, (initial, self.max_lr), (m_high, m_low))
        if self.three_phase:
            return [rise, (2 * up, (self.max_lr, initial), (m_low, m_high)),
                    (last, (initial, low), (m_high, m_high))]
        return [rise, (last, (self.max_lr, low), (m_low, m_high))]

    def lr_at(self, step):
        return self._value_at(step, 1)

    def momentum_at(self, step):
        """The momentum (or beta1) of ``step`` when ``cycle_momentum`` is on."""
        return self._value_at(step, 2)

    def _apply(self, t):
        super()._apply(t)
        if self.cycle_momentum:
            if "betas" in self.optimizer.hyperparameters():
                self.optimizer.betas = (self.momentum_at(t), self.optimizer.betas[1])
            else:
                self.optimizer.momentum = self.momentum_at(t)

    def _value_at(self, step, which):
        if step > self.total_steps:
            raise ValueError(f"OneCycleLR: stepped {step} times, but total_steps is "
                             f"{self.total_steps}")
        phases = self._phases()
        k = next((k for k, phase in enumerate(phases) if step <= phase[0]), len(phases) - 1)
        start_step = phases[k - 1][0] if k else 0.0
        end_step, (start, end) = phases[k][0], phases[k][which]
        # past the end torch extrapolates (a linear anneal to below 0): stay final
        pct = min((step - start_step) / (end_step - start_step), 1.0)
        if self.anneal_strategy == "linear":
            return start + (end - start) * pct
        return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


class ReduceLROnPlateau(LRScheduler):
    """Multiply the rate by ``factor`` when ``monitor`` (a logged metric; ``step(value)``
    by hand) has not improved for more than ``patience`` epochs, then wait ``cooldown``
    epochs, as torch.optim.lr_scheduler.ReduceLROnPlateau.

    Improved ("min" mode, "rel"): value < best * (1 - threshold); "abs": value <
    best - threshold ("max" mode: > best * (1 + threshold), > best + threshold).
    The rate never goes below ``min_lr``, and changes smaller than ``eps`` are skipped.
    """

    _counters = {**LRScheduler._counters, "best": (check_real, {"finite": False}),
                 "num_bad_epochs": _COUNT, "cooldown_counter": _COUNT}
    _checks = {"mode": (_check_choice, {"options": ("min", "max")}),
               "threshold_mode": (_check_choice, {"options": ("rel", "abs")}),
               "factor": (check_real, {"minimum": 0, "below": 1}), "patience": _COUNT,
               "threshold": _NON_NEGATIVE, "cooldown": _COUNT,
               "min_lr": _NON_NEGATIVE, "eps": _NON_NEGATIVE,
               "monitor": (lambda value, name, owner: str(value), {})}

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8, monitor="val_loss"):
        super().__init__(optimizer, mode=mode, factor=factor, patience=patience,
                         threshold=threshold, threshold_mode=threshold_mode,
                         cooldown=cooldown, min_lr=min_lr, eps=eps, monitor=monitor)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = self.cooldown_counter = 0

    def lr_at(self, epoch):
        return self.optimizer.lr     # no closed form: the rate is whatever it was set to

    def step(self, value):
        """End an epoch whose monitored metric was ``value``."""
        value = float(value)
        super().step()      # lr_at is the optimizer's rate: only last_epoch moves
        if self._improved(value):
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            old = self.optimizer.lr
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                self.optimizer.lr = new
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0

    def _improved(self, value):
        sign = 1 if self.mode == "max" else -1
        if self.threshold_mode == "rel":
            return sign * value > sign * self.best * (1 + sign * self.threshold)
        return sign * value > sign * self.best + self.threshold

    def on_epoch_end(self, trainer, epoch, logs):
        self.step(_Monitor(self.monitor, self.mode).value(logs, "ReduceLROnPlateau"))



class _Combined(LRScheduler):
    """What SequentialLR and ChainedScheduler share: ``schedulers`` of one optimizer, of
    which only ``lr_at`` is used (they are not stepped), stepped ``per_batch`` as they all
    are. OneCycleLR (a schedule of its own, warm-up included) and ReduceLROnPlateau (no
    closed form) cannot join."""

    def __init__(self, optimizer, schedulers, per_batch, **hyperparameters):
        owner = type(self).__name__
        if not isinstance(schedulers, (list, tuple)) or not schedulers:
            raise TypeError(f"{owner}: schedulers must be a non-empty list, got {schedulers!r}")
        self.schedulers = list(schedulers)
        for i, s in enumerate(self.schedulers):
            if not isinstance(s, LRScheduler) or isinstance(s, (OneCycleLR, ReduceLROnPlateau)):
                raise TypeError(f"{owner}: schedulers[{i}] must be a minidl scheduler, not "
                                f"OneCycleLR or ReduceLROnPlateau, got {s!r}")
            if s.optimizer is not (optimizer or schedulers[0].optimizer):
                raise ValueError(f"{owner}: schedulers[{i}] schedules another optimizer")
        cadences = ({s.per_batch for s in self.schedulers} if per_batch is None
                    else {check_bool(per_batch, "per_batch", owner)})
        if len(cadences) > 1:
            raise ValueError(f"{owner}: some schedulers step per batch, some per epoch; pass "
                             f"per_batch=True (all count optimizer steps) or False (epochs)")
        self.per_batch = cadences.pop()
        super().__init__(optimizer or schedulers[0].optimizer, **hyperparameters)


class SequentialLR(_Combined):
    """``schedulers`` one after another, as torch.optim.lr_scheduler.SequentialLR: the
    i-th from ``milestones[i - 1]`` on, counting its own steps from 0 there,

        lr(t) = schedulers[i].lr_at(t - milestones[i - 1]),  i = number of milestones <= t
    """

    _checks = {"milestones": (_check_milestones, {})}

    def __init__(self, optimizer, schedulers, milestones, per_batch=None):
        super().__init__(optimizer, schedulers, per_batch, milestones=milestones)

    def _checked(self, h):
        checked, n = super()._checked(h), len(self.schedulers)
        if tuple(h["milestones"]) != checked["milestones"] or len(checked["milestones"]) != n - 1:
            raise ValueError(f"SequentialLR: milestones must be {n - 1} increasing epochs, one "
                             f"per scheduler after the first, got {h['milestones']!r}")
        return checked

    def lr_at(self, t):
        i = bisect.bisect_right(self.milestones, t)
        return self.schedulers[i].lr_at(t - (self.milestones[i - 1] if i else 0))


class ChainedScheduler(_Combined):
    """The schedulers' factors applied together, as torch.optim.lr_scheduler's
    ChainedScheduler stepping each of them in turn (each scales the rate it is given):

        lr(t) = base_lr * product over i of schedulers[i].lr_at(t) / base_lr
    """

    def __init__(self, schedulers, optimizer=None, per_batch=None):
        super().__init__(optimizer, schedulers, per_batch)

    def lr_at(self, t):
        return self.base_lr * math.prod(s.lr_at(t) / s.base_lr for s in self.schedulers
                                        if s.base_lr)
