"""What a user pastes into a bug report: MLX version, backend, device, memory, BLAS."""

from __future__ import annotations

import os
import platform
import sys

import mlx.core as mx

from policy_core.backends.cpu_blas import blas_in_use


def backend_name() -> str:
    if mx.metal.is_available():
        return "Metal"
    if mx.cuda.is_available():
        return "CUDA"
    return "CPU"


def environment_report() -> dict[str, str]:
    device = mx.default_device()
    report = {
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "mlx": mx.__version__,
        "backend": backend_name(),
        "device": str(device),
        "memory_active": f"{mx.get_active_memory() / 2**20:.1f} MiB",
        "memory_peak": f"{mx.get_peak_memory() / 2**20:.1f} MiB",
        "memory_limit": f"{mx.get_memory_limit() / 2**30:.2f} GiB",
        "cpu_blas": blas_in_use(),
    }
    if backend_name() == "CUDA":
        report["device_name"] = str(mx.device_info().get("device_name", "?"))  # names the card in results
        # The variable as this process sees it; dpmlx serve sets 0 unless it is set.
        report["MLX_USE_CUDA_GRAPHS"] = os.environ.get("MLX_USE_CUDA_GRAPHS", "unset (MLX: graphs on)")
    if backend_name() == "Metal":
        info = mx.metal.device_info()
        report["device_name"] = str(info.get("device_name", "?"))
    return report


def format_report(report: dict[str, str]) -> str:
    width = max(map(len, report))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in report.items())
