#!/usr/bin/env python
"""Time minidl's Conv2D, MaxPool2D and MNIST training step against PyTorch, and against
an older commit of minidl.

    python benchmarks/bench_conv.py                       # all rows, a few minutes
    python benchmarks/bench_conv.py --quick               # smoke run
    python benchmarks/bench_conv.py --only step --baseline b268094
    python benchmarks/bench_conv.py --device gpu          # minidl on cupy, torch on CUDA

Needs the ``bench`` extra (threadpoolctl); torch, when importable, adds its column.
Rows: Conv2D forward + grads of x, W and b on the shapes A-D of docs/performance.md
(and C again with im2col in 16 MiB chunks); the convolution family: a dilated 3x3
(d = 2) on shape B, a depthwise 3x3 (groups = channels) on N64 C64 28x28, and a
ConvTranspose2D 4x4/2 from N64 C32 7x7 to F16 14x14; MaxPool2D 2x2/2 forward + backward; one
training step (forward, loss, backward, SGD update) of ``minidl.ext.zoo.mnist_cnn()``
(the CLI's default model) and of a plain CNN without batch norm, at batch 64.

How it measures (docs/performance.md):
* every column of a row runs in alternating blocks (A B C, then C B A, ...), so drift
  of a noisy machine hits all columns alike; each column's cell is the median of all
  its timed calls, with the 25th-75th percentiles;
* a pause separates blocks of different columns (OpenBLAS and OpenMP threads spin for
  a while after a call and would slow the next column down), followed by ~0.1 s of
  untimed calls (an idle core takes ~50 ms to run at full speed again);
* ``--baseline REV`` checks REV out into a temporary git worktree and runs its minidl
  in a child process, started as a user would start it (this process's environment
  before minidl was imported), taking part in the same alternation;
* BLAS and torch use ``--threads`` threads (threadpoolctl, torch.set_num_threads);
* peak memory is tracemalloc's peak over building a fresh layer or model and calling
  it twice (numpy arrays are traced; torch's are not, so torch has no memory column);
* every row first checks that minidl and torch agree (or raises);
* ``--device gpu`` runs minidl on the cupy backend and torch on CUDA, and waits for
  both devices after every timed call (kernels run asynchronously); it has no
  baseline, one-thread or memory columns (tracemalloc sees host memory only).
"""
import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

USER_ENV = dict(os.environ)       # before minidl sets anything: what a baseline runs with
CHILD = "--child" in sys.argv     # a baseline's process: its minidl comes from PYTHONPATH
if not CHILD:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minidl  # noqa: E402  (first: it sets what OpenBLAS reads when numpy loads)
import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

try:
    if CHILD:
        raise ImportError
    import torch
    import torch.nn.functional as TF
except ImportError:           # torch is only ever a comparison, never a dependency
    torch = None

CONV_CASES = {  # name: N, C, H, W, F, k, s, p, target ratio to torch[, options]
    "A": (64, 1, 28, 28, 32, 3, 1, 1, 1.0),
    "B": (64, 32, 14, 14, 64, 3, 1, 1, 1.5),
    "C": (32, 64, 32, 32, 128, 3, 1, 1, 1.5),
    "D": (32, 16, 32, 32, 32, 5, 2, 2, 1.5),
    "dilated": (64, 32, 14, 14, 64, 3, 1, 2, 1.5, {"dilation": 2}),      # shape B, d = 2
    "depthwise": (64, 64, 28, 28, 64, 3, 1, 1, 1.5, {"groups": 64}),
    "transpose": (64, 32, 7, 7, 16, 4, 2, 1, 1.5, {"transposed": True}),  # 7x7 -> 14x14
}
CHUNKED_BYTES = 16 * 2**20    # the "C, chunked" row: im2col in 16 MiB batch chunks
ROWS = ["conv-A", "conv-B", "conv-C", "conv-D", "conv-C-chunked", "conv-dilated",
        "conv-depthwise", "conv-transpose", "pool", "step-mnist_cnn", "step-plain"]
STEP_TARGET = 1.3
POOL_TARGET = 1.5
GPU = False                   # --device gpu: minidl on cupy, torch on CUDA (set once by main)


