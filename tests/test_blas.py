"""MLX's CPU products on numpy's OpenBLAS through the shim (policy_core/backends/cpu_blas.py,
cblas_shim.c): its own kernel for a matrix times at most 8 vectors, every other product cut into blocks
of single-threaded OpenBLAS products, and one thread pool for both."""

import ctypes
import os
import shutil
import subprocess
import sys
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from policy_core.backends import cpu_blas as blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")


@pytest.fixture(autouse=True)
def _mlx_on_the_cpu():
    """The shim serves MLX's CPU products: on a CUDA machine MLX would put them on the GPU."""
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


@pytest.fixture(autouse=True)
def _no_pauses():
    """The pool's pauses off, so that a busy test machine does not move the counted parallel calls onto
    the calling thread (the pause test turns them on)."""
    shim = blas._shim()
    if shim is None:
        yield
        return
    shim.dpmlx_pool_set_late_ns.argtypes = [ctypes.c_long]
    shim.dpmlx_pool_set_late_ns.restype = ctypes.c_long
    before = shim.dpmlx_pool_set_late_ns(-1)
    shim.dpmlx_pool_resume()
    yield
    shim.dpmlx_pool_set_late_ns(before)


def _need_pool(threads: int = 1) -> None:
    if blas.shim_threads() < threads:
        pytest.skip(f"the BLAS shim with a pool of at least {threads} threads is not in use")


def test_mlx_matmuls_run_on_numpys_openblas_when_a_compiler_exists():
    a = mx.random.normal((64, 300))
    b = mx.random.normal((300, 5))
    assert np.allclose(np.array(a @ b), np.array(a) @ np.array(b), atol=1e-4)
    if blas.numpy_openblas() is None or shutil.which("cc") is None or os.environ.get("DPMLX_BLAS"):
        pytest.skip("no numpy-bundled OpenBLAS, no C compiler, or DPMLX_BLAS overrides the choice")
    assert blas.loaded_blas is not None and "libdpmlx_cblas_" in blas.loaded_blas
    assert blas.blas_in_use().startswith("OpenBLAS 0.3")


@pytest.mark.parametrize("rows", [515, 2053])  # on the calling thread alone; split over the pool
@pytest.mark.parametrize("vectors", [1, 3, 4, 5, 8])
def test_kernel_for_few_vectors_equals_numpy_in_every_layout(vectors, rows):
    """Both orientations, either operand transposed, addmm's alpha and beta; K = 301 leaves a tail after
    the 8-wide loop, and the row counts are no multiple of the rows a block takes."""
    _need_pool()
    rng = np.random.default_rng(vectors)
    big = rng.standard_normal((rows, 301), dtype=np.float32)
    small = rng.standard_normal((301, vectors), dtype=np.float32)
    bias = rng.standard_normal((rows, vectors), dtype=np.float32)
    exact = big.astype(np.float64) @ small.astype(np.float64)
    # Transposed views reach BLAS as transpose flags, not copies.
    cases = {
        "A @ B": mx.array(big) @ mx.array(small),
        "A @ B given as B^T": mx.array(big) @ mx.array(np.ascontiguousarray(small.T)).T,
        "(B^T A^T)^T": (mx.array(np.ascontiguousarray(small.T)) @ mx.array(big).T).T,
        "(B^T A^T)^T, B^T given as B": (mx.array(small).T @ mx.array(big).T).T,
        "addmm": mx.addmm(mx.array(bias), mx.array(big), mx.array(small), alpha=0.5, beta=2.0),
    }
    kernel_before, _ = blas.shim_calls()
    for name, product in cases.items():
        expected = 0.5 * exact + 2.0 * bias if name == "addmm" else exact
        np.testing.assert_allclose(np.array(product), expected, rtol=1e-5, atol=1e-4, err_msg=name)
    assert blas.shim_calls()[0] - kernel_before == len(cases)  # none of them went to OpenBLAS
    nine = mx.array(big) @ mx.array(rng.standard_normal((301, 9), dtype=np.float32))
    mx.eval(nine)
    assert blas.shim_calls()[0] - kernel_before == len(cases)  # 9 vectors: OpenBLAS's


