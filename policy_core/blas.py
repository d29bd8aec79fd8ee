"""Use an optimised BLAS for MLX's CPU backend on Linux.

The PyPI ``mlx[cpu]`` wheel links the reference Netlib BLAS (~8 GFLOP/s on a matmul, ~30x slower than
OpenBLAS). MLX resolves ``cblas_sgemm`` and friends through the dynamic linker, so a CBLAS library loaded
with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported takes precedence. This module must therefore be
imported before anything imports MLX; ``policy_core/__init__.py`` does that.

The first choice is the OpenBLAS that every numpy wheel bundles (0.3.31 with numpy 2.4, runtime CPU
dispatch): on the sampler's matrix-vector-like products it is ~1.3x faster than Debian's 0.3.21. Its
symbols are renamed (``scipy_cblas_sgemm64_``, 64-bit integers), so a ten-line shim that exports MLX's
real-valued products, ``cblas_sgemm`` and ``cblas_dgemm``, is compiled once with the C compiler (MLX's CPU
``mx.compile`` needs one too) and cached (complex ``cblas_cgemm`` stays on the bundled BLAS). Without a
compiler or numpy's library, a system OpenBLAS is used; without either, the reference BLAS stays.

Override with ``DPMLX_BLAS``: a path to a CBLAS shared library, or ``reference`` to keep the bundled one
(either way nothing is compiled).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import stat
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


def _cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/dpmlx`` or ``~/.cache/dpmlx`` if it is (or can be made) a directory of ours that
    nobody else can write to; None otherwise (no home, read-only, foreign or shared)."""
    try:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        directory = Path(base) / "dpmlx"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except (OSError, RuntimeError, KeyError):
        return None
    private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022
    return directory if private else None


def build_shim(openblas: Path) -> Path | None:
    """The CBLAS shim over ``openblas``: cached in the user's cache directory, else built into a fresh
    private temporary directory (never a shared, guessable path: the result is loaded as code).
    None without a compiler or when the build fails (then a warning carries the compiler's message)."""
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        return None
    key = hashlib.sha256(f"{openblas}\n{SHIM_SOURCE}".encode()).hexdigest()[:16]
    name = f"libdpmlx_cblas_{key}.so"
    cache = _cache_dir()
    if cache is not None and (cache / name).is_file() and (cache / name).stat().st_uid == os.getuid():
        return cache / name
    work = None
    try:
        work = Path(tempfile.mkdtemp(prefix="dpmlx-cblas-", dir=cache))
        source = work / "cblas_shim.c"
        source.write_text(SHIM_SOURCE)
        built = work / name
        command = [*compiler, "-O2", "-shared", "-fPIC", "-Wl,--no-undefined", str(source), "-o", str(built)]
        command += [str(openblas), "-Xlinker", "-rpath", "-Xlinker", str(openblas.parent)]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        warnings.warn(
            f"could not build the BLAS shim ({exc}; {detail.decode(errors='replace')[-300:]}); "
            "falling back to the system OpenBLAS if there is one",
            stacklevel=2,
        )
        return None
    if cache is None:
        return built
    target = cache / name
    built.replace(target)  # atomic: concurrent importers see a whole file or none
    shutil.rmtree(work, ignore_errors=True)
    return target


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
