"""minidl makes OpenBLAS's idle threads sleep, so its threaded memory passes run by default."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
