#!/usr/bin/env python
"""Images/s of data-parallel training of the default CNN on 1 and 2 MPI ranks, and
the share of each step spent communicating (docs/distributed.md records a run).

    python benchmarks/bench_distributed.py                  # 1 and 2 ranks, 3 rounds
    python benchmarks/bench_distributed.py --ranks 1,2,4 --steps 40 --rounds 2

It starts ``mpiexec -n P python -m mpi4py`` on itself for each P, in alternating
rounds (1 2 1 2 ...) so that a noisy machine's drift hits every P alike. Each rank
trains minidl.ext.zoo.mnist_cnn() on synthetic 28x28 images with its own batch of
--batch (weak scaling, as Horovod and PyTorch DDP report), one thread per rank
(OMP_NUM_THREADS=1), and times every step in three parts: compute (forward, loss,
backward, Adam update), wait (a barrier: the time a rank waits for a slower one),
and communication (distributed.average_gradients: pack, one allreduce, divide). The table gives medians over steps and rounds, then what
the ring-allreduce model predicts for 8 and 64 ranks:

    t_comm(p) = 2 (p - 1) / p * bytes / bandwidth + 2 (p - 1) * latency
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
LINKS = {   # bandwidth (bytes/s) and latency (s) per hop, nominal
    "10 GbE": (1.25e9, 20e-6),
    "100 Gb/s InfiniBand": (12.5e9, 2e-6),
}


def worker(args):
    import minidl
    from minidl.ext import distributed
    from minidl.ext.zoo import mnist_cnn

    comm = distributed.init()
    minidl.manual_seed(0)
    model = mnist_cnn()
    distributed.broadcast_parameters(model, comm=comm)
    loss_fn = minidl.SoftmaxCrossEntropy()
    optimizer = minidl.Adam(model.parameters(), lr=1e-3)
    rng = numpy.random.default_rng(comm.rank)
    x = rng.random((args.batch, 1, 28, 28), dtype=numpy.float32)
    y = rng.integers(0, 10, args.batch)
    compute, wait, communicate = [], [], []
    for step in range(args.warmup + args.steps):
        comm.barrier()      # every step starts together: a step's time is the slowest rank's
        start = time.perf_counter()
        logits = model.forward(x, training=True)
        loss_fn.forward(logits, y)
        model.backward(loss_fn.backward(), input_grad=False)
        middle = time.perf_counter()
        comm.barrier()      # waiting for a slower rank is imbalance, not communication
        ready = time.perf_counter()
        distributed.average_gradients(model.parameters(), comm)
        after = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        end = time.perf_counter()
        if step >= args.warmup:
            compute.append((middle - start) + (end - after))
            wait.append(ready - middle)
            communicate.append(after - ready)
    bytes_ = 4 * sum(p.size for p in model.parameters())
    flat = numpy.ones(bytes_ // 4, numpy.float32)
    allreduce = []
    for _ in range(50):     # the collective alone, without packing
        comm.barrier()
        start = time.perf_counter()
        comm.allreduce_(flat)
        allreduce.append(time.perf_counter() - start)
    # the slowest rank sets the pace: take the maximum over ranks of each median
    medians = [statistics.median(t) for t in (compute, wait, communicate, allreduce)]
    worst = _max_over_ranks(comm, medians)
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "batch": args.batch, "bytes": bytes_,
                          "compute": worst[0], "wait": worst[1], "communicate": worst[2],
                          "allreduce": worst[3]}), flush=True)


def _max_over_ranks(comm, values):
    """Each value's maximum over the ranks (a sum of slots, one slot per rank)."""
    slots = [0.0] * (len(values) * comm.size)
    slots[comm.rank * len(values):(comm.rank + 1) * len(values)] = values
    every = comm.sum(slots)
    return [max(every[r * len(values) + i] for r in range(comm.size))
            for i in range(len(values))]


def launch(ranks, args):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                           os.environ.get("PYTHONPATH", "")]))
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", __file__,
               "--worker", "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results, args):
    rows = {}
    for r in results:
        rows.setdefault(r["ranks"], []).append(r)
    print(f"default CNN ({results[0]['bytes'] / 1e6:.2f} MB of float32 gradients), "
          f"batch {args.batch} per rank, one thread per rank, medians of "
          f"{len(results) // len(rows)} rounds x {args.steps} steps\n")
    print("| ranks | step (ms) | compute (ms) | wait (ms) | communication (ms) | share | "
          "images/s | allreduce alone (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    one_step = None
    for ranks, rs in sorted(rows.items()):
        compute = statistics.median(r["compute"] for r in rs) * 1e3
        wait = statistics.median(r["wait"] for r in rs) * 1e3
        comm = statistics.median(r["communicate"] for r in rs) * 1e3
        alone = statistics.median(r["allreduce"] for r in rs) * 1e3
        step = compute + wait + comm
        one_step = one_step or compute
        print(f"| {ranks} | {step:.1f} | {compute:.1f} | {wait:.1f} | {comm:.2f} | "
              f"{comm / step:.1%} | {ranks * args.batch / step * 1e3:.0f} | {alone:.2f} |")
    nbytes = results[0]["bytes"]
    print(f"\nring allreduce of {nbytes / 1e6:.2f} MB, compute {one_step:.1f} ms a step:")
    print("| link | ranks | allreduce (ms) | share of a step |")
    print("|---|---|---|---|")
    for link, (bandwidth, latency) in LINKS.items():
        for p in (8, 64):
            t = (2 * (p - 1) / p * nbytes / bandwidth + 2 * (p - 1) * latency) * 1e3
            print(f"| {link} | {p} | {t:.2f} | {t / (t + one_step):.1%} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    ranks = [int(r) for r in args.ranks.split(",")]
    results = []
    for _ in range(args.rounds):
        for p in ranks:
            results.append(launch(p, args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
