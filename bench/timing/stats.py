"""What a timing is: a median with its quartiles, and, for a GPU call, the host's share and
the second GPU measurement it was checked against."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, fields

# Two GPU measurements of one call (CUDA-graph replays, torch.profiler's sum of device
# time) that differ by more than this fraction are reported as disagreeing.
DISAGREEMENT_LIMIT = 0.10

WALL, CUDA_GRAPH, EVENTS = "wall", "cuda-graph", "events"


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call (median and quartiles over `repeats` samples).

    method: how the median was measured: "wall" (the host's clock around a synchronous
        call: the CPU), "cuda-graph" (GPU time: replays of a captured graph of calls
        between one pair of events, `bench.timing.gpu`), "events" (GPU time between events
        around eagerly launched calls, where a call cannot be captured).
    host_us: host time to issue one call, without waiting for the GPU (GPU runs only).
    profiler_ms: the same call's GPU time as torch.profiler's sum of device activity
        (kernels, copies, memsets) per call: the cross-check of the median.
    """
    median_ms: float
    q1_ms: float      # 25th percentile
    q3_ms: float      # 75th percentile
    repeats: int
    method: str = WALL
    host_us: float | None = None
    profiler_ms: float | None = None

    @property
    def disagreement(self) -> float | None:
        """|median - profiler| relative to the smaller of the two, or None without both."""
        if self.profiler_ms is None:
            return None
        return relative_difference(self.median_ms, self.profiler_ms)

    @property
    def disagrees(self) -> bool:
        return self.disagreement is not None and self.disagreement > DISAGREEMENT_LIMIT

    def to_json(self) -> dict:
        return {**asdict(self), "disagrees": self.disagrees}

    @classmethod
    def from_json(cls, data: dict) -> "Timing":
        """A timing as a results file stores it (records older than the GPU columns have
        only the median, the quartiles and the repeats)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def relative_difference(a: float, b: float) -> float:
    smaller = min(abs(a), abs(b))
    if smaller == 0:
        return 0.0 if a == b else float("inf")
    return abs(a - b) / smaller


def summarize(samples_ms: list[float], **details) -> Timing:
    """The median and quartiles of `samples_ms`; `details` fill Timing's other fields."""
    if not samples_ms:
        raise ValueError("cannot summarize zero timing samples")
    if len(samples_ms) == 1:
        only = samples_ms[0]
        return Timing(only, only, only, 1, **details)
    q1, median, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Timing(median, q1, q3, len(samples_ms), **details)
