"""How the ranks of a data-parallel job talk (docs/distributed.md, "Liveness"): MPI for
host arrays and Python values, NCCL for GPU arrays.

MPI's blocking collectives wait forever for a rank that never comes: one that left
``fit`` early, was stopped, or hangs. So every MPI collective here is non-blocking
(``Iallreduce``, ``Ibcast``, ``Ibarrier``, ``Iallgather``) and polled until it ends.
Past the timeout the waiting rank asks the others, on a communicator of its own, where
they are (each rank answers while it polls), and raises ``CollectiveTimeout`` naming
the ranks that did not arrive and where the others wait. Under ``python -m mpi4py``
that error ends the whole job.
"""
import json
import os
import time

from .. import backend
from ..checks import check_real

_numpy = backend.get_module("cpu")    # MPI's arrays live in host memory

DEFAULT_TIMEOUT = 300.0     # seconds a collective may wait for the slowest rank
# Poll without sleeping first, yielding the core to any process that wants it: ranks a
# step apart meet within this, and a sleeping rank would slow the transfer it is part
# of (MPICH moves a non-blocking collective only inside MPI calls). Longer waits (rank 0
# writing a checkpoint, downloading) sleep between polls, up to _MAX_PAUSE.
_SPIN_SECONDS = 0.05
_MAX_PAUSE = 1e-3
_yield_core = getattr(os, "sched_yield", lambda: None)     # Unix
_QUERY, _ANSWER = 1, 2      # the tags of the side channel's messages


class CollectiveTimeout(TimeoutError):
    """A collective waited longer than the job's timeout; the message says which ranks
    did not arrive and where the others wait."""


class MPIHost:
    """MPI's collectives on host arrays (named as cupyx.distributed's), each polled
    against a deadline of ``timeout`` seconds (a call may pass its own)."""

    def __init__(self, world, MPI, timeout=DEFAULT_TIMEOUT):
        self.MPI = MPI
        # minidl's traffic apart from the user's, and each kind of collective on a
        # communicator of its own: MPI matches collectives by their order alone, so a
        # rank in a barrier would complete another's allreduce with garbage.
        self.comm, self.fence, self.gather = world.Dup(), world.Dup(), world.Dup()
        self.talk = world.Dup()     # the side channel: where is each rank?
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = check_timeout(timeout)
        node = world.Split_type(MPI.COMM_TYPE_SHARED)   # the ranks on this machine
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.calls = 0              # collectives entered: equal on ranks that are in step
        self.waiting = None         # [call, what] while this rank waits in a collective
        self._sent = []             # side-channel sends in flight, with their buffers

    # -- the collectives -------------------------------------------------------------
    def all_reduce(self, a, out, timeout=None):
        _check_host(a)
        send = self.MPI.IN_PLACE if a is out else a
        self._wait(self.comm.Iallreduce(send, out, op=self.MPI.SUM),
                   f"an allreduce of {a.size} {a.dtype}", timeout)

    def broadcast(self, a, root, timeout=None):
        _check_host(a)
        self._wait(self.comm.Ibcast(a, root=root),
                   f"a broadcast of {a.size} {a.dtype} from rank {root}", timeout)

    def barrier(self, timeout=None):
        self._wait(self.fence.Ibarrier(), "a barrier", timeout)

    def allgather_object(self, obj, timeout=None):
        """Every rank's ``obj`` (JSON values), in rank order: the sizes, then the bytes."""
        data = _numpy.frombuffer(json.dumps(obj).encode(), dtype=_numpy.uint8)
        sizes = _numpy.zeros(self.size, _numpy.int64)
        self._wait(self.gather.Iallgather(_numpy.array([data.size], _numpy.int64), sizes),
                   "an allgather of sizes", timeout)
        counts = sizes.tolist()
        ends = _numpy.cumsum(counts).tolist()
        every = _numpy.empty(max(1, ends[-1]), _numpy.uint8)
        starts = [end - count for end, count in zip(ends, counts)]
        self._wait(self.gather.Iallgatherv(data, [every, (counts, starts)]),
                   f"an allgather of {ends[-1]} bytes", timeout)
        return [json.loads(every[start:end].tobytes()) for start, end in zip(starts, ends)]

    def bcast_object(self, obj, root=0):
        return self.allgather_object(obj if self.rank == root else None)[root]

    # -- waiting against a deadline ------------------------------------------------
    def _wait(self, request, what, timeout):
        """Poll ``request`` until it completes, answering the others' questions meanwhile;
        CollectiveTimeout after ``timeout`` seconds (None: the host's)."""
        limit = self.timeout if timeout is None else timeout
        self.calls += 1
        self.waiting = [self.calls, what]
        start, pause = time.monotonic(), 0.0
        try:
            while not request.Test():
                waited = time.monotonic() - start
                if waited < _SPIN_SECONDS:
                    _yield_core()
                    continue
                self._answer()
                if waited > limit:
                    raise CollectiveTimeout(self._missing(waited, limit))
                time.sleep(pause)
                pause = min(2 * pause + 1e-5, _MAX_PAUSE)
        finally:
            self.waiting = None

    def _answer(self):
        """Tell every rank that asked where this one waits."""
        for source, _ in self._received(_QUERY):
            self._send(source, _ANSWER, self.waiting)

    def _missing(self, waited, limit):
        """Ask every other rank where it is (for up to ``limit`` or 5 s) and say who is
        missing: the text of the CollectiveTimeout."""
        call, what = self.waiting
        for rank in range(self.size):
            if rank != self.rank:
                self._send(rank, _QUERY, self.waiting)
        answers, deadline = {}, time.monotonic() + min(limit, 5.0)
        while len(answers) < self.size - 1 and time.monotonic() < deadline:
            self._answer()                          # others may be asking too
            answers.update(self._received(_ANSWER))
            time.sleep(1e-3)
        text = (f"distributed: rank {self.rank} waited {waited:.1f} s in {what} (collective "
                f"#{call}) for the other ranks")
        silent = [rank for rank in range(self.size) if rank != self.rank and rank not in answers]
        if silent:
            text += (f"; {_ranks(silent)} did not arrive and did not answer: stopped, dead, "
                     f"or busy outside minidl's collectives (did one leave fit early?)")
        for rank, (other_call, other) in sorted(answers.items()):
            if [other_call, other] != self.waiting:
                text += (f"; rank {rank} waits in {other} (collective #{other_call}) instead: "
                         f"the ranks took different paths (did one leave fit early?)")
        return text + (f". The timeout is {limit:g} s: distributed.init(timeout=...), or "
                       f"minidl train --collective-timeout")

    def _send(self, dest, tag, obj):
        data = _numpy.frombuffer(json.dumps(obj).encode(), dtype=_numpy.uint8)
        self._sent = [(r, d) for r, d in self._sent if not r.Test()]
        self._sent.append((self.talk.Isend(data, dest=dest, tag=tag), data))

    def _received(self, tag):
        """(source, value) of each message with ``tag`` that has arrived."""
        status = self.MPI.Status()
        while self.talk.Iprobe(source=self.MPI.ANY_SOURCE, tag=tag, status=status):
            data = _numpy.empty(status.Get_count(self.MPI.BYTE), _numpy.uint8)
            self.talk.Recv(data, source=status.Get_source(), tag=tag)
            yield status.Get_source(), json.loads(data.tobytes())