def _sgemm(
    trans_a: bool, trans_b: bool, a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float, beta: float
):
    """The shim's cblas_sgemm on row-major views whose rows may be padded (leading dimension > width)."""
    shim = blas._shim()
    f = ctypes.c_float
    pointer = ctypes.c_void_p
    shim.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [f, pointer, ctypes.c_int, pointer, ctypes.c_int, f]
    shim.cblas_sgemm.argtypes += [pointer, ctypes.c_int]
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    ld = [x.strides[0] // 4 for x in (a, b, c)]
    shim.cblas_sgemm(
        101, 112 if trans_a else 111, 112 if trans_b else 111, m, n, k, alpha, a.ctypes.data, ld[0],
        b.ctypes.data, ld[1], beta, c.ctypes.data, ld[2],
    )  # fmt: skip


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_padded_leading_dimensions_beta_zero_and_alpha_zero(trans_a, trans_b):
    """Rows padded past their width (the padding untouched) and beta = 0 with NaN in C (never read), in
    the kernel's layouts and OpenBLAS's; alpha = 0 goes to OpenBLAS (BLAS reads neither A nor B then,
    where the kernel would multiply them by zero)."""
    _need_pool()
    rng = np.random.default_rng(7)

    def padded(rows, cols):
        store = np.full((rows, cols + 5), 99.0, np.float32)
        store[:, :cols] = rng.standard_normal((rows, cols), dtype=np.float32)
        return store, store[:, :cols]

    for m, n in ((3, 700), (700, 3)):  # few rows of A, or few columns of B
        kernel_takes = (not trans_a and n <= 8) or (trans_b and m <= 8)
        k = 301
        a_store, a = padded(k, m) if trans_a else padded(m, k)
        b_store, b = padded(n, k) if trans_b else padded(k, n)
        c_store, c = padded(m, n)
        c[:] = np.nan
        exact = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
        kernel_before, _ = blas.shim_calls()
        _sgemm(trans_a, trans_b, a, b, c, alpha=1.0, beta=0.0)
        assert blas.shim_calls()[0] == kernel_before + kernel_takes
        np.testing.assert_allclose(c, exact, rtol=1e-5, atol=1e-4)
        for store, view in ((a_store, a), (b_store, b), (c_store, c)):
            assert (store[:, view.shape[1] :] == 99.0).all()
        _sgemm(trans_a, trans_b, a, b, c, alpha=0.0, beta=2.0)
        assert blas.shim_calls()[0] == kernel_before + kernel_takes
        np.testing.assert_allclose(c, 2.0 * exact, rtol=1e-5, atol=1e-4)


def test_the_pool_takes_openblass_thread_count_and_keeps_openblas_single_threaded():
    _need_pool(threads=2)
    shim = blas._shim()
    assert shim.scipy_openblas_get_num_threads64_() == 1  # every OpenBLAS product: one block, one thread
    big, few = mx.random.normal((4096, 640)), mx.random.normal((640, 4))
    threads = blas.shim_threads()
    try:
        shim.dpmlx_pool_set_threads(1)
        assert blas.shim_threads() == 1
        _, pool_before = blas.shim_calls()
        mx.eval(big @ few)
        assert blas.shim_calls()[1] == pool_before  # ran on the calling thread alone
    finally:
        shim.dpmlx_pool_set_threads(threads)
    _, pool_before = blas.shim_calls()
    mx.eval(big @ few)
    assert blas.shim_calls()[1] == pool_before + 1


def test_helpers_that_start_late_pause_the_pool_to_the_calling_thread_and_it_comes_back():
    """Other processes on the cores: where helpers keep starting late, every product runs on the calling
    thread for a pause, then the pool is looked at again."""
    _need_pool(threads=2)
    shim = blas._shim()
    big, few = mx.random.normal((4096, 640)), mx.random.normal((640, 4))  # a parallel kernel product
    shim.dpmlx_pool_set_late_ns(0)  # every helper is late
    for _ in range(8):
        mx.eval(big @ few)
    assert shim.dpmlx_pool_paused()
    _, pool_before = blas.shim_calls()
    mx.eval(big @ few)
    assert blas.shim_calls()[1] == pool_before  # on the calling thread
    shim.dpmlx_pool_set_late_ns(-1)
    time.sleep(0.06)  # a first pause lasts 50 ms
    mx.eval(big @ few)
    assert not shim.dpmlx_pool_paused()
    assert blas.shim_calls()[1] == pool_before + 1


@pytest.mark.parametrize("shape", [(256, 1280, 16), (64, 4096, 1024), (3, 700, 2048), (4096, 640, 4)])
def test_products_are_the_same_whatever_the_thread_count_and_pauses(shape):
    """A product is cut by its shape alone and each block computed the same way on any thread, so a
    request gives the same bits on a busy machine as on an idle one (and with any OPENBLAS_NUM_THREADS)."""
    _need_pool(threads=2)
    shim = blas._shim()
    m, k, n = shape
    rng = np.random.default_rng(3)
    a = mx.array(rng.standard_normal((m, k), dtype=np.float32))
    b = mx.array(rng.standard_normal((k, n), dtype=np.float32))
    threads = blas.shim_threads()
    _, pool_before = blas.shim_calls()
    parallel = np.array(a @ b)
    assert blas.shim_calls()[1] > pool_before  # it was cut and ran on the pool
    try:
        for count in (1, 3):
            shim.dpmlx_pool_set_threads(count)
            assert np.array_equal(np.array(a @ b), parallel)
    finally:
        shim.dpmlx_pool_set_threads(threads)
    shim.dpmlx_pool_set_late_ns(0)
    while not shim.dpmlx_pool_paused():
        mx.eval(a @ b)
    assert np.array_equal(np.array(a @ b), parallel)


def test_larger_products_run_on_the_pool_in_blocks_and_numpys_on_one_thread():
    _need_pool(threads=2)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((512, 512), dtype=np.float32) for _ in range(2))
    _, pool_before = blas.shim_calls()
    mlx_product = np.array(mx.array(a) @ mx.array(b))
    assert blas.shim_calls()[1] == pool_before + 1
    numpy_product = a @ b  # numpy calls OpenBLAS directly: single-threaded, off the pool
    assert blas.shim_calls()[1] == pool_before + 1
    exact = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(mlx_product, exact, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(numpy_product, exact, rtol=1e-4, atol=1e-3)


def test_products_from_several_threads_at_once_are_right_and_finish():
    """The pool takes one call at a time; concurrent callers (MLX on several Python threads, numpy on
    another) wait their turn, and nobody deadlocks or reads another call's job."""
    _need_pool(threads=2)
    rng = np.random.default_rng(1)
    square = rng.standard_normal((384, 384), dtype=np.float32)
    big = rng.standard_normal((4096, 640), dtype=np.float32)
    few = rng.standard_normal((640, 4), dtype=np.float32)
    square_exact = square.astype(np.float64) @ square.astype(np.float64)
    few_exact = big.astype(np.float64) @ few.astype(np.float64)
    errors: list[str] = []

    def numpy_products():
        for _ in range(30):
            if not np.allclose(square @ square, square_exact, rtol=1e-4, atol=1e-3):
                errors.append("numpy product wrong")

    def mlx_products(a: np.ndarray, b: np.ndarray, exact: np.ndarray):
        def run():
            with mx.stream(mx.cpu):
                for _ in range(30):
                    if not np.allclose(np.array(mx.array(a) @ mx.array(b)), exact, rtol=1e-4, atol=1e-3):
                        errors.append("MLX product wrong")

        return run

    workers = [numpy_products, mlx_products(big, few, few_exact), mlx_products(square, square, square_exact)]
    # Daemons: a deadlock fails the test instead of hanging pytest at exit.
    threads = [threading.Thread(target=f, daemon=True) for f in workers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a product never finished"
    assert errors == []


def test_a_forked_child_gets_a_fresh_pool():
    """The child of a fork has none of the parent's helper threads: its first parallel product starts
    new ones instead of waiting for the parent's."""
    _need_pool(threads=2)
    # The shim's cblas_sgemm called directly: MLX itself does not run in a forked child.
    script = """
import ctypes, os, sys
import numpy as np
import policy_core
from policy_core.backends import cpu_blas as blas
shim = blas._shim()
f, p = ctypes.c_float, ctypes.c_void_p
shim.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [f, p, ctypes.c_int, p, ctypes.c_int, f, p, ctypes.c_int]
a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
exact = a.astype(np.float64) @ a.astype(np.float64)

def product():
    c = np.empty_like(a)
    shim.cblas_sgemm(101, 111, 111, 512, 512, 512, 1.0, a.ctypes.data, 512, a.ctypes.data, 512, 0.0,
                     c.ctypes.data, 512)
    return np.allclose(c, exact, rtol=1e-4, atol=1e-3)

assert product()
pid = os.fork()
if pid == 0:
    before = blas.shim_calls()[1]
    ok = product() and blas.shim_calls()[1] > before
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_shim_build_falls_back_to_the_next_flags_and_caches(monkeypatch, tmp_path):
    openblas = blas.numpy_openblas()
    if openblas is None or shutil.which("cc") is None:
        pytest.skip("no numpy-bundled OpenBLAS or no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(blas, "SHIM_FLAGS", (("-fno-such-flag",), ("-O2", "-pthread")))
    built = blas.build_shim(openblas)
    assert built is not None and built.parent == tmp_path / "dpmlx"
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # the failed build left nothing
    stamp = built.stat().st_mtime_ns
    assert blas.build_shim(openblas) == built and built.stat().st_mtime_ns == stamp  # cached, not rebuilt
