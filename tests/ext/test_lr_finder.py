"""The LR range test (minidl/ext/lr_finder.py): the rate grows geometrically, the model
and the optimizer are left as they were, and the suggestion lies inside the range; NaN
in the data is blamed on the data. ``minidl lr-find``: tests/cli/test_lr_find.py."""
import numpy as np
import pytest

from minidl import Adam, DataLoader, Dense, Flatten, Sequential, SoftmaxCrossEntropy, Trainer
from minidl.ext.lr_finder import lr_find, suggest_lr

from conftest import fake_images


def test_lr_find_grows_the_rate_and_leaves_the_model_as_it_was():
    x, y = fake_images()
    model = Sequential(Flatten(), Dense(64, 3))
    optimizer = Adam(model.parameters(), lr=1e-3)
    trainer = Trainer(model, SoftmaxCrossEntropy(), optimizer, verbose=0)
    before = model.state_dict()
    lrs, losses = lr_find(trainer, DataLoader(x / 255, y, 8), start_lr=1e-5, end_lr=10.0,
                          steps=30)
    assert lrs[0] == pytest.approx(1e-5) and len(lrs) == len(losses) <= 30
    assert np.all(np.diff(np.log(lrs)) == pytest.approx(np.log(1e6) / 29))
    assert min(losses) < losses[0]                    # it learned at some rate
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    assert optimizer.lr == 1e-3 and optimizer.state == {}
    assert lrs[0] < suggest_lr(lrs, losses) < lrs[-1]
    with pytest.raises(ValueError, match="lr_find: end_lr must be a finite number > 1, got 0.1"):
        lr_find(trainer, DataLoader(x, y, 8), start_lr=1.0, end_lr=0.1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # numpy's note on the NaN and inf
def test_nan_in_the_data_is_named_as_such_not_as_a_rate_problem():
    """A NaN pixel used to end the test as if the rate had diverged."""
    x, y = fake_images()
    x = (x / 255).astype(np.float32)
    x[20, 0, 3, 3] = np.nan                             # in the third batch of 8
    model = Sequential(Flatten(), Dense(64, 3))
    trainer = Trainer(model, SoftmaxCrossEntropy(), Adam(model.parameters()), verbose=0)
    before = model.state_dict()
    with pytest.raises(ValueError, match="lr_find: batch 3 of the data holds NaN or inf: the "
                                         "data, not the learning rate, is at fault"):
        lr_find(trainer, DataLoader(x, y, 8, shuffle=False), steps=10)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    # finite data whose loss is not finite from the start: the model, not the rate
    model[1].weight.data[...] = np.inf
    with pytest.raises(ValueError, match="the loss is not finite from the first step on, at "
                                         "the lowest rate 1e-07"):
        lr_find(trainer, DataLoader(x[:16], y[:16], 8, shuffle=False), steps=10)
