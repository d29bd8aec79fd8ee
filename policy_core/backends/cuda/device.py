"""The GPU's attributes, and what the persistent kernels (``sampler``, ``trunk``) share.

A persistent kernel runs one thread block per SM for its whole length and separates its phases by a
grid-wide barrier (``DEVICE_COMMON``), which needs every block resident at once: hence one such kernel
in flight per process (``LAUNCH_LOCK``), and a barrier that gives up after ``TIMEOUT_S`` instead of
hanging when another process's kernels hold SMs. MLX's CUDA device is assumed to be device 0.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import mlx.core as mx

TIMEOUT_S = 2.0
FLAG_WORDS = 32  # the grid barrier's words a block: each block's count on its own 128-byte line
LAUNCH_LOCK = threading.Lock()
"""Held while a persistent kernel may run: two such grids sharing the SMs could each hold blocks the
other's barrier waits for."""


def available() -> bool:
    """True where the CUDA kernels can run: MLX's CUDA backend is the default device."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def use_direct_launches() -> None:
    """For a process that only serves requests: MLX's CUDA backend then launches kernels directly instead
    of recording them into CUDA graphs, which made bf16 requests faster and train steps slower
    (benchmarks/NOTES.md). MLX reads the setting once, at its first GPU work: call this before. An
    explicit ``MLX_USE_CUDA_GRAPHS`` wins."""
    os.environ.setdefault("MLX_USE_CUDA_GRAPHS", "0")


def sync_words(blocks: int) -> int:
    """Size of a persistent kernel's ``sync`` array: a first line (word 2: the abort flag), then one line
    per block for ``grid_barrier``'s counts."""
    return FLAG_WORDS * (blocks + 1)


# What DEVICE_COMMON's grid barrier needs #defined by every kernel's header that includes it.
COMMON_DEFINES = {"TIMEOUT_NS": f"{int(TIMEOUT_S * 1e9)}ull", "FLAG_WORDS": FLAG_WORDS}


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Device code every persistent kernel includes: conversions, loads, sums, the grid barrier (which reads
# COMMON_DEFINES from its kernel's header).
DEVICE_COMMON = r"""
__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }

__device__ __forceinline__ unsigned int load_acquire(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void store_release(unsigned int* p, unsigned int v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Grid-wide barrier. Each block counts its barriers (`generation`) and publishes the count in its own
// 128-byte line of `sync` (line b + 1 for block b) by a release store once its threads are past their
// writes; then threads poll one block's line each until every count has reached its own. The last
// arrival's store is seen about one L2 round trip later: an arrival counter whose last block then bumped a
// generation word took three dependent round trips (1.55-1.66 against 1.13-1.28 us on an H100,
// benchmarks/NOTES.md). A wait past TIMEOUT_NS (a block that never became resident) sets sync[2], and
// every block returns false from then on.
__device__ bool grid_barrier(unsigned int* sync, unsigned int& generation) {
  ++generation;
  __syncthreads();
  if (threadIdx.x == 0) store_release(sync + FLAG_WORDS * (1 + blockIdx.x), generation);
  int good = 1;
  for (int b = threadIdx.x; b < gridDim.x && good; b += blockDim.x) {
    const unsigned int* flag = sync + FLAG_WORDS * (1 + b);
    const unsigned long long start = global_ns();
    for (int spins = 0; load_acquire(flag) < generation; ++spins) {
      if ((spins & 63) == 63) {
        if (load_acquire(sync + 2) != 0u) { good = 0; break; }
        if (global_ns() - start > TIMEOUT_NS) { atomicExch(sync + 2, 1u); good = 0; break; }
      }
    }
  }
  return __syncthreads_and(good) != 0;
}

template <int VEC>
__device__ __forceinline__ void load_staged(const float* p, float* x) {
  if constexpr (VEC == 1) {
    x[0] = p[0];
  } else {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <int W>
__device__ __forceinline__ void load_cg(const float* p, float* v) {
  if constexpr (W == 4) {
    const float4 a = __ldcg(reinterpret_cast<const float4*>(p));
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  } else {
    v[0] = __ldcg(p);
  }
}

template <int W>
__device__ __forceinline__ void store(float* p, const float* v) {
  if constexpr (W == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    p[0] = v[0];
  }
}
"""


WEIGHT_TYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half"}


@functools.cache
def cuda_driver() -> tuple[ctypes.CDLL, ctypes.c_int] | None:
    """The CUDA driver library, initialised, and device 0 (MLX's device); None where there is none."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device = ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), 0):
        return None
    return cuda, device


@functools.cache
def device_attribute(code: int) -> int | None:
    """A CUDA driver attribute of device 0 (MLX's device), or None where the driver can't say."""
    driver = cuda_driver()
    if driver is None:
        return None
    cuda, device = driver
    value = ctypes.c_int()
    if cuda.cuDeviceGetAttribute(ctypes.byref(value), code, device):
        return None
    return value.value


def sm_count() -> int | None:
    """Streaming multiprocessors: the grid size, one resident block each."""
    return device_attribute(16)  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT


def l2_bytes() -> int:
    """The L2 cache's size (50 MB on an H100), or 0 where the driver can't say."""
    return device_attribute(38) or 0  # CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE


def max_shared_bytes() -> int:
    """Dynamic shared memory one block may opt into (227 KB on an H100, 99 KB on an L4)."""
    optin = device_attribute(97)  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    return max(0, (optin or 0) - 1024)  # the kernel's static shared memory
