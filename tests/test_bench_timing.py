"""The GPU-time harness (bench/timing/gpu.py) and its columns, on the CPU: the procedure
runs against a fake device whose clocks are scripted, so every number it reports can be
checked exactly; on a GPU (`-m gpu`) against a copy whose time is known."""
import math

import pytest
import torch

from bench.output import columns
from bench.timing import gpu
from bench.timing.stats import CUDA_GRAPH, DISAGREEMENT_LIMIT, EVENTS, WALL, Timing, summarize

MIB = 2**20


# ----------------------------------------------------------------------------- sizing

def test_buffer_sets_hold_twice_the_l2_cache():
    # LayerNorm at GPT-2 124M in bf16: 8192 x 768 x 2 bytes = 12 MiB per set; H100: 50 MiB L2.
    assert gpu.buffer_sets(12 * MIB, 50 * MIB, 10_000 * MIB) == 9          # 9 x 12 >= 100
    assert 9 * 12 >= gpu.ROTATION_L2_MULTIPLE * 50 > 8 * 12


def test_one_set_when_a_set_alone_is_larger_than_the_rotation():
    assert gpu.buffer_sets(300 * MIB, 50 * MIB, 10_000 * MIB) == 1


def test_buffer_sets_stay_within_the_memory_budget_and_the_cap():
    assert gpu.buffer_sets(12 * MIB, 50 * MIB, 40 * MIB) == 3   # 3 x 12 <= 40 < 4 x 12
    assert gpu.buffer_sets(12 * MIB, 50 * MIB, 5 * MIB) == 1    # at least one, always
    assert gpu.buffer_sets(1024, 50 * MIB, 10_000 * MIB) == gpu.MAX_SETS


def test_buffer_sets_refuse_an_empty_set():
    with pytest.raises(ValueError, match="must hold some bytes"):
        gpu.buffer_sets(0, 50 * MIB, 100 * MIB)


def test_plan_is_whole_passes_over_the_sets_sized_by_the_estimate():
    plan = gpu.plan_for(call_ms=0.015, sets=9)       # a 15 us LayerNorm
    assert plan.calls_per_graph % 9 == 0
    assert plan.calls_per_graph * 0.015 >= gpu.GRAPH_MS - 9 * 0.015
    assert plan.calls_per_graph <= gpu.MAX_CALLS_PER_GRAPH
    assert plan.replays * plan.calls_per_graph * 0.015 >= gpu.TRIAL_MS
    assert plan.profiled_calls % 9 == 0 and plan.profiled_calls <= gpu.MAX_PROFILED_CALLS

    slow = gpu.plan_for(call_ms=5.0, sets=2)          # a long attention call: one pass
    assert (slow.calls_per_graph, slow.replays, slow.profiled_calls) == (2, 1, 2)

    many = gpu.plan_for(call_ms=0.001, sets=gpu.MAX_SETS)  # every set at least once
    assert many.calls_per_graph == gpu.MAX_SETS


def test_plan_needs_a_set():
    with pytest.raises(ValueError, match="at least one input set"):
        gpu.plan_for(1.0, 0)


# ----------------------------------------------------------------------------- the procedure

class FakeDevice:
    """A GPU whose every call takes `call_ms` of GPU time and `host_us` of host time;
    profiled calls report `profiled_ms` each. Records what ran where."""

    def __init__(self, call_ms=0.02, host_us=7.0, profiled_ms=0.021, capturable=True):
        self.call_ms, self.host_us, self.profiled_ms_per_call = call_ms, host_us, profiled_ms
        self.capturable = capturable
        self.clock_s = 0.0
        self.queued = 0            # GPU calls issued since the last reading
        self.captured = None
        self.warm_ups = []
        self.event_pairs = 0

    def issue(self):               # what a call does to the device: one unit of GPU work
        self.queued += 1
        self.clock_s += self.host_us * 1e-6

    def synchronize(self):
        pass

    def warm_up(self, body):
        before = self.queued
        body()
        self.warm_ups.append(self.queued - before)

    def capture(self, body):
        if not self.capturable:
            return None
        before = self.queued
        body()
        self.captured = self.queued - before
        self.queued = before

        def replay():
            self.queued += self.captured
        return replay

    def elapsed_ms(self, body):
        self.event_pairs += 1
        before = self.queued
        body()
        return (self.queued - before) * self.call_ms

    def profiled_ms(self, body):
        before = self.queued
        body()
        return (self.queued - before) * self.profiled_ms_per_call

    def host_s(self):
        return self.clock_s


