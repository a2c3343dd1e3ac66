#!/usr/bin/env python
"""Images/s of data-parallel training on one machine: 1 process with 1 thread, 1 process
with 2 threads, and 2 MPI ranks with 1 thread each (the default since distributed.init
shares the cores out) or 2 each (what they took before), at the same global batch, and
where each step's time goes (docs/distributed.md, "Speed", records a run).

    python benchmarks/bench_distributed.py              # 2 models x batch 64, 128; 5 rounds
    python benchmarks/bench_distributed.py --quick      # a smoke run
    python benchmarks/bench_distributed.py --models plain --batches 64 --rounds 3

Every run is ``mpiexec -n P python -m mpi4py`` of this file (P = 1 or 2), training as
``minidl train --distributed`` does: the model (``mnist_cnn``, whose BatchNorm become
SyncBatchNorm on 2 ranks; or ``plain``, the README's CNN without batch norm), Adam,
batches from a ShardedLoader of synthetic uint8 images with the CLI's augmentation
(random shifts, then /255), global batch --batch split over the ranks. BLAS (through
threadpoolctl, the bench extra) and minidl's memory passes get --threads threads each.
The configurations alternate within every round (1 2 3 4, then 4 3 2 1, ...), so the drift
of a busy machine hits them alike; a cell is the median over rounds.

Each step is timed in phases, per rank: loader (the next batch, augmented), forward
(with the loss; SyncBatchNorm's allreduces included), backward, allreduce (the
gradients' average: waiting for the slower rank, then the transfer), update (Adam).
The allreduce splits into its transfer (that of the rank that came last, which did
not wait) and the wait (the rest). Images/s count the global batch over the wall time
of the timed steps on rank 0. Last, an allreduce alone: MPI's blocking Allreduce
against minidl's polled one (minidl/ext/transport.py), alternating.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2),
           ("2 ranks, 1 thread each", 2, 1),
           ("2 ranks, 2 threads each", 2, 2)]    # what each rank took before init() shared
PHASES = ("loader", "forward", "backward", "allreduce", "update")


def worker(args):
    """One run: train ``args.steps`` timed steps; rank 0 prints a JSON line."""
    sys.path.insert(0, os.path.dirname(HERE))
    import numpy
    from threadpoolctl import threadpool_limits
    import minidl
    from minidl.ext import distributed
    from minidl.ext.sync_batchnorm import convert_sync_batchnorm
    from minidl.ext.transforms import Compose, RandomShift
    from minidl.ext.zoo import mnist_cnn
    from minidl.layers import parallel

    comm = distributed.init(threads=args.threads)
    parallel.NUM_THREADS = args.threads     # one process: init() leaves the threads alone
    threadpool_limits(args.threads, user_api="blas")
    minidl.manual_seed(0)
    model = mnist_cnn() if args.model == "mnist_cnn" else plain_cnn(minidl)
    distributed.broadcast_parameters(model, comm=comm)
    if comm.size > 1:
        model = convert_sync_batchnorm(model, comm)
    loss = minidl.SoftmaxCrossEntropy()
    optimizer = distributed.DistributedOptimizer(minidl.Adam(model.parameters()), comm)
    rng = numpy.random.default_rng(0)
    n = args.batch * (args.warmup + args.steps)
    x = rng.integers(0, 256, (n, 1, 28, 28), dtype=numpy.uint8)
    y = rng.integers(0, 10, n)
    to_float = lambda images: images.astype(numpy.float32) * numpy.float32(1 / 255)  # noqa
    loader = distributed.ShardedLoader(x, y, args.batch // comm.size, comm, seed=0,
                                       transform=Compose([RandomShift(2), to_float]))
    distributed.seed_per_rank(model, loader, comm)
    model.train()
    batches = iter(loader)
    times = {phase: [] for phase in PHASES}
    comm.barrier()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            comm.barrier()
            start = time.perf_counter()
        t0 = time.perf_counter()
        xb, yb = next(batches)
        t1 = time.perf_counter()
        loss.forward(model.forward(xb, training=True), yb)
        t2 = time.perf_counter()
        model.backward(loss.backward(), input_grad=False)
        t3 = time.perf_counter()
        optimizer.synchronize()
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t5 = time.perf_counter()
        if step >= args.warmup:
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                times[phase].append(seconds)
    comm.barrier()
    wall = time.perf_counter() - start
    every = comm.allgather(times)       # each rank's phases, step by step
    if comm.rank == 0:
        transfer = [min(rank["allreduce"][s] for rank in every) for s in range(args.steps)]
        phases = {phase: statistics.mean(statistics.median(rank[phase]) for rank in every)
                  for phase in PHASES}
        phases["transfer"] = statistics.median(transfer)
        phases["wait"] = phases["allreduce"] - phases["transfer"]
        print(json.dumps({"images_per_s": args.batch * args.steps / wall,
                          "step": wall / args.steps, **phases}), flush=True)


def allreduce_worker(args):
    """Blocking Allreduce against minidl's polled one (transport.MPIHost), alternating,
    for the default CNN's gradients and for a few numbers; rank 0 prints a JSON line."""
    sys.path.insert(0, os.path.dirname(HERE))
    import numpy
    from mpi4py import MPI
    from minidl.ext import distributed

    host = distributed.init().host
    found = {}
    for n in (130, 421738):
        a = numpy.ones(n, numpy.float32)
        times = {"blocking": [], "polled": []}
        for round_ in range(10):
            for how in (("blocking", "polled") if round_ % 2 == 0 else ("polled", "blocking")):
                for _ in range(20):
                    host.barrier()
                    start = time.perf_counter()
                    if how == "blocking":
                        host.comm.Allreduce(MPI.IN_PLACE, a)
                    else:
                        host.all_reduce(a, a)
                    times[how].append(time.perf_counter() - start)
        found[n] = {how: statistics.median(t) for how, t in times.items()}
    if host.rank == 0:
        print(json.dumps(found), flush=True)


