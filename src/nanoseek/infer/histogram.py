"""Latency histograms in Prometheus' form (cumulative buckets, sum, count): time to first token, time per output
token and time in the queue, observed by the engine's thread and read by /metrics from another."""

from __future__ import annotations

import threading
from bisect import bisect_left

# seconds; vLLM's bucket edges, so that dashboards built for it read these too
LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Histogram:
    def __init__(self, name: str, text: str, buckets: tuple[float, ...]):
        self.name, self.text, self.buckets = name, text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every edge
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect_left(self.buckets, value)] += 1
            self.sum += value

    def prometheus(self) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        lines = [f"# HELP {self.name} {self.text}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for edge, count in zip((*self.buckets, "+Inf"), counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{edge}"}} {cumulative}')
        return lines + [f"{self.name}_sum {total:g}", f"{self.name}_count {cumulative}"]
