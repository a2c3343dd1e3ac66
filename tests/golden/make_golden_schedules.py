"""Record PyTorch's learning rates for the schedulers into tests/golden/schedules.npz.

    PYTHONPATH=. python tests/golden/make_golden_schedules.py     # needs torch

Each case is a minidl scheduler class, its arguments (PyTorch's have the same
names), a number of steps and, for ReduceLROnPlateau, the metric of each step. The
file holds, per case, the rate and momentum torch's SGD has after construction and
after each step (for OneCycleLR, which cycles the momentum, Adam's rate and beta1 too).
The cases of COMBINED are SequentialLR and ChainedScheduler of other schedulers, each
built by one function from either library's scheduler module.
tests/core/test_schedulers.py compares minidl against it (no torch needed) and, with
torch installed, against torch live through ``torch_lrs``. (Its comparisons of StepLR,
ExponentialLR and CosineAnnealingLR go through the ``torch_reference`` fixture instead:
tests/golden/schedulers.npz, written by make_golden.py.)
"""
import os

import numpy

from minidl import schedulers
from minidl.schedulers import LinearLR, MultiStepLR, OneCycleLR, ReduceLROnPlateau

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schedules.npz")
BASE_LR = 0.1
PLATEAU_METRICS = [5.0, 4.0, 4.0, 3.99, 4.1, 4.2, 3.0, 3.0, 3.0, 3.0, 3.0, 2.9, 3.5, 3.5, 3.5,
                   3.5, 3.5, 3.5, 3.5, 3.5]

CASES = {
    "multistep": (MultiStepLR, dict(milestones=[2, 5, 5, 9], gamma=0.5), 12),
    "linear_warmup": (LinearLR, dict(start_factor=0.1, end_factor=1.0, total_iters=6), 10),
    "linear_decay": (LinearLR, dict(start_factor=1.0, end_factor=0.2, total_iters=4), 7),
    "onecycle_cos": (OneCycleLR, dict(max_lr=0.5, total_steps=40), 40),
    "onecycle_linear_three_phase": (OneCycleLR, dict(max_lr=0.5, total_steps=37, pct_start=0.25,
                                                     anneal_strategy="linear",
                                                     three_phase=True, base_momentum=0.8), 37),
    "onecycle_no_momentum": (OneCycleLR, dict(max_lr=0.3, total_steps=12,
                                              cycle_momentum=False), 12),
    "onecycle_epochs": (OneCycleLR, dict(max_lr=1.0, epochs=3, steps_per_epoch=7,
                                         div_factor=10.0, final_div_factor=100.0), 21),
    "plateau_min_rel": (ReduceLROnPlateau, dict(mode="min", factor=0.5, patience=2,
                                                threshold=0.01, cooldown=1), 20),
    "plateau_max_abs": (ReduceLROnPlateau, dict(mode="max", factor=0.2, patience=1,
                                                threshold=0.05, threshold_mode="abs",
                                                min_lr=0.003), 20),
}

# name -> (steps, build(L, optimizer, kwargs)): L is minidl.schedulers or
# torch.optim.lr_scheduler; kwargs holds what only minidl takes (the cadence).
COMBINED = {
    "sequential_warmup_cosine": (12, lambda L, o, kw: L.SequentialLR(o, [
        L.LinearLR(o, start_factor=0.1, total_iters=4),
        L.CosineAnnealingLR(o, T_max=8, eta_min=0.01)], milestones=[4], **kw)),
    "sequential_three": (14, lambda L, o, kw: L.SequentialLR(o, [
        L.ExponentialLR(o, gamma=0.8), L.StepLR(o, step_size=2, gamma=0.5),
        L.MultiStepLR(o, milestones=[2, 4], gamma=0.3)], milestones=[3, 8], **kw)),
    "chained_warmup_exponential": (10, lambda L, o, kw: L.ChainedScheduler([
        L.LinearLR(o, start_factor=0.2, total_iters=5), L.ExponentialLR(o, gamma=0.9)], **kw)),
    "chained_three": (10, lambda L, o, kw: L.ChainedScheduler([
        L.StepLR(o, step_size=3, gamma=0.5), L.MultiStepLR(o, milestones=[2, 7], gamma=0.1),
        L.CosineAnnealingLR(o, T_max=10)], **kw)),
}


def make(case, lib, optimizer):
    """The scheduler of ``case`` for ``optimizer``, from ``lib`` (minidl.schedulers or
    torch.optim.lr_scheduler); and its number of steps."""
    if case in COMBINED:
        steps, build = COMBINED[case]
        return build(lib, optimizer, {"per_batch": False} if lib is schedulers else {}), steps
    cls, kwargs, steps = CASES[case]
    return getattr(lib, cls.__name__)(optimizer, **kwargs), steps


def metric(case, step):
    """The monitored value at ``step`` (1-based): falls then stalls; "max" mode sees
    its negative, so both modes meet improvements and plateaus."""
    value = PLATEAU_METRICS[step - 1]
    return -value if CASES.get(case, (0, {}))[1].get("mode") == "max" else value


def torch_lrs(case, optimizer="SGD"):
    """Torch's rate after construction and after each step: one row per step, then the
    momentum (SGD's, or Adam's beta1) as a second column."""
    import torch
    param = torch.zeros(1, requires_grad=True)
    opt = (torch.optim.SGD([param], lr=BASE_LR, momentum=0.9) if optimizer == "SGD"
           else torch.optim.Adam([param], lr=BASE_LR))
    sched, steps = make(case, torch.optim.lr_scheduler, opt)

    def now():
        group = opt.param_groups[0]
        return group["lr"], group["momentum"] if optimizer == "SGD" else group["betas"][0]

    rows = [now()]
    for step in range(1, steps + 1):
        opt.step()              # no grads: a no-op that keeps torch's order check quiet
        plateau = type(sched).__name__ == "ReduceLROnPlateau"
        sched.step(metric(case, step)) if plateau else sched.step()
        rows.append(now())
    return numpy.array(rows)


def main():
    arrays = {case: torch_lrs(case) for case in [*CASES, *COMBINED]}
    arrays.update({f"{case}/adam": torch_lrs(case, "Adam") for case in CASES
                   if case.startswith("onecycle")})
    numpy.savez(PATH, **arrays)
    print(f"wrote {PATH} ({len(arrays)} cases)")


if __name__ == "__main__":
    main()