def plain_cnn(minidl):
    """The README's CNN: two conv blocks and an MLP head, no batch norm, no dropout."""
    L = minidl
    return L.Sequential([L.Conv2D(1, 32, 3, padding=1, activation="relu"), L.MaxPool2D(2),
                         L.Conv2D(32, 64, 3, padding=1, activation="relu"), L.MaxPool2D(2),
                         L.Flatten(), L.Dense(64 * 7 * 7, 128, activation="relu"),
                         L.Dense(128, 10)])


def launch(ranks, threads, model, batch, args, worker="--worker"):
    """One run in fresh processes; its JSON line."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                           os.environ.get("PYTHONPATH", "")]))
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", __file__,
               worker, "--model", model, "--batch", str(batch), "--threads", str(threads),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results, args):
    print(f"{args.rounds} rounds x {args.steps} steps (after {args.warmup}), medians over "
          f"rounds; phases in ms per step, averaged over the ranks\n")
    print("| model | global batch | configuration | images/s | vs 1 thread | step (ms) | "
          "loader | forward | backward | allreduce: wait | allreduce: transfer | update |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for batch in args.batches:
            base = None
            for name, _, _ in CONFIGS:
                rows = results[model, batch, name]
                cell = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
                base = base or cell["images_per_s"]
                ms = {key: f"{cell[key] * 1e3:.1f}" for key in cell if key != "images_per_s"}
                print(f"| {model} | {batch} | {name} | {cell['images_per_s']:.0f} | "
                      f"{cell['images_per_s'] / base:.2f}x | {ms['step']} | {ms['loader']} | "
                      f"{ms['forward']} | {ms['backward']} | {ms['wait']} | "
                      f"{ms['transfer']} | {ms['update']} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mnist_cnn", "plain"],
                        choices=["mnist_cnn", "plain"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 round of 3 steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.allreduce_worker:
        return allreduce_worker(args)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
    print(f"machine: {os.cpu_count()} cores; load average before: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results = {}
    for round_ in range(args.rounds):
        configs = CONFIGS if round_ % 2 == 0 else CONFIGS[::-1]
        for model in args.models:
            for batch in args.batches:
                for name, ranks, threads in configs:
                    result = launch(ranks, threads, model, batch, args)
                    results.setdefault((model, batch, name), []).append(result)
                    print(json.dumps({"round": round_, "model": model, "batch": batch,
                                      "config": name, **result}), file=sys.stderr, flush=True)
    alone = launch(2, 1, "plain", 64, args, worker="--allreduce-worker")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    report(results, args)
    print("\nan allreduce alone, 2 ranks, median of 200 calls (us): "
          + "; ".join(f"{int(n):,} float32: blocking {t['blocking'] * 1e6:.1f}, polled "
                      f"{t['polled'] * 1e6:.1f}" for n, t in alone.items()))


if __name__ == "__main__":
    main()
