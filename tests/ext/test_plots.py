"""minidl.ext.plots: the confusion matrix behind confusion_matrix.png; the gradient
legend, the filters' colour bar, whole epoch ticks, and writes that never leave half a
file. The PNG files of a run: tests/cli/test_train.py."""
import warnings

import numpy as np
import pytest

from minidl import Conv2D, Dense, Flatten, Sequential
from minidl.ext import plots as viz


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    counts = viz.confusion_matrix([0, 2, 2, 1], np.array([0, 1, 2, 1], np.uint8), 3)
    assert counts.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.mark.parametrize("labels, predictions, message", [
    ([-1, 0], [0, 0], r"labels must be in \[0, 3\), got values from -1 to 0"),
    ([0, 1], [0, 3], r"predictions must be in \[0, 3\)"),
    ([0.0, 1.0], [0, 1], "labels must be integers, got float64"),
    ([0, 1], [0], "shape"),
])
def test_confusion_matrix_refuses_labels_outside_the_classes(labels, predictions, message):
    # a label of -1 used to be counted silently in the last row
    with pytest.raises(ValueError, match=message):
        viz.confusion_matrix(np.array(labels), np.array(predictions), 3)


# -- what the pictures show, and how they are written -------------------------------------
@pytest.fixture
def drawn(monkeypatch):
    """The figures the plots draw, kept open instead of written."""
    figures = []
    monkeypatch.setattr(viz, "_save", lambda fig, path, layout=True: figures.append(fig) or path)
    yield figures
    for fig in figures:
        viz._pyplot().close(fig)


def test_gradient_legend_names_the_layer(drawn):
    """The legend used to say "9.weight"."""
    model = Sequential(Conv2D(1, 2, 3), Flatten(), Dense(2 * 4 * 4, 3))
    viz.plot_gradient_norms({"0.weight": [1.0, 2.0], "2.bias": [0.5, 0.1]}, "g.png", model=model)
    viz.plot_gradient_norms({"2.bias": [0.5]}, "g.png")
    labels = [ax.get_legend_handles_labels()[1] for fig in drawn for ax in fig.axes]
    assert labels == [["Conv2D 0 weight", "Dense 2 bias"], ["layer 2 bias"]]


def test_an_empty_gradient_plot_says_so_without_a_warning(drawn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        viz.plot_gradient_norms({}, "g.png")
    (ax,) = drawn[0].axes
    assert ax.get_legend() is None
    assert [t.get_text() for t in ax.texts] == ["no gradient norms recorded"]


def test_the_filters_have_a_colour_bar(drawn):
    viz.plot_filters(np.random.default_rng(0).standard_normal((10, 1, 3, 3)), "f.png")
    fig = drawn[0]
    assert len(fig.axes) == 2 * 8 + 1 and fig.axes[-1].get_ylabel() == "weight"
    assert fig.axes[-1].get_ylim() == pytest.approx(fig.axes[0].images[0].get_clim())


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_epoch_axes_have_whole_ticks(drawn, epochs):
    """One epoch used to get ticks at 0.96, 0.98, 1.00..."""
    viz.plot_history({"loss": [1.0] * epochs, "accuracy": [0.5] * epochs}, "h.png")
    viz.plot_gradient_norms({"0.weight": [1.0] * epochs}, "g.png")
    for fig in drawn:
        fig.canvas.draw()
        for ax in fig.axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_plot_that_fails_to_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "curves.png"
    viz.plot_history({"loss": [1.0, 0.5]}, path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def disk_full(self, *args, **kwargs):
        with open(args[0], "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(viz._pyplot().Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space left"):
        viz.plot_history({"loss": [1.0, 0.2]}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
