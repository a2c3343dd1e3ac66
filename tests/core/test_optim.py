"""minidl.optim: SGD, Adam, AdamW, RMSprop and clip_grad_norm_.

Hand-computed cases pin each update rule on small numbers; when torch is installed the
optimizers are also compared with torch.optim in float64 (else with its answers recorded
in tests/golden/optim.npz). The schedulers: test_schedulers.py."""
import math

import numpy as np
import pytest

import minidl
from minidl import backend
from minidl.layers.base import Parameter
from minidl.optim import SGD, Adam, AdamW, RMSprop, clip_grad_norm_

from conftest import npz_round_trip


def scalar_param(value, grad=None):
    p = Parameter(np.array(value, dtype=np.float64))
    p.grad = None if grad is None else np.array(grad, dtype=np.float64)
    return p


def run_steps(opt, param, grads):
    """Step ``opt`` once per grad in ``grads``; returns the values after each step."""
    values = []
    for g in grads:
        param.grad = np.array(g, dtype=param.data.dtype)
        opt.step()
        values.append(float(param.data))
    return values


# -- hand-computed update rules ------------------------------------------------
def test_sgd_plain_step():
    p = scalar_param(1.0)
    assert run_steps(SGD([p], lr=0.1), p, [2.0, -1.0]) == pytest.approx([0.8, 0.9])


def test_sgd_momentum_three_steps():
    # b1 = g1 = 1;           theta = 1    - 0.1 * 1    = 0.9
    # b2 = 0.9 * 1 + 2 = 2.9;  theta = 0.9  - 0.1 * 2.9  = 0.61
    # b3 = 0.9 * 2.9 + 3 = 5.61; theta = 0.61 - 0.1 * 5.61 = 0.049
    p = scalar_param(1.0)
    opt = SGD([p], lr=0.1, momentum=0.9)
    assert run_steps(opt, p, [1.0, 2.0, 3.0]) == pytest.approx([0.9, 0.61, 0.049])
    assert float(opt.state[0]["b"]) == pytest.approx(5.61)


def test_sgd_dampening_does_not_touch_the_first_step():
    # b1 = g1 = 1 (no dampening); b2 = 0.9 * 1 + (1 - 0.5) * 1 = 1.4
    p = scalar_param(1.0)
    opt = SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    assert run_steps(opt, p, [1.0, 1.0]) == pytest.approx([0.9, 0.76])


def test_sgd_nesterov_two_steps():
    # step 1: b = 1,   d = 1 + 0.9 * 1   = 1.9,  theta = 1    - 0.19  = 0.81
    # step 2: b = 1.9, d = 1 + 0.9 * 1.9 = 2.71, theta = 0.81 - 0.271 = 0.539
    p = scalar_param(1.0)
    opt = SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    assert run_steps(opt, p, [1.0, 1.0]) == pytest.approx([0.81, 0.539])


def test_sgd_weight_decay_is_an_l2_gradient():
    p = scalar_param(2.0)
    # g = 0 + 0.1 * 2 = 0.2; theta = 2 - 0.5 * 0.2
    assert run_steps(SGD([p], lr=0.5, weight_decay=0.1), p, [0.0]) == pytest.approx([1.9])


def test_adam_first_step_moves_by_lr_times_sign():
    # after one step m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps)
    p = Parameter(np.array([1.0, 1.0, 1.0, 1.0]))
    p.grad = np.array([-3.0, 0.5, 2e-3, 1e4])
    Adam([p], lr=0.01).step()
    np.testing.assert_allclose(p.data, [1.01, 0.99, 0.99, 0.99], rtol=0, atol=1e-7)


