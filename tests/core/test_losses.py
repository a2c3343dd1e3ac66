"""SoftmaxCrossEntropy and MSE: loop reference, gradcheck, PyTorch, extremes, errors."""
import numpy
import pytest

import minidl

from conftest import GPU, NO_GPU_REASON, randn, to_np
from reference_layers import softmax_cross_entropy

F64 = numpy.float64


def labels_for(xp, n, k, seed=4):
    return xp.asarray(numpy.random.default_rng(seed).integers(0, k, n))


# -- SoftmaxCrossEntropy ----------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy_matches_loop_reference(xp, smoothing):
    logits, labels = randn(xp, 6, 5, seed=1) * 3, labels_for(xp, 6, 5)
    fn = minidl.SoftmaxCrossEntropy(label_smoothing=smoothing)
    loss = fn.forward(logits, labels)
    loss_ref, grad_ref = softmax_cross_entropy(to_np(logits), to_np(labels), smoothing)
    assert isinstance(loss, float)
    assert abs(loss - loss_ref) < 1e-10
    numpy.testing.assert_allclose(to_np(fn.backward()), grad_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_gradcheck(xp, smoothing):
    fn = minidl.SoftmaxCrossEntropy(label_smoothing=smoothing)
    assert minidl.gradcheck(fn, randn(xp, 4, 6, seed=3), target=labels_for(xp, 4, 6)) < 1e-6


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.35])
def test_cross_entropy_matches_torch(xp, smoothing, torch_reference):
    logits, labels = randn(xp, 8, 7, seed=1) * 2, labels_for(xp, 8, 7)
    fn = minidl.SoftmaxCrossEntropy(label_smoothing=smoothing)
    loss, grad = fn(logits, labels), fn.backward()            # __call__ is forward

    def compute(torch):
        zt = torch.tensor(to_np(logits), requires_grad=True)
        lt = torch.nn.functional.cross_entropy(zt, torch.tensor(to_np(labels)),
                                               label_smoothing=smoothing)
        lt.backward()
        return {"loss": lt.item(), "grad": zt.grad.numpy()}

    theirs = torch_reference(compute)
    assert abs(loss - float(theirs["loss"])) < 1e-12
    numpy.testing.assert_allclose(to_np(grad), theirs["grad"], rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [numpy.float32, F64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_of_huge_logits_is_finite(xp, dtype, smoothing):
    logits = xp.asarray(numpy.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [1e4, -1e4, -1e4]],
                                    dtype=dtype))
    labels = xp.asarray(numpy.array([0, 0, 1]))
    fn = minidl.SoftmaxCrossEntropy(label_smoothing=smoothing)
    loss, grad = fn.forward(logits, labels), fn.backward()
    loss_ref, grad_ref = softmax_cross_entropy(to_np(logits).astype(F64), [0, 0, 1], smoothing)
    assert numpy.isfinite(loss) and numpy.isfinite(to_np(grad)).all()
    assert abs(loss - loss_ref) <= 1e-6 * loss_ref
    numpy.testing.assert_allclose(to_np(grad), grad_ref, rtol=0, atol=1e-7)


def test_cross_entropy_float32_stays_float32(xp):
    fn = minidl.SoftmaxCrossEntropy(label_smoothing=0.1)
    loss = fn.forward(randn(xp, 4, 3, dtype=numpy.float32), labels_for(xp, 4, 3))
    assert isinstance(loss, float) and fn.backward().dtype == numpy.float32


def test_cross_entropy_bad_input_is_rejected(xp):
    fn = minidl.SoftmaxCrossEntropy()
    logits = randn(xp, 4, 3)
    cases = [
        (logits, xp.asarray([0, 1, 3, 2]), r"labels in \[0, 3\) for 3 classes.*from 0 to 3"),
        (logits, xp.asarray([0, -1, 2, 2]), r"labels in \[0, 3\).*from -1 to 2"),
        (logits, xp.asarray([0, 1, 2]), r"integer labels of shape \(4,\).*shape \(3,\)"),
        (logits, xp.asarray([0.0, 1.0, 2.0, 1.0]), r"integer labels of shape \(4,\).*float64"),
        (logits, xp.zeros((4, 1), dtype=int), r"integer labels of shape \(4,\).*\(4, 1\)"),
        (randn(xp, 4, 3, 1), xp.asarray([0, 1, 2, 0]),
         r"logits of shape \(N, num_classes\).*\(4, 3, 1\)"),
        (xp.asarray([[0.0, numpy.nan]]), xp.asarray([0]), r"finite logits.*1 NaN/inf"),
        (xp.asarray([[0.0, numpy.inf], [-numpy.inf, 1.0]]), xp.asarray([0, 1]),
         r"finite logits, got 2 NaN/inf"),
        (xp.asarray([[1, 2]]), xp.asarray([0]), r"float logits.*int"),
    ]
    for z, labels, message in cases:
        with pytest.raises(ValueError, match="SoftmaxCrossEntropy: expected " + message):
            fn.forward(z, labels)
    with pytest.raises(TypeError,
                       match=r"SoftmaxCrossEntropy \(labels\): expected a numpy or cupy"):
        fn.forward(logits, [0, 1, 2, 0])


