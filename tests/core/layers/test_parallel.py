"""minidl/layers/parallel.py: how many threads a memory pass gets (minidl makes
OpenBLAS's idle threads sleep, so its threaded passes run by default), in_pieces
splitting big passes and re-raising a worker's error, and a forked child."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minidl.layers import parallel as parallel_module

ROOT = str(Path(__file__).resolve().parents[3])  # the repository

SHOW = ("from minidl.layers import parallel; "
        "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), parallel.num_threads() > 1)")


@pytest.mark.parametrize("before, user_value, expected", [
    ("", None, "4 True"),                   # the default run: set before numpy loads
    ("", "8", "8 True"),                    # the user's own value is kept
    ("", "100", "100 False"),               # ... also one that keeps threads spinning
    ("import numpy; ", None, "None False"),  # numpy loaded first: too late, nothing set
])
def test_import_sets_the_openblas_timeout_only_before_numpy(before, user_value, expected):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["PYTHONPATH"] = ROOT
    if user_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    code = f"import os; {before}import minidl; {SHOW}"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    if os.cpu_count() == 1 or len(os.sched_getaffinity(0)) < 2:
        expected = expected.replace("True", "False")
    assert " ".join(out) == expected


@pytest.mark.parametrize("timeout, expected", [(None, 1), ("28", 1), ("junk", 1), ("4", 2)])
def test_threads_only_when_openblas_threads_sleep(monkeypatch, timeout, expected):
    """By default the passes stay on one thread unless OPENBLAS_THREAD_TIMEOUT makes
    OpenBLAS's idle threads sleep (else they spin and take the cores)."""
    monkeypatch.setattr(parallel_module, "NUM_THREADS", None)
    monkeypatch.setattr(parallel_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    if timeout is None:
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", timeout)
    assert parallel_module.num_threads() == expected
    monkeypatch.setattr(parallel_module, "NUM_THREADS", 3)
    assert parallel_module.num_threads() == 3


def test_in_pieces_splits_big_passes_and_keeps_small_ones_whole(monkeypatch):
    monkeypatch.setattr(parallel_module, "NUM_THREADS", 3)
    seen = []

    def record(a, b):
        seen.append((a.shape, b.shape))
        b[...] = 2 * a

    a, b = np.arange(7 * 4.0).reshape(2, 7, 2), np.zeros((2, 7, 2))
    parallel_module.in_pieces(record, a, b)                    # small: one call
    assert seen == [((2, 7, 2), (2, 7, 2))]
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)
    seen.clear()
    b[...] = 0
    parallel_module.in_pieces(record, a, b, axis=1)            # 7 channels: 3 + 3 + 1
    assert sorted(s[0][1] for s in seen) == [1, 3, 3]
    np.testing.assert_array_equal(b, 2 * a)


def test_in_pieces_reraises_a_workers_error(monkeypatch):
    monkeypatch.setattr(parallel_module, "NUM_THREADS", 2)
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)

    def fail_on_first_part(a):
        if a[0, 0] == 0:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        parallel_module.in_pieces(fail_on_first_part, np.arange(8.0).reshape(1, 8))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_threads_work_in_a_forked_child(monkeypatch):
    """A child process inherits the worker pool but not its threads: the split pass must
    still run there (a new pool) instead of waiting forever."""
    import os
    monkeypatch.setattr(parallel_module, "NUM_THREADS", 2)
    monkeypatch.setattr(parallel_module, "MIN_PARALLEL_ELEMENTS", 0)
    a = np.zeros((1, 8))
    parallel_module.in_pieces(lambda part: part.__iadd__(1), a)       # makes the pool
    pid = os.fork()
    if pid == 0:                                                    # the child
        b = np.zeros((1, 8))
        parallel_module.in_pieces(lambda part: part.__iadd__(1), b)
        os._exit(0 if b.sum() == 8 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0 and a.sum() == 8
