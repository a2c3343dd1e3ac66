"""minidl.ext.plots: the confusion matrix behind confusion_matrix.png. The PNG files of
a run: tests/cli/test_train.py."""
import numpy as np
import pytest

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
