"""GPU time of one call, as the GPU sees it, and the host time of issuing it.

Two events around a single call measure whichever is slower: the GPU running the call, or
the host launching it (Python, dispatch, the launcher). For a call of a few microseconds of
GPU work the host is the slower one, and the events time Python: on the first H200 record
LayerNorm "took" 0.3-1.3 ms for ~15 us of GPU work. So the GPU time here never includes a
launch:

1. Input sets. The call runs on `buffer_sets` sets of inputs, together at least
   ROTATION_L2_MULTIPLE x the L2 cache, taken in turn, so that no call finds its inputs in
   L2 where an earlier call on the same set left them: every call pays for reading its
   inputs from device memory, as an op does whose inputs were written long before.
2. A graph. K calls (cycling through the sets) are captured in one CUDA graph, whose replay
   launches them back to back with no host in between.
3. Timing. R replays between one pair of events, so the events' own resolution (~0.5 us)
   and the replay's launch are spread over R x K calls; the per-call time of TRIALS such
   trials gives the median and quartiles.
4. Cross-check. The same call launched eagerly under torch.profiler: the sum of its device
   activity (kernels, copies, memsets) per call. It excludes the gaps between kernels that
   the graph still has (~1 us each) and includes nothing the host does. When the two differ
   by more than `stats.DISAGREEMENT_LIMIT` the row says so.
5. Host time. The host's clock around each of a few eager calls issued back to back
   without waiting for the GPU (its queue absorbs the work): what a call costs the host,
   reported beside the GPU time. Eagerly, a call takes at least the larger of the two.

A call that cannot be captured (it synchronizes with the host, say) is timed between
events around K eagerly launched calls instead, and its timing's method says "events".

`measure` is the procedure and speaks to the GPU only through a `Device` (`CudaDevice` on
a real one), so the procedure itself is tested on the CPU with a fake device and fake
clocks (tests/test_bench_timing.py).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from bench.timing.stats import CUDA_GRAPH, EVENTS, Timing, summarize

ROTATION_L2_MULTIPLE = 2   # the input sets together hold at least this many L2 caches
MAX_SETS = 256             # tiny inputs: at most this many sets (each is a real allocation)
MEMORY_FRACTION = 0.25     # the input sets may take this share of the free device memory

GRAPH_MS = 2.0             # GPU work per graph: its replay's launch (~10 us) is noise
MAX_CALLS_PER_GRAPH = 256  # (at least one call per set, whatever this says)
TRIAL_MS = 10.0            # GPU work per trial (R replays between one pair of events)
TRIALS = 7
PROFILE_MS = 5.0           # GPU work profiled for the cross-check
MAX_PROFILED_CALLS = 64
HOST_CALLS = 10            # eager calls timed on the host's clock


def buffer_sets(bytes_per_set: int, l2_bytes: int, budget_bytes: int) -> int:
    """How many input sets to rotate through: together at least ROTATION_L2_MULTIPLE x
    the L2 cache, at most MAX_SETS, and no more than `budget_bytes` hold (at least one)."""
    if bytes_per_set <= 0:
        raise ValueError(f"an input set must hold some bytes, got {bytes_per_set}")
    wanted = math.ceil(ROTATION_L2_MULTIPLE * l2_bytes / bytes_per_set)
    affordable = budget_bytes // bytes_per_set
    return max(1, min(wanted, affordable, MAX_SETS))


@dataclass(frozen=True)
class Plan:
    """How many calls each measurement makes (see the module docstring)."""
    calls_per_graph: int   # K, a whole number of passes over the sets
    replays: int           # R per trial
    trials: int
    profiled_calls: int
    host_calls: int


def plan_for(call_ms: float, sets: int) -> Plan:
    """The plan for a call estimated to take `call_ms` of GPU time, rotating over `sets`
    input sets: about GRAPH_MS of work per graph, TRIAL_MS per trial, PROFILE_MS profiled."""
    if sets < 1:
        raise ValueError(f"need at least one input set, got {sets}")
    call_ms = max(call_ms, 1e-4)

    def whole_passes(target_ms: float, most: int) -> int:
        passes = max(1, min(math.ceil(target_ms / (sets * call_ms)), most // sets))
        return passes * sets

    calls = whole_passes(GRAPH_MS, MAX_CALLS_PER_GRAPH)
    return Plan(calls_per_graph=calls,
                replays=max(1, math.ceil(TRIAL_MS / (calls * call_ms))),
                trials=TRIALS,
                profiled_calls=whole_passes(PROFILE_MS, MAX_PROFILED_CALLS),
                host_calls=HOST_CALLS)


class Device(Protocol):
    """What `measure` needs of a GPU."""

    def synchronize(self) -> None: ...

    def warm_up(self, body: Callable[[], None]) -> None:
        """Run body() once, as a graph capture needs it run first (a side stream)."""

    def capture(self, body: Callable[[], None]) -> Callable[[], None] | None:
        """A function that replays body()'s GPU work, or None if it cannot be captured."""

    def elapsed_ms(self, body: Callable[[], None]) -> float:
        """GPU time between an event recorded before body() and one recorded after it."""

    def profiled_ms(self, body: Callable[[], None]) -> float | None:
        """The sum of the device activity body() causes (None: no profiler here)."""

    def host_s(self) -> float:
        """The host's clock, in seconds."""


