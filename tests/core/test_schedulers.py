"""minidl.schedulers: StepLR, ExponentialLR and CosineAnnealingLR by hand and against
PyTorch; MultiStepLR, LinearLR (warm-up), OneCycleLR, ReduceLROnPlateau, SequentialLR
and ChainedScheduler against PyTorch (golden file and live); state dicts, argument
checks, one scheduler per optimizer, and how the Trainer steps them: once per epoch,
or per batch between the batch callbacks."""
import importlib.util
import math
import os

import numpy as np
import pytest

import minidl
from minidl import SGD, Adam, Callback, DataLoader, Dense, Sequential, SoftmaxCrossEntropy, Trainer
from minidl.callbacks import LearningRateMonitor
from minidl.layers import Parameter
from minidl.schedulers import (ChainedScheduler, CosineAnnealingLR, ExponentialLR, LinearLR,
                               LRScheduler, MultiStepLR, OneCycleLR, ReduceLROnPlateau,
                               SequentialLR, StepLR)

from conftest import GOLDEN_DIR, bar_model, npz_round_trip, oriented_bars

GOLDEN = os.fspath(GOLDEN_DIR)

_spec = importlib.util.spec_from_file_location(
    "make_golden_schedules", os.path.join(GOLDEN, "make_golden_schedules.py"))

cases = importlib.util.module_from_spec(_spec)

_spec.loader.exec_module(cases)


def scalar_param(value, grad=None):
    p = Parameter(np.array(value, dtype=np.float64))
    p.grad = None if grad is None else np.array(grad, dtype=np.float64)
    return p


def P():
    return scalar_param(0.0)


# -- StepLR, ExponentialLR, CosineAnnealingLR ----------------------------------------------
def lrs_over(scheduler, epochs):
    """The optimizer's lr at epoch 0 and after each of ``epochs`` steps."""
    lrs = [scheduler.optimizer.lr]
    for _ in range(epochs):
        scheduler.step()
        assert scheduler.get_last_lr() == scheduler.optimizer.lr
        lrs.append(scheduler.optimizer.lr)
    return lrs


def test_step_lr_by_hand():
    sched = StepLR(SGD([P()], lr=1.0), step_size=2, gamma=0.5)
    assert sched.base_lr == 1.0 and sched.last_epoch == 0
    assert lrs_over(sched, 5) == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    assert sched.last_epoch == 5


def test_exponential_lr_by_hand():
    assert lrs_over(ExponentialLR(SGD([P()], lr=2.0), gamma=0.5), 3) == \
        pytest.approx([2, 1, 0.5, 0.25])


def test_cosine_annealing_lr_by_hand():
    sched = CosineAnnealingLR(SGD([P()], lr=1.0), T_max=4, eta_min=0.2)
    half = (1 + math.cos(math.pi / 4)) / 2
    expected = [1.0, 0.2 + 0.8 * half, 0.6, 0.2 + 0.8 * (1 - half), 0.2, 0.2 + 0.8 * (1 - half)]
    assert lrs_over(sched, 5) == pytest.approx(expected)


def test_scheduler_state_dict_round_trip():
    opt = SGD([P()], lr=0.3)
    sched = CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    lrs_over(sched, 4)
    saved = npz_round_trip(sched.state_dict())
    other = CosineAnnealingLR(SGD([P()], lr=99.0), T_max=3)
    other.load_state_dict(saved)
    assert (other.base_lr, other.last_epoch, other.T_max, other.eta_min) == (0.3, 4, 10, 0.01)
    assert lrs_over(other, 5)[1:] == lrs_over(sched, 5)[1:]


@pytest.mark.parametrize("make, error", [
    (lambda: StepLR("optimizer", step_size=2), TypeError),
    (lambda: StepLR(SGD([P()], lr=0.1), step_size=0), ValueError),
    (lambda: StepLR(SGD([P()], lr=0.1), step_size=1.5), TypeError),
    (lambda: StepLR(SGD([P()], lr=0.1), step_size=2, gamma=-0.1), ValueError),
    (lambda: ExponentialLR(SGD([P()], lr=0.1), gamma=0), ValueError),
    (lambda: CosineAnnealingLR(SGD([P()], lr=0.1), T_max=0), ValueError),
    (lambda: CosineAnnealingLR(SGD([P()], lr=0.1), T_max=5, eta_min=-1), ValueError),
    (lambda: ExponentialLR(SGD([P()], lr=0.1), gamma=float("inf")), ValueError),
    (lambda: ExponentialLR(SGD([P()], lr=0.1), gamma="0.9"), TypeError),
    (lambda: StepLR(SGD([P()], lr=0.1), step_size="2"), TypeError),
    (lambda: StepLR(SGD([P()], lr=0.1), step_size=2.0), TypeError),
    (lambda: CosineAnnealingLR(SGD([P()], lr=0.1), T_max=5, eta_min=float("inf")),
     ValueError),
])
def test_scheduler_bad_arguments(make, error):
    with pytest.raises(error):
        make()


