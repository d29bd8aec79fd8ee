"""Thread-safe counters, histograms and recent-latency windows; Prometheus text and JSON views."""

from __future__ import annotations

import threading
from collections import Counter, deque

from proto.latency import summarize

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def prometheus(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        lines += [f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return lines


class Metrics:
    def __init__(self, window: int = 10_000):
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by request type
        self.errors: Counter[str] = Counter()  # by error code
        self.swaps = 0
        self.failed_loads = 0
        self.server_ms = Histogram(LATENCY_BUCKETS_MS)
        self.infer_ms = Histogram(LATENCY_BUCKETS_MS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.recent: dict[str, deque[float]] = {
            k: deque(maxlen=window) for k in ("server_ms", "queue_ms", "infer_ms")
        }
        self.max_batch_seen = 0

    def request(self, rtype: str) -> None:
        with self._lock:
            self.requests[rtype] += 1

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def swapped(self) -> None:
        with self._lock:
            self.swaps += 1

    def load_failed(self) -> None:
        with self._lock:
            self.failed_loads += 1

    def batch(self, size: int, infer_ms: float) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.infer_ms.observe(infer_ms)
            self.recent["infer_ms"].append(infer_ms)
            self.max_batch_seen = max(self.max_batch_seen, size)

    def reply(self, server_ms: float, queue_ms: float) -> None:
        with self._lock:
            self.server_ms.observe(server_ms)
            self.recent["server_ms"].append(server_ms)
            self.recent["queue_ms"].append(queue_ms)

    def stats(self) -> dict:
        with self._lock:
            latency = {name: summarize(values) for name, values in self.recent.items()}
            return {
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "swaps": self.swaps,
                "failed_loads": self.failed_loads,
                "batches": self.batch_size.n,
                "max_batch_size": self.max_batch_seen,
                "latency_ms": latency,
            }

    def prometheus(self, queue_depth: int, model_version: int | None) -> str:
        with self._lock:
            lines = _family(
                "dpmlx_requests_total", "counter", "Requests received, by type.",
                [(f'{{type="{t}"}}', n) for t, n in sorted(self.requests.items())],
            )  # fmt: skip
            lines += _family(
                "dpmlx_errors_total", "counter", "Error replies, by code.",
                [(f'{{code="{c}"}}', n) for c, n in sorted(self.errors.items())],
            )  # fmt: skip
            lines += _family(
                "dpmlx_model_swaps_total", "counter", "Successful model swaps.", [("", self.swaps)]
            )
            lines += _family(
                "dpmlx_model_load_failures_total", "counter", "Failed loads.", [("", self.failed_loads)]
            )
            lines += _family(
                "dpmlx_queue_depth", "gauge", "Requests waiting for the worker.", [("", queue_depth)]
            )
            lines += _family(
                "dpmlx_model_version", "gauge", "Version of the active model.", [("", model_version or 0)]
            )
            lines += self.server_ms.prometheus("dpmlx_server_latency_ms", "Receipt to reply, per request.")
            lines += self.infer_ms.prometheus(
                "dpmlx_infer_latency_ms", "Model time per batch, until its actions are on the host."
            )
            lines += self.batch_size.prometheus("dpmlx_batch_size", "Requests' rows per executed batch.")
            return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> list[str]:
    """One Prometheus metric family: HELP and TYPE lines, then ``name{labels} value`` per sample."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"] + [
        f"{name}{labels} {v}" for labels, v in samples
    ]
