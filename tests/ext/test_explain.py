"""minidl.ext.explain: saliency and Grad-CAM equal PyTorch's autograd on the same weights
(live, or tests/golden/explain.npz), the saliency equals finite differences through
Residual and Concat blocks, SmoothGrad is the mean saliency over its noise, occlusion
equals a loop over the patches, the model is left as it was, bad targets and layers
are clear errors; and two sanity checks from the literature on a trained model:
randomised weights change the saliency (Adebayo et al., 2018), and covering the
Grad-CAM's top quarter hurts the prediction more than covering a random quarter."""
import copy

import numpy as np
import pytest

import minidl
from minidl import (BatchNorm2D, Conv2D, DataLoader, Dense, Dropout, Flatten, ReLU, Sequential,
                    SoftmaxCrossEntropy, Softmax)
from minidl.checkpoint import build_layer
from minidl.data import datasets, read_idx
from minidl.ext import explain
from minidl.ext.zoo import mnist_cnn
from minidl.layers.base import layer_spec

from conftest import GPU, NO_GPU_REASON, make_trainer, write_fake_dataset
from interop_models import build


def as_float64(model):
    """A float64 copy of ``model``: its config with every dtype float64, then its weights."""
    def widen(value):
        if isinstance(value, dict):
            return {k: ("float64" if k == "dtype" and v else widen(v)) for k, v in value.items()}
        return [widen(v) for v in value] if isinstance(value, list) else value
    wide = build_layer(widen(layer_spec(model)))
    wide.load_state_dict(model.state_dict())
    return wide.eval()


def float64_model(name):
    """The zoo model ``name`` ("cnn", "lenet5", "resnet") in float64 with random batch-norm
    statistics (tests/interop_models.py), and 4 inputs."""
    model, x = build(name)
    return as_float64(model), x[:4].astype(np.float64)


def last_4d_layer(model, x):
    shape, found = x.shape, None
    for i, layer in enumerate(model.layers):
        shape = layer.output_shape(shape)
        found = i if len(shape) == 4 else found
    return found


def assert_equal_to_1e9(actual, expected):
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-9 * scale)


# -- against PyTorch's autograd ------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn", "lenet5", "resnet"])
def test_saliency_and_grad_cam_equal_torch_autograd(name, torch_reference):
    """Same weights through minidl.ext.pytorch.to_torch, float64: the class score's
    gradient by autograd, and Grad-CAM from autograd's gradient at the layer's output."""
    model, x = float64_model(name)
    targets = np.arange(len(x)) % 10
    k = last_4d_layer(model, x)

    def compute(torch):
        from torch.nn.functional import interpolate
        from minidl.ext.pytorch import to_torch
        head, tail = to_torch(model[:k + 1]).eval(), to_torch(model[k + 1:]).eval()
        xt = torch.from_numpy(x).requires_grad_(True)
        scores = tail(head(xt))
        scores.gather(1, scores.argmax(1, keepdim=True)).sum().backward()
        a = head(torch.from_numpy(x))
        a.retain_grad()
        tail(a).gather(1, torch.from_numpy(targets)[:, None]).sum().backward()
        cam = torch.relu((a.grad.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))
        up = interpolate(cam[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)
        return {"saliency": xt.grad.numpy(), "grad_cam": up[:, 0].detach().numpy()}

    expected = torch_reference(compute)
    assert_equal_to_1e9(explain.saliency(model, x), expected["saliency"])
    assert_equal_to_1e9(explain.grad_cam(model, x, target=targets), expected["grad_cam"])
    assert_equal_to_1e9(explain.grad_cam(model, x, target=targets, layer=k),
                        expected["grad_cam"])


def test_saliency_equals_finite_differences_through_residual_and_concat():
    """d y[n, t] / d x by central differences, at pixels of every sample, on a model of
    nested Residual and Concat blocks (tests/interop_models.py)."""
    model, x = build("branches")
    model, x = as_float64(model), x[:3].astype(np.float64)
    targets = [4, 0, 2]
    grad = explain.saliency(model, x, target=targets)
    rng, eps = np.random.default_rng(1), 1e-6
    for n, t in enumerate(targets):
        for _ in range(5):
            pixel = (n,) + tuple(rng.integers(0, s) for s in x.shape[1:])
            up, down = x.copy(), x.copy()
            up[pixel] += eps
            down[pixel] -= eps
            numeric = (model.predict(up)[n, t] - model.predict(down)[n, t]) / (2 * eps)
            assert grad[pixel] == pytest.approx(numeric, rel=1e-5, abs=1e-8)


# -- the four maps, each on its own -------------------------------------------------------
def test_saliency_in_float32_matches_float64():
    model32, x = build("cnn")
    model32.eval()
    s32 = explain.saliency(model32, x, target=3)
    assert s32.dtype == np.float32 and s32.shape == x.shape
    s64 = explain.saliency(as_float64(model32), x.astype(np.float64), target=3)
    np.testing.assert_allclose(s32, s64, rtol=1e-3, atol=1e-4 * float(np.abs(s64).max()))


def test_smoothgrad_is_the_mean_saliency_over_its_noise():
    model, x = float64_model("lenet5")
    predicted = model.predict(x).argmax(axis=1)
    rng = np.random.default_rng(5)      # the noise smoothgrad draws from seed=5
    spread = 0.2 * (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))[:, None, None, None]
    expected = np.mean([explain.saliency(model, x + rng.standard_normal(x.shape) * spread,
                                         target=predicted) for _ in range(3)], axis=0)
    got = explain.smoothgrad(model, x, n=3, sigma=0.2, seed=5)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(explain.smoothgrad(model, x, n=1, sigma=0.0),
                                  explain.saliency(model, x))
    assert not np.allclose(got, explain.smoothgrad(model, x, n=3, sigma=0.2, seed=6))


