"""The examples run (fast, on generated data), and the docs stay true to the code:
extending.md is exactly examples/custom_layer.py, every code block marked
``<!-- from FILE -->`` still appears in FILE, links resolve, and api.md names every
public name."""
import importlib.util
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import minidl
import minidl.checkpoint
import minidl.cli
import minidl.data
import minidl.layers.registry
import minidl.summary
from minidl.data import datasets
from minidl.ext import (dataset_sources, distributed, explain, lr_finder, onnx, plots, pytorch,
                        recorder, report, resume, sync_batchnorm, transport, zoo)

from conftest import write_fake_dataset

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ACCURACY_LINE = re.compile(r"test accuracy: [01]\.\d{4}")


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """MNIST and Fashion-MNIST look-alikes, accepted as official for this test."""
    root = tmp_path / "data"
    for dataset in ("mnist", "fashion-mnist"):
        monkeypatch.setitem(datasets.CHECKSUMS, dataset, write_fake_dataset(root, dataset))
    monkeypatch.chdir(tmp_path)            # default output folders land in tmp
    return root


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def assert_png(path):
    data = Path(path).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000, path


# -- the examples -----------------------------------------------------------------------
def test_train_mnist(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    accuracy = load_example("train_mnist").main(
        ["--epochs", "1", "--limit", "128", "--data-root", str(data_root), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Total params" in printed and "Recept. field" in printed     # the summary
    assert printed.strip().splitlines()[-1] == f"test accuracy: {accuracy:.4f}"
    assert ACCURACY_LINE.fullmatch(printed.strip().splitlines()[-1])
    assert (out / "model.npz").exists()


def test_custom_layer(data_root, tmp_path, capsys):
    module = load_example("custom_layer")
    out = tmp_path / "custom"
    accuracy = module.main(["--epochs", "1", "--limit", "128", "--data-root", str(data_root),
                            "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("gradcheck stride=") == 3
    assert "forward vs Conv2D" in printed
    assert "DepthwiseConv2D" in printed and "8x8" in printed   # in the summary table
    lines = printed.strip().splitlines()
    assert lines[-2] == (f"rebuilt from {out / 'depthwise_cnn.npz'}: DepthwiseConv2D, "
                         f"same predictions: True")            # saved, then load_model
    assert lines[-1] == f"test accuracy: {accuracy:.4f}"


@pytest.mark.parametrize("bug", [
    ("dx_slab += dy", "dx_slab[...] = dy"),                      # '=' where '+=' is needed
    ("slab(x_pad, m, l, self.stride, out_hw)).sum",
     "slab(x_pad, l, m, self.stride, out_hw)).sum"),                  # m, l swapped
])
def test_custom_layer_checks_catch_the_bugs_extending_md_suggests(bug):
    """The tutorial's checks are real: make the breakages docs/extending.md suggests,
    and check_gradients fails."""
    source = (EXAMPLES / "custom_layer.py").read_text()
    assert source.count(bug[0]) == 1
    namespace = {"__name__": "example_custom_layer"}   # registers as the example does
    exec(compile(source.replace(*bug), "broken_custom_layer.py", "exec"), namespace)
    with pytest.raises(AssertionError, match="backward disagrees"):
        namespace["check_gradients"]()


def test_custom_layer_on_its_own():
    layer = load_example("custom_layer").DepthwiseConv2D(2, 3, stride=2, padding=1,
                                                         dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 6))
    assert layer.forward(x).shape == layer.output_shape(x.shape) == (1, 2, 3, 3)
    assert minidl.gradcheck(layer, x) < 1e-6
    assert repr(layer) == "DepthwiseConv2D(2, kernel_size=3, stride=2, padding=1)"


def test_inspect_mnist(data_root, tmp_path, capsys):
    out = tmp_path / "inspect"
    module = load_example("inspect_mnist")
    history = module.main(
        ["--epochs", "2", "--limit", "64", "--data-root", str(data_root), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "gradient flowing back through the layers:" in printed
    flow = [line.split()[0] for line in printed.splitlines() if "|dL/dy|" in line]
    model = module.mnist_cnn()
    assert flow == [type(layer).__name__ for layer in reversed(model.layers)]  # backward order
    for name in ("filters.png", "feature_maps.png", "gradients.png"):
        assert_png(out / name)
    table = (out / "activations.txt").read_text()
    assert "dead ReLU" in table and "2:ReLU" in table
    assert history.epochs == 2
    assert len(history["grad_norm/0.weight"]) == 2 and len(history["act_mean/2:ReLU"]) == 2


def test_fashion_mnist(data_root, tmp_path, capsys):
    out = tmp_path / "fashion"
    accuracy = load_example("fashion_mnist").main(
        ["--epochs", "1", "--limit", "160", "--data-root", str(data_root), "--out", str(out)])
    assert last_line(capsys) == f"test accuracy: {accuracy:.4f}"
    assert (out / "best.npz").exists()
    for name in ("confusion_matrix.png", "curves.png"):
        assert_png(out / name)


def test_autoencoder_mnist(data_root, tmp_path, capsys):
    """The reconstruction loss falls, and the PNG of inputs above reconstructions is written."""
    out = tmp_path / "autoencoder"
    before, after = load_example("autoencoder_mnist").main(
        ["--epochs", "2", "--limit", "256", "--data-root", str(data_root), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "ConvTranspose2D" in printed and "(4, 7, 7)" in printed     # the summary: the code
    assert after < 0.8 * before, (before, after)
    assert printed.strip().splitlines()[-1] == (
        f"reconstruction loss (test MSE per pixel): {before:.4f} before training, "
        f"{after:.4f} after")
    assert_png(out / "reconstructions.png")


def test_examples_have_main_and_options():
    for path in sorted(EXAMPLES.glob("*.py")):
        text = path.read_text()
        assert "def main(argv=None):" in text and 'if __name__ == "__main__":' in text, path
        assert "--data-root" in text, path


# -- the docs: code blocks ------------------------------------------------------------------
def code_blocks(markdown, language="python"):
    """(preceding line, code) of each fenced block of ``language``."""
    pattern = re.compile(r"(?:^|\n)([^\n]*)\n```" + language + r"\n(.*?)\n```", re.S)
    return pattern.findall(markdown)


def nonblank_lines(text):
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def test_extending_md_is_exactly_the_custom_layer_example():
    """Every Python block of extending.md, in order, is the example file, all of it."""
    doc = (DOCS / "extending.md").read_text()
    quoted = [line for _, code in code_blocks(doc) for line in nonblank_lines(code)]
    source = nonblank_lines((EXAMPLES / "custom_layer.py").read_text())
    for k, (doc_line, file_line) in enumerate(zip(quoted, source)):
        assert doc_line == file_line, (f"docs/extending.md differs from "
                                       f"examples/custom_layer.py at code line {k + 1}")
    assert len(quoted) == len(source), "docs/extending.md does not quote the whole example"


def test_quoted_code_still_appears_in_its_source_file():
    """A block preceded by <!-- from path --> quotes lines of that file (indentation
    aside): when the code changes, the doc must change with it."""
    marked = 0
    for doc in sorted(DOCS.glob("*.md")):
        for before, code in code_blocks(doc.read_text()):
            match = re.fullmatch(r"<!-- from (\S+) -->", before.strip())
            if not match:
                continue
            marked += 1
            source = {line.strip() for line in (ROOT / match[1]).read_text().splitlines()}
            for line in nonblank_lines(code):
                assert line.strip() in source, (f"{doc.name} quotes a line that is no longer "
                                                f"in {match[1]}: {line.strip()!r}")
    assert marked >= 5


def test_the_check_in_conv2d_md_runs(capsys):
    """conv2d.md's check that ConvTranspose2D is Conv2D's backward: the transpose
    identity to rounding, each forward the other's backward exactly."""
    blocks = [code for before, code in code_blocks((DOCS / "conv2d.md").read_text())
              if "<!-- from" not in before]
    assert len(blocks) == 1
    exec(compile(blocks[0], "conv2d.md", "exec"), {})
    printed = [float(line) for line in capsys.readouterr().out.split()]
    assert len(printed) == 3 and printed[0] < 1e-12 and printed[1:] == [0.0, 0.0]


def test_relative_links_in_docs_resolve():
    for doc in [ROOT / "README.md", EXAMPLES / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target == "docs/performance.md" and doc.name == "README.md":
                continue                   # web links; performance.md is written elsewhere
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_doc_anchors_exist():
    for doc in sorted(DOCS.glob("*.md")):
        for target, anchor in re.findall(r"\]\(([\w.]*\.md)?#([\w-]+)\)", doc.read_text()):
            page = (DOCS / target) if target else doc
            headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{doc.name} links to a missing heading {target}#{anchor}"


# -- the docs: api.md names everything public -------------------------------------------------
def code_text(markdown):
    """The text of every `code span` and fenced block, joined."""
    return " ".join(re.findall(r"```.*?```|`[^`\n]+`", markdown, re.S))


def identifiers_in_code(markdown):
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code_text(markdown)))


def public_names():
    names = {name for name in dir(minidl) if not name.startswith("_")}
    names |= set(minidl.data.__all__)
    for module in (minidl.losses, minidl.optim, minidl.schedulers, minidl.summary,
                   minidl.checkpoint, minidl.layers.registry, recorder, plots, zoo, onnx,
                   pytorch, distributed, sync_batchnorm, transport, resume, lr_finder,
                   dataset_sources, explain, report):
        for name, value in vars(module).items():
            if name.startswith("_") or inspect.ismodule(value):
                continue
            if getattr(value, "__module__", module.__name__) == module.__name__:
                names.add(name)
    return names


def cli_options():
    parser = minidl.cli.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    options = set(subparsers.choices)
    for sub in subparsers.choices.values():
        options |= {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
    return options - {"--help"}


def test_api_md_names_every_public_name():
    text = (DOCS / "api.md").read_text()
    documented = identifiers_in_code(text)
    missing = sorted(name for name in public_names() if name not in documented)
    assert not missing, f"docs/api.md does not mention: {missing}"
    assert len(public_names()) > 60


def test_api_md_documents_every_cli_option():
    code = code_text((DOCS / "api.md").read_text())
    documented = (set(re.findall(r"--[a-z][a-z-]*", code))
                  | set(re.findall(r"minidl ([\w-]+)", code)))
    missing = sorted(cli_options() - documented)
    assert not missing, f"docs/api.md does not document: {missing}"
