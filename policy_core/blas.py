"""Use an optimised BLAS for MLX's CPU backend on Linux.

The PyPI ``mlx[cpu]`` wheel links the reference Netlib BLAS (~8 GFLOP/s on a matmul, ~30x slower than
OpenBLAS). MLX resolves ``cblas_sgemm`` and friends through the dynamic linker, so a CBLAS library loaded
with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported takes precedence. This module must therefore be
imported before anything imports MLX; ``policy_core/__init__.py`` does that.

Override with ``DPMLX_BLAS``: a path to a CBLAS shared library, or ``reference`` to keep the bundled one.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from pathlib import Path

# Debian/Ubuntu (libopenblas0-pthread), Fedora/RHEL (openblas), Arch.
SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded_blas: str | None = None
"""Path of the BLAS this module loaded, or None when MLX uses whatever it links."""


def _candidates() -> list[str]:
    override = os.environ.get("DPMLX_BLAS", "").strip()
    if override:
        return [] if override == "reference" else [override]
    return [p for p in SYSTEM_OPENBLAS if Path(p).exists()]


def preload() -> str | None:
    """Load the first usable optimised BLAS globally; return its path (None on macOS or if none found)."""
    global loaded_blas
    if loaded_blas is not None or not sys.platform.startswith("linux"):
        return loaded_blas
    if "mlx.core" in sys.modules:
        # Too late: MLX's symbols are already bound. `dpmlx info` reports what is actually in use.
        if _candidates():
            warnings.warn(
                "mlx was imported before policy_core, so MLX keeps its slow reference BLAS; "
                "import policy_core first",
                stacklevel=3,
            )
        return None
    for path in _candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded_blas = path
        return path
    return None


def blas_in_use() -> str:
    """Which BLAS library the process has mapped, read from /proc/self/maps (Linux) or inferred."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    libs = sorted({line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() and "/" in line})
    optimised = [lib for lib in libs if "openblas" in lib.lower() or "mkl" in lib.lower()]
    reference = [lib for lib in libs if "mlx_cpu.libs" in lib]
    if optimised:
        return f"OpenBLAS ({optimised[0]})"
    if reference:
        return f"reference Netlib BLAS bundled with mlx[cpu] ({reference[0]}) -- slow, see README"
    return "none mapped yet" if not libs else ", ".join(libs)
