"""A request's host observations for MLX's CUDA backend, without managed-memory page migrations.

``mx.array(numpy)`` there writes the bytes into managed memory, often a buffer recycled from the GPU: MLX
first copies its stale contents back (a synchronous device-to-managed copy), the host's writes then migrate
its pages to the host, and the first kernel that reads them migrates them back: a tenth of a millisecond or
more of a request (benchmarks/NOTES.md). ``HostUploads`` instead keeps one MLX array per observation key,
shape and dtype, advised to live in host memory and to be read there by the GPU (``cuMemAdvise``: preferred
location the host, accessed by device 0), and writes each request's values into it through a NumPy view: no
page moves either way, and the kernel that reads them reads tens of KB over the bus. Advice applies to whole
pages, so each array lies on pages of a buffer of its own (``_page_aligned``): advising a page shared with
another small allocation (the barrier counters of a persistent kernel, say) would put that one in host memory
too. The arrays are written behind MLX's back, so a returned array is only valid until the next write of its
(key, shape, dtype) slot: one request at a time per ``HostUploads`` (a request's kernels have read its
observations before the policy returns). Where MLX does not use managed memory (no concurrent managed access:
WSL, some Jetsons) or the advice fails, observations go through ``mx.array`` as before. The sampler kernel's
result is such an array too, written the other way: by the GPU, then read by the host (``sampler``). MLX's
CUDA device is assumed to be device 0, as elsewhere in policy_core.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import warnings
import weakref
from typing import Any

import mlx.core as mx
import numpy as np

from policy_core.backends.cuda import device

KEPT_ARRAYS = 32  # per HostUploads, over all keys: each observation key's batch buckets
PAGE_BYTES = max(4096, mmap.PAGESIZE)  # the host's page: the unit of managed-memory advice
# dtypes ``mx.array`` stores as they are (it would convert others, e.g. float64 to float32).
WRITTEN_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]  # CUmemLocation


class _Driver:
    """The CUDA driver's memory advice, bound once per process (MLX's device is device 0)."""

    SET_PREFERRED_LOCATION, UNSET_PREFERRED_LOCATION, SET_ACCESSED_BY, UNSET_ACCESSED_BY = 3, 4, 5, 6
    DEVICE, HOST = _Location(1, 0), _Location(2, 0)  # CUmemLocationType DEVICE / HOST

    def __init__(self) -> None:
        driver = device.cuda_driver()
        if driver is None:
            raise RuntimeError("no CUDA driver or device")
        lib, index = driver
        self._advise = lib.cuMemAdvise_v2
        self._advise.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, _Location]
        context = ctypes.c_void_p()
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), index), "cuDevicePrimaryCtxRetain")
        self._lib, self._context = lib, context

    @staticmethod
    def _check(result: int, call: str) -> None:
        if result != 0:
            raise RuntimeError(f"{call} failed with CUDA driver error {result}")

    def keep_on_host(self, pointer: int, nbytes: int) -> None:
        """Managed memory at ``pointer`` stays in host memory and device 0 reads it there."""
        self._advise_all(
            pointer, nbytes, [(self.SET_PREFERRED_LOCATION, self.HOST), (self.SET_ACCESSED_BY, self.DEVICE)]
        )

    def release(self, pointer: int, nbytes: int) -> None:
        """Undo ``keep_on_host``, before MLX recycles the memory for other arrays."""
        self._advise_all(
            pointer,
            nbytes,
            [(self.UNSET_PREFERRED_LOCATION, self.HOST), (self.UNSET_ACCESSED_BY, self.DEVICE)],
        )

    def _advise_all(self, pointer: int, nbytes: int, advice: list[tuple[int, _Location]]) -> None:
        self._check(self._lib.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")  # the calling thread's
        for kind, location in advice:
            self._check(self._advise(pointer, nbytes, kind, location), "cuMemAdvise")


@functools.cache
def _driver() -> _Driver:
    return _Driver()


def _managed_memory() -> bool:
    """Whether MLX's arrays are in managed memory here: its CUDA backend is the default device, and that
    device has concurrent managed access (elsewhere MLX allocates pinned host memory)."""
    return device.available() and _concurrent_managed_access()


@functools.cache
def _concurrent_managed_access() -> bool:
    return device.device_attribute(89) == 1  # CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS


class HostUploads:
    """Observation arrays kept per (key, shape, dtype), written by each request from host data."""

    # Set for the process after advice failed once; its array is kept here, never given back to MLX with
    # whatever part of the advice took.
    failed: list[mx.array | None] = []

    def __init__(self) -> None:
        self._arrays: dict[tuple, tuple[mx.array, np.ndarray]] = {}

    def __call__(self, key: str, value: Any) -> mx.array:
        """``value`` as an MLX array: an MLX array as it is; host data of a written dtype in the kept array
        of its (key, shape, dtype) slot (valid until the slot's next write); anything else, or where the
        advice can't be used, through ``mx.array``."""
        if isinstance(value, mx.array):
            return value
        host = np.asarray(value)
        if host.dtype not in WRITTEN_DTYPES or host.size == 0 or self.failed or not _managed_memory():
            return mx.array(host)
        slot = (key, host.shape, host.dtype)
        if slot in self._arrays:
            array, view = self._arrays[slot] = self._arrays.pop(slot)  # now the most recently used
            view[...] = host
            return array
        if len(self._arrays) >= KEPT_ARRAYS:
            del self._arrays[next(iter(self._arrays))]  # the least recently used
        array = None
        try:
            array, view = _page_aligned(host.shape, host.dtype)
            pointer = view.__array_interface__["data"][0]
            nbytes = device.round_up(view.nbytes, PAGE_BYTES)
            driver = _driver()
            driver.keep_on_host(pointer, nbytes)
        except (OSError, AttributeError, RuntimeError) as error:
            HostUploads.failed.append(array)
            message = f"host arrays ({key!r} first) go through mx.array from now on: {error}"
            warnings.warn(message, stacklevel=2)
            return mx.array(host)
        # The memory goes back to MLX's cache when the array dies (evicted, or the policy with it): the
        # advice must not follow it to other arrays. At exit the driver may be gone; so is the memory.
        weakref.finalize(array, driver.release, pointer, nbytes).atexit = False
        view[...] = host
        self._arrays[slot] = (array, view)
        return array


def _page_aligned(shape: tuple[int, ...], dtype: np.dtype) -> tuple[mx.array, np.ndarray]:
    """An MLX array of ``shape`` starting on a page boundary of a buffer made for it, whose whole pages it
    spans lie inside that buffer, and a writable NumPy view of it (the same memory)."""
    size = int(np.prod(shape))
    spare = PAGE_BYTES // dtype.itemsize  # room to move the start onto a page boundary
    buffer = mx.array(
        np.zeros(spare + device.round_up(size * dtype.itemsize, PAGE_BYTES) // dtype.itemsize, dtype)
    )
    start = (-np.asarray(buffer).__array_interface__["data"][0] % PAGE_BYTES) // dtype.itemsize
    array = buffer[start : start + size].reshape(shape)  # a view of the buffer (MLX slices share it)
    mx.eval(array)
    view = np.asarray(array)
    if view.__array_interface__["data"][0] % PAGE_BYTES or not np.shares_memory(view, np.asarray(buffer)):
        raise RuntimeError("MLX gave a page-aligned slice other memory than its buffer's")
    return array, view