def test_scheduler_load_rejects_wrong_keys():
    step = StepLR(SGD([P()], lr=0.1), step_size=2)
    with pytest.raises(ValueError, match="missing"):
        ExponentialLR(SGD([P()], lr=0.1), gamma=0.9).load_state_dict(step.state_dict())


def test_lr_scheduler_base_is_abstract():
    with pytest.raises(NotImplementedError):
        LRScheduler(SGD([P()], lr=0.1)).step()


@pytest.mark.parametrize("cls, kwargs", [
    (StepLR, dict(step_size=3, gamma=0.5)),
    (StepLR, dict(step_size=1)),
    (ExponentialLR, dict(gamma=0.9)),
    (CosineAnnealingLR, dict(T_max=10)),
    (CosineAnnealingLR, dict(T_max=7, eta_min=0.001)),
], ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
def test_schedulers_match_torch(cls, kwargs, torch_reference):
    epochs = 21    # 20 steps, past T_max where the cosine climbs back

    def compute(torch):
        torch_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        torch_sched = getattr(torch.optim.lr_scheduler, cls.__name__)(torch_opt, **kwargs)
        lr, last_epoch = [], []
        for epoch in range(epochs):
            if epoch:
                torch_opt.step()  # no grads: a no-op that keeps torch's ordering check quiet
                torch_sched.step()
            lr.append(torch_opt.param_groups[0]["lr"])
            last_epoch.append(torch_sched.last_epoch)
        return {"lr": lr, "last_epoch": last_epoch}

    theirs = torch_reference(compute)
    opt = SGD([P()], lr=0.1)
    sched = cls(opt, **kwargs)
    for epoch in range(epochs):
        if epoch:
            sched.step()
        expected = float(theirs["lr"][epoch])
        assert sched.last_epoch == theirs["last_epoch"][epoch] == epoch
        assert opt.lr == pytest.approx(expected, rel=1e-12, abs=1e-15), f"epoch {epoch}"
        assert sched.get_last_lr() == pytest.approx(expected, rel=1e-12, abs=1e-15)


# -- MultiStepLR, LinearLR, OneCycleLR, ReduceLROnPlateau against PyTorch ------------------
def minidl_lrs(case, optimizer="SGD"):
    """Like cases.torch_lrs: (lr, momentum or beta1) after construction and each step."""
    opt = (SGD([Parameter(np.zeros(1))], lr=cases.BASE_LR, momentum=0.9) if optimizer == "SGD"
           else Adam([Parameter(np.zeros(1))], lr=cases.BASE_LR))
    sched, steps = cases.make(case, minidl.schedulers, opt)

    def now():
        return opt.lr, opt.momentum if optimizer == "SGD" else opt.betas[0]

    rows = [now()]
    for step in range(1, steps + 1):
        plateau = isinstance(sched, ReduceLROnPlateau)
        sched.step(cases.metric(case, step)) if plateau else sched.step()
        rows.append(now())
        assert sched.get_last_lr() == opt.lr
    return np.array(rows)


RUNS = (sorted(cases.CASES) + sorted(cases.COMBINED)
        + [f"{c}/adam" for c in sorted(cases.CASES) if c.startswith("onecycle")])


@pytest.mark.parametrize("run", RUNS)
def test_matches_torch_golden(run):
    with np.load(os.path.join(GOLDEN, "schedules.npz")) as data:
        expected = data[run]
    case, _, optimizer = run.partition("/")
    compare(minidl_lrs(case, optimizer.capitalize() or "SGD"), expected, case)
    assert len(set(expected[:, 0].round(12))) > 2     # the case really changes the rate


@pytest.mark.parametrize("run", RUNS)
def test_matches_torch_live(run):
    pytest.importorskip("torch")
    case, _, optimizer = run.partition("/")
    optimizer = optimizer.capitalize() or "SGD"
    compare(minidl_lrs(case, optimizer), cases.torch_lrs(case, optimizer), case)


def compare(ours, torch_rows, case):
    """Equal at every step; OneCycleLR's values after its last step (which no optimizer
    step uses) stay at the final ones where torch extrapolates the anneal."""
    if case.startswith("onecycle"):
        kwargs = cases.CASES[case][1]
        final = (kwargs["max_lr"] / kwargs.get("div_factor", 25.0)
                 / kwargs.get("final_div_factor", 1e4))
        assert ours[-1, 0] == pytest.approx(final, rel=1e-9)
        ours, torch_rows = ours[:-1], torch_rows[:-1]
    np.testing.assert_allclose(ours, torch_rows, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", sorted(cases.CASES))
def test_state_dict_round_trip_mid_schedule(case, tmp_path):
    cls, kwargs, steps = cases.CASES[case]
    opt = SGD([Parameter(np.zeros(1))], lr=cases.BASE_LR)
    sched = cls(opt, **kwargs)

    def step(s, k):
        s.step(cases.metric(case, k)) if cls is ReduceLROnPlateau else s.step()

    for k in range(1, steps // 2 + 1):
        step(sched, k)
    np.savez(tmp_path / "s.npz", **sched.state_dict())
    with np.load(tmp_path / "s.npz") as data:
        saved = dict(data)
    other_opt = SGD([Parameter(np.zeros(1))], lr=cases.BASE_LR)
    other = cls(other_opt, **kwargs)
    other.load_state_dict(saved)
    other_opt.lr = opt.lr          # the optimizer's own state_dict carries its lr
    for k in range(steps // 2 + 1, steps + 1):
        step(sched, k)
        step(other, k)
        assert other_opt.lr == opt.lr


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_batch_begin(self, trainer, batch):
        self.events.append(("begin", trainer.epoch, batch, trainer.optimizer.lr))

    def on_batch_end(self, trainer, batch, logs):
        self.events.append(("end", trainer.epoch, batch, round(logs["loss"], 6) > 0))

    def on_epoch_end(self, trainer, epoch, logs):
        self.events.append(("epoch", epoch))


def tiny_fit(scheduler_fn, epochs=2, callbacks=(), n=40, batch=10):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = Sequential(Dense(3, 2))
    opt = SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, SoftmaxCrossEntropy(), opt, scheduler=scheduler_fn(opt), verbose=0)
    history = trainer.fit(DataLoader(x, y, batch, seed=0), epochs=epochs, callbacks=callbacks,
                          val=DataLoader(x, y, n, shuffle=False))
    return trainer, history


def test_batch_callbacks_are_called_in_order_with_the_rate_of_each_step():
    recorder, monitor = Recorder(), LearningRateMonitor()
    trainer, _ = tiny_fit(lambda opt: OneCycleLR(opt, 1.0, epochs=2, steps_per_epoch=4),
                          callbacks=[recorder, monitor])
    kinds = [e[0] for e in recorder.events]
    assert kinds == (["begin", "end"] * 4 + ["epoch"]) * 2
    assert [e[2] for e in recorder.events if e[0] == "begin"] == [0, 1, 2, 3] * 2
    assert all(e[3] for e in recorder.events if e[0] == "end")
    # the scheduler is stepped after each optimizer step, before the next batch begins
    expected = OneCycleLR(SGD([Parameter(np.zeros(1))], lr=1.0), 1.0, total_steps=8)
    rates = [expected.lr_at(t) for t in range(8)]
    assert monitor.lrs == pytest.approx(rates, rel=1e-12)
    assert [e[3] for e in recorder.events if e[0] == "begin"] == monitor.lrs
    assert trainer.scheduler.last_epoch == 8


def test_epoch_schedulers_still_step_once_per_epoch_and_plateau_reads_logs():
    trainer, history = tiny_fit(lambda opt: MultiStepLR(opt, [1]), epochs=3)
    assert history["lr"] == pytest.approx([0.1, 0.01, 0.01])
    trainer, history = tiny_fit(
        lambda opt: ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=0.9), epochs=3)
    # threshold 0.9 (relative): only a 90% drop counts after epoch 1, so the rate halves
    assert history["lr"] == pytest.approx([0.1, 0.1, 0.05])
    with pytest.raises(ValueError, match="ReduceLROnPlateau: the metric 'val_acc' is not logged"):
        tiny_fit(lambda opt: ReduceLROnPlateau(opt, monitor="val_acc"))


def test_linear_warmup_per_batch_sets_the_first_rate_at_once():
    opt = SGD([Parameter(np.zeros(1))], lr=0.5)
    warmup = LinearLR(opt, start_factor=0.01, total_iters=100)
    assert warmup.per_batch and opt.lr == pytest.approx(0.005)
    assert not LinearLR(opt, per_batch=False).per_batch
    assert not CosineAnnealingLR(opt, T_max=3).per_batch


@pytest.mark.parametrize("make, error, match", [
    (lambda o: MultiStepLR(o, 3), TypeError, "milestones must be a list"),
    (lambda o: MultiStepLR(o, [2, -1]), ValueError, "milestones must be >= 0"),
    (lambda o: LinearLR(o, start_factor=0), ValueError,
     "start_factor must be a finite number > 0"),
    (lambda o: LinearLR(o, end_factor=1.5), ValueError,
     "end_factor must be a finite number >= 0 and <= 1, got 1.5"),
    (lambda o: OneCycleLR(o, 0.1), ValueError, "pass total_steps, or epochs and steps_per_epoch"),
    (lambda o: OneCycleLR(o, 0.1, total_steps=10, anneal_strategy="cosine"), ValueError,
     "anneal_strategy must be 'cos' or 'linear'"),
    (lambda o: OneCycleLR(o, 0.1, total_steps=10, pct_start=1.5), ValueError, "pct_start"),
    (lambda o: ReduceLROnPlateau(o, factor=1.0), ValueError,
     "factor must be a finite number >= 0 and < 1, got 1.0"),
    (lambda o: OneCycleLR(minidl.optim.Optimizer([Parameter(np.zeros(1))], 0.1), 0.1,
                          total_steps=5), ValueError, "no momentum or betas to cycle"),
    (lambda o: ReduceLROnPlateau(o, mode="best"), ValueError, "mode must be 'min' or 'max'"),
])
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make(SGD([Parameter(np.zeros(1))], lr=0.1))


def test_one_cycle_refuses_to_step_past_its_end():
    sched = OneCycleLR(SGD([Parameter(np.zeros(1))], lr=0.1), 0.1, total_steps=3)
    for _ in range(3):
        sched.step()
    with pytest.raises(ValueError, match="OneCycleLR: stepped 4 times, but total_steps is 3"):
        sched.step()


def test_trainer_takes_only_minidl_schedulers():
    model = Sequential(Dense(3, 2))
    opt = SGD(model.parameters(), lr=0.1)

    class Steps:
        def step(self):
            pass
    with pytest.raises(TypeError, match="Trainer: scheduler must be a minidl LRScheduler"):
        Trainer(model, SoftmaxCrossEntropy(), opt, scheduler=Steps())


def test_scheduler_steps_once_per_epoch():
    x, y = oriented_bars(32)
    model = bar_model()
    opt = SGD(model.parameters(), lr=0.1)
    sched = minidl.StepLR(opt, step_size=1, gamma=0.5)
    history = Trainer(model, SoftmaxCrossEntropy(), opt, scheduler=sched, verbose=0).fit(
        DataLoader(x, y, 16), epochs=3)
    assert history["lr"] == pytest.approx([0.1, 0.05, 0.025])


# -- combined schedulers, and one scheduler per optimizer ----------------------------------
def test_a_scheduler_made_after_a_warm_up_starts_from_the_optimizers_rate():
    """The cosine used to take the warm-up's first rate (0.01) as its base."""
    opt = SGD([P()], lr=0.1)
    LinearLR(opt, start_factor=0.1, total_iters=4)
    assert opt.lr == pytest.approx(0.01)
    assert CosineAnnealingLR(opt, T_max=10).base_lr == 0.1 == opt.initial_lr


def test_two_schedulers_stepping_one_optimizer_are_refused():
    """A warm-up callback beside a cosine scheduler used to overwrite its rate at every
    batch, without a word."""
    x, y = oriented_bars(32)
    model = bar_model()
    opt = SGD(model.parameters(), lr=0.1)
    warmup = LinearLR(opt, start_factor=0.1, total_iters=4)
    trainer = Trainer(model, SoftmaxCrossEntropy(), opt,
                      scheduler=CosineAnnealingLR(opt, T_max=3), verbose=0)
    with pytest.raises(ValueError, match=r"LinearLR: CosineAnnealingLR\(T_max=3.*made later, "
                                         r"sets this optimizer's rate; combine schedulers "
                                         r"with SequentialLR or ChainedScheduler"):
        trainer.fit(DataLoader(x, y, 16), epochs=2, callbacks=[warmup])


def test_sequential_warm_up_then_cosine_per_batch_in_the_trainer():
    monitor = LearningRateMonitor()

    def schedule(opt):
        warmup = LinearLR(opt, start_factor=0.25, total_iters=3)
        cosine = CosineAnnealingLR(opt, T_max=5)       # counts optimizer steps here
        return SequentialLR(opt, [warmup, cosine], milestones=[3], per_batch=True)

    trainer, _ = tiny_fit(schedule, epochs=2, callbacks=[monitor])
    cosine = [0.1 * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(5)]
    assert monitor.lrs == pytest.approx([0.025, 0.05, 0.075] + cosine, rel=1e-12)
    assert trainer.scheduler.per_batch and trainer.scheduler.last_epoch == 8


def test_one_cycle_and_plateau_cannot_join():
    opt = SGD([P()], lr=0.1, momentum=0.9)
    for other in (OneCycleLR(opt, max_lr=1.0, total_steps=10), ReduceLROnPlateau(opt)):
        with pytest.raises(TypeError, match=rf"schedulers\[1\] must be a minidl scheduler, "
                                            rf"not OneCycleLR or ReduceLROnPlateau, got "
                                            rf"{type(other).__name__}"):
            SequentialLR(opt, [LinearLR(opt, 0.5, total_iters=2), other], milestones=[2])


@pytest.mark.parametrize("case", sorted(cases.COMBINED))
def test_combined_state_dict_round_trip(case):
    opt = SGD([P()], lr=cases.BASE_LR)
    sched, steps = cases.make(case, minidl.schedulers, opt)
    for _ in range(steps // 2):
        sched.step()
    other_opt = SGD([P()], lr=cases.BASE_LR)
    other, _ = cases.make(case, minidl.schedulers, other_opt)
    other.load_state_dict(npz_round_trip(sched.state_dict()))
    assert other.last_epoch == steps // 2
    other_opt.lr = opt.lr
    assert lrs_over(other, 3) == lrs_over(sched, 3)


@pytest.mark.parametrize("make, error, match", [
    (lambda o: SequentialLR(o, [StepLR(o, 2), ExponentialLR(o, 0.9)], milestones=[]),
     ValueError, r"milestones must be 1 increasing epochs, one per scheduler after the first"),
    (lambda o: SequentialLR(o, [StepLR(o, 2), StepLR(o, 3), StepLR(o, 4)], milestones=[5, 2]),
     ValueError, r"milestones must be 2 increasing epochs.*got \[5, 2\]"),
    (lambda o: ChainedScheduler([StepLR(o, 2), OneCycleLR(o, 0.1, total_steps=9)]),
     TypeError, r"ChainedScheduler: schedulers\[1\] must be a minidl scheduler, not "
                r"OneCycleLR or ReduceLROnPlateau"),
    (lambda o: ChainedScheduler([StepLR(o, 2), "cosine"]), TypeError,
     r"schedulers\[1\] must be a minidl scheduler.*got 'cosine'"),
    (lambda o: ChainedScheduler([StepLR(o, 2), StepLR(SGD([P()], lr=0.1), 2)]),
     ValueError, r"ChainedScheduler: schedulers\[1\] schedules another optimizer"),
    (lambda o: ChainedScheduler([StepLR(o, 2), LinearLR(o)]),
     ValueError, r"some schedulers step per batch, some per epoch; pass per_batch=True"),
    (lambda o: ChainedScheduler([]), TypeError, r"schedulers must be a non-empty list, got \[\]"),
    (lambda o: ChainedScheduler([StepLR(o, 2)], per_batch="yes"), TypeError,
     "per_batch must be True or False"),
])
def test_combined_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make(SGD([P()], lr=0.1))