def occlusion_by_loops(model, x, target, window, stride, fill):
    """The occlusion map, one patch and one pixel at a time."""
    n, _, h, w = x.shape
    p = lambda images: (lambda e: e / e.sum(1, keepdims=True))(np.exp(model.predict(images)))
    drop_sum, count = np.zeros((n, h, w)), np.zeros((h, w))
    rows = sorted(set(range(0, h - window + 1, stride)) | {h - window})
    cols = sorted(set(range(0, w - window + 1, stride)) | {w - window})
    for i in rows:
        for j in cols:
            covered = x.copy()
            for k in range(n):
                covered[k, :, i:i + window, j:j + window] = x[k].mean() if fill is None else fill
            drop = p(x)[np.arange(n), target] - p(covered)[np.arange(n), target]
            drop_sum[:, i:i + window, j:j + window] += drop[:, None, None]
            count[i:i + window, j:j + window] += 1
    return drop_sum / count


@pytest.mark.parametrize("window, stride, fill", [(4, 2, None), (5, 3, 0.0), (3, 3, 1.5)])
def test_occlusion_equals_a_loop_over_the_patches(window, stride, fill):
    minidl.manual_seed(3)
    model = Sequential(Conv2D(2, 4, 3, activation="relu", dtype=np.float64), Flatten(),
                       Dense(4 * 9 * 8, 5, dtype=np.float64)).eval()
    x = np.random.default_rng(2).standard_normal((3, 2, 11, 10))
    target = [1, 4, 0]
    got = explain.occlusion(model, x, target=target, window=window, stride=stride, fill=fill,
                            batch_size=7)
    assert got.shape == (3, 11, 10)
    np.testing.assert_allclose(got, occlusion_by_loops(model, x, target, window, stride, fill),
                               rtol=1e-10, atol=1e-14)


def test_occlusion_of_a_model_ending_in_softmax_reads_its_probabilities():
    minidl.manual_seed(3)
    logits = Sequential(Conv2D(1, 2, 3, dtype=np.float64), Flatten(),
                        Dense(2 * 6 * 6, 3, dtype=np.float64))
    probabilities = Sequential(*logits.layers, Softmax())
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    np.testing.assert_allclose(explain.occlusion(probabilities, x),
                               explain.occlusion(logits, x), rtol=1e-12, atol=1e-15)


def test_grad_cam_names_a_layer_by_index_name_or_object_nested_too():
    model, x = float64_model("resnet")
    by_index = explain.grad_cam(model, x, layer=-3)
    np.testing.assert_array_equal(by_index, explain.grad_cam(model, x))  # the last 4-D one
    np.testing.assert_array_equal(by_index, explain.grad_cam(model, x, layer=str(len(model) - 3)))
    nested = model[5].block[3]                   # a conv inside the third Residual
    cam = explain.grad_cam(model, x, layer=nested)
    np.testing.assert_array_equal(cam, explain.grad_cam(model, x, layer="5.block.3"))
    assert cam.shape == (4, 28, 28) and cam.min() >= 0 and cam.max() > 0
    assert not np.allclose(cam, by_index)


