#!/usr/bin/env python
"""Time minidl's Conv2D, MaxPool2D and MNIST training against PyTorch (issue #7).

    python benchmarks/bench_conv.py                 # full run, ~2.5 minutes on an idle machine
    python benchmarks/bench_conv.py --quick         # smoke run, ~30 seconds
    python benchmarks/bench_conv.py --only conv,pool --repeats 40
    python benchmarks/bench_conv.py --device gpu    # minidl on cupy against torch on CUDA

Rows: Conv2D forward + grads of x, W and b on the reference shapes A-D (and C again
with a small im2col budget, the chunked path); MaxPool2D 2x2/2 forward + backward;
one training step (forward, loss, backward, SGD update) of minidl.models.mnist_cnn()
and of the plain CNN of shared/notes/performance-anchors.md at batch 64; and
images/s over an epoch of 60000 synthetic images through minidl.Trainer (measured
over --epoch-steps steps and extrapolated; --full-epoch times all 938).

How it measures (see docs/performance.md):
* every implementation of a row runs in this one process, warm-up first, then in
  alternating blocks (A B A B ..., order reversed every round), so drift of a noisy
  machine hits all columns alike; a pause separates a numpy block from a torch block
  (OpenBLAS and OpenMP worker threads spin for a while after a call and would slow
  the other library down), and ~0.1 s of untimed calls follows each pause (after a
  sleep, idle cores need ~50 ms of work to run at full speed again, which threaded
  code feels most; a training loop never sleeps);
* the cell is the median over all timed calls, with the 25th-75th percentile range;
* peak memory is the growth of the resident set (VmHWM, reset through
  /proc/self/clear_refs, after malloc_trim) over two calls on a fresh layer or model,
  so it includes buffers a layer keeps between calls;
* both libraries use the same number of threads (--threads, default: all cores);
  OPENBLAS_THREAD_TIMEOUT is 4 unless the environment or --blas-timeout sets it (minidl splits its
  memory passes over threads only then; see minidl/layers/parallel.py);
* every row first checks that minidl and torch agree (or raises).

"before #7" is minidl's Conv2D / MaxPool2D as they were before issue #7
(benchmarks/baseline_layers.py), timed side by side.
"""
import argparse
import ctypes
import gc
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _blas_timeout_from_argv(argv):
    """--blas-timeout's value, read before numpy loads OpenBLAS (which reads it only then)."""
    for i, arg in enumerate(argv):
        if arg == "--blas-timeout" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--blas-timeout="):
            return arg.split("=", 1)[1]
    return None


# OpenBLAS's worker threads spin for about 2**28 cycles (~0.1 s) after every product
# before they sleep; minidl's threaded memory passes (im2col, col2im, pooling, ReLU,
# batch norm), which run right after a product, would fight them for the cores, so
# minidl splits them only when OPENBLAS_THREAD_TIMEOUT is small. This run uses 4
# (2**4 cycles: sleep at once) unless told otherwise; "default" leaves it unset.
# It must be set before numpy is imported; see docs/performance.md.
BLAS_TIMEOUT = (_blas_timeout_from_argv(sys.argv[1:])
                or os.environ.get("OPENBLAS_THREAD_TIMEOUT") or "4")
if BLAS_TIMEOUT == "default":
    os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)
else:
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = BLAS_TIMEOUT

import numpy as np  # noqa: E402

import minidl  # noqa: E402
import minidl.models  # noqa: E402
from minidl.layers import parallel  # noqa: E402
from baseline_layers import BaselineConv2D, BaselineMaxPool2D  # noqa: E402

try:
    import torch
    import torch.nn.functional as TF
except ImportError:           # torch is only ever a comparison, never a dependency
    torch = None