def test_losses_bad_arguments_and_misuse():
    for smoothing in [-0.1, 1.5, "0.1"]:
        with pytest.raises((TypeError, ValueError), match="SoftmaxCrossEntropy: label_smoothing"):
            minidl.SoftmaxCrossEntropy(label_smoothing=smoothing)
    for fn in [minidl.SoftmaxCrossEntropy(), minidl.MSE()]:
        with pytest.raises(RuntimeError,
                           match=f"{type(fn).__name__}.backward called before forward"):
            fn.backward()
    assert isinstance(minidl.MSE(), minidl.losses.Loss)
    assert repr(minidl.SoftmaxCrossEntropy(0.1)) == "SoftmaxCrossEntropy(label_smoothing=0.1)"


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason=NO_GPU_REASON)
def test_labels_on_another_device_are_a_type_error():
    import cupy
    logits = cupy.zeros((2, 3), dtype=cupy.float32)
    with pytest.raises(TypeError, match="SoftmaxCrossEntropy: expected logits and labels on "
                                        "one device, got logits on the gpu and labels on the cpu"):
        minidl.SoftmaxCrossEntropy().forward(logits, numpy.array([0, 1]))
    with pytest.raises(TypeError, match="MSE: expected prediction and target on one device"):
        minidl.MSE().forward(logits, numpy.zeros((2, 3), dtype=numpy.float32))


# -- MSE ---------------------------------------------------------------------------------------

def test_mse_values_and_gradcheck(xp):
    y, t = randn(xp, 3, 4, seed=1), randn(xp, 3, 4, seed=2)
    fn = minidl.MSE()
    loss = fn(y, t)
    numpy.testing.assert_allclose(loss, ((to_np(y) - to_np(t)) ** 2).mean(), rtol=1e-14)
    numpy.testing.assert_allclose(to_np(fn.backward()), 2 * (to_np(y) - to_np(t)) / 12, rtol=1e-14)
    assert minidl.gradcheck(fn, randn(xp, 3, 4, seed=3), target=t) < 1e-6


def test_mse_matches_torch(xp, torch_reference):
    y, t = randn(xp, 5, 2, 3, seed=1), randn(xp, 5, 2, 3, seed=2)
    fn = minidl.MSE()
    loss, grad = fn.forward(y, t), fn.backward()

    def compute(torch):
        yt = torch.tensor(to_np(y), requires_grad=True)
        lt = torch.nn.MSELoss()(yt, torch.tensor(to_np(t)))
        lt.backward()
        return {"loss": lt.item(), "grad": yt.grad.numpy()}

    theirs = torch_reference(compute)
    assert abs(loss - float(theirs["loss"])) < 1e-12
    numpy.testing.assert_allclose(to_np(grad), theirs["grad"], rtol=0, atol=1e-15)


def test_mse_float32_stays_float32(xp):
    fn = minidl.MSE()
    loss = fn.forward(randn(xp, 4, 3, dtype=numpy.float32), xp.zeros((4, 3), dtype=int))
    assert isinstance(loss, float) and fn.backward().dtype == numpy.float32


def test_mse_bad_input_is_rejected(xp):
    fn, y = minidl.MSE(), randn(xp, 4, 3)
    with pytest.raises(ValueError, match=r"MSE: expected a non-empty target of the "
                                         r"prediction's shape \(4, 3\), got shape \(4, 1\)"):
        fn.forward(y, randn(xp, 4, 1))
    bad = to_np(y).copy()
    bad[0, 0] = numpy.nan
    with pytest.raises(ValueError, match="MSE: expected a finite prediction, got 1 NaN/inf"):
        fn.forward(xp.asarray(bad), y)
    with pytest.raises(ValueError, match="MSE: expected a finite target, got 1 NaN/inf"):
        fn.forward(y, xp.asarray(bad))
    huge = xp.full((2, 2), 1e30, dtype=numpy.float32)
    with pytest.raises(ValueError, match="MSE: the loss overflowed to inf in float32"), \
            numpy.errstate(over="ignore"):
        fn.forward(huge, -huge)
    with pytest.raises(ValueError, match="MSE: expected float prediction, got dtype int"):
        fn.forward(xp.zeros((2, 2), dtype=int), y)