def test_upsample_keeps_a_constant_and_matches_block_averages():
    maps = np.random.default_rng(0).standard_normal((2, 3, 5))
    np.testing.assert_allclose(explain.upsample(np.full((1, 7, 7), 2.5), (28, 28)), 2.5)
    np.testing.assert_allclose(explain.upsample(maps, (3, 5)), maps)     # same size: as is
    # downsampling by 2 with half-pixel centres averages each 2x2 block
    big = np.random.default_rng(1).standard_normal((1, 6, 8))
    blocks = big.reshape(1, 3, 2, 4, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(explain.upsample(big, (3, 4)), blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason=NO_GPU_REASON)
def test_the_maps_on_cupy_equal_those_on_numpy():
    model, x = float64_model("resnet")
    methods = {"saliency": {}, "smoothgrad": {"n": 3}, "grad_cam": {"layer": "5.block.3"},
               "occlusion": {"window": 7, "stride": 7}}
    target = [1, 2, 3, 4]
    expected = {name: getattr(explain, name)(model, x, target=target, **kw)
                for name, kw in methods.items()}
    with minidl.set_backend("cupy"):
        model.to("gpu")
        for name, kw in methods.items():
            got = getattr(explain, name)(model, minidl.to_device(x, "gpu"), target=target, **kw)
            assert minidl.backend.device_of(got) == "gpu"
            scale = float(np.abs(expected[name]).max())
            np.testing.assert_allclose(minidl.to_numpy(got), expected[name], rtol=1e-9,
                                       atol=1e-12 * scale, err_msg=name)


# -- the model is left as it was --------------------------------------------------------------
@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "grad_cam", "occlusion"])
def test_the_model_is_left_as_it_was(method):
    """Explained between a training step's forward and backward, the step's gradients,
    the running statistics, the dropout stream and every training flag are unchanged."""
    minidl.manual_seed(0)
    model = Sequential(Conv2D(1, 4, 3, padding=1, bias=False), BatchNorm2D(4), ReLU(),
                       Flatten(), Dropout(0.5, seed=1), Dense(4 * 8 * 8, 3))
    twin = copy.deepcopy(model)
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0])
    grads = []
    for m, explain_between in ((model, True), (twin, False)):
        loss = SoftmaxCrossEntropy()
        loss.forward(m.forward(x, training=True), y)
        if explain_between:
            getattr(explain, method)(m, x[:2], **({"n": 2} if method == "smoothgrad" else {}))
            assert m.training and all(layer.training for layer in m.layers)
        m.backward(loss.backward())
        grads.append(m.state_dict() | {k: p.grad for k, p in m.named_parameters()})
    for key, value in grads[1].items():
        np.testing.assert_array_equal(grads[0][key], value, err_msg=key)
    assert model[4].rng.bit_generator.state == twin[4].rng.bit_generator.state


def test_gradients_already_there_are_kept():
    model, x = float64_model("lenet5")
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    explain.saliency(model, x)
    explain.grad_cam(model, x)
    assert all((p.grad == 1).all() for p in model.parameters())


# -- bad input: clear errors ----------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    ({"target": 10}, ValueError, r"target 10 is out of range: the model has 10 classes \(0 to 9\)"),
    ({"target": -1}, ValueError, "target -1 is out of range"),
    ({"target": [1, 2]}, ValueError, "target has 2 classes for 4 inputs"),
    ({"target": 1.5}, TypeError, "target must be None .* got 1.5"),
    ({"target": [[1]]}, TypeError, "target must be None"),
])
def test_bad_target_is_a_clear_error(kwargs, error, message):
    model, x = float64_model("cnn")
    for method in (explain.saliency, explain.smoothgrad, explain.grad_cam, explain.occlusion):
        with pytest.raises(error, match=f"{method.__name__}: {message}"):
            method(model, x, **kwargs)


@pytest.mark.parametrize("layer, error, message", [
    (12, ValueError, "layer 12 is out of range: the model has 12 layers"),
    ("9", ValueError, r"layer 9 \(Dense\) gives an output of shape \(4, 128\); Grad-CAM "
                      r"needs a 4-D one"),
    ("6.block", ValueError, "no layer named '6.block'"),
    (ReLU(), ValueError, "the layer ReLU given is not in the model"),
    (2.0, TypeError, "layer must be None, an int, a name"),
])
def test_bad_grad_cam_layer_names_the_layers_that_exist(layer, error, message):
    model, x = float64_model("cnn")
    with pytest.raises(error, match=f"grad_cam: {message}") as caught:
        explain.grad_cam(model, x, layer=layer)
    if error is ValueError:
        assert "the layers with a 4-D output are 0 (Conv2D), 1 (BatchNorm2D), 2 (ReLU), " \
               "3 (MaxPool2D), 4 (Conv2D), 5 (BatchNorm2D), 6 (ReLU), 7 (MaxPool2D)" \
               in str(caught.value)


