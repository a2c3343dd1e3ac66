"""``minidl lr-find``, after ``minidl train --schedule onecycle``: the loss plot
(lr_find.png) and the suggestion, and the one-cycle rate plot (lr.png); refused options,
out of memory and a cache path that is a file: one line, and no folder left behind."""
import pytest

from minidl import cli
from minidl.cli import lr_find as cli_lr_find
from minidl.cli import train as cli_train


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_onecycle_plots_the_rate_and_lr_find_plots_the_loss(quiet_data_root, tmp_path,
                                                                capsys, monkeypatch):
    monkeypatch.setattr(cli_train, "write_plots", lambda *args: None)   # test_train.py's job
    out = tmp_path / "run"
    assert cli.main(["train", "--limit", "80", "--epochs", "1", "--batch-size", "40",
                     "--schedule", "onecycle", "--data-root", str(quiet_data_root),
                     "--out", str(out), "--quiet"]) == 0
    assert (out / "lr.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    assert cli.main(["lr-find", "--limit", "80", "--steps", "12", "--batch-size", "16",
                     "--data-root", str(quiet_data_root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "steps from lr 1e-07 to" in printed and "the loss fell fastest at lr" in printed
    assert (out / "lr_find.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("options, code, message", [
    (["--start-lr", "1", "--end-lr", "0.1"], 1,
     "minidl lr-find: error: --start-lr 1 and --end-lr 0.1: the range must be finite, with "
     "0 < --start-lr < --end-lr"),
    (["--start-lr", "0"], 1, "with 0 < --start-lr < --end-lr"),
    (["--steps", "1"], 2, "argument --steps: must be at least 2, got 1"),
])
def test_a_refused_option_leaves_no_output_folder(quiet_data_root, tmp_path, capsys, options, code,
                                                  message):
    """lr-find used to create --out first, and leave it empty after the error."""
    out = tmp_path / "new" / "deeper"
    argv = ["lr-find", *options, "--data-root", str(quiet_data_root), "--out", str(out)]
    if code == 2:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    else:
        assert cli.main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_out_of_memory_is_one_line_and_leaves_no_folder(quiet_data_root, tmp_path, capsys,
                                                       monkeypatch):
    """A huge --batch-size used to end in a MemoryError traceback."""
    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 183. GiB for an array")

    monkeypatch.setattr(cli_lr_find, "lr_find", too_big)
    assert cli.main(["lr-find", "--batch-size", "100000000", "--data-root", str(quiet_data_root),
                     "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == (
        "minidl lr-find: error: out of memory (Unable to allocate 183. GiB for an array); a "
        "smaller --batch-size (or --limit) needs less\n")
    assert not (tmp_path / "run").exists()


def test_a_cache_path_that_is_a_file_is_named(tmp_path, capsys):
    """It used to say "[Errno 17] File exists"."""
    (tmp_path / "cache").write_text("")
    for root in (tmp_path / "cache", tmp_path / "cache" / "deeper"):
        assert cli.main(["lr-find", "--data-root", str(root), "--out", str(tmp_path / "o")]) == 1
        assert capsys.readouterr().err == (
            f"minidl lr-find: error: the dataset cache {root / 'mnist'} cannot be made: "
            f"{tmp_path / 'cache'} is a file, not a folder (--data-root or $MINIDL_DATA)\n")
    assert not (tmp_path / "o").exists()
