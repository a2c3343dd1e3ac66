"""``minidl explain``: a PNG grid of test images and their maps, beside the checkpoint or
at --out; a missing, special or crafted checkpoint, a bad index, target or model is
one line on stderr, exit 1, and nothing written."""
import os
import re

import matplotlib.image
import pytest

from minidl import Conv2D, Dense, Flatten, Sequential
from minidl import cli
from minidl.ext import plots
from minidl.ext.zoo import mnist_cnn


def explain(*args):
    return cli.main(["explain", *map(str, args)])


def png_size(path):
    """(height, width) in pixels."""
    return matplotlib.image.imread(path).shape[:2]


def test_explain_draws_every_method_beside_the_checkpoint(data_root, tmp_path, capsys):
    mnist_cnn().save(tmp_path / "model.npz")
    assert explain("--checkpoint", tmp_path / "model.npz", "--index", 3, 7,
                   "--data-root", data_root) == 0
    out = tmp_path / "explain.png"
    assert capsys.readouterr().out == (f"saliency, SmoothGrad, Grad-CAM, occlusion of mnist "
                                       f"test images 3, 7 (each image's predicted class) "
                                       f"written to {out}\n")
    height, width = png_size(out)
    assert width > 2 * height        # 2 rows of 5 pictures: the image, then 4 maps


def test_one_method_one_target_at_out(data_root, tmp_path, capsys):
    mnist_cnn().save(tmp_path / "model.npz")
    out = tmp_path / "pictures" / "cam.png"
    assert explain("--checkpoint", tmp_path / "model.npz", "--method", "gradcam", "--target", 4,
                   "--index", 0, 1, 2, "--out", out, "--data-root", data_root) == 0
    assert capsys.readouterr().out.endswith(f"Grad-CAM of mnist test images 0, 1, 2 (class 4) "
                                            f"written to {out}\n")
    height, width = png_size(out)
    assert height > width            # 3 rows of 2 pictures
    assert sorted(os.listdir(tmp_path)) == ["data", "model.npz", "pictures"]


def _fifo(path):
    os.mkfifo(path)


def _folder(path):
    path.mkdir()


def _garbage(path):
    path.write_bytes(b"PK\x03\x04 not a zip at all")


def _saved(model):
    return lambda path: model.save(path)


@pytest.mark.parametrize("make, options, message", [
    (None, [], "model.npz: no checkpoint there"),
    (_folder, [], "model.npz: the checkpoint is not a regular file"),
    (_fifo, [], "model.npz: the checkpoint is not a regular file"),
    (_garbage, [], "checkpoint '.*model.npz': it is corrupt, truncated or not an .npz"),
    (_saved(Sequential(Conv2D(1, 2, 3))), [],
     r"model.npz: the model gives outputs of shape \(8, 2, 26, 26\), not class scores"),
    (_saved(Sequential(Dense(4, 3))), [], r"Dense: expected a 2-D input, got shape \(8, 1, 28"),
    (_saved(mnist_cnn()), ["--index", "5", "100"],
     r"--index 100 is out of range: the mnist test set has 100 images \(0 to 99\)"),
    (_saved(mnist_cnn()), ["--target", "10"],
     r"saliency: target 10 is out of range: the model has 10 classes \(0 to 9\)"),
    (_saved(Sequential(Flatten(), Dense(784, 10))), ["--method", "gradcam"],
     "grad_cam: no layer of the model gives a 4-D output"),
])
def test_a_bad_checkpoint_or_option_is_one_line_and_nothing_written(data_root, tmp_path, capsys,
                                                                    make, options, message):
    checkpoint = tmp_path / "model.npz"
    if make:
        make(checkpoint)
    before = sorted(os.listdir(tmp_path))
    code = explain("--checkpoint", checkpoint, "--data-root", data_root, *options)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("minidl explain: error: ") and re.search(message, err), err
    assert sorted(os.listdir(tmp_path)) == before          # no PNG, no temporary file


@pytest.mark.parametrize("make, message", [
    (lambda path: path.write_text('{"dataset": "../../etc"}'), "run.json: unknown dataset"),
    (os.mkfifo, "run.json: the run.json is not a regular file"),
])
def test_a_crafted_run_json_beside_the_checkpoint_is_named(data_root, tmp_path, capsys, make,
                                                           message):
    mnist_cnn().save(tmp_path / "model.npz")
    make(tmp_path / "run.json")
    assert explain("--checkpoint", tmp_path / "model.npz", "--data-root", data_root) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "explain.png").exists()


def test_without_matplotlib_it_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    assert explain("--checkpoint", tmp_path / "model.npz") == 1
    assert "explain draws with matplotlib: pip install 'minidl[viz]'" in capsys.readouterr().err
