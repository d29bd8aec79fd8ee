"""Latency summaries in one shape, shared by the server's ``/v1/stats`` and the client-side benchmarks."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def summarize(values: Iterable[float]) -> dict[str, float]:
    """p50 / p90 / p99 / max and the count ``n`` (only ``n`` when there are no values)."""
    arr = np.fromiter(values, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(arr.max()),
        "n": int(arr.size),
    }