CONV_CASES = [  # name, N, C, H, W, F, k, s, p, target ratio to torch
    ("A", 64, 1, 28, 28, 32, 3, 1, 1, 1.0),
    ("B", 64, 32, 14, 14, 64, 3, 1, 1, 1.5),
    ("C", 32, 64, 32, 32, 128, 3, 1, 1, 1.5),
    ("D", 32, 16, 32, 32, 32, 5, 2, 2, 1.5),
]
_START = time.perf_counter()
CHUNKED_BYTES = 16 * 2**20    # the extra "C, chunked" row: im2col in 16 MiB batch chunks
STEP_TARGET = 1.5
POOL_TARGET = 1.5
GPU = False                   # --device gpu: minidl on cupy, torch on CUDA


def to_minidl(a):
    """A numpy array where minidl computes (the GPU with --device gpu)."""
    return minidl.to_device(a, "gpu") if GPU else a


def to_torch(a):
    """A numpy or cupy array as a torch tensor on torch's device (sharing its memory
    where it already is there)."""
    if minidl.device_of(a) == "gpu":
        return torch.from_dlpack(a)
    t = torch.from_numpy(a)
    return t.cuda() if GPU else t


def synced(run):
    """``run``, waiting for the GPU before it returns, so a call's time is its work."""
    if not GPU:
        return run

    def run_and_wait():
        out = run()
        minidl.get_backend().cuda.Device().synchronize()
        torch.cuda.synchronize()
        return out
    return run_and_wait


# -- machine and threads ---------------------------------------------------------------

def _openblas():
    """The OpenBLAS library numpy loaded (a ctypes handle), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _blas_function(lib, stem):
    for name in (f"scipy_openblas_{stem}64_", f"openblas_{stem}64_", f"openblas_{stem}"):
        fn = getattr(lib, name, None) if lib is not None else None
        if fn is not None:
            return fn
    return None


def set_threads(n):
    """Use n threads in OpenBLAS (numpy) and in torch; returns (numpy's, torch's)."""
    lib = _openblas()
    setter, getter = _blas_function(lib, "set_num_threads"), _blas_function(lib, "get_num_threads")
    if setter is not None:
        setter(ctypes.c_int(n))
    blas_threads = getter() if getter is not None else "?"
    torch_threads = None
    if torch is not None:
        torch.set_num_threads(n)
        torch_threads = torch.get_num_threads()
    return blas_threads, torch_threads


def machine_description(threads):
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = "AVX-512" if "avx512f" in text else ("AVX2" if "avx2" in text else "")
    except OSError:
        pass
    config = _blas_function(_openblas(), "get_config")
    blas = "unknown BLAS"
    if config is not None:
        config.restype = ctypes.c_char_p
        blas = config().decode()
    blas_threads, torch_threads = threads
    lines = [f"- CPU: {cpu}{', ' + flags if flags else ''}; {os.cpu_count()} logical cores "
             f"({len(os.sched_getaffinity(0))} usable); "
             + (f"GPU: {torch.cuda.get_device_name(0)}" if GPU else "no GPU used"),
             f"- Python {platform.python_version()}, numpy {np.__version__} "
             f"({' '.join(blas.split()[:2])}, {_blas_kernel(blas)} kernel), "
             f"{blas_threads} BLAS threads",
             f"- minidl {minidl.__version__}, backend {minidl.backend_name()}, float32"]
    if torch is not None:
        onednn = torch.backends.mkldnn.is_available()
        mkl = torch.backends.mkl.is_available()
        lines.append(f"- torch {torch.__version__} (MKL {'on' if mkl else 'off'}, "
                     f"oneDNN {'on' if onednn else 'off'}), {torch_threads} threads")
    else:
        lines.append("- torch not importable: no torch column")
    return "\n".join(lines)


def _blas_kernel(config):
    words = config.split()
    known = ("SkylakeX", "Haswell", "Zen", "Sandybridge", "Cooperlake", "SapphireRapids",
             "Prescott", "Nehalem", "Core2")
    hits = [w for w in words if w in known]
    return hits[-1] if hits else "unknown"


# -- measuring -------------------------------------------------------------------------

class Impl:
    """One column of a row: ``make()`` builds a fresh callable that runs one iteration."""

    def __init__(self, name, side, make):
        self.name, self.side, self.make = name, side, make
        self.fn = None
        self.samples = []
        self.peak_bytes = None


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


_LIBC = None


def _trim():
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(make):
    """Resident-set growth (bytes) over building ``make()`` and calling it twice; None
    where /proc/self/clear_refs cannot reset the high-water mark (or on the GPU)."""
    if GPU:
        return None
    gc.collect()
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                      # reset VmHWM to the current RSS
        base = _status_bytes("VmRSS:")
    except OSError:
        return None
    fn = make()
    fn()
    fn()
    peak = _status_bytes("VmHWM:") - base
    del fn
    gc.collect()
    return max(peak, 0)


def measure(impls, samples, block, pause, warmup=2):
    """Fill each impl's ``samples`` (seconds per call) in alternating blocks."""
    for impl in impls:
        impl.peak_bytes = peak_memory(impl.make)
    previous = None
    for impl in impls:                        # warm-up, and a time estimate
        impl.fn = impl.make()
        if previous is not None and impl.side != previous:
            time.sleep(pause)
        previous = impl.side
        for _ in range(warmup):
            impl.fn()
    rounds = max(1, math.ceil(samples / block))
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(rounds):
            order = impls if r % 2 == 0 else impls[::-1]
            for impl in order:
                gc.collect()
                if impl.side != previous:
                    time.sleep(pause)
                    _rewarm(impl.fn)
                previous = impl.side
                gc.disable()
                for _ in range(block):
                    t0 = time.perf_counter()
                    impl.fn()
                    impl.samples.append(time.perf_counter() - t0)
                if gc_was_enabled:
                    gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    for impl in impls:
        impl.fn = None


