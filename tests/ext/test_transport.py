"""How the ranks talk (minidl/ext/transport.py): MPI's collectives polled against a
deadline, the question-and-answer that names a missing rank, and NCCL through a fake
cupy. (Real 2-rank jobs that time out: tests/ext/test_distributed.py.)"""
import ctypes
import json
import re
from types import SimpleNamespace

import numpy
import pytest

from minidl.ext import distributed, transport
from minidl.ext.transport import CollectiveTimeout, MPIHost, NCCLDevice


class FakeRequest:
    """Completes at its ``polls``-th Test (None: never)."""

    def __init__(self, polls=1):
        self.polls, self.tests = polls, 0

    def Test(self):
        self.tests += 1
        return self.polls is not None and self.tests >= self.polls


class FakeWorld:
    """MPI's communicator as one rank of ``size`` sees it. Collectives return the
    ``requests`` given (one each, in order); on the side channel, the ranks of
    ``answers`` answer a question with their [call, what]; the others stay silent."""

    IN_PLACE, SUM, BYTE, ANY_SOURCE, COMM_TYPE_SHARED = "in place", "sum", "byte", -1, 7

    def __init__(self, rank=0, size=3, requests=(), answers=None):
        self.rank, self.size = rank, size
        self.requests, self.answers = list(requests), answers or {}
        self.calls, self.inbox, self.sent = [], [], []

    # what MPIHost asks of COMM_WORLD and of its duplicates
    def Dup(self):
        return self

    def Split_type(self, kind):
        return SimpleNamespace(Get_rank=lambda: self.rank, Get_size=lambda: 2,
                               Free=lambda: None)

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Iallreduce(self, send, recv, op):
        self.calls.append(("Iallreduce", send, op))
        return self.requests.pop(0)

    def Ibarrier(self):
        self.calls.append(("Ibarrier",))
        return self.requests.pop(0)

    # the side channel
    def Isend(self, data, dest, tag):
        message = json.loads(data.tobytes())
        self.sent.append((dest, tag, message))
        if tag == transport._QUERY and dest in self.answers:
            self.inbox.append((dest, transport._ANSWER, self.answers[dest]))
        return FakeRequest()

    def Iprobe(self, source, tag, status):
        for i, (sender, kind, message) in enumerate(self.inbox):
            if kind == tag:
                status.found = self.probed = self.inbox.pop(i)
                return True
        return False

    def Recv(self, data, source, tag):
        data[...] = numpy.frombuffer(json.dumps(self.probed[2]).encode(), numpy.uint8)

    def Status(self):
        return FakeStatus()


class FakeStatus:
    found = None

    def Get_source(self):
        return self.found[0]

    def Get_count(self, kind):
        return len(json.dumps(self.found[2]).encode())


def host(world, timeout=1.0):
    return MPIHost(world, world, timeout)


def test_collectives_are_polled_to_completion():
    request = FakeRequest(polls=40)
    world = FakeWorld(requests=[request, FakeRequest()])
    h = host(world)
    a = numpy.ones(3)
    h.all_reduce(a, a)
    assert world.calls == [("Iallreduce", "in place", "sum")] and request.tests == 40
    h.barrier()
    assert h.calls == 2 and h.waiting is None and world.sent == []   # nobody was asked
    assert (h.rank, h.size, h.local_rank, h.local_size) == (0, 3, 0, 2)


def test_a_collective_that_waits_too_long_names_who_is_missing():
    # rank 1 answers from another collective; rank 2 never answers (stopped, or dead)
    world = FakeWorld(requests=[FakeRequest(polls=None)], answers={1: [7, "a barrier"]})
    h = host(world, timeout=0.05)
    with pytest.raises(CollectiveTimeout) as error:
        h.all_reduce(numpy.ones(4, numpy.float32), numpy.ones(4, numpy.float32))
    assert isinstance(error.value, TimeoutError)        # an OSError: the CLI's one line
    text = str(error.value)
    assert re.match(r"distributed: rank 0 waited 0\.\d s in an allreduce of 4 float32 "
                    r"\(collective #1\) for the other ranks; rank 2 did not arrive and did not "
                    r"answer: stopped, dead, or busy outside minidl's collectives", text), text
    assert ("; rank 1 waits in a barrier (collective #7) instead: the ranks took different "
            "paths") in text
    assert text.endswith("The timeout is 0.05 s: distributed.init(timeout=...), or minidl "
                         "train --collective-timeout")
    queries = [(dest, message) for dest, tag, message in world.sent if tag == transport._QUERY]
    assert queries == [(1, [1, "an allreduce of 4 float32"]),
                       (2, [1, "an allreduce of 4 float32"])]