def test_adam_second_step_by_hand():
    # g = 1 then 3, betas (0.5, 0.5), eps 0 (so the numbers stay exact):
    # m = 0.5, 1.75 ; v = 0.5, 4.75 ; m_hat_2 = 1.75 / 0.75, v_hat_2 = 4.75 / 0.75
    p = scalar_param(0.0)
    opt = Adam([p], lr=1.0, betas=(0.5, 0.5), eps=0.0)
    expected_2 = -1.0 - (1.75 / 0.75) / math.sqrt(4.75 / 0.75)
    assert run_steps(opt, p, [1.0, 3.0]) == pytest.approx([-1.0, expected_2])


def test_adam_amsgrad_keeps_the_largest_second_moment():
    p = scalar_param(0.0)
    opt = Adam([p], lr=1.0, betas=(0.5, 0.5), eps=0.0, amsgrad=True)
    run_steps(opt, p, [4.0, 0.0])
    # v: 8 then 4; v_max stays 8 and the step-2 denominator is sqrt(8 / 0.75)
    assert float(opt.state[0]["v"]) == 4.0 and float(opt.state[0]["v_max"]) == 8.0
    m_hat_2 = 1.0 / 0.75
    assert float(p.data) == pytest.approx(-1.0 - m_hat_2 / math.sqrt(8 / 0.75))


def test_adam_l2_decay_versus_adamw_decoupled_decay():
    # zero gradient: Adam's decay becomes g = wd * theta, so the first step is lr * sign;
    # AdamW shrinks theta by (1 - lr * wd) and its moments stay 0.
    p_adam, p_adamw = scalar_param(2.0, grad=0.0), scalar_param(2.0, grad=0.0)
    Adam([p_adam], lr=0.1, weight_decay=0.25).step()
    AdamW([p_adamw], lr=0.1, weight_decay=0.25).step()
    assert float(p_adam.data) == pytest.approx(1.9, abs=1e-7)
    assert float(p_adamw.data) == pytest.approx(2.0 * (1 - 0.1 * 0.25))


def test_rmsprop_first_step():
    # v = (1 - alpha) g^2, so the step is lr * g / (sqrt(1 - alpha) |g| + eps) ~ 0.1
    p = scalar_param(1.0)
    assert run_steps(RMSprop([p], lr=0.01, alpha=0.99), p, [4.0]) == pytest.approx([0.9])


def test_rmsprop_centered_and_momentum_by_hand():
    # alpha 0.5, eps 0: v = 0.5 g^2 = 2, g_avg = 0.5 g = 1, d = sqrt(2 - 1) = 1,
    # b = 0 * 0.9 + 2 / 1 = 2, theta = 0 - 0.1 * 2
    p = scalar_param(0.0)
    opt = RMSprop([p], lr=0.1, alpha=0.5, eps=0.0, momentum=0.9, centered=True)
    assert run_steps(opt, p, [2.0]) == pytest.approx([-0.2])


