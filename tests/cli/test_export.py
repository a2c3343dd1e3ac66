"""``minidl export``: a checkpoint written as ONNX (a trained model keeps its accuracy
in ONNX Runtime; a resnet's layers come from the file), its output named and its
metadata carried over, errors without a traceback, and an earlier file kept when an
export fails."""
import json
import sys

import numpy as np
import pytest

import minidl
import minidl.checkpoint
import minidl.ext.plots
from minidl import cli
from minidl.cli import recipe
from minidl.data import datasets

from conftest import write_fake_dataset
from interop_models import assert_close, build, needs_onnx, run_onnx


@needs_onnx
@pytest.mark.slow
def test_trained_model_has_the_same_accuracy_in_onnx_runtime(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    monkeypatch.setitem(datasets.CHECKSUMS, "mnist", write_fake_dataset(root, "mnist", 200))
    monkeypatch.setattr(minidl.ext.plots, "available", lambda: False)      # no plots: faster
    out = tmp_path / "run"
    # no augmentation: a shift moves the stripe that tells the fake classes apart
    assert cli.main(["train", "--limit", "160", "--epochs", "1", "--batch-size", "32",
                     "--no-augment", "--data-root", str(root), "--out", str(out),
                     "--quiet"]) == 0
    assert cli.main(["export", "--checkpoint", str(out / "model.npz"),
                     "--onnx", str(out / "model.onnx")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    minidl_accuracy = float(printed[-2].split()[-1])      # "test accuracy: 0.xxxx"
    assert printed[-1].endswith(f"written to {out / 'model.onnx'}")
    x_test, y_test = datasets.mnist("test", root=root)
    images = recipe.to_float(x_test)
    labels = run_onnx(out / "model.onnx", images).argmax(axis=1)
    np.testing.assert_array_equal(labels, recipe.predict_labels(
        minidl.ext.zoo.mnist_cnn().load(out / "model.npz"), x_test))
    assert round(float(np.mean(labels == y_test)), 4) == minidl_accuracy
    assert minidl_accuracy > 0.5          # five steps do learn the stripes: a real model
    # what the checkpoint says of its input and classes, the ONNX file says too
    import onnx
    props = {p.key: json.loads(p.value) for p in onnx.load(out / "model.onnx").metadata_props}
    assert props == minidl.checkpoint.load_metadata(out / "model.npz") == {
        "dataset": "mnist", "input": {"shape": [1, 28, 28], "dtype": "uint8"},
        "preprocessing": {"scale": 1 / 255, "mean": [0.0], "std": [1.0]},
        "class_names": [str(k) for k in range(10)]}


@needs_onnx
def test_cli_exports_a_resnet_checkpoint(tmp_path, capsys):
    model, x = build("resnet", width=4)
    model.save(tmp_path / "model.npz")          # no run.json: the layers come from the file
    assert cli.main(["export", "--checkpoint", str(tmp_path / "model.npz"),
                     "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert_close(run_onnx(tmp_path / "m.onnx", x), model.predict(x))


def test_cli_export_errors_without_traceback(tmp_path, capsys, monkeypatch):
    code = cli.main(["export", "--checkpoint", str(tmp_path / "none.npz"),
                     "--onnx", str(tmp_path / "m.onnx")])
    assert code == 1
    assert "minidl export: error: checkpoint" in capsys.readouterr().err
    minidl.ext.zoo.lenet5().save(tmp_path / "model.npz")
    monkeypatch.setitem(sys.modules, "onnx", None)
    code = cli.main(["export", "--checkpoint", str(tmp_path / "model.npz"), "--model", "lenet5",
                     "--onnx", str(tmp_path / "m.onnx")])
    assert code == 1
    assert "needs the onnx package" in capsys.readouterr().err


@needs_onnx
def test_export_names_the_output_and_carries_the_metadata(tmp_path):
    """The output used to be named after its last node ("11"), and the file held neither
    the preprocessing nor the class names."""
    import onnx
    import onnxruntime
    model, x = build("cnn")
    metadata = {"class_names": ["a", "b"], "preprocessing": {"scale": 0.5}}
    model.save(tmp_path / "model.npz", metadata=metadata)
    assert cli.main(["export", "--checkpoint", str(tmp_path / "model.npz"),
                     "--onnx", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert [t.name for t in session.get_inputs()] == ["input"]
    assert [t.name for t in session.get_outputs()] == ["output"]
    proto = onnx.load(tmp_path / "m.onnx")
    assert {p.key: json.loads(p.value) for p in proto.metadata_props} == metadata
    assert_close(run_onnx(tmp_path / "m.onnx", x), model.predict(x))


@needs_onnx
def test_cli_export_keeps_the_earlier_onnx_file_when_it_fails(tmp_path, capsys, monkeypatch):
    import errno
    import onnx
    minidl.ext.zoo.lenet5().save(tmp_path / "model.npz")
    export = ["export", "--checkpoint", str(tmp_path / "model.npz"),
              "--onnx", str(tmp_path / "m.onnx")]
    assert cli.main(export) == 0
    before = (tmp_path / "m.onnx").read_bytes()
    capsys.readouterr()                 # what the first export printed
    # a crafted checkpoint: a 1 GB layer in a small file
    np.savez(tmp_path / "model.npz", __model__=np.array([json.dumps({
        "class": "Sequential", "config": {"layers": [{"class": "Dense", "config": {
            "in_features": 16000, "out_features": 16000}}]}})]))
    assert cli.main(export) == 1
    err = capsys.readouterr().err
    assert err == (f"minidl export: error: checkpoint {str(tmp_path / 'model.npz')!r}: has no "
                   f"array '0.weight'\n")
    # the disk fills up while the new file is written
    minidl.ext.zoo.lenet5().save(tmp_path / "model.npz")

    def full_disk(proto, f, *args, **kwargs):
        f.write(proto.SerializeToString()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(onnx, "save_model", full_disk)
    assert cli.main(export) == 1
    assert capsys.readouterr().err == "minidl export: error: [Errno 28] No space left on device\n"
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "model.npz"]
