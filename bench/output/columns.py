"""The timing columns every table shares: on a GPU, GPU time and host time per call in
separate columns, and whether the GPU time's two measurements agree; on the CPU, wall time.

A timing is a `bench.timing.Timing` as a results file stores it (a dict; records written
before the GPU columns existed have only the median and quartiles)."""
from __future__ import annotations

from bench.timing.stats import CUDA_GRAPH, DISAGREEMENT_LIMIT, EVENTS, Timing

GPU_HEADERS = ("GPU µs", "host µs", "GPU time check")


def number(value, digits: int = 3) -> str:
    """A value to `digits` significant digits (whole numbers with separators past that)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value)


def spread(median: float, q1: float, q3: float) -> str:
    return f"{number(median)} ({number(q1)}–{number(q3)})"


def wall_ms(t: dict | None) -> str:
    """The CPU's column: median (quartiles) in ms."""
    if t is None:
        return "n/a"
    return spread(t["median_ms"], t["q1_ms"], t["q3_ms"])


def gpu_us(t: dict | None) -> str:
    """GPU time per call in µs: median (quartiles) over the trials."""
    if t is None:
        return "n/a"
    return spread(1e3 * t["median_ms"], 1e3 * t["q1_ms"], 1e3 * t["q3_ms"])


def host_us(t: dict | None) -> str:
    return "n/a" if t is None else number(t.get("host_us"))


def gpu_time_check(t: dict | None) -> str:
    """Empty when the GPU time is a CUDA graph's and torch.profiler's sum agrees with it
    within the limit; else what differs."""
    if t is None:
        return ""
    if "method" not in t:
        return "events around one call (a record older than the CUDA-graph harness)"
    timing = Timing.from_json(t)
    notes = []
    if timing.method == EVENTS:
        notes.append("not capturable in a CUDA graph: events around eager calls")
    elif timing.method != CUDA_GRAPH:
        notes.append(f"measured by {timing.method}")
    if timing.profiler_ms is None:
        notes.append("no profiler cross-check")
    elif timing.disagrees:
        sign = "+" if timing.profiler_ms > timing.median_ms else "−"
        notes.append(f"**disagree**: profiler {number(1e3 * timing.profiler_ms)} µs "
                     f"({sign}{100 * timing.disagreement:.0f} %, limit "
                     f"{100 * DISAGREEMENT_LIMIT:.0f} %)")
    return "; ".join(notes)


def gpu_columns(t: dict | None) -> list[str]:
    """The cells under GPU_HEADERS."""
    return [gpu_us(t), host_us(t), gpu_time_check(t)]


ITERATION_HEADERS = ("ms/iter", "GPU busy ms/iter", "host ms/iter", "GPU idle")


def iteration_columns(t: dict | None) -> list[str]:
    """A training iteration on a GPU (`bench.training.loop.train`): wall time per
    iteration, the GPU's busy time (torch.profiler) and the host's time to issue it, and
    the share of the iteration the GPU spent idle when it exceeds the disagreement limit."""
    if t is None:
        return ["n/a"] * len(ITERATION_HEADERS)
    timing = Timing.from_json(t)
    busy, host = timing.profiler_ms, timing.host_us
    idle = ""
    if timing.disagrees and busy is not None and busy < timing.median_ms:
        idle = f"{100 * (1 - busy / timing.median_ms):.0f} %"
    return [wall_ms(t), number(busy), number(None if host is None else host / 1e3), idle]