def _rewarm(fn, seconds=0.1):
    """Untimed calls for ~0.1 s after a pause. On this VM an idle core needs about 50 ms
    of work to run at full speed again (measured: after 0.5 s of sleep, 9 calls of
    threaded max pooling took 5.7-6.4 ms, then 3.2 ms); a training loop never idles."""
    end = time.perf_counter() + seconds
    fn()
    while time.perf_counter() < end:
        fn()


def samples_for(impls_fn_time, budget, lo, hi):
    """How many timed calls fit ``budget`` seconds per column (between lo and hi)."""
    return int(min(hi, max(lo, budget / max(impls_fn_time, 1e-6))))


def quantiles(samples):
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], statistics.median(samples), q[2]


# -- rows ------------------------------------------------------------------------------

def _rng():
    return np.random.default_rng(0)


def conv_row(case, args, max_bytes=None, label=None):
    name, n, c, h, w, f, k, s, p, target = case
    rng = _rng()
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    kwargs = {} if max_bytes is None else {"max_im2col_bytes": max_bytes}
    minidl.manual_seed(0)
    layer = minidl.Conv2D(c, f, k, stride=s, padding=p, **kwargs)
    layer.bias.data[...] = to_minidl(rng.standard_normal(f, dtype=np.float32))
    ho, wo = layer.output_shape(x.shape)[2:]
    dz = rng.standard_normal((n, f, ho, wo), dtype=np.float32)
    weight, bias = layer.weight.data.copy(), layer.bias.data.copy()
    x, dz = to_minidl(x), to_minidl(dz)

    def make_minidl(cls=minidl.Conv2D):
        def make():
            conv = cls(c, f, k, stride=s, padding=p, **kwargs)
            conv.weight.data[...] = weight
            conv.bias.data[...] = bias

            def run():
                conv.zero_grad()
                conv.forward(x)
                return conv.backward(dz)
            return synced(run)
        return make

    def make_torch():
        xt = to_torch(x).requires_grad_()
        wt = to_torch(weight).clone().requires_grad_()
        bt = to_torch(bias).clone().requires_grad_()
        dzt = to_torch(dz)

        def run():
            xt.grad = wt.grad = bt.grad = None
            TF.conv2d(xt, wt, bt, stride=s, padding=p).backward(dzt)
        return synced(run)

    impls = [Impl("minidl", "numpy", make_minidl())]
    if torch is not None:
        _check_conv(layer, x, dz, (s, p))
        impls.append(Impl("torch", "torch", make_torch))
    if args.baseline:
        impls.append(Impl("before #7", "numpy", make_minidl(BaselineConv2D)))
    flops = 3 * n * layer.flops(x.shape)        # forward, dW and dx: one GEMM's worth each
    title = label or (f"Conv2D {name}: N{n} C{c} {h}x{w} F{f} k{k} s{s} p{p}")
    return run_row(title, impls, args, flops=flops, target=target)