def _measure(device, sets=3, plan=None):
    used = []

    def call(s):
        used.append(s)
        device.issue()
    timing = gpu.measure(call, list(range(sets)), device, plan)
    return timing, used


def test_measure_reports_gpu_time_per_call_host_time_and_the_cross_check():
    device = FakeDevice(call_ms=0.02, host_us=7.0, profiled_ms=0.021)
    timing, _ = _measure(device)
    assert timing.method == CUDA_GRAPH
    assert timing.median_ms == pytest.approx(0.02)
    assert timing.q1_ms == pytest.approx(0.02) and timing.q3_ms == pytest.approx(0.02)
    assert timing.repeats == gpu.TRIALS
    assert timing.host_us == pytest.approx(7.0)
    assert timing.profiler_ms == pytest.approx(0.021)
    assert not timing.disagrees                      # 5 % apart


def test_measure_times_each_trial_with_one_pair_of_events_over_the_whole_graph():
    device = FakeDevice(call_ms=0.02)
    plan = gpu.Plan(calls_per_graph=6, replays=4, trials=5, profiled_calls=3, host_calls=2)
    _measure(device, sets=3, plan=plan)
    assert device.captured == 6
    assert device.event_pairs == 5                   # one pair per trial, given the plan


def test_calls_rotate_over_every_set_in_turn():
    device = FakeDevice()
    plan = gpu.Plan(calls_per_graph=6, replays=1, trials=1, profiled_calls=3, host_calls=4)
    _, used = _measure(device, sets=3, plan=plan)
    warm_up, captured = used[:3], used[3:9]
    assert warm_up == [0, 1, 2]                      # every set warmed (compiles, autotunes)
    assert captured == [0, 1, 2, 0, 1, 2]
    assert device.warm_ups == [3]


def test_disagreeing_measurements_are_flagged():
    device = FakeDevice(call_ms=0.02, profiled_ms=0.013)  # the profiler sees 35 % less
    timing, _ = _measure(device)
    assert timing.disagrees
    assert timing.disagreement == pytest.approx(0.007 / 0.013)


def test_an_uncapturable_call_is_timed_between_events_and_says_so():
    timing, _ = _measure(FakeDevice(capturable=False))
    assert timing.method == EVENTS
    assert timing.median_ms == pytest.approx(0.02)


def test_no_profiler_means_no_cross_check_and_no_flag():
    device = FakeDevice()
    device.profiled_ms = lambda body: (body(), None)[1]
    timing, _ = _measure(device)
    assert timing.profiler_ms is None and timing.disagreement is None and not timing.disagrees


def test_host_time_is_the_median_issue_time_without_waiting():
    device = FakeDevice(host_us=3.0)
    assert gpu.host_time_us(lambda s: device.issue(), [0], device, 5) == pytest.approx(3.0)


def test_measure_needs_a_set():
    with pytest.raises(ValueError, match="at least one input set"):
        gpu.measure(lambda s: None, [], FakeDevice())


def test_device_activity_sums_only_device_events():
    class Range:
        def __init__(self, us):
            self.us = us

        def elapsed_us(self):
            return self.us

    class Event:
        def __init__(self, device_type, us):
            self.device_type, self.time_range = device_type, Range(us)

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [Event(cuda, 10.0), Event(cpu, 500.0), Event(cuda, 2.5)]
    assert gpu.device_activity_us(events) == pytest.approx(12.5)


def test_tensor_bytes_counts_each_storage_once():
    x = torch.empty(100, dtype=torch.float32)
    view = x[10:20]
    y = torch.empty(8, dtype=torch.bfloat16)
    assert gpu.tensor_bytes((x, view), [y], 3, None) == 400 + 16


# ----------------------------------------------------------------------------- stats

def test_timing_round_trips_and_old_records_still_read():
    t = summarize([1.0, 2.0, 3.0], method=CUDA_GRAPH, host_us=40.0, profiler_ms=2.5)
    data = t.to_json()
    assert data["disagrees"] is True                  # 2.0 vs 2.5: 25 %
    assert Timing.from_json(data) == t
    old = Timing.from_json({"median_ms": 1.0, "q1_ms": 0.9, "q3_ms": 1.1, "repeats": 5})
    assert old.method == WALL and old.host_us is None and not old.disagrees