# -- common behaviour ----------------------------------------------------------
ALL_OPTIMIZERS = [
    (SGD, dict(lr=0.1)),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    (AdamW, dict(lr=0.01, amsgrad=True)),
    (RMSprop, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
]


ALL_IDS = [f"{cls.__name__}-{'-'.join(kw)}" for cls, kw in ALL_OPTIMIZERS]


@pytest.mark.parametrize("cls, kwargs", ALL_OPTIMIZERS, ids=ALL_IDS)
def test_params_without_grad_are_skipped(cls, kwargs):
    used, unused = scalar_param(1.0, grad=1.0), scalar_param(5.0)
    opt = cls([used, unused], **kwargs)
    opt.step()
    assert float(unused.data) == 5.0 and 1 not in opt.state
    assert float(used.data) != 1.0 and opt.state[0]["t"] == 1


def test_zero_grad_sets_grads_to_none():
    params = [scalar_param(1.0, grad=1.0), scalar_param(2.0, grad=3.0)]
    SGD(params, lr=0.1).zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("cls, kwargs", ALL_OPTIMIZERS, ids=ALL_IDS)
def test_float32_stays_float32_and_updates_in_place(cls, kwargs):
    rng = np.random.default_rng(0)
    p = Parameter(rng.standard_normal((4, 3)).astype(np.float32))
    data = p.data
    opt = cls([p], **kwargs)
    for step in range(3):
        p.grad = rng.standard_normal((4, 3)).astype(np.float32)
        if step == 2:
            p.grad = p.grad.astype(np.float64)  # a float64 grad must not upcast either
        opt.step()
    assert p.data is data and p.data.dtype == np.float32
    assert all(v.dtype == np.float32 for k, v in opt.state[0].items() if k != "t")


def test_grad_shape_mismatch_is_a_clear_error():
    p = Parameter(np.zeros(3))
    p.grad = np.zeros(4)
    with pytest.raises(ValueError, match="grad has shape"):
        SGD([p], lr=0.1).step()


# -- argument checking ---------------------------------------------------------
def P():
    return scalar_param(0.0)


@pytest.mark.parametrize("make, error, match", [
    (lambda: SGD([], lr=0.1), ValueError, "empty"),
    (lambda: SGD(iter([]), lr=0.1), ValueError, "empty"),
    (lambda: SGD([P(), np.zeros(2)], lr=0.1), TypeError, r"params\[1\]"),
    (lambda: SGD(P(), lr=0.1), TypeError, "iterable"),
    (lambda: SGD(3, lr=0.1), TypeError, "iterable"),
    (lambda: SGD([P()], lr=-0.1), ValueError, "lr"),
    (lambda: SGD([P()], lr="fast"), TypeError, "lr"),
    (lambda: SGD([P()], lr=0.1, momentum=-0.9), ValueError, "momentum"),
    (lambda: SGD([P()], lr=0.1, dampening=1.5), ValueError, "dampening"),
    (lambda: SGD([P()], lr=0.1, weight_decay=-1), ValueError, "weight_decay"),
    (lambda: SGD([P()], lr=0.1, nesterov=True), ValueError, "nesterov"),
    (lambda: SGD([P()], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
     ValueError, "nesterov"),
    (lambda: Adam([P()], betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (lambda: Adam([P()], betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (lambda: Adam([P()], betas=(0.9,)), ValueError, "betas"),
    (lambda: Adam([P()], eps=-1e-8), ValueError, "eps"),
    (lambda: AdamW([P()], weight_decay=-0.1), ValueError, "weight_decay"),
    (lambda: RMSprop([P()], alpha=1.5), ValueError, "alpha"),
    (lambda: RMSprop([P()], momentum=-1), ValueError, "momentum"),
    (lambda: RMSprop([P()], eps=float("nan")), ValueError, "eps"),
])
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_duplicate_parameters_are_rejected():
    p = P()
    with pytest.raises(ValueError, match="more than once"):
        Adam([p, p])


def test_lr_assignment_is_checked():
    opt = SGD([P()], lr=0.1)
    opt.lr = 0.05
    assert opt.lr == 0.05 and type(opt.lr) is float
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0


# Flags must be bools and numbers real and finite: Python truthiness would make
# amsgrad="False" true, and float() would accept "0.1".
@pytest.mark.parametrize("make, error, match", [
    (lambda: Adam([P()], amsgrad="False"), TypeError, "Adam: amsgrad must be True or False"),
    (lambda: Adam([P()], amsgrad=1), TypeError, "amsgrad"),
    (lambda: SGD([P()], lr=0.1, momentum=0.9, nesterov="yes"), TypeError, "nesterov"),
    (lambda: RMSprop([P()], centered="False"), TypeError, "centered"),
    (lambda: SGD([P()], lr="0.1"), TypeError, "SGD: lr must be a real number, got '0.1'"),
    (lambda: SGD([P()], lr=0.1, momentum="0.9"), TypeError, "momentum"),
    (lambda: SGD([P()], lr=float("inf")), ValueError, "SGD: lr must be a finite number"),
    (lambda: SGD([P()], lr=0.1, momentum=float("inf")), ValueError, "momentum"),
    (lambda: SGD([P()], lr=0.1, weight_decay=float("inf")), ValueError, "weight_decay"),
    (lambda: Adam([P()], eps=float("inf")), ValueError, "eps"),
    (lambda: RMSprop([P()], weight_decay=float("inf")), ValueError, "weight_decay"),
    (lambda: Adam([P()], betas={0.9, 0.999}), TypeError, "betas must be a tuple"),
    (lambda: Adam([P()], betas=0.9), TypeError, "betas must be a tuple"),
    (lambda: Adam([P()], betas=("0.9", 0.999)), TypeError, r"betas\[0\]"),
    (lambda: clip_grad_norm_([P()], "1"), TypeError, "max_norm"),
    (lambda: clip_grad_norm_([P()], 1.0, norm_type=0), ValueError, "norm_type"),
])
def test_flags_are_bools_and_numbers_real_and_finite(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_numpy_scalars_and_lists_are_accepted():
    opt = Adam([P()], lr=np.float32(0.5), betas=[0.5, np.float32(0.75)], amsgrad=np.bool_(True))
    assert opt.betas == (0.5, 0.75) and type(opt.lr) is float and opt.amsgrad is True
    assert SGD([P()], lr=0.1, nesterov=True, momentum=np.int64(1)).momentum == 1.0


def test_only_lr_is_a_checked_property():
    """Schedulers write lr; the other hyper-parameters are plain attributes."""
    opt = SGD([P()], lr=0.1)
    with pytest.raises(TypeError, match="lr"):
        opt.lr = "0.1"
    with pytest.raises(ValueError, match="lr"):
        opt.lr = float("nan")
    assert opt.lr == 0.1
    assert [name for name, value in vars(type(opt)).items() if isinstance(value, property)] \
        == [] and isinstance(vars(minidl.optim.Optimizer)["lr"], property)


def test_sgd_momentum_switched_on_after_a_step_starts_its_buffer_then():
    # As torch.optim.SGD: the buffer starts as the gradient (undamped) on the first
    # step with momentum, then b <- momentum * b + (1 - dampening) * g.
    p = scalar_param(1.0)
    opt = SGD([p], lr=0.1)
    run_steps(opt, p, [1.0])
    opt.momentum, opt.dampening = 0.9, 0.5
    assert run_steps(opt, p, [1.0, 1.0]) == pytest.approx([0.8, 0.8 - 0.1 * 1.4])
    opt.momentum = 0.0  # switched off: plain SGD again (the buffer is kept, as torch)
    assert run_steps(opt, p, [1.0]) == pytest.approx([0.56])


def test_amsgrad_switched_on_after_a_step_starts_from_v():
    # v_max starts at zero, so its first maximum is v: that step equals plain Adam's.
    plain, late = scalar_param(1.0), scalar_param(1.0)
    adam, late_adam = Adam([plain], lr=0.1), Adam([late], lr=0.1)
    run_steps(adam, plain, [1.0])
    run_steps(late_adam, late, [1.0])
    late_adam.amsgrad = True
    assert run_steps(late_adam, late, [0.5]) == run_steps(adam, plain, [0.5])
    assert set(late_adam.state[0]) == {"t", "m", "v", "v_max"}


@pytest.mark.parametrize("cls, kwargs, name, value", [
    (SGD, dict(lr=0.1, dampening=0.3), "momentum", 0.9),
    (Adam, dict(lr=0.01), "amsgrad", True),
    (RMSprop, dict(lr=0.01), "momentum", 0.5),
    (RMSprop, dict(lr=0.01), "centered", True),
])
def test_option_switched_on_later_survives_a_state_dict_round_trip(cls, kwargs, name, value):
    p = scalar_param(1.0)
    opt = cls([p], **kwargs)
    run_steps(opt, p, [1.0, -0.5])
    setattr(opt, name, value)
    # saved before the step that creates the new buffer: loading must accept that
    copy_p = scalar_param(float(p.data))
    copy = cls([copy_p], **kwargs)
    copy.load_state_dict(npz_round_trip(opt.state_dict()))
    assert getattr(copy, name) == value
    assert run_steps(copy, copy_p, [2.0, 0.3]) == run_steps(opt, p, [2.0, 0.3])


# -- state_dict ----------------------------------------------------------------
STATEFUL_OPTIMIZERS = [
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (Adam, dict(lr=0.01, amsgrad=True)),
    (AdamW, dict(lr=0.01, weight_decay=0.1)),
    (RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
]


STATEFUL_IDS = [f"{cls.__name__}-{'-'.join(kw)}" for cls, kw in STATEFUL_OPTIMIZERS]


def random_grads(shapes, steps, seed):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape) for shape in shapes] for _ in range(steps)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.copy()


@pytest.mark.parametrize("cls, kwargs", STATEFUL_OPTIMIZERS, ids=STATEFUL_IDS)
def test_state_dict_round_trip_continues_identically(cls, kwargs):
    shapes = [(3, 2), (4,)]
    grads = random_grads(shapes, 6, seed=1)
    grads[0][1] = None  # parameter 1 starts one step late: its count must travel too
    params_a = [Parameter(np.random.default_rng(2).standard_normal(s)) for s in shapes]
    opt_a = cls(params_a, **kwargs)
    for step_grads in grads[:3]:
        set_grads(params_a, step_grads)
        opt_a.step()

    params_b = [Parameter(p.data.copy()) for p in params_a]
    opt_b = cls(params_b, **{**kwargs, "lr": 7 * kwargs["lr"]})
    opt_b.load_state_dict(npz_round_trip(opt_a.state_dict()))
    assert opt_b.lr == opt_a.lr
    assert [opt_b.state[i]["t"] for i in (0, 1)] == [3, 2]

    for step_grads in grads[3:]:
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            set_grads(params, step_grads)
            opt.step()
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a.data, b.data)


def test_state_dict_is_flat_numpy_and_a_copy():
    p = scalar_param(1.0, grad=1.0)
    opt = SGD([p], lr=0.1, momentum=0.9)
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"num_params", "lr", "momentum", "dampening", "nesterov",
                          "weight_decay", "state.0.t", "state.0.b"}
    assert isinstance(state["state.0.b"], np.ndarray)
    p.grad = np.array(1.0)
    opt.step()
    assert float(state["state.0.b"]) == 1.0  # later steps don't leak into the saved dict


def test_load_state_dict_checks_shapes_and_changes_nothing_on_error():
    p = Parameter(np.zeros(3))
    p.grad = np.ones(3)
    source = Adam([p], lr=0.01)
    source.step()
    target = Adam([Parameter(np.zeros(4))], lr=0.5)
    with pytest.raises(ValueError, match="shape"):
        target.load_state_dict(source.state_dict())
    assert target.lr == 0.5 and target.state == {}


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("eps"), "missing"),
    (lambda s: s.update(momentum=0.9), "unexpected"),
    (lambda s: s.update(num_params=2), "parameters"),
    (lambda s: s.update(lr=-1.0), "lr"),
    (lambda s: s.update({"state.5.t": 1}), "'state.5.t' is not .* with an index < 1"),
    (lambda s: s.pop("state.0.t"), "state"),
    (lambda s: s.update({"state.0.w": s["state.0.v"]}), "state"),
    (lambda s: s.update({"state.0.t": 1.5}), "integer"),
])
def test_load_state_dict_rejects_bad_state(edit, match):
    p = scalar_param(1.0, grad=1.0)
    opt = Adam([p])
    opt.step()
    state = opt.state_dict()
    edit(state)
    with pytest.raises(ValueError, match=match):
        Adam([scalar_param(1.0)]).load_state_dict(state)


def test_loading_another_optimizers_state_fails():
    p = scalar_param(1.0, grad=1.0)
    sgd = SGD([p], lr=0.1, momentum=0.9)
    sgd.step()
    with pytest.raises(ValueError, match="another optimizer"):
        Adam([scalar_param(1.0)]).load_state_dict(sgd.state_dict())


# -- gradient clipping -----------------------------------------------------------
def test_clip_grad_norm_scales_all_grads_together():
    a, b, no_grad = Parameter(np.zeros(2)), Parameter(np.zeros(1)), Parameter(np.zeros(2))
    a.grad, b.grad = np.array([3.0, 4.0]), np.array([12.0])
    total = clip_grad_norm_([a, b, no_grad], max_norm=6.5)
    assert type(total) is float and total == pytest.approx(13.0)
    scale = 6.5 / (13.0 + 1e-6)
    np.testing.assert_allclose(a.grad, [3.0 * scale, 4.0 * scale], rtol=1e-15)
    np.testing.assert_allclose(b.grad, [12.0 * scale], rtol=1e-15)
    assert no_grad.grad is None


def test_clip_grad_norm_leaves_small_grads_alone():
    p = Parameter(np.zeros(2))
    p.grad = grad = np.array([3.0, 4.0])
    assert clip_grad_norm_([p], max_norm=10.0) == pytest.approx(5.0)
    assert p.grad is grad
    np.testing.assert_array_equal(p.grad, [3.0, 4.0])


def test_clip_grad_norm_other_norms_and_edge_cases():
    p = Parameter(np.zeros(3))
    p.grad = np.array([1.0, -2.0, 2.0])
    assert clip_grad_norm_([p], 100.0, norm_type=1) == pytest.approx(5.0)
    assert clip_grad_norm_([p], 100.0, norm_type=math.inf) == pytest.approx(2.0)
    assert clip_grad_norm_(p, 100.0) == pytest.approx(3.0)  # a single Parameter is fine
    assert clip_grad_norm_([Parameter(np.zeros(2))], 1.0) == 0.0
    with pytest.raises(ValueError, match="norm_type"):
        clip_grad_norm_([p], 1.0, norm_type=0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([p], -1.0)


# -- comparisons with PyTorch ----------------------------------------------------
TORCH_SHAPES = [(3, 4), (5,), ()]


# varying grad sizes make AMSGrad's running maximum differ from v
TORCH_GRAD_SCALES = [3.0, 0.1, 1.0, 0.05, 2.0]


TORCH_CASES = [
    (SGD, dict(lr=0.1)),
    (SGD, dict(lr=0.1, momentum=0.9)),
    (SGD, dict(lr=0.1, momentum=0.9, dampening=0.5)),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (SGD, dict(lr=0.1, weight_decay=0.05)),
    (SGD, dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.05)),
    (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    (Adam, dict(lr=0.01)),
    (Adam, dict(lr=0.01, weight_decay=0.1)),
    (Adam, dict(lr=0.01, amsgrad=True)),
    (Adam, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1, amsgrad=True)),
    (AdamW, dict(lr=0.01)),
    (AdamW, dict(lr=0.01, weight_decay=0.3)),
    (AdamW, dict(lr=0.01, betas=(0.5, 0.8), eps=1e-3, weight_decay=0.3, amsgrad=True)),
    (RMSprop, dict(lr=0.01)),
    (RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-3)),
    (RMSprop, dict(lr=0.01, weight_decay=0.1)),
    (RMSprop, dict(lr=0.01, momentum=0.9)),
    (RMSprop, dict(lr=0.01, centered=True)),
    (RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.1)),
]

