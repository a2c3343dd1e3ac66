"""The layer registry (minidl/layers/registry.py): a user's own layer, registered once,
is saved and rebuilt like a built-in one; nothing unregistered is ever built."""
import json

import numpy as np
import pytest

import minidl
from minidl import Dense, Layer, Parameter, ReLU, Sequential
from minidl.layers import registry
from minidl.layers.registry import layer_class, register_layer


@register_layer
class Scale(Layer):
    """y = x * w per feature (w a trainable vector): a user's own layer with a parameter
    and a constructor argument, written as docs/extending.md teaches."""

    def __init__(self, features, init=1.0, dtype=minidl.backend.float32):
        super().__init__(dtype)
        self.features, self.init = features, init
        self.weight = Parameter(np.full(features, init, dtype=self.dtype), "weight")

    def forward(self, x, training=True):
        x = self._as_input(x, ndim=2)
        self.cache = {"x": x, "y_shape": x.shape}
        return x * self.weight.data

    def backward(self, dy):
        x = self._checked_cache(dy)["x"]
        self.weight.accumulate_grad((dy * x).sum(axis=0))
        return dy * self.weight.data

    def get_config(self):
        return {**super().get_config(), "features": self.features, "init": self.init}


def test_a_users_layer_round_trips_through_save_and_load_model(tmp_path):
    model = Sequential(Dense(4, 6), Scale(6, init=0.5), ReLU(), Dense(6, 3))
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                             minidl.SGD(model.parameters(), lr=0.1), verbose=0)
    trainer.fit(minidl.DataLoader(x, np.arange(5) % 3, 5), epochs=3)   # Scale's w moves
    model.save(tmp_path / "model.npz")
    rebuilt = minidl.load_model(tmp_path / "model.npz")
    assert type(rebuilt[1]) is Scale and rebuilt[1].init == 0.5
    np.testing.assert_array_equal(rebuilt.predict(x), model.predict(x))
    assert not np.allclose(rebuilt[1].weight.data, 0.5)


def test_a_file_cannot_name_an_unregistered_class(tmp_path):
    class Unlisted(Scale):      # a subclass is a class of its own: not registered
        pass

    Sequential(Unlisted(3)).save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match=r"unknown layer class 'Unlisted' \(registered: .*"
                                         r"Scale.*@minidl.register_layer"):
        minidl.load_model(tmp_path / "model.npz")
    # nor a module path: names are looked up in the registry, never imported
    spec = {"class": "os.system", "config": {}}
    with pytest.raises(ValueError, match="unknown layer class 'os.system'"):
        minidl.checkpoint.build_layer(spec)


def test_every_builtin_layer_is_registered_once():
    names = registry.registered_layers()
    for name in ("Conv2D", "Dense", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "BatchNorm1D",
                 "BatchNorm2D", "Dropout", "Flatten", "ReLU", "LeakyReLU", "Sigmoid", "Tanh",
                 "Softmax", "Identity", "Residual", "Concat", "Sequential"):
        assert names[name] is getattr(minidl, name)
        assert layer_class(name) is getattr(minidl, name)


def test_registering_is_checked():
    with pytest.raises(TypeError, match="expected a subclass of minidl's Layer"):
        register_layer(dict)

    class Dense(Layer):         # another class under a registered name
        pass

    with pytest.raises(ValueError, match="a layer class named 'Dense' is already registered"):
        register_layer(Dense)
    assert register_layer(Scale) is Scale      # the same class again: fine
    with pytest.raises(ValueError, match="register the layer class"):
        registry.register_converter("onnx", Dense, object())


def test_converters_live_beside_the_class():
    from minidl.ext import onnx, pytorch  # importing a bridge registers its converters
    assert registry.converters("onnx").get(minidl.Conv2D).ops == ("Conv",)
    assert registry.converters("torch").get(minidl.Dense).torch_classes == ("Linear",)
    assert registry.converters("onnx").get(Scale) is None
    onnx.register(Scale, lambda graph, layer, x, name: graph.node("Mul", [x], name))
    try:
        assert registry.converters("onnx").get(Scale).export is not None
    finally:
        del registry._CONVERTERS["onnx"][Scale]
    assert json.dumps(minidl.layers.base.layer_spec(Scale(2)))
    assert pytorch.TorchConverter is not None
