"""Learning-rate schedulers: set ``optimizer.lr`` from the epoch number.

    opt = SGD(model.parameters(), lr=0.1)
    sched = CosineAnnealingLR(opt, T_max=50)
    for epoch in range(50):
        train_one_epoch(model, opt)
        sched.step()                    # once per epoch, after the optimizer's steps

Each scheduler computes the rate in closed form from ``base_lr`` (the optimizer's
lr when the scheduler was made) and ``last_epoch`` (how many times ``step()`` ran),
so its whole state is a few numbers. The values equal torch.optim.lr_scheduler's
(which updates recursively) up to floating-point rounding.
"""
import math

from .checks import check_int, check_real
from .optim import Optimizer


class LRScheduler:
    """Base class: a subclass implements ``lr_at(epoch)``.

    ``base_lr`` is the optimizer's lr at construction and the rate of epoch 0;
    ``last_epoch`` counts the ``step()`` calls so far.
    """

    def __init__(self, optimizer, **hyperparameters):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected a minidl Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_epoch = 0
        self._hyper_names = tuple(hyperparameters)
        for name, value in self._checked(hyperparameters).items():
            setattr(self, name, value)

    def lr_at(self, epoch):
        """The learning rate of ``epoch`` (0 is the start, before any step)."""
        raise NotImplementedError(f"{type(self).__name__} must implement lr_at(epoch)")

    def _checked(self, h):
        """``h`` validated and normalised; ValueError when out of range."""
        return dict(h)

    def step(self):
        """End an epoch: advance ``last_epoch`` and set the optimizer's lr for the next."""
        self.last_epoch += 1
        self.optimizer.lr = self.lr_at(self.last_epoch)

    def get_last_lr(self):
        """The rate this scheduler set last (a float: minidl has no parameter groups)."""
        return self.lr_at(self.last_epoch)

    def state_dict(self):
        """Python scalars: base_lr, last_epoch and the hyper-parameters."""
        state = {"base_lr": self.base_lr, "last_epoch": self.last_epoch}
        state.update({name: getattr(self, name) for name in self._hyper_names})
        return state

    def load_state_dict(self, state):
        """Restore ``state_dict()``'s output (numpy 0-d arrays from numpy.load are fine).

        The optimizer's lr is not touched: it is restored by the optimizer's own
        load_state_dict, and the next ``step()`` sets it from the schedule anyway.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        expected = {"base_lr", "last_epoch", *self._hyper_names}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{owner}: missing keys {missing}, unexpected keys {unexpected}")
        last_epoch = check_int(_scalar(owner, "last_epoch", state), "last_epoch", owner,
                               minimum=0)
        base_lr = check_real(_scalar(owner, "base_lr", state), "base_lr", owner, minimum=0)
        h = self._checked({name: _scalar(owner, name, state) for name in self._hyper_names})
        self.base_lr, self.last_epoch = base_lr, last_epoch
        for name, value in h.items():
            setattr(self, name, value)

    def __repr__(self):
        args = ", ".join(f"{name}={getattr(self, name)}" for name in self._hyper_names)
        return f"{type(self).__name__}({args}, base_lr={self.base_lr}, " \
               f"last_epoch={self.last_epoch})"


class StepLR(LRScheduler):
    """Multiply the rate by ``gamma`` every ``step_size`` epochs.

        lr(epoch) = base_lr * gamma ** (epoch // step_size)
    """

    def __init__(self, optimizer, step_size, gamma=0.1):
        super().__init__(optimizer, step_size=step_size, gamma=gamma)

    def _checked(self, h):
        owner = type(self).__name__
        return {"step_size": check_int(h["step_size"], "step_size", owner, minimum=1),
                "gamma": check_real(h["gamma"], "gamma", owner, above=0)}

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(LRScheduler):
    """Multiply the rate by ``gamma`` every epoch.

        lr(epoch) = base_lr * gamma ** epoch
    """

    def __init__(self, optimizer, gamma):
        super().__init__(optimizer, gamma=gamma)

    def _checked(self, h):
        return {"gamma": check_real(h["gamma"], "gamma", type(self).__name__, above=0)}

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** epoch


class CosineAnnealingLR(LRScheduler):
    """Follow half a cosine from ``base_lr`` down to ``eta_min`` over ``T_max`` epochs.

        lr(epoch) = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2

    Past ``T_max`` the cosine continues, so the rate climbs back (period 2 * T_max),
    as in PyTorch (SGDR's warm restarts are a different scheduler).
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min)

    def _checked(self, h):
        owner = type(self).__name__
        return {"T_max": check_int(h["T_max"], "T_max", owner, minimum=1),
                "eta_min": check_real(h["eta_min"], "eta_min", owner, minimum=0)}

    def lr_at(self, epoch):
        cosine = (1 + math.cos(math.pi * epoch / self.T_max)) / 2
        return self.eta_min + (self.base_lr - self.eta_min) * cosine


# -- argument checking --------------------------------------------------------
def _scalar(owner, key, state):
    """state[key] as a Python scalar (numpy.load gives 0-d arrays)."""
    value = state[key]
    if hasattr(value, "item"):
        if getattr(value, "size", 1) != 1:
            raise ValueError(f"{owner}: '{key}' must be a single number, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    return value