def _check_conv(layer, x, dz, sp):
    s, p = sp
    layer.zero_grad()
    y = layer.forward(x)
    dx = layer.backward(dz)
    xt = to_torch(x).requires_grad_()
    wt = to_torch(layer.weight.data).clone().requires_grad_()
    bt = to_torch(layer.bias.data).clone().requires_grad_()
    yt = TF.conv2d(xt, wt, bt, stride=s, padding=p)
    yt.backward(to_torch(dz))
    pairs = (("y", y, yt), ("dx", dx, xt.grad), ("dW", layer.weight.grad, wt.grad),
             ("db", layer.bias.grad, bt.grad))
    for what, mine, theirs in pairs:
        _agree(what, mine, theirs.detach().cpu().numpy())


def _agree(what, mine, theirs, rtol=1e-4):
    mine = minidl.to_numpy(mine)
    assert mine.dtype == np.float32, f"{what}: minidl returned {mine.dtype}, not float32"
    err = float(np.max(np.abs(mine - theirs))) / max(float(np.max(np.abs(theirs))), 1e-30)
    if err > rtol:
        raise AssertionError(f"{what}: minidl and torch differ by {err:.2e} (relative)")


def pool_row(args):
    n, c, h, w = 64, 32, 28, 28
    rng = _rng()
    x = to_minidl(rng.standard_normal((n, c, h, w), dtype=np.float32))
    dy = to_minidl(rng.standard_normal((n, c, h // 2, w // 2), dtype=np.float32))

    def make_minidl(cls=minidl.MaxPool2D):
        def make():
            pool = cls(2)

            def run():
                pool.forward(x)
                return pool.backward(dy)
            return synced(run)
        return make

    def make_torch():
        xt, dyt = to_torch(x).requires_grad_(), to_torch(dy)

        def run():
            xt.grad = None
            TF.max_pool2d(xt, 2).backward(dyt)
        return synced(run)

    impls = [Impl("minidl", "numpy", make_minidl())]
    if torch is not None:
        pool = minidl.MaxPool2D(2)
        y, dx = pool.forward(x), pool.backward(dy)
        xt = to_torch(x).requires_grad_()
        yt = TF.max_pool2d(xt, 2)
        yt.backward(to_torch(dy))
        _agree("y", y, yt.detach().cpu().numpy())
        _agree("dx", dx, xt.grad.cpu().numpy())
        impls.append(Impl("torch", "torch", make_torch))
    if args.baseline:
        impls.append(Impl("before #7", "numpy", make_minidl(BaselineMaxPool2D)))
    return run_row(f"MaxPool2D 2x2/2: N{n} C{c} {h}x{w}", impls, args, target=POOL_TARGET)


# -- models -----------------------------------------------------------------------------

def minidl_model(kind):
    if kind == "mnist_cnn":
        return minidl.models.mnist_cnn()
    L = minidl
    return L.Sequential([
        L.Conv2D(1, 32, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(32, 64, 3, padding=1), L.ReLU(), L.MaxPool2D(2),
        L.Flatten(), L.Dense(3136, 128), L.ReLU(), L.Dense(128, 10)])


def torch_model(kind):
    model = _torch_model(kind)
    return model.cuda() if GPU else model


def _torch_model(kind):
    nn = torch.nn
    if kind == "mnist_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(3136, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, 10))
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))


def model_flops(batch):
    """Multiply-adds x 2 of one training step: forward, dW, and dx except for layer 0."""
    convs = [(28 * 28, 32, 1 * 9), (14 * 14, 64, 32 * 9)]
    dense = [(3136, 128), (128, 10)]
    fwd = [2 * hw * f * ck for hw, f, ck in convs] + [2 * a * b for a, b in dense]
    return batch * (3 * sum(fwd) - fwd[0])


def _copy_weights(model, tmodel):
    """Give the torch model minidl's initial weights (Dense stores W transposed)."""
    mine = [l for l in model.layers if isinstance(l, (minidl.Conv2D, minidl.Dense))]
    theirs = [m for m in tmodel if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        for a, b in zip(mine, theirs):
            w = a.weight.data.T if isinstance(a, minidl.Dense) else a.weight.data
            b.weight.copy_(to_torch(np.ascontiguousarray(minidl.to_numpy(w))))
            b.bias.copy_(to_torch(a.bias.data))


def step_row(kind, args, batch=64):
    rng = _rng()
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    lr, momentum = 0.01, 0.9

    def make_minidl():
        minidl.manual_seed(0)
        model = minidl_model(kind)
        trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                                 minidl.SGD(model.parameters(), lr=lr, momentum=momentum),
                                 metrics=(), verbose=0)
        xd, yd = to_minidl(x), to_minidl(y)
        return lambda: trainer.train_step(xd, yd)      # reads the loss: waits for the GPU

    def make_torch():
        torch.manual_seed(0)
        tmodel = torch_model(kind)
        tmodel.train()
        opt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum)
        xt, yt = to_torch(x), to_torch(y)

        def run():
            loss = TF.cross_entropy(tmodel(xt), yt)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.item()
        return run

    impls = [Impl("minidl", "numpy", make_minidl)]
    if torch is not None:
        if kind == "plain":
            _check_step(x, y, lr)
        impls.append(Impl("torch", "torch", make_torch))
    label = ("Training step, mnist_cnn (BN, dropout), batch 64" if kind == "mnist_cnn"
             else "Training step, plain CNN (anchors), batch 64")
    return run_row(label, impls, args, flops=model_flops(batch), target=STEP_TARGET)


def _check_step(x, y, lr):
    """One plain-SGD step of the plain CNN from the same weights: same loss, same update."""
    minidl.manual_seed(0)
    model = minidl_model("plain")
    tmodel = torch_model("plain")
    _copy_weights(model, tmodel)
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                             minidl.SGD(model.parameters(), lr=lr), metrics=(), verbose=0)
    loss, _ = trainer.train_step(to_minidl(x), to_minidl(y))
    opt = torch.optim.SGD(tmodel.parameters(), lr=lr)
    tloss = TF.cross_entropy(tmodel(to_torch(x)), to_torch(y))
    tloss.backward()
    opt.step()
    assert abs(loss - tloss.item()) < 1e-4 * max(1.0, abs(loss)), (loss, tloss.item())
    _agree("W after one step", model.layers[0].weight.data,
           tmodel[0].weight.detach().cpu().numpy())


