"""Use an optimised BLAS for MLX's CPU backend on Linux.

The PyPI ``mlx[cpu]`` wheel links the reference Netlib BLAS (~8 GFLOP/s on a matmul, ~30x slower than
OpenBLAS). MLX resolves ``cblas_sgemm`` and friends through the dynamic linker, so a CBLAS library loaded
with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported takes precedence. This module must therefore be
imported before anything imports MLX; ``policy_core/__init__.py`` does that.

The first choice is the OpenBLAS that every numpy wheel bundles (0.3.31 with numpy 2.4, runtime CPU
dispatch): on the sampler's matrix-vector-like products it is ~1.3x faster than Debian's 0.3.21. Its
symbols are renamed (``scipy_cblas_sgemm64_``, 64-bit integers), so a ten-line shim that exports the two
routines MLX calls, ``cblas_sgemm`` and ``cblas_dgemm``, is compiled once with the C compiler (MLX's CPU
``mx.compile`` needs one too) and cached. Without a compiler or numpy's library, a system OpenBLAS is
used; without either, the reference BLAS stays.

Override with ``DPMLX_BLAS``: a path to a CBLAS shared library, or ``reference`` to keep the bundled one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
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

SHIM_SOURCE = r"""
#include <stdint.h>
typedef int64_t i64;
void scipy_cblas_sgemm64_(int, int, int, i64, i64, i64, float, const float *, i64, const float *, i64,
                          float, float *, i64);
void scipy_cblas_dgemm64_(int, int, int, i64, i64, i64, double, const double *, i64, const double *, i64,
                          double, double *, i64);
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  scipy_cblas_sgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
                 const double *b, int ldb, double beta, double *c, int ldc) {
  scipy_cblas_dgemm64_(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""

loaded_blas: str | None = None
"""Path of the BLAS this module loaded, or None when MLX uses whatever it links."""


def numpy_openblas() -> Path | None:
    """numpy's bundled ILP64 OpenBLAS (``numpy.libs/libscipy_openblas64_*.so``), if this numpy has one."""
    import numpy

    libs = Path(numpy.__file__).resolve().parent.parent / "numpy.libs"
    found = sorted(libs.glob("libscipy_openblas64_*.so"))
    return found[0] if found else None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dpmlx"


def build_shim(openblas: Path) -> Path | None:
    """Compile (once, cached per library and source) the CBLAS shim over ``openblas``; None on failure."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256(f"{openblas}\n{SHIM_SOURCE}".encode()).hexdigest()[:16]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"dpmlx-{os.getuid()}"):
        target = directory / f"libdpmlx_cblas_{key}.so"
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as work:
                source = Path(work) / "cblas_shim.c"
                source.write_text(SHIM_SOURCE)
                built = Path(work) / target.name
                command = [compiler, "-O2", "-shared", "-fPIC", "-Wl,--no-undefined", str(source)]
                command += ["-o", str(built), str(openblas), f"-Wl,-rpath,{openblas.parent}"]
                subprocess.run(command, check=True, capture_output=True, timeout=120)
                built.replace(target)  # atomic: concurrent importers see a whole file or none
            return target
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def _candidates() -> list[str]:
    override = os.environ.get("DPMLX_BLAS", "").strip()
    if override:
        return [] if override == "reference" else [override]
    found = []
    openblas = numpy_openblas()
    shim = build_shim(openblas) if openblas is not None else None
    if shim is not None:
        found.append(str(shim))
    return found + [p for p in SYSTEM_OPENBLAS if Path(p).exists()]


def preload() -> str | None:
    """Load the first usable optimised BLAS globally; return its path (None on macOS or if none found)."""
    global loaded_blas
    if loaded_blas is not None or not sys.platform.startswith("linux"):
        return loaded_blas
    if "mlx.core" in sys.modules and os.environ.get("DPMLX_BLAS", "").strip() != "reference":
        # Too late: MLX's symbols are already bound. `dpmlx info` reports what is actually in use.
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
    """Which BLAS library serves MLX's matmuls: the one loaded here, else read from /proc/self/maps."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if loaded_blas is not None and "libdpmlx_cblas_" in loaded_blas:
        lib = ctypes.CDLL(loaded_blas)
        lib.scipy_openblas_get_config64_.restype = ctypes.c_char_p
        config = lib.scipy_openblas_get_config64_().decode()
        return f"{config} (numpy's, through {loaded_blas})"
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