def to_minidl(a):
    """A numpy array where minidl computes: on the GPU with --device gpu."""
    return minidl.to_device(a, "gpu") if GPU else a   # on the CPU, as old commits take it


def to_torch(a):
    """A numpy array (as a tensor) or a torch module, where torch computes."""
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
    return t.cuda() if GPU else t


def synchronize():
    """Wait until the GPU has run everything queued, so a timed call's time is its work
    and not just its launch; nothing to wait for on the CPU."""
    if GPU:
        minidl.get_backend().cuda.Device().synchronize()     # cupy, the active backend
        if torch is not None:
            torch.cuda.synchronize()


def use_gpu():
    """--device gpu: minidl's backend becomes cupy; exits with one line when CuPy or
    torch cannot reach a CUDA device."""
    global GPU
    try:
        minidl.set_backend("cupy")
    except RuntimeError as exc:
        sys.exit(f"bench_conv.py --device gpu: {exc}")
    if torch is not None and not torch.cuda.is_available():
        sys.exit("bench_conv.py --device gpu: torch sees no CUDA device (a CPU-only build?)")
    GPU = True


# -- the rows: each builds fresh minidl and torch callables, one call = one iteration ----

def _rng():
    return np.random.default_rng(0)


def conv_row(key):
    """(title, target, make_minidl, make_torch) of a Conv2D or ConvTranspose2D row."""
    name = key.split("-")[1]
    n, c, h, w, f, k, s, p, target, *options = CONV_CASES[name]
    kwargs = dict(options[0]) if options else {}
    transposed = kwargs.pop("transposed", False)
    d, g = kwargs.get("dilation", 1), kwargs.get("groups", 1)
    if key.endswith("chunked"):
        kwargs["max_im2col_bytes"] = CHUNKED_BYTES
    rng = _rng()
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    shape = (c, f // g, k, k) if transposed else (f, c // g, k, k)
    weight = rng.standard_normal(shape, dtype=np.float32) * np.float32((c // g * k * k) ** -0.5)
    bias = rng.standard_normal(f, dtype=np.float32)
    if transposed:
        ho, wo = (h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k
    else:
        ho, wo = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    dz = rng.standard_normal((n, f, ho, wo), dtype=np.float32)
    layer = minidl.ConvTranspose2D if transposed else minidl.Conv2D
    torch_op = (lambda *a: TF.conv_transpose2d(*a, stride=s, padding=p)) if transposed else \
        (lambda *a: TF.conv2d(*a, stride=s, padding=p, dilation=d, groups=g))

    def make_minidl():
        conv = layer(c, f, k, stride=s, padding=p, **kwargs)
        conv.weight.data[...] = to_minidl(weight)
        conv.bias.data[...] = to_minidl(bias)
        xd, dzd = to_minidl(x), to_minidl(dz)

        def run():
            conv.zero_grad()
            y = conv.forward(xd)
            return y, conv.backward(dzd), conv.weight.grad, conv.bias.grad
        return run

    def make_torch():
        xt = to_torch(x).requires_grad_()
        wt = to_torch(weight.copy()).requires_grad_()
        bt = to_torch(bias.copy()).requires_grad_()
        dzt = to_torch(dz)

        def run():
            xt.grad = wt.grad = bt.grad = None
            yt = torch_op(xt, wt, bt)
            yt.backward(dzt)
            return yt, xt.grad, wt.grad, bt.grad
        return run

    shape = f"N{n} C{c} {h}x{w} F{f} k{k} s{s} p{p}"
    extras = (f" d{d}" if d > 1 else "") + (f" groups {g}" if g > 1 else "")
    title = (f"ConvTranspose2D: {shape} (to {ho}x{wo})" if transposed
             else f"Conv2D {name}: {shape}{extras}")
    if key.endswith("chunked"):
        title = f"Conv2D C, im2col in {CHUNKED_BYTES // 2**20} MiB chunks"
    return title, target, make_minidl, make_torch


def pool_row(key):
    n, c, h, w = 64, 32, 28, 28
    rng = _rng()
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    dy = rng.standard_normal((n, c, h // 2, w // 2), dtype=np.float32)

    def make_minidl():
        pool, xd, dyd = minidl.MaxPool2D(2), to_minidl(x), to_minidl(dy)
        return lambda: (pool.forward(xd), pool.backward(dyd))

    def make_torch():
        xt, dyt = to_torch(x).requires_grad_(), to_torch(dy)

        def run():
            xt.grad = None
            yt = TF.max_pool2d(xt, 2)
            yt.backward(dyt)
            return yt, xt.grad
        return run
    return f"MaxPool2D 2x2/2: N{n} C{c} {h}x{w}", POOL_TARGET, make_minidl, make_torch


def mnist_cnn():
    """The CLI's default model, from where this minidl keeps it (a --baseline may be older)."""
    try:
        from minidl.ext.zoo import mnist_cnn as build
    except ImportError:             # before minidl/ext/ (issue 21)
        from minidl.models import mnist_cnn as build
    return build()


def minidl_model(kind):
    if kind == "mnist_cnn":
        return mnist_cnn()
    L = minidl
    return L.Sequential([
        L.Conv2D(1, 32, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(32, 64, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
        L.Flatten(), L.Dense(3136, 128), L.ReLU(), L.Dense(128, 10)])


def torch_model(kind):
    """The same network in torch (mnist_cnn's convolutions have no bias, as minidl's)."""
    nn = torch.nn
    bn = kind == "mnist_cnn"

    def block(c, f):
        return [nn.Conv2d(c, f, 3, padding=1, bias=not bn)] + ([nn.BatchNorm2d(f)] if bn else []) \
            + [nn.ReLU(), nn.MaxPool2d(2)]
    head = ([nn.Linear(3136, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10)] if bn
            else [nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10)])
    return nn.Sequential(*block(1, 32), *block(32, 64), nn.Flatten(), *head)


def step_row(key, batch=64):
    kind = key.split("-", 1)[1]
    rng = _rng()
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch)

    def make_minidl():
        minidl.manual_seed(0)
        model = minidl_model(kind)
        trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                                 minidl.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                 metrics=(), verbose=0)
        xd, yd = to_minidl(x), to_minidl(y)
        return lambda: trainer.train_step(xd, yd)

    def make_torch():
        torch.manual_seed(0)
        model = to_torch(torch_model(kind)).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        xt, yt = to_torch(x), to_torch(y)

        def run():
            loss = TF.cross_entropy(model(xt), yt)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.item()
        return run
    return f"Training step, {kind}, batch {batch}", STEP_TARGET, make_minidl, make_torch


def build_row(key):
    return (conv_row if key.startswith("conv") else pool_row if key == "pool" else step_row)(key)


def check_agreement(key, make_minidl, make_torch):
    """Conv and pool rows: minidl's outputs and gradients equal torch's (float32, 1e-4)."""
    if key.startswith("step"):
        return
    for mine, theirs in zip(make_minidl()(), make_torch()()):
        mine, theirs = minidl.to_numpy(mine), theirs.detach().cpu().numpy()
        assert mine.dtype == np.float32, f"{key}: minidl returned {mine.dtype}"
        err = float(np.max(np.abs(mine - theirs))) / max(float(np.max(np.abs(theirs))), 1e-30)
        assert err < 1e-4, f"{key}: minidl and torch differ by {err:.2e} (relative)"


# -- columns: in this process, or in a baseline's child process --------------------------

class Column:
    """A callable timed in this process: ``block(k)`` times k calls."""

    def __init__(self, name, make):
        self.name, self.make = name, make
        self.fn, self.samples = None, []

    def start(self):
        self.fn = self.make()
        self.fn()

    def block(self, k):
        times = []
        synchronize()
        for _ in range(k):
            t0 = time.perf_counter()
            self.fn()
            synchronize()
            times.append(time.perf_counter() - t0)
        return times

    def peak_bytes(self):
        return traced_peak(self.make)

    def stop(self):
        self.fn = None


class ChildColumn(Column):
    """The minidl of another checkout, timed in a child process that reads commands
    ("start", "block K", "peak", "stop") on stdin and answers one JSON line each."""

    def __init__(self, name, key, tree, threads):
        super().__init__(name, None)
        env = dict(USER_ENV, PYTHONPATH=tree)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", key,
               "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, env=env, cwd=tree, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the child process ended (see its error above)")
        return json.loads(line)

    def start(self):
        self._ask("start")

    def block(self, k):
        return self._ask(f"block {k}")

    def peak_bytes(self):
        return self._ask("peak")

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait()


def serve_child(key, threads):
    """The child's loop: one column of row ``key`` with the minidl on PYTHONPATH."""
    set_threads(threads)
    column = Column("child", build_row(key)[2])
    for line in sys.stdin:
        command, *arg = line.split()
        answer = (column.start() if command == "start" else column.block(int(arg[0]))
                  if command == "block" else column.peak_bytes())
        print(json.dumps(answer), flush=True)


def set_threads(threads):
    """BLAS and torch use ``threads`` threads; minidl's threaded memory passes at most
    that many (old commits may have none)."""
    threadpool_limits(threads, user_api="blas")
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        from minidl.layers import parallel
    except ImportError:
        return
    parallel.NUM_THREADS = min(threads, parallel.num_threads())


def one_thread_passes(make):
    """``make`` with minidl's memory passes on one thread during each call."""
    from minidl.layers import parallel

    def make_single():
        fn = make()

        def run():
            threads, parallel.NUM_THREADS = parallel.NUM_THREADS, 1
            try:
                return fn()
            finally:
                parallel.NUM_THREADS = threads
        return run
    return make_single


def traced_peak(make):
    """tracemalloc's peak (bytes) over building ``make()`` and calling it twice."""
    gc.collect()
    tracemalloc.start()
    try:
        fn = make()
        fn()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(columns, samples, block, pause):
    """Fill each column's ``samples`` in alternating blocks; returns nothing."""
    for column in columns:
        column.start()
    previous = None
    rounds = -(-samples // block)
    for r in range(rounds):
        for column in (columns if r % 2 == 0 else columns[::-1]):
            if previous is not column:
                time.sleep(pause)
                end = time.perf_counter() + 0.1          # re-warm the cores, untimed
                while time.perf_counter() < end:
                    column.block(1)
            previous = column
            gc.collect()
            gc.disable()
            try:
                column.samples += column.block(block)
            finally:
                gc.enable()


def run_row(key, args, tree):
    title, target, make_minidl, make_torch = build_row(key)
    columns = [Column("minidl", make_minidl)]
    if args.one_thread_passes:
        columns.append(Column("minidl, passes on 1 thread", one_thread_passes(make_minidl)))
    if torch is not None:
        check_agreement(key, make_minidl, make_torch)
        columns.append(Column("torch", make_torch))
    if tree:
        columns.append(ChildColumn(f"minidl {args.baseline}", key, tree, args.threads))
    peaks = {c.name: c.peak_bytes() for c in columns
             if not GPU and (c.name == "minidl" or isinstance(c, ChildColumn))}
    columns[0].start()
    estimate = min(columns[0].block(3))
    samples = args.repeats or int(min(60, max(args.min_samples, args.budget / estimate)))
    measure(columns, samples, min(args.block, samples), args.pause)
    for column in columns:
        column.stop()
    print(f"  measured: {title}", file=sys.stderr, flush=True)
    return {"title": title, "target": target, "peaks": peaks,
            "medians": {c.name: statistics.quantiles(c.samples, n=4, method="inclusive")
                        for c in columns}}


# -- the table ---------------------------------------------------------------------------

def markdown(rows, baseline):
    base = f"minidl {baseline}" if baseline else None
    single = "minidl, passes on 1 thread"
    head = ["Case", "minidl ms, median (p25-p75)", "torch ms", "minidl / torch", "target"]
    if any(single in row["medians"] for row in rows):
        head += [f"{single} ms", "minidl / that"]
    if base:
        head += [f"{base} ms", f"minidl / {baseline}"]
    memory = any(row["peaks"] for row in rows)       # none on the GPU
    if memory:
        head += ["peak MiB minidl" + (f" / {baseline}" if base else "")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        q = row["medians"]
        mine = q["minidl"][1]
        cells = [row["title"], _ms(q["minidl"])]
        if "torch" in q:
            ratio = mine / q["torch"][1]
            over = "" if ratio <= row["target"] else " (over)"
            cells += [_ms(q["torch"]), f"**{ratio:.2f}x**{over}", f"<= {row['target']:.1f}x"]
        else:
            cells += ["-", "-", "-"]
        if single in q:
            cells += [_ms(q[single]), f"**{mine / q[single][1]:.2f}x**"]
        if base:
            cells += [_ms(q[base]), f"**{mine / q[base][1]:.2f}x**"]
        if memory:
            cells.append(" / ".join(f"{p / 2**20:.0f}" for p in row["peaks"].values()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(q):
    return f"{q[1] * 1e3:.2f} ({q[0] * 1e3:.2f}-{q[2] * 1e3:.2f})"


def describe(args):
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    blas_text = ", ".join(f"{i['internal_api']} {i['version']} ({i['architecture']})"
                          for i in blas) or "unknown BLAS"
    lines = [f"- {platform.machine()}, {os.cpu_count()} logical cores "
             f"({len(os.sched_getaffinity(0))} usable), load average {os.getloadavg()[0]:.2f}",
             f"- Python {platform.python_version()}, numpy {np.__version__} ({blas_text}), "
             f"{args.threads} BLAS threads; OPENBLAS_THREAD_TIMEOUT="
             f"{os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')}",
             f"- minidl {minidl.__version__}, float32" + (
                 f"; torch {torch.__version__}, {torch.get_num_threads()} threads" if torch else
                 "; torch not importable: no torch column")]
    if GPU:
        cupy = minidl.get_backend()
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        lines.append(f"- GPU: {name}; minidl on cupy {cupy.__version__}, torch on CUDA; "
                     "no memory column (tracemalloc sees host memory only)")
    return "\n".join(lines)


def baseline_tree(rev, stack):
    """A temporary git worktree of ``rev``; ``stack`` holds the clean-up."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    tmp = tempfile.mkdtemp(prefix="minidl-baseline-")
    tree = os.path.join(tmp, "tree")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "--quiet", tree, rev],
                   check=True)
    stack.append(lambda: subprocess.run(["git", "-C", root, "worktree", "remove", "--force",
                                         tree], check=False))
    stack.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    return tree


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: minidl on the cupy backend against torch on CUDA "
                             "(no --baseline, --one-thread-passes or memory column)")
    parser.add_argument("--only", default="conv,pool,step",
                        help="comma-separated prefixes of rows: " + ", ".join(ROWS))
    parser.add_argument("--baseline", metavar="REV",
                        help="also time the minidl of git revision REV, side by side")
    parser.add_argument("--one-thread-passes", action="store_true",
                        help="add a column: minidl with its memory passes on one thread")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for BLAS and torch (default: all usable cores)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed calls per column (default: sized to --budget)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed calls per column and row (default 2)")
    parser.add_argument("--block", type=int, default=5, help="calls per alternating block")
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds of sleep between blocks of different columns")
    parser.add_argument("--output", help="also write the Markdown table to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return serve_child(args.child, args.threads)
    if args.device == "gpu":
        if args.baseline or args.one_thread_passes:
            parser.error("--baseline and --one-thread-passes time CPU code only; "
                         "leave them out with --device gpu")
        use_gpu()
    args.min_samples = 10
    if args.quick:
        args.budget, args.min_samples, args.pause = 0.3, 3, 0.2
    keys = [k for k in ROWS if any(k.startswith(p) for p in args.only.split(","))]
    set_threads(args.threads)
    cleanup = []
    try:
        tree = baseline_tree(args.baseline, cleanup) if args.baseline else None
        rows = [run_row(key, args, tree) for key in keys]
    finally:
        for undo in cleanup:
            undo()
    table = (f"minidl vs PyTorch{' and ' + args.baseline if args.baseline else ''}, "
             f"{args.device.upper()}, "
             f"float32, {time.strftime('%Y-%m-%d %H:%M')}\n\n{describe(args)}\n\n"
             + markdown(rows, args.baseline))
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
