"""Use an optimised BLAS for MLX's CPU backend on Linux.

The PyPI ``mlx[cpu]`` wheel links the reference Netlib BLAS, many times slower than OpenBLAS. MLX resolves
``cblas_sgemm`` and friends through the dynamic linker, so a CBLAS library loaded with ``RTLD_GLOBAL``
*before* ``mlx.core`` is imported takes precedence. This module must therefore be imported before anything
imports MLX; ``policy_core/__init__.py`` does that.

The first choice is the OpenBLAS that every numpy wheel bundles (0.3.31 with numpy 2.4, runtime CPU
dispatch), faster than Debian's on the sampler's matrix-vector-like products. Its symbols are renamed
(``scipy_cblas_sgemm64_``, 64-bit integers), so a shim that exports MLX's real-valued products,
``cblas_sgemm`` and ``cblas_dgemm`` (``cblas_shim.c``), is compiled once with the C compiler (MLX's CPU
``mx.compile`` needs one too) and cached (complex ``cblas_cgemm`` stays on the bundled BLAS). Without a
compiler or numpy's library, a system OpenBLAS is used; without either, the reference BLAS stays.

The shim computes a matrix times at most 8 vectors itself, the shape of most layers at batch 1, faster
than OpenBLAS's blocked GEMM, and cuts every other product into blocks of single-threaded OpenBLAS
products, both on one thread pool of its own. OpenBLAS is kept single-threaded (numpy's matmuls in this
process too): a product's result then depends on its shape only, not on the thread count or on other
processes holding the cores (see ``cblas_shim.c``; benchmarks/NOTES.md has the measurements).

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

SHIM_SOURCE = (Path(__file__).parent / "cblas_shim.c").read_text()
# Compiler flags, first choice first; the cache key has the CPU's features (-march=native).
SHIM_FLAGS = (("-O3", "-march=native", "-pthread"), ("-O2", "-pthread"))

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


def _cpu_features() -> str:
    """The CPU's feature list (part of the shim's cache key: it is built for this CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def build_shim(openblas: Path) -> Path | None:
    """The CBLAS shim over ``openblas``: cached in the user's cache directory, else built into a fresh
    private temporary directory (never a shared, guessable path: the result is loaded as code).
    None without a compiler or when every build fails (then a warning carries the compiler's message)."""
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        return None
    cache = _cache_dir()
    names = [
        "libdpmlx_cblas_"
        + hashlib.sha256(
            "\n".join([str(openblas), _cpu_features(), *flags, SHIM_SOURCE]).encode()
        ).hexdigest()[:16]
        + ".so"
        for flags in SHIM_FLAGS
    ]
    for name in names:  # a fallback's cached build is used without retrying the first flags
        if cache is not None and (cache / name).is_file() and (cache / name).stat().st_uid == os.getuid():
            return cache / name
    errors = []
    for flags, name in zip(SHIM_FLAGS, names, strict=True):
        work = None
        try:
            work = Path(tempfile.mkdtemp(prefix="dpmlx-cblas-", dir=cache))
            source, built = work / "cblas_shim.c", work / name
            source.write_text(SHIM_SOURCE)
            command = [
                *compiler,
                *flags,
                "-shared",
                "-fPIC",
                "-Wl,--no-undefined",
                str(source),
                "-o",
                str(built),
            ]
            command += [str(openblas), "-Xlinker", "-rpath", "-Xlinker", str(openblas.parent)]
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            detail = getattr(exc, "stderr", b"") or b""
            errors.append(f"{' '.join(flags)}: {exc}; {detail.decode(errors='replace')[-300:]}")
            continue
        if cache is None:
            return built
        target = cache / name
        built.replace(target)  # atomic: concurrent importers see a whole file or none
        shutil.rmtree(work, ignore_errors=True)
        return target
    warnings.warn(
        f"could not build the BLAS shim ({' | '.join(errors)}); "
        "falling back to the system OpenBLAS if there is one",
        stacklevel=2,
    )
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


def _shim() -> ctypes.CDLL | None:
    return ctypes.CDLL(loaded_blas) if loaded_blas is not None and "libdpmlx_cblas_" in loaded_blas else None


def shim_threads() -> int:
    """Threads of the shim's pool (OpenBLAS's thread count when it loaded: ``OPENBLAS_NUM_THREADS`` or the
    cores); 0 when the shim is not loaded or its OpenBLAS cannot set its thread count (then OpenBLAS
    takes every product on its own threads)."""
    shim = _shim()
    return shim.dpmlx_pool_threads() if shim is not None else 0


def shim_calls() -> tuple[int, int]:
    """Products the shim's kernel took, and parallel calls its pool ran (the kernel's and the blocks of
    the others)."""
    shim = _shim()
    if shim is None:
        return 0, 0
    shim.dpmlx_kernel_calls.restype = shim.dpmlx_pool_calls.restype = ctypes.c_long
    return shim.dpmlx_kernel_calls(), shim.dpmlx_pool_calls()


def blas_in_use() -> str:
    """Which BLAS library serves MLX's matmuls: the one loaded here, else read from /proc/self/maps."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    shim = _shim()
    if shim is not None:
        shim.scipy_openblas_get_config64_.restype = ctypes.c_char_p
        config = shim.scipy_openblas_get_config64_().decode()
        threads = shim.dpmlx_pool_threads()
        vectors = shim.dpmlx_kernel_max_vectors()
        pool = f"; own kernel for at most {vectors} vectors, one pool of {threads} threads" if threads else ""
        return f"{config} (numpy's, through {loaded_blas}{pool})"
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
