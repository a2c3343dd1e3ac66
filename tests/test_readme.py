"""The README's Python example runs as written (on a small generated MNIST)."""
import pathlib
import re

import numpy as np

import minidl.data

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_example():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    return blocks[0]


def test_readme_example_builds_trains_evaluates_saves_reloads(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)

    def small_mnist(split="train", root=None):
        n = 256 if split == "train" else 64
        return (rng.integers(0, 256, (n, 1, 28, 28)).astype(np.uint8),
                rng.integers(0, 10, n).astype(np.int64))

    monkeypatch.setattr(minidl.data, "mnist", small_mnist)
    monkeypatch.chdir(tmp_path)
    code = readme_example()
    assert len(code.strip().splitlines()) <= 20
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "Total params" in printed and "'accuracy'" in printed
    assert (tmp_path / "cnn.npz").exists()