def epoch_row(args, batch=64):
    """Images/s over one epoch of 60000 synthetic images (or a few steps, extrapolated)."""
    rng = _rng()
    n_images = 60000
    x = rng.random((n_images, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n_images)
    steps = args.epoch_steps                 # None: the whole epoch
    used = n_images if steps is None else steps * batch
    lr, momentum = 0.01, 0.9
    results = {}

    minidl.manual_seed(0)
    model = minidl.models.mnist_cnn()
    trainer = minidl.Trainer(model, minidl.SoftmaxCrossEntropy(),
                             minidl.SGD(model.parameters(), lr=lr, momentum=momentum), verbose=0)
    loader = minidl.DataLoader(x[:used], y[:used], batch_size=batch, shuffle=True, seed=0)
    trainer.train_step(to_minidl(x[:batch]), to_minidl(y[:batch]))     # warm-up
    t0 = time.perf_counter()
    trainer.fit(loader, epochs=1, verbose=0)
    results["minidl"] = used / (time.perf_counter() - t0)

    if torch is not None:
        time.sleep(args.pause)
        torch.manual_seed(0)
        tmodel = torch_model("mnist_cnn")
        opt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum)
        tloader = minidl.DataLoader(x[:used], y[:used], batch_size=batch, shuffle=True, seed=0)
        tmodel.train()
        t0 = time.perf_counter()
        for xb, yb in tloader:                 # the same loader: the same data pipeline cost
            xt, yt = to_torch(xb), to_torch(yb)
            logits = tmodel(xt)
            loss = TF.cross_entropy(logits, yt)
            loss.backward()
            opt.step()
            opt.zero_grad()
            loss.item()
            (logits.argmax(1) == yt).float().mean().item()   # the Trainer's accuracy metric
        results["torch"] = used / (time.perf_counter() - t0)
    how = ("full epoch, 938 steps" if steps is None
           else f"{steps} steps of batch {batch}, extrapolated")
    return {"title": f"Epoch of 60000 images, mnist_cnn via Trainer ({how})",
            "epoch": results}