def test_bad_model_or_input_is_a_clear_error():
    model, x = float64_model("lenet5")
    with pytest.raises(TypeError, match="saliency: expected a minidl Sequential, got Conv2D"):
        explain.saliency(model[0], x)
    with pytest.raises(TypeError, match="grad_cam: expected a float input .* got dtype uint8"):
        explain.grad_cam(model, (x * 0).astype(np.uint8))
    with pytest.raises(TypeError, match="occlusion: expected a numpy or cupy array, got list"):
        explain.occlusion(model, x.tolist())
    with pytest.raises(ValueError, match=r"saliency: expected a batch .* got shape \(0, 1, 28"):
        explain.saliency(model, x[:0])
    with pytest.raises(ValueError, match=r"class scores of shape \(N, classes\), got an output "
                                         r"of shape \(4, 6, 28, 28\)"):
        explain.saliency(model[:1], x)
    with pytest.raises(ValueError, match=r"grad_cam: no layer of the model gives a 4-D output"):
        explain.grad_cam(Sequential(Flatten(), Dense(784, 3, dtype=np.float64)), x)
    for method in (explain.grad_cam, explain.occlusion):
        with pytest.raises(ValueError, match=rf"{method.__name__}: expected images x of shape "
                                             r"\(N, C, H, W\), got \(4, 784\)"):
            method(Sequential(Dense(784, 3, dtype=np.float64)), x.reshape(4, -1))
    with pytest.raises(ValueError, match=r"occlusion: window \(30, 30\) is larger than"):
        explain.occlusion(model, x, window=30)
    with pytest.raises(ValueError, match="smoothgrad: n must be >= 1, got 0"):
        explain.smoothgrad(model, x, n=0)


# -- sanity checks on a trained model ----------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """mnist_cnn trained for 3 epochs on 600 stripe images (tests/conftest.py's fake MNIST:
    the class is the row of a bright stripe), and the 100 test images, as floats."""
    root = tmp_path_factory.mktemp("stripes")
    write_fake_dataset(root, "mnist", n_train=600, n_test=100)
    x_train, y_train, x_test, y_test = (
        read_idx(root / "mnist" / f"{name}.gz") for name in (*datasets.SPLITS["train"],
                                                             *datasets.SPLITS["test"]))
    scale = lambda images: (images[:, None] / 255.0).astype(np.float32)
    minidl.manual_seed(0)
    model = mnist_cnn()
    make_trainer(model, lr=2e-3).fit(DataLoader(scale(x_train), y_train.astype(np.int64), 32),
                                     epochs=3)
    model.eval()
    x = scale(x_test)
    assert (model.predict(x).argmax(axis=1) == y_test).mean() > 0.9
    return model, x


def rank_correlation(a, b):
    """Spearman's rank correlation of two arrays, flattened."""
    ranks = [np.argsort(np.argsort(v.ravel())) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


@pytest.mark.slow
def test_randomised_weights_change_the_saliency(trained):
    """Adebayo et al.'s model-randomisation test: a map that survives the loss of the
    learned weights explains the input, not the model. |saliency| of the trained model
    against the same architecture with fresh random weights: low rank correlation,
    while the trained model's maps agree with themselves."""
    model, x = trained
    minidl.manual_seed(99)
    random = mnist_cnn().eval()
    trained_maps = np.abs(explain.saliency(model, x))
    random_maps = np.abs(explain.saliency(random, x))
    same = [rank_correlation(trained_maps[k], np.abs(explain.saliency(model, x[k:k + 1])))
            for k in range(5)]
    across = [rank_correlation(t, r) for t, r in zip(trained_maps, random_maps)]
    assert min(same) > 0.999
    assert np.mean(across) < 0.5, np.mean(across)


@pytest.mark.slow
def test_covering_the_grad_cam_top_quarter_hurts_more_than_a_random_quarter(trained):
    """Over the 100 test images: the target (predicted) class's probability falls more
    when the quarter of pixels that Grad-CAM ranks highest is set to the image's mean
    than when a random quarter is."""
    model, x = trained
    n, pixels = len(x), x[0].size
    quarter = pixels // 4
    cams = explain.grad_cam(model, x).reshape(n, -1)
    rng = np.random.default_rng(0)
    masks = {"grad_cam": np.argsort(-cams, axis=1)[:, :quarter],
             "random": np.stack([rng.permutation(pixels)[:quarter] for _ in range(n)])}
    p = lambda images: (lambda e: e / e.sum(1, keepdims=True))(np.exp(model.predict(images)))
    predicted = p(x).argmax(axis=1)
    clean = p(x)[np.arange(n), predicted]
    drop = {}
    for name, covered in masks.items():
        flat = x.reshape(n, -1).copy()
        np.put_along_axis(flat, covered, flat.mean(axis=1, keepdims=True), axis=1)
        drop[name] = float(np.mean(clean - p(flat.reshape(x.shape))[np.arange(n), predicted]))
    assert drop["grad_cam"] > drop["random"] + 0.1, drop