@pytest.mark.parametrize("graph, profiler, flagged", [(1.0, 1.0, False), (1.0, 1.09, False),
                                                      (1.0, 1.11, True), (1.2, 1.0, True),
                                                      (0.0, 0.0, False)])
def test_the_disagreement_limit_is_relative_to_the_smaller(graph, profiler, flagged):
    t = Timing(graph, graph, graph, 1, CUDA_GRAPH, 1.0, profiler)
    assert t.disagrees == flagged
    assert DISAGREEMENT_LIMIT == 0.10


# ----------------------------------------------------------------------------- columns

def test_gpu_columns_are_microseconds_host_apart_and_the_check_empty_when_agreeing():
    t = Timing(0.0152, 0.0150, 0.0155, 7, CUDA_GRAPH, 41.3, 0.0149).to_json()
    assert columns.gpu_columns(t) == ["15.2 (15–15.5)", "41.3", ""]


def test_the_check_column_names_a_disagreement_and_its_size():
    t = Timing(0.0152, 0.0150, 0.0155, 7, CUDA_GRAPH, 41.3, 0.0110).to_json()
    assert columns.gpu_time_check(t) == "**disagree**: profiler 11 µs (−38 %, limit 10 %)"


def test_the_check_column_names_an_events_fallback_and_a_missing_profiler():
    t = Timing(1.0, 1.0, 1.0, 7, EVENTS, 9.0, None).to_json()
    assert columns.gpu_time_check(t) == ("not capturable in a CUDA graph: events around eager "
                                         "calls; no profiler cross-check")


def test_a_record_older_than_the_harness_says_how_it_was_timed():
    old = {"median_ms": 0.3, "q1_ms": 0.2, "q3_ms": 0.4, "repeats": 200}
    assert columns.gpu_time_check(old).startswith("events around one call")
    assert columns.gpu_columns(old)[:2] == ["300 (200–400)", "n/a"]


def test_columns_of_a_missing_timing():
    assert columns.gpu_columns(None) == ["n/a", "n/a", ""]
    assert columns.wall_ms(None) == "n/a"


def test_iteration_columns_show_the_gpu_idle_share_only_past_the_limit():
    busy = Timing(100.0, 99.0, 101.0, 20, WALL, 30_000.0, 95.0).to_json()
    assert columns.iteration_columns(busy) == ["100 (99–101)", "95", "30", ""]
    idle = Timing(100.0, 99.0, 101.0, 20, WALL, 98_000.0, 40.0).to_json()
    assert columns.iteration_columns(idle) == ["100 (99–101)", "40", "98", "60 %"]


# ----------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_copy_runs_near_the_copy_bandwidth_and_both_measurements_agree():
    """A 256 MiB device-to-device copy moves 512 MiB: its GPU time must be within the
    bandwidth bounds, and the graph and the profiler must agree on it."""
    device = torch.device("cuda")
    sources = [torch.randn(64 * MIB, device=device) for _ in range(2)]
    target = torch.empty_like(sources[0])
    timing = gpu.measure(lambda s: target.copy_(s), sources, gpu.CudaDevice(device))
    seconds = timing.median_ms / 1e3
    rate = 2 * sources[0].nbytes / seconds
    assert timing.method == CUDA_GRAPH
    assert 0.3e12 < rate < 6e12, f"{rate / 1e12:.2f} TB/s"
    assert not timing.disagrees, timing
    assert timing.host_us is not None and math.isfinite(timing.host_us)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_tiny_call_is_timed_as_gpu_work_not_as_its_launch():
    """An 8192 x 768 LayerNorm is ~10 us of GPU work and costs the host more to launch:
    the GPU time must come out below the host time (events around one call would report
    the launch)."""
    device = torch.device("cuda")
    x = [torch.randn(8192, 768, device=device, dtype=torch.bfloat16) for _ in range(9)]
    w = torch.ones(768, device=device, dtype=torch.bfloat16)

    def layer_norm(s):
        return torch.nn.functional.layer_norm(s, (768,), w)
    timing = gpu.measure(layer_norm, x, gpu.CudaDevice(device))
    assert timing.median_ms * 1e3 < 60, timing
    assert not timing.disagrees, timing
