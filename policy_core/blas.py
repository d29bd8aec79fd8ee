"""Use an optimised BLAS for MLX's CPU backend on Linux.

The PyPI ``mlx[cpu]`` wheel links the reference Netlib BLAS (~8 GFLOP/s on a matmul, ~30x slower than
OpenBLAS). MLX resolves ``cblas_sgemm`` and friends through the dynamic linker, so a CBLAS library loaded
with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported takes precedence. This module must therefore be
imported before anything imports MLX; ``policy_core/__init__.py`` does that.

The first choice is the OpenBLAS that every numpy wheel bundles (0.3.31 with numpy 2.4, runtime CPU
dispatch): on the sampler's matrix-vector-like products it is ~1.3x faster than Debian's 0.3.21. Its
symbols are renamed (``scipy_cblas_sgemm64_``, 64-bit integers), so a shim that exports MLX's real-valued
products, ``cblas_sgemm`` and ``cblas_dgemm``, is compiled once with the C compiler (MLX's CPU
``mx.compile`` needs one too) and cached (complex ``cblas_cgemm`` stays on the bundled BLAS). Without a
compiler or numpy's library, a system OpenBLAS is used; without either, the reference BLAS stays.

The shim computes a matrix times at most 16 vectors itself, the shape of every layer at batch 1: each
row streamed once against all the vectors, rows over OpenMP threads. On the 2-core VM that reads the
weights at ~18 GB/s where OpenBLAS's blocked GEMM reaches ~14 (benchmarks/NOTES.md); every other product,
and every product where OpenMP is missing, goes to OpenBLAS.

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
#include <stdlib.h>
#include <string.h>
typedef int64_t i64;
void scipy_cblas_sgemm64_(int, int, int, i64, i64, i64, float, const float *, i64, const float *, i64,
                          float, float *, i64);
void scipy_cblas_dgemm64_(int, int, int, i64, i64, i64, double, const double *, i64, const double *, i64,
                          double, double *, i64);

#ifdef _OPENMP
#include <omp.h>
#include <pthread.h>
/* C[i*si + j*sj] = alpha * sum_k big[i*ldbig + k] * small_j[k] (+ beta C) for rows i of a large matrix and
   at most 16 vectors, the shape of a batch-1 layer: each row is streamed once against all the vectors
   (packed below, zero-padded to 8 floats), R rows at a time, rows split over OpenMP threads. Built for
   this machine's CPU (-march=native; the cache key includes its features). */
typedef float v8 __attribute__((vector_size(32)));
#define LOAD8(p) ({ v8 v_; memcpy(&v_, (p), sizeof v_); v_; })
#define HSUM8(v) ((((v)[0] + (v)[4]) + ((v)[1] + (v)[5])) + (((v)[2] + (v)[6]) + ((v)[3] + (v)[7])))
#define SKINNY_BLOCK(R, NSP)                                                                        \
  static void skinny_##R##_##NSP(                                                                   \
      const float *big, i64 ldbig, i64 rows, i64 k, const float *pack, i64 k8, i64 ns, float alpha,  \
      float beta, float *c, i64 si, i64 sj) {                                                       \
    const i64 kv = k & ~(i64)7;                                                                     \
    _Pragma("omp parallel for schedule(static) if (rows * k >= (1 << 18))")                         \
    for (i64 i0 = 0; i0 < rows; i0 += R) {                                                          \
      v8 acc[R][NSP];                                                                               \
      memset(acc, 0, sizeof acc);                                                                   \
      const float *a[R];                                                                            \
      for (int r = 0; r < R; ++r) a[r] = big + (i0 + r < rows ? i0 + r : rows - 1) * ldbig;        \
      for (i64 kk = 0; kk < kv; kk += 8) {                                                          \
        v8 x[R];                                                                                    \
        for (int r = 0; r < R; ++r) x[r] = LOAD8(a[r] + kk);                                        \
        for (int j = 0; j < NSP; ++j) {                                                             \
          const v8 s = LOAD8(pack + j * k8 + kk);                                                   \
          for (int r = 0; r < R; ++r) acc[r][j] += x[r] * s;                                        \
        }                                                                                           \
      }                                                                                             \
      for (int r = 0; r < R && i0 + r < rows; ++r)                                                  \
        for (int j = 0; j < ns; ++j) {                                                              \
          float sum = HSUM8(acc[r][j]);                                                             \
          for (i64 kk = kv; kk < k; ++kk) sum += a[r][kk] * pack[j * k8 + kk];                     \
          float *out = c + (i0 + r) * si + j * sj;                                                  \
          *out = beta == 0.f ? alpha * sum : alpha * sum + beta * *out;                             \
        }                                                                                           \
    }                                                                                               \
  }
SKINNY_BLOCK(4, 4)
SKINNY_BLOCK(2, 8)
SKINNY_BLOCK(1, 16)

static long skinny_calls;
/* A thread's packed vectors, kept between calls and freed when the thread ends (the key's destructor). */
static __thread float *pack_buffer;
static __thread size_t pack_capacity;
static pthread_key_t pack_key;
static pthread_once_t pack_key_once = PTHREAD_ONCE_INIT;
static void make_pack_key(void) { pthread_key_create(&pack_key, free); }

/* Vector j's element kk is small[j * js + kk * ks]. Returns 0 (nothing done) where it can't take the call. */
static int skinny(const float *big, i64 ldbig, i64 rows, i64 k, const float *small, i64 js, i64 ks, i64 ns,
                  float alpha, float beta, float *c, i64 si, i64 sj) {
  const i64 nsp = ns <= 4 ? 4 : ns <= 8 ? 8 : 16, k8 = (k + 7) & ~(i64)7;
  if ((size_t)(nsp * k8) > pack_capacity) {
    float *grown = realloc(pack_buffer, (size_t)(nsp * k8) * sizeof(float));
    if (!grown) return 0;
    pack_buffer = grown;
    pack_capacity = (size_t)(nsp * k8);
    pthread_once(&pack_key_once, make_pack_key);
    pthread_setspecific(pack_key, grown);
  }
  float *pack = pack_buffer;
  memset(pack, 0, (size_t)(nsp * k8) * sizeof(float));
  for (i64 j = 0; j < ns; ++j)
    for (i64 kk = 0; kk < k; ++kk) pack[j * k8 + kk] = small[j * js + kk * ks];
  __atomic_fetch_add(&skinny_calls, 1, __ATOMIC_RELAXED);
  if (nsp == 4) skinny_4_4(big, ldbig, rows, k, pack, k8, ns, alpha, beta, c, si, sj);
  else if (nsp == 8) skinny_2_8(big, ldbig, rows, k, pack, k8, ns, alpha, beta, c, si, sj);
  else skinny_1_16(big, ldbig, rows, k, pack, k8, ns, alpha, beta, c, si, sj);
  return 1;
}

int dpmlx_skinny_threads(void) { return omp_get_max_threads(); }
long dpmlx_skinny_calls(void) { return __atomic_load_n(&skinny_calls, __ATOMIC_RELAXED); }
#else
int dpmlx_skinny_threads(void) { return 0; }
long dpmlx_skinny_calls(void) { return 0; }
#endif

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, SKINNY_MAX = 16, SKINNY_MIN_ELEMENTS = 1 << 16 };

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
#ifdef _OPENMP
  if (order == ROW_MAJOR && m > 0 && n > 0 && k > 0) {
    /* A (m x k) times at most 16 columns of B. */
    if (ta == NO_TRANS && n <= SKINNY_MAX && (i64)m * k >= SKINNY_MIN_ELEMENTS &&
        (tb == NO_TRANS ? skinny(a, lda, m, k, b, 1, ldb, n, alpha, beta, c, ldc, 1)
                        : skinny(a, lda, m, k, b, ldb, 1, n, alpha, beta, c, ldc, 1)))
      return;
    /* At most 16 rows of A times B^T, B (n x k): the same with the roles swapped, C written transposed. */
    if (tb == TRANS && m <= SKINNY_MAX && (i64)n * k >= SKINNY_MIN_ELEMENTS &&
        (ta == NO_TRANS ? skinny(b, ldb, n, k, a, lda, 1, m, alpha, beta, c, 1, ldc)
                        : skinny(b, ldb, n, k, a, 1, lda, m, alpha, beta, c, 1, ldc)))
      return;
  }
#endif
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


# Compiler flags, first choice first: without OpenMP the shim forwards every product to OpenBLAS.
SHIM_FLAGS = (("-O3", "-march=native", "-fopenmp"), ("-O2",))


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
    keys = [
        hashlib.sha256("\n".join([str(openblas), _cpu_features(), *flags, SHIM_SOURCE]).encode())
        for flags in SHIM_FLAGS
    ]
    names = [f"libdpmlx_cblas_{key.hexdigest()[:16]}.so" for key in keys]
    for name in names:  # a build that failed here once is not retried at every import
        if cache is not None and (cache / name).is_file() and (cache / name).stat().st_uid == os.getuid():
            return cache / name
    errors = []
    for flags, name in zip(SHIM_FLAGS, names, strict=True):
        work = None
        try:
            work = Path(tempfile.mkdtemp(prefix="dpmlx-cblas-", dir=cache))
            source, built = work / "cblas_shim.c", work / name
            source.write_text(SHIM_SOURCE)
            command = [*compiler, *flags, "-shared", "-fPIC", "-Wl,--no-undefined", str(source)]
            command += [
                "-o",
                str(built),
                str(openblas),
                "-Xlinker",
                "-rpath",
                "-Xlinker",
                str(openblas.parent),
            ]
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


def skinny_threads() -> int:
    """Threads of the shim's own kernel for matrix-times-few-vectors products; 0 where every product goes
    to OpenBLAS (no shim, or a shim built without OpenMP)."""
    shim = _shim()
    return shim.dpmlx_skinny_threads() if shim is not None else 0


def skinny_calls() -> int:
    """Products the shim's own kernel has computed in this process."""
    shim = _shim()
    if shim is None:
        return 0
    shim.dpmlx_skinny_calls.restype = ctypes.c_long
    return shim.dpmlx_skinny_calls()


def blas_in_use() -> str:
    """Which BLAS library serves MLX's matmuls: the one loaded here, else read from /proc/self/maps."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    shim = _shim()
    if shim is not None:
        shim.scipy_openblas_get_config64_.restype = ctypes.c_char_p
        config = shim.scipy_openblas_get_config64_().decode()
        threads = skinny_threads()
        own = f"; products with at most 16 vectors by its own kernel, {threads} threads" if threads else ""
        return f"{config} (numpy's, through {loaded_blas}{own})"
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
