"""Splitting a memory-bound numpy pass between threads (``in_pieces``).

numpy runs a copy, add or elementwise pass (im2col, col2im, pooling, ReLU, batch norm)
on one core, while the matrix products around it use every core. Slices of different
channels (or samples) touch disjoint memory, and numpy releases the GIL inside a copy
or an add, so a big pass runs as one piece per core in threads. This pays only while
OpenBLAS's idle threads sleep: ``minidl/__init__.py`` sets OPENBLAS_THREAD_TIMEOUT=4
before numpy loads, and passes are split only when it is <= 16. ``NUM_THREADS`` forces
a count. On the GPU (cupy) nothing is split.
"""
import os
from concurrent.futures import ThreadPoolExecutor

from .. import backend

NUM_THREADS = None                  # None: all usable cores if OpenBLAS threads sleep, else 1
MIN_PARALLEL_ELEMENTS = 1 << 19     # 2 MiB of float32: below that a hand-off costs more

_executor = None                    # (ThreadPoolExecutor, its workers, the pid that made it)


def num_threads():
    """How many threads a big copy or add is split into (see NUM_THREADS)."""
    if NUM_THREADS is not None:
        return max(1, int(NUM_THREADS))
    try:        # OpenBLAS's idle threads sleep within 2**16 cycles, not spin for 2**28
        if int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", "")) > 16:
            return 1
    except ValueError:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def in_pieces(fn, *arrays, axis=1):
    """fn(*parts) for the parts of ``arrays`` cut into one slice per thread along ``axis``
    (an int, or one axis per array; every array must have the same length there), the
    parts running in parallel on the CPU. One call with the whole arrays on the GPU,
    with one thread, when the first array has no such axis, or when the largest array
    has fewer than MIN_PARALLEL_ELEMENTS elements. fn must write only into its own parts."""
    axes = (axis,) * len(arrays) if isinstance(axis, int) else tuple(axis)
    length = arrays[0].shape[axes[0]] if arrays[0].ndim > axes[0] else 1
    size = max(a.size for a in arrays)
    # no more pieces than threads, than slices, or than halves of the minimum size
    pieces = min(num_threads(), length, size // max(1, MIN_PARALLEL_ELEMENTS // 2))
    if pieces < 2 or size < MIN_PARALLEL_ELEMENTS or backend.device_of(arrays[0]) != "cpu":
        fn(*arrays)
        return
    step = -(-length // pieces)
    parts = [[a[(slice(None),) * ax + (slice(start, start + step),)] for a, ax in zip(arrays, axes)]
             for start in range(0, length, step)]
    global _executor
    workers = len(parts) - 1
    # A forked child inherits the executor but not its threads: make a new one there.
    if _executor is None or _executor[1] < workers or _executor[2] != os.getpid():
        _executor = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minidl"),
                     workers, os.getpid())
    futures = [_executor[0].submit(fn, *part) for part in parts[:-1]]
    fn(*parts[-1])                               # the last part in this thread
    for future in futures:
        future.result()                          # waits, and re-raises a worker's error
