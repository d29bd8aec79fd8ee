"""Thread-safe counters, histograms and recent-latency windows; Prometheus text and JSON views."""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

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
            latency = {}
            for name, values in self.recent.items():
                arr = np.fromiter(values, dtype=np.float64)
                latency[name] = (
                    {p: float(np.percentile(arr, q)) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
                    | {"max": float(arr.max()), "n": int(arr.size)}
                    if arr.size
                    else {"n": 0}
                )
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
            lines = [
                "# HELP dpmlx_requests_total Requests received, by type.",
                "# TYPE dpmlx_requests_total counter",
            ]
            lines += [f'dpmlx_requests_total{{type="{t}"}} {n}' for t, n in sorted(self.requests.items())]
            lines += [
                "# HELP dpmlx_errors_total Error replies, by code.",
                "# TYPE dpmlx_errors_total counter",
            ]
            lines += [f'dpmlx_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())]
            lines += [
                "# HELP dpmlx_model_swaps_total Successful model swaps.",
                "# TYPE dpmlx_model_swaps_total counter",
            ]
            lines += [f"dpmlx_model_swaps_total {self.swaps}"]
            lines += [
                "# HELP dpmlx_model_load_failures_total Failed loads.",
                "# TYPE dpmlx_model_load_failures_total counter",
            ]
            lines += [f"dpmlx_model_load_failures_total {self.failed_loads}"]
            lines += [
                "# HELP dpmlx_queue_depth Requests waiting for the worker.",
                "# TYPE dpmlx_queue_depth gauge",
            ]
            lines += [f"dpmlx_queue_depth {queue_depth}"]
            lines += [
                "# HELP dpmlx_model_version Version of the active model.",
                "# TYPE dpmlx_model_version gauge",
            ]
            lines += [f"dpmlx_model_version {model_version if model_version is not None else 0}"]
            lines += self.server_ms.prometheus("dpmlx_server_latency_ms", "Receipt to reply, per request.")
            lines += self.infer_ms.prometheus(
                "dpmlx_infer_latency_ms", "Model time per batch, after mx.eval."
            )
            lines += self.batch_size.prometheus("dpmlx_batch_size", "Requests' rows per executed batch.")
            return "\n".join(lines) + "\n"