def run_row(title, impls, args, flops=None, target=None):
    estimate = []
    for impl in impls:                      # a rough per-call time, to size the repeats
        fn = impl.make()
        fn()
        t0 = time.perf_counter()
        fn()
        estimate.append(time.perf_counter() - t0)
        del fn
        time.sleep(args.pause if impl.side == "torch" else 0)
    samples = samples_for(max(estimate), args.budget, args.min_samples, args.max_samples)
    if args.repeats:
        samples = args.repeats
    measure(impls, samples, block=max(1, min(args.block, samples)), pause=args.pause)
    row = {"title": title, "flops": flops, "target": target, "impls": {}}
    for impl in impls:
        row["impls"][impl.name] = {"q": quantiles(impl.samples), "n": len(impl.samples),
                                   "peak": impl.peak_bytes}
    print(f"  measured: {title} ({time.perf_counter() - _START:.0f} s)", file=sys.stderr,
          flush=True)
    return row


# -- the table ---------------------------------------------------------------------------

def _ms(q):
    lo, med, hi = q
    return f"{med * 1e3:.2f} ({lo * 1e3:.2f}-{hi * 1e3:.2f})"


def _mib(b):
    return "?" if b is None else f"{b / 2**20:.0f}"


def markdown(rows, header):
    lines = [header, "",
             "| Case | minidl ms, median (p25-p75) | torch ms, median (p25-p75) | ratio to torch "
             "| target | met | minidl / torch GFLOP/s | peak MiB minidl / torch "
             "| before #7 ms | speed-up vs before |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "epoch" in row:
            e = row["epoch"]
            mine, theirs = e.get("minidl"), e.get("torch")
            ratio = f"{theirs / mine:.2f}x" if theirs else "-"
            lines.append(f"| {row['title']} | {mine:.0f} img/s | "
                         f"{f'{theirs:.0f} img/s' if theirs else '-'} | {ratio} | - | - "
                         f"| - | - | - | - |")
            continue
        impls = row["impls"]
        mine = impls["minidl"]
        theirs = impls.get("torch")
        before = impls.get("before #7")
        med = mine["q"][1]
        ratio = met = "-"
        if theirs is not None:
            r = med / theirs["q"][1]
            ratio = f"**{r:.2f}x**"
            met = "yes" if r <= row["target"] else "no"
        target = f"<= {row['target']:.1f}x" if row["target"] else "-"
        gflops = "-"
        if row["flops"]:
            g = f"{row['flops'] / med / 1e9:.0f}"
            if theirs is not None:
                g += f" / {row['flops'] / theirs['q'][1] / 1e9:.0f}"
            gflops = g
        peak = _mib(mine["peak"]) + (f" / {_mib(theirs['peak'])}" if theirs else "")
        before_ms = _ms(before["q"]) if before else "-"
        speedup = f"{before['q'][1] / med:.2f}x" if before else "-"
        lines.append(f"| {row['title']} | {_ms(mine['q'])} | "
                     f"{_ms(theirs['q']) if theirs else '-'} | {ratio} | {target} | {met} "
                     f"| {gflops} | {peak} | {before_ms} | {speedup} |")
    lines.append("")
    lines.append("Ratio = minidl time / torch time (lower is better; for the epoch row, torch "
                 "img/s / minidl img/s). GFLOP/s count forward, dW and dx as one GEMM each "
                 "(no dx for a model's first layer). Samples per cell: "
                 + ", ".join(sorted({str(i['n']) for r in rows if 'impls' in r
                                     for i in r['impls'].values()})) + ".")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: few samples, epoch extrapolated from 20 steps")
    parser.add_argument("--only", default="conv,chunked,pool,step,epoch",
                        help="comma-separated rows: conv, chunked, pool, step, epoch")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for OpenBLAS and torch (default: all usable cores)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed calls per column (default: sized to --budget)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed calls per column and row (default 2)")
    parser.add_argument("--block", type=int, default=5, help="calls per alternating block")
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds of sleep between numpy and torch blocks (default 0.5)")
    parser.add_argument("--epoch-steps", type=int, default=200,
                        help="epoch row: time this many steps of the Trainer and extrapolate "
                             "to 60000 images (default 200)")
    parser.add_argument("--full-epoch", action="store_true",
                        help="epoch row: time a whole epoch (938 steps) instead")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the 'before #7' column")
    parser.add_argument("--blas-timeout", default=None,
                        help="OPENBLAS_THREAD_TIMEOUT for this run (default: the environment's, "
                             "else 4, which lets minidl thread its memory passes; 'default': "
                             "unset, OpenBLAS's own 28, and minidl's passes on one thread)")
    parser.add_argument("--output", help="also write the Markdown table to this file")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: minidl on cupy against torch on CUDA (no 'before #7' "
                             "column, no memory column)")
    args = parser.parse_args(argv)
    if args.device == "gpu":
        global GPU
        GPU = True
        minidl.set_backend("cupy")
        args.baseline = False
    args.min_samples, args.max_samples = 10, 60
    if args.quick:
        args.budget, args.min_samples, args.max_samples, args.pause = 0.3, 3, 10, 0.2
        args.epoch_steps = min(args.epoch_steps, 20)
    if args.full_epoch:
        args.epoch_steps = None
    only = set(args.only.split(","))

    threads = set_threads(args.threads)
    # minidl splits memory passes over threads only when OpenBLAS's threads sleep between
    # products (see minidl/layers/parallel.py); --threads caps how many.
    parallel.NUM_THREADS = min(args.threads, parallel.num_threads())
    load_before = os.getloadavg()[0]
    rows = []
    if "conv" in only:
        for case in CONV_CASES:
            rows.append(conv_row(case, args))
    if "chunked" in only:
        case = CONV_CASES[2]
        rows.append(conv_row(case, args, max_bytes=CHUNKED_BYTES,
                             label=f"Conv2D C, im2col in {CHUNKED_BYTES // 2**20} MiB chunks"))
    if "pool" in only:
        rows.append(pool_row(args))
    if "step" in only:
        rows.append(step_row("mnist_cnn", args))
        rows.append(step_row("plain", args))
    if "epoch" in only:
        rows.append(epoch_row(args))
        print("  measured: epoch", file=sys.stderr, flush=True)
    header = (f"minidl vs PyTorch, {args.device.upper()}, float32, {time.strftime('%Y-%m-%d')}; "
              f"threads: OpenBLAS {threads[0]}, torch {threads[1]}, minidl memory passes "
              f"{parallel.num_threads()}; OPENBLAS_THREAD_TIMEOUT="
              f"{os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset (OpenBLAS default, 28)')}\n\n"
              + machine_description(threads)
              + f"\n- load average (1 min) {load_before:.2f} before, "
                f"{os.getloadavg()[0]:.2f} after this run (other processes share the machine)")
    table = markdown(rows, header)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