TORCH_IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
             for cls, kw in TORCH_CASES]


def torch_problem(seed=0):
    rng = np.random.default_rng(seed)
    start = [np.asarray(rng.standard_normal(shape)) for shape in TORCH_SHAPES]
    grads = [[np.asarray(scale * rng.standard_normal(shape)) for shape in TORCH_SHAPES]
             for scale in TORCH_GRAD_SCALES]
    grads[0][2] = None   # parameter 2 has no grad at first: skipped, its count lags
    grads[3][0] = None   # and parameter 0 misses a step in the middle
    return start, grads


def minidl_trajectory(cls, kwargs, start, grads):
    params = [Parameter(x.copy()) for x in start]
    opt = cls(params, **kwargs)
    trajectory = []
    for step_grads in grads:
        set_grads(params, step_grads)
        opt.step()
        trajectory.append([p.data.copy() for p in params])
    return trajectory


def torch_trajectory(cls, kwargs, start, grads):
    """PyTorch's parameters after each step: "p{i}" stacks parameter i over the steps."""
    def compute(torch):
        params = [torch.tensor(x, requires_grad=True) for x in start]
        opt = getattr(torch.optim, cls.__name__)(params, **kwargs)
        trajectory = []
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = None if g is None else torch.tensor(g)
            opt.step()
            trajectory.append([p.detach().numpy().copy() for p in params])
        return {f"p{i}": np.stack(values) for i, values in enumerate(zip(*trajectory))}
    return compute