def check_timeout(seconds):
    return check_real(seconds, "timeout", "distributed.init", above=0)


def _ranks(ranks):
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _check_host(a):
    if not isinstance(a, _numpy.ndarray):
        raise TypeError(f"distributed: MPI sums host (numpy) arrays, got "
                        f"{type(a).__module__}.{type(a).__name__}; for a model on the GPU "
                        f"use distributed.init(device='gpu'), which sums them with NCCL")


class NCCLDevice:
    """NCCL collectives on GPU arrays (``cupy.cuda.nccl``), one GPU per rank.

    Rank 0 makes the communicator's id; MPI carries it to the others once. NCCL's calls
    are queued on the CUDA stream and return at once: they have no deadline of their own.
    """

    def __init__(self, host, cupy):
        cuda = cupy.cuda
        cuda.Device(host.local_rank % cuda.runtime.getDeviceCount()).use()
        self.nccl, self.cuda = cuda.nccl, cuda
        uid = self.nccl.get_unique_id() if host.rank == 0 else None
        uid = tuple(host.bcast_object(None if uid is None else list(uid)))
        self.comm = self.nccl.NcclCommunicator(host.size, uid, host.rank)
        self.types = {_numpy.dtype(name): getattr(self.nccl, f"NCCL_{name.upper()}")
                      for name in ("float16", "float32", "float64", "int64")}

    def all_reduce(self, a, out):
        self.comm.allReduce(_device_pointer(a), _device_pointer(out), a.size, self._type(a),
                            self.nccl.NCCL_SUM, self.cuda.get_current_stream().ptr)

    def broadcast(self, a, root):
        self.comm.bcast(_device_pointer(a), a.size, self._type(a), root,
                        self.cuda.get_current_stream().ptr)

    def _type(self, a):
        if a.dtype not in self.types:
            raise TypeError(f"distributed: NCCL sums {sorted(map(str, self.types))} arrays, "
                            f"got {a.dtype}")
        return self.types[a.dtype]


def _device_pointer(a):
    """The address of a cupy array's first element (what NCCL calls take)."""
    return a.data.ptr