def test_a_waiting_rank_answers_where_it_waits():
    world = FakeWorld(requests=[FakeRequest(polls=None)])
    h = host(world, timeout=10.0)
    world.inbox.append((2, transport._QUERY, [3, "a barrier"]))    # rank 2 asks
    h.waiting = [5, "an allreduce of 9 float32"]
    h._answer()
    assert world.sent == [(2, transport._ANSWER, [5, "an allreduce of 9 float32"])]


def test_a_timeout_per_call_and_checked_values():
    world = FakeWorld(requests=[FakeRequest(polls=None)])
    h = host(world, timeout=100.0)
    with pytest.raises(CollectiveTimeout, match=r"waited 0\.\d s in a barrier \(collective #1\) "
                                                r"for the other ranks; ranks 1, 2 did not arrive"):
        h.barrier(timeout=0.01)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="distributed.init: timeout must be a finite "
                                             "number > 0"):
            transport.check_timeout(bad)


def test_mpi_sums_host_arrays_only():
    h = host(FakeWorld(requests=[FakeRequest()]))
    with pytest.raises(TypeError, match="init\\(device='gpu'\\)"):
        h.all_reduce([1.0], [1.0])


# -- NCCL through a fake cupy: pointers, counts, types, device choice ----------------
class FakeNcclCommunicator:
    def __init__(self, ndev, uid, rank):
        self.args, self.calls = (ndev, uid, rank), []

    @staticmethod
    def view(ptr, count, dtype):
        ctype = {1: ctypes.c_float, 2: ctypes.c_double}[dtype]
        return numpy.ctypeslib.as_array((ctype * count).from_address(ptr))

    def allReduce(self, send, recv, count, dtype, op, stream):
        self.calls.append(("allReduce", count, dtype, op, stream))
        self.view(recv, count, dtype)[...] = 2 * self.view(send, count, dtype)

    def bcast(self, ptr, count, dtype, root, stream):
        self.calls.append(("bcast", count, dtype, root, stream))
        self.view(ptr, count, dtype)[...] = 9


def fake_cupy(devices_used):
    nccl = SimpleNamespace(get_unique_id=lambda: (1, 2, 3), NcclCommunicator=FakeNcclCommunicator,
                           NCCL_FLOAT16=0, NCCL_FLOAT32=1, NCCL_FLOAT64=2, NCCL_INT64=3,
                           NCCL_SUM=4)
    device = lambda i: SimpleNamespace(use=lambda: devices_used.append(i))  # noqa: E731
    return SimpleNamespace(cuda=SimpleNamespace(
        nccl=nccl, Device=device, runtime=SimpleNamespace(getDeviceCount=lambda: 4),
        get_current_stream=lambda: SimpleNamespace(ptr=77)))


def test_nccl_on_gpu_arrays(monkeypatch):
    monkeypatch.setattr(transport, "_device_pointer", lambda a: a.ctypes.data)
    sent = []
    host_ = SimpleNamespace(rank=1, size=2, local_rank=5,
                            bcast_object=lambda obj, root=0: sent.append(obj) or [7, 8, 9])
    used = []
    gpu = NCCLDevice(host_, fake_cupy(used))
    assert used == [1]                                  # local rank 5 of 4 GPUs
    assert gpu.comm.args == (2, (7, 8, 9), 1) and sent == [None]    # rank 0's id, as a tuple
    comm = distributed.Communicator(SimpleNamespace(rank=1, size=2), gpu)
    model = _two_layer_model()
    for p in model.parameters():
        p.grad = numpy.ones_like(p.data)
    distributed.average_gradients(model.parameters(), comm)
    n = sum(p.size for p in model.parameters())
    assert gpu.comm.calls == [("allReduce", n, 1, 4, 77)]
    assert all((p.grad == 1).all() for p in model.parameters())     # (1 + 1) / 2
    for value in [p.data for p in model.parameters()]:
        comm.broadcast_(value)
    assert gpu.comm.calls[1] == ("bcast", 12, 1, 0, 77)
    assert all((p.data == 9).all() for p in model.parameters())
    with pytest.raises(TypeError, match="NCCL sums"):
        gpu.all_reduce(numpy.zeros(2, numpy.int8), numpy.zeros(2, numpy.int8))


def _two_layer_model():
    import minidl
    return minidl.Sequential(minidl.Dense(3, 4), minidl.ReLU(), minidl.Dense(4, 2))