@pytest.mark.parametrize("cls, kwargs", TORCH_CASES, ids=TORCH_IDS)
def test_matches_torch_optim(cls, kwargs, torch_reference):
    start, grads = torch_problem()
    ours = minidl_trajectory(cls, kwargs, start, grads)
    theirs = torch_reference(torch_trajectory(cls, kwargs, start, grads))
    for step, mine in enumerate(ours):
        for i, a in enumerate(mine):
            np.testing.assert_allclose(a, theirs[f"p{i}"][step], rtol=1e-10, atol=1e-14,
                                       err_msg=f"step {step + 1}, parameter {i}")
    assert not np.allclose(ours[-1][0], start[0])  # the comparison is not vacuous


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_clip_grad_norm_matches_torch(norm_type, torch_reference):
    start, grads = torch_problem()
    ours = [Parameter(x.copy()) for x in start]
    set_grads(ours, grads[0])  # includes a None grad, which both must ignore
    total = clip_grad_norm_(ours, max_norm=0.5, norm_type=norm_type)

    def compute(torch):
        theirs = [torch.tensor(x, requires_grad=True) for x in start]
        for t, g in zip(theirs, grads[0]):
            t.grad = None if g is None else torch.tensor(g)
        total = torch.nn.utils.clip_grad_norm_(theirs, max_norm=0.5, norm_type=norm_type)
        return {"total": float(total), "grad0": theirs[0].grad.numpy(),
                "grad1": theirs[1].grad.numpy()}

    theirs = torch_reference(compute)
    assert total > 0.5 and total == pytest.approx(float(theirs["total"]), rel=1e-12)
    for i, p in enumerate(ours[:2]):
        np.testing.assert_allclose(p.grad, theirs[f"grad{i}"], rtol=1e-12)


# -- the cupy backend --------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("cls, kwargs", ALL_OPTIMIZERS, ids=ALL_IDS)
def test_gpu_matches_cpu(cls, kwargs):
    if not backend.gpu_available():
        pytest.skip("no CUDA device")
    start, grads = torch_problem()
    cpu = minidl_trajectory(cls, kwargs, start, grads)
    params = [Parameter(backend.to_device(x, "gpu")) for x in start]
    opt = cls(params, **kwargs)
    for step_grads in grads:
        set_grads(params, [None if g is None else backend.to_device(g, "gpu")
                           for g in step_grads])
        opt.step()
    for p, expected in zip(params, cpu[-1]):
        assert backend.device_of(p.data) == "gpu"
        np.testing.assert_allclose(backend.to_numpy(p.data), expected, rtol=1e-10)
    reloaded = cls([Parameter(backend.to_device(x, "gpu")) for x in start], **kwargs)
    reloaded.load_state_dict(opt.state_dict())
    assert all(backend.device_of(v) == "gpu"
               for s in reloaded.state.values() for k, v in s.items() if k != "t")
    total = clip_grad_norm_(params, max_norm=0.1)
    assert type(total) is float and backend.device_of(params[0].grad) == "gpu"