def measure(call: Callable[[object], object], sets: Sequence[object], device: Device,
            plan: Plan | None = None) -> Timing:
    """GPU time per call of call(set), rotating over `sets` (see the module docstring)."""
    if not sets:
        raise ValueError("need at least one input set")

    def calls(count: int) -> Callable[[], None]:
        def body() -> None:
            for k in range(count):
                call(sets[k % len(sets)])
        return body

    device.warm_up(calls(len(sets)))  # compiles, autotunes, allocates workspaces
    device.synchronize()
    if plan is None:
        plan = plan_for(device.elapsed_ms(calls(len(sets))) / len(sets), len(sets))
    replay = device.capture(calls(plan.calls_per_graph))
    method, run_once = (CUDA_GRAPH, replay) if replay is not None \
        else (EVENTS, calls(plan.calls_per_graph))

    def trial() -> None:
        for _ in range(plan.replays):
            run_once()

    samples = [device.elapsed_ms(trial) / (plan.replays * plan.calls_per_graph)
               for _ in range(plan.trials)]
    profiled = device.profiled_ms(calls(plan.profiled_calls))
    host_us = host_time_us(call, sets, device, plan.host_calls)
    return summarize(samples, method=method, host_us=host_us,
                     profiler_ms=None if profiled is None else profiled / plan.profiled_calls)


def host_time_us(call: Callable[[object], object], sets: Sequence[object], device: Device,
                 count: int) -> float:
    """Median host time of issuing one eager call, the GPU left to catch up afterwards."""
    device.synchronize()
    samples = []
    for k in range(count):
        start = device.host_s()
        call(sets[k % len(sets)])
        samples.append(1e6 * (device.host_s() - start))
    device.synchronize()
    return statistics.median(samples)


# ----------------------------------------------------------------------------- a real GPU

def device_activity_us(events) -> float:
    """Total duration of the device-side events of a torch.profiler trace (kernels,
    memcpys, memsets: every event whose device_type is CUDA)."""
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.time_range.elapsed_us() for e in events if e.device_type == cuda)


class CudaDevice:
    """`Device` on a CUDA GPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def l2_bytes(self) -> int:
        return torch.cuda.get_device_properties(self.device).L2_cache_size

    def free_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def warm_up(self, body: Callable[[], None]) -> None:
        # As torch.cuda.make_graphed_callables does: libraries create their handles and
        # workspaces on the stream they first run on, which must not be the capture's.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            body()
        current.wait_stream(side)

    def capture(self, body: Callable[[], None]) -> Callable[[], None] | None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                body()
        except Exception:  # not capturable (e.g. a host sync): `measure` falls back to events
            self.synchronize()
            return None
        return graph.replay

    def elapsed_ms(self, body: Callable[[], None]) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        body()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def profiled_ms(self, body: Callable[[], None]) -> float | None:
        from torch.profiler import ProfilerActivity, profile

        self.synchronize()
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as trace:
                body()
                self.synchronize()
        except RuntimeError:  # no CUPTI on this machine: the row has no cross-check
            return None
        return device_activity_us(trace.events()) / 1e3

    def host_s(self) -> float:
        return time.perf_counter()


def tensor_bytes(*values) -> int:
    """Bytes of the storage behind every tensor in `values` (nested tuples and lists too),
    each storage counted once."""
    seen, total = set(), 0
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, (tuple, list)):
            stack.extend(value)
        elif isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def time_rotating(call: Callable[[object], object], sets_for: Callable[[int], Sequence[object]],
                  bytes_per_set: int, device: torch.device) -> Timing:
    """GPU time of call(set) on `device`, over as many input sets as `buffer_sets` asks
    for; sets_for(n) gives n sets."""
    gpu = CudaDevice(device)
    count = buffer_sets(bytes_per_set, gpu.l2_bytes(), int(MEMORY_FRACTION * gpu.free_bytes()))
    return measure(call, sets_for(count), gpu)
