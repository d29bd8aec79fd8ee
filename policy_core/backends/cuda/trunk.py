"""The image encoder's ResNet18-GN trunk on MLX's CUDA backend, for inference: one persistent kernel.

On CUDA the module trunk is a chain of ~60 small kernels (cuDNN convolutions, GroupNorm's reductions and
elementwise passes), and a request pays MLX's host cost for each, far more than the trunk's arithmetic
and weights take (benchmarks/NOTES.md). Here the whole trunk is one kernel launch, built like
``sampler``'s: one thread block per SM walks a program of
phases with a grid-wide barrier between them. A phase

1. computes one or two convolutions that read the same input (a BasicBlock's first one and its 1x1
   downsample) in *items* of (image, output rows, output channels), spread round-robin over the blocks.
   An item stages the input window it reads in shared memory (zero padding included), building it from
   earlier phases' outputs: GroupNorm (statistics combined from the producer's per-item partials) + ReLU
   [+ the residual, itself plain or GroupNorm'd] as it loads, while its weight rows are copied to shared
   memory asynchronously. Each thread then sums CT output channels x PT pixels over a contiguous slice
   of a weight row (MLX's (out, kh, kw, in) layout: one kernel row's taps and input channels are
   contiguous in the weights and in the staged window), the block adds its slices, and writes the raw
   outputs and, per group of GroupNorm channels in the item, their (mean, sum of squared deviations).
   Where an item's input is a BasicBlock's output, items of the first channel tile also write it out:
   the next block's residual.
2. or applies the stem's GroupNorm + ReLU and 3x3 max pooling, or the last block's GroupNorm + residual +
   ReLU into the kernel's output.

The tile shapes are chosen per convolution by a rough cost model (``_tiling``, for PLAN_IMAGES images); the
program is compiled by NVRTC per image shape and dtype, for every batch size (seconds on first use; MLX
keeps the result on disk).
Activations and arithmetic are float32 whatever the weights' dtype. Same parameters and results as
``ResNet18Trunk`` (tests/test_vision.py, on a GPU); no gradients, so only the inference conditioning uses
it. The barrier needs every block resident: one kernel of this kind or the sampler's runs at a time per
process (a caller evaluates it under ``device.LAUNCH_LOCK``), and a barrier that waits past
``device.TIMEOUT_S`` ends the kernel with NaN features rather than hanging.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from policy_core.backends.cuda import device
from policy_core.backends.cuda.fused_unet import same_dtype
from policy_core.nets.vision import BasicBlock, ResNet18Trunk

THREADS = 256
MAX_GROUPS = 64  # GroupNorm groups per tensor: a block keeps their (mean, rstd) in shared memory
MAX_PARTIALS = 512  # a tensor's statistics partials per image, loaded into shared memory at once
MAX_CHANNELS = 2 * THREADS  # a thread holds two channels' GroupNorm terms
SCRATCH_FLOATS = 4 * (MAX_PARTIALS + MAX_GROUPS)  # two tensors' partials and group terms
ROUND_TRIP = 1500  # the cost model's L2 round trip, in issue cycles
PLAN_IMAGES = 2  # the batch the tiles are planned for: one robot's two observation steps

# C++ aggregates of the phase records: a convolution's output with its GroupNorm, and a phase's input.
_SOURCE = r"""
struct Raw {
  const float* data;
  const float2* stats;  // per (image, row tile, unit of channels): (mean, M2)
  int h, w, c, tiles, tile_rows, unit, group;
  const AT* gamma;
  const AT* beta;
  float eps;
};

// mode 0: plain; 1: relu(gn(raw)); 2: relu(gn(raw) + plain); 3: relu(gn(raw) + gn(id)); 4: the input.
struct Src {
  int mode;
  const float* plain;
  const AT* input;
  Raw raw;
  Raw id;
  float* mat;  // where items of the first channel tile also write what they stage (mode 2, 3)
};

// GroupNorm of image n as per-channel terms a * x + b (at aff + 2kC and aff + (2k + 1)C) of `count` (1 or
// 2) tensors of C channels at once: a source's input and its GroupNorm'd residual. Every thread first
// loads its share of the producers' partials and its channels' gamma and beta (one L2 round trip), then
// one warp per group combines the partials (mean = sum n_i m_i / N, M2 = sum M2_i + n_i (m_i - mean)^2),
// then one thread per channel computes the terms.
__device__ void norm_terms(const Raw (&raws)[2], int count, int n, float* aff, float* scratch) {
  constexpr int CPT = 2;  // channels per thread (C <= 512)
  const int c = raws[0].c, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float2* loaded = reinterpret_cast<float2*>(scratch);
  float* terms = scratch + 4 * MAX_PARTIALS;
  float gb[2][CPT][2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (k >= count) break;
    const Raw& r = raws[k];
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int ch = tid + j * THREADS;
      gb[k][j][0] = ch < c ? as_float(r.gamma[ch]) : 0.f;
      gb[k][j][1] = ch < c ? as_float(r.beta[ch]) : 0.f;
    }
    const int partials = r.tiles * (c / r.unit);
    for (int i = tid; i < partials; i += THREADS)
      loaded[k * MAX_PARTIALS + i] = __ldcg(r.stats + (size_t)n * partials + i);
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (k >= count) break;
    const Raw& r = raws[k];
    const int per_group = r.group / r.unit, units = c / r.unit;
    const float2* p = loaded + k * MAX_PARTIALS;
    for (int g = warp; g < c / r.group; g += THREADS / 32) {
      float weighted = 0.f, total = 0.f;
      for (int i = lane; i < r.tiles * per_group; i += 32) {
        const int t = i / per_group;
        const float nb = (float)(min(r.tile_rows, r.h - t * r.tile_rows) * r.w * r.unit);
        weighted += nb * p[t * units + g * per_group + i % per_group].x;
        total += nb;
      }
      total = warp_sum(total);
      const float mean = warp_sum(weighted) / total;
      float m2 = 0.f;
      for (int i = lane; i < r.tiles * per_group; i += 32) {
        const int t = i / per_group;
        const float nb = (float)(min(r.tile_rows, r.h - t * r.tile_rows) * r.w * r.unit);
        const float2 s = p[t * units + g * per_group + i % per_group];
        m2 += s.y + nb * (s.x - mean) * (s.x - mean);
      }
      m2 = warp_sum(m2);
      if (lane == 0) {
        terms[2 * (k * MAX_GROUPS + g)] = mean;
        terms[2 * (k * MAX_GROUPS + g) + 1] = rsqrtf(m2 / total + r.eps);
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (k >= count) break;
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      const int ch = tid + j * THREADS;
      if (ch >= c) break;
      const float* t = terms + 2 * (k * MAX_GROUPS + ch / raws[k].group);
      const float scale = t[1] * gb[k][j][0];
      aff[2 * k * c + ch] = scale;
      aff[(2 * k + 1) * c + ch] = gb[k][j][1] - t[0] * scale;
    }
  }
  __syncthreads();
}

// aff: (a, b) of the raw input, then of a GroupNorm'd residual, C floats each.
__device__ void source_terms(const Src& src, int n, float* aff, float* scratch) {
  if (src.mode >= 1 && src.mode <= 3) norm_terms({src.raw, src.id}, src.mode == 3 ? 2 : 1, n, aff, scratch);
}

template <int CW>
__device__ __forceinline__ void source_load(const Src& src, size_t at, float* v, float* id) {
  if (src.mode == 4) {
#pragma unroll
    for (int i = 0; i < CW; ++i) v[i] = as_float(src.input[at + i]);
  } else {
    load_cg<CW>((src.mode == 0 ? src.plain : src.raw.data) + at, v);
    if (src.mode == 2) load_cg<CW>(src.plain + at, id);
    if (src.mode == 3) load_cg<CW>(src.id.data + at, id);
  }
}

template <int CW>
__device__ __forceinline__ void source_finish(const Src& src, int ch, const float* aff, float* v,
                                              const float* id) {
  if (src.mode == 0 || src.mode == 4) return;
  const int c = src.raw.c;
#pragma unroll
  for (int i = 0; i < CW; ++i) {
    float residual = src.mode == 2 ? id[i] : 0.f;
    if (src.mode == 3) residual = aff[2 * c + ch + i] * id[i] + aff[3 * c + ch + i];
    v[i] = fmaxf(aff[ch + i] * v[i] + aff[c + ch + i] + residual, 0.f);
  }
}

// Rows iy0 .. iy0 + RW - 1, columns ix0 .. ix0 + WP - 1 of image n of the source, zero outside the image,
// CIP floats a pixel. A thread issues the loads of BATCH positions before it transforms and stores any
// (their round trips overlap).
template <int H, int W, int CI, int RW, int WP, int CIP>
__device__ void stage_window(const Src& src, int n, int iy0, int ix0, const float* aff, float* xs, bool mat) {
  constexpr int CW = CI % 4 == 0 ? 4 : 1, Q = CI / CW, TOTAL = RW * WP * Q, BATCH = 8;
  for (int e0 = threadIdx.x; e0 < TOTAL; e0 += BATCH * THREADS) {
    float v[BATCH][CW] = {}, id[BATCH][CW];
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
      const int e = e0 + u * THREADS, col = (e / Q) % WP, iy = iy0 + e / (Q * WP), ix = ix0 + col;
      if (e < TOTAL && iy >= 0 && iy < H && ix >= 0 && ix < W)
        source_load<CW>(src, (((size_t)n * H + iy) * W + ix) * CI + (e % Q) * CW, v[u], id[u]);
    }
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
      const int e = e0 + u * THREADS, ch = (e % Q) * CW, col = (e / Q) % WP, row = e / (Q * WP);
      const int iy = iy0 + row, ix = ix0 + col;
      if (e >= TOTAL) break;
      if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
        source_finish<CW>(src, ch, aff, v[u], id[u]);
        if (mat) store<CW>(src.mat + (((size_t)n * H + iy) * W + ix) * CI + ch, v[u]);
      }
      store<CW>(xs + (row * WP + col) * CIP + ch, v[u]);
    }
  }
}

__device__ __forceinline__ void copy_async(void* to_shared, const void* from) {
  const unsigned int to = static_cast<unsigned int>(__cvta_generic_to_shared(to_shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(from) : "memory");
}

// VEC weights from shared memory as floats.
template <int VEC>
__device__ __forceinline__ void load_weights(const AT* p, float* w) {
  if constexpr (VEC == 1) {
    w[0] = as_float(p[0]);
  } else if constexpr (sizeof(AT) == 2) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned int bits[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const unsigned short h = i % 2 ? bits[i / 2] >> 16 : bits[i / 2] & 0xffffu;
      w[i] = as_float(*reinterpret_cast<const AT*>(&h));
    }
  } else {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
  }
}

// A KxK convolution, stride S, zero padding P, no bias, (nimg, H, W, CI) -> raw (nimg, HO, WO, CO) and
// its partial statistics. This block's items are those of begin .. begin + ITEMS - 1 it is dealt of the
// phase's `total`. An item's weights (NT rows, contiguous) are copied to shared memory asynchronously
// while its window is staged. Threads: CG channel groups x PG pixel groups x KS slices of a weight row.
template <int H, int W, int CI, int K, int S, int P, int CO, int HO, int WO,
          int TR, int NT, int CT, int PT, int KS, int VEC, int UNIT, int XS>
__device__ void conv_phase(const Src& src, const AT* __restrict__ w, float* out, float2* stats,
                           float* smem, int nimg, int begin, int total) {
  constexpr int RT = (HO + TR - 1) / TR, CTILES = CO / NT;
  const int ITEMS = nimg * RT * CTILES;
  constexpr int RW = (TR - 1) * S + K, WP = (WO - 1) * S + K, PIX = TR * WO;
  constexpr int CG = NT / CT, PG = (PIX + PT - 1) / PT, ACTIVE = CG * PG * KS;
  constexpr int SPAN = K * CI, CHUNK = SPAN / KS;
  // With vector loads, weight rows in shared memory start an odd number of 16 bytes apart and the window's
  // pixels 16 bytes more than their channels: the rows and pixels a warp reads at once fall in different
  // banks (unpadded, a 64-channel layer's loads conflicted 16 ways).
  constexpr int ROW_BYTES = K * SPAN * (int)sizeof(AT);
  constexpr int PITCH_BYTES = VEC > 1 ? ((ROW_BYTES + 15) / 16 | 1) * 16 : ROW_BYTES;
  constexpr int PITCH = PITCH_BYTES / (int)sizeof(AT), CIP = VEC > 1 ? CI + 4 : CI;
  static_assert(ACTIVE <= THREADS && SPAN % KS == 0 && CHUNK % VEC == 0 && CO % NT == 0);
  float* aff = smem;
  float* scratch = aff + 4 * CI;
  float* xs = scratch + SCRATCH_FLOATS;
  AT* wsm = reinterpret_cast<AT*>(xs + XS);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int cg = tid % CG, pg = (tid / CG) % PG, ks = tid / (CG * PG);
  int terms_for = -1;
  for (int item = blockIdx.x; item < total; item += gridDim.x) {
    const int it = item - begin;
    if (it < 0 || it >= ITEMS) continue;
    const int ct = it % CTILES, rt = (it / CTILES) % RT, n = it / (CTILES * RT);
    const int oy0 = rt * TR, pixels = min(TR, HO - oy0) * WO;
    if (n != terms_for) {
      source_terms(src, n, aff, scratch);
      terms_for = n;
    }
    const AT* wsrc = w + (size_t)ct * NT * K * SPAN;
    if constexpr (VEC > 1) {
      constexpr int PER_ROW = ROW_BYTES / 16;
      for (int i = tid; i < NT * PER_ROW; i += THREADS)
        copy_async(reinterpret_cast<char*>(wsm) + (i / PER_ROW) * PITCH_BYTES + (i % PER_ROW) * 16,
                   reinterpret_cast<const char*>(wsrc) + 16 * i);
    } else if constexpr (NT * ROW_BYTES % 16 == 0) {
      for (int i = tid; i < NT * ROW_BYTES / 16; i += THREADS)
        copy_async(reinterpret_cast<char*>(wsm) + 16 * i, reinterpret_cast<const char*>(wsrc) + 16 * i);
    } else {
#pragma unroll 4
      for (int i = tid; i < NT * K * SPAN; i += THREADS)
        wsm[(i / (K * SPAN)) * PITCH + i % (K * SPAN)] = __ldg(wsrc + i);
    }
    stage_window<H, W, CI, RW, WP, CIP>(src, n, oy0 * S - P, -P, aff, xs, ct == 0 && src.mat != nullptr);
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    float acc[PT][CT] = {};
    if (tid < ACTIVE) {
      int base[PT];
#pragma unroll
      for (int p = 0; p < PT; ++p) {
        const int pix = pg + p * PG, q = pix < pixels ? pix : 0;
        base[p] = ((q / WO) * S * WP + (q % WO) * S) * CIP;
      }
      const AT* wrow = wsm + cg * CT * PITCH + ks * CHUNK;
#pragma unroll 1
      for (int ky = 0; ky < K; ++ky) {
        const float* xk = xs + ky * WP * CIP;
        const AT* wk = wrow + ky * SPAN;
#pragma unroll 2
        for (int j = 0; j < CHUNK; j += VEC) {
          // (kx, ci) of this step: contiguous in a weight row, CIP floats a pixel in the window
          const int span_at = ks * CHUNK + j, at = span_at + span_at / CI * (CIP - CI);
          float wv[CT][VEC];
#pragma unroll
          for (int c = 0; c < CT; ++c) load_weights<VEC>(wk + c * PITCH + j, wv[c]);
#pragma unroll
          for (int p = 0; p < PT; ++p) {
            float xv[VEC];
            load_staged<VEC>(xk + base[p] + at, xv);
#pragma unroll
            for (int c = 0; c < CT; ++c)
#pragma unroll
              for (int v = 0; v < VEC; ++v) acc[p][c] = fmaf(xv[v], wv[c][v], acc[p][c]);
          }
        }
      }
    }
    __syncthreads();  // the window is read: its space takes the output tile and the slices' sums
    float* tile = xs;
    float* part = KS == 1 ? tile : xs + PIX * NT;
    if (tid < ACTIVE) {
#pragma unroll
      for (int p = 0; p < PT; ++p) {
        const int pix = pg + p * PG;
        if (pix >= pixels) continue;
#pragma unroll
        for (int c = 0; c < CT; ++c) part[(ks * PIX + pix) * NT + cg * CT + c] = acc[p][c];
      }
    }
    __syncthreads();
    if (KS > 1) {
      for (int e = tid; e < pixels * NT; e += THREADS) {
        float s = 0.f;
        for (int k = 0; k < KS; ++k) s += part[k * PIX * NT + e];
        tile[e] = s;
      }
      __syncthreads();
    }
    for (int e = tid; e < pixels * NT; e += THREADS)
      out[(((size_t)n * HO + oy0) * WO + e / NT) * CO + ct * NT + e % NT] = tile[e];
    for (int u = warp; u < NT / UNIT; u += THREADS / 32) {
      const int count = pixels * UNIT;
      float s = 0.f;
      for (int i = lane; i < count; i += 32) s += tile[(i / UNIT) * NT + u * UNIT + i % UNIT];
      const float mean = warp_sum(s) / count;
      float m2 = 0.f;
      for (int i = lane; i < count; i += 32) {
        const float d = tile[(i / UNIT) * NT + u * UNIT + i % UNIT] - mean;
        m2 += d * d;
      }
      m2 = warp_sum(m2);
      if (lane == 0)
        stats[((size_t)n * RT + rt) * (CO / UNIT) + ct * (NT / UNIT) + u] = make_float2(mean, m2);
    }
    __syncthreads();
  }
}

// Elementwise phases split each image into gridDim / nimg pieces (at least one).
#define FOR_PIECES(E, STEP)                                                         \
  const int pieces = max(1, (int)gridDim.x / nimg), per = ((E) / (STEP) + pieces - 1) / pieces; \
  int terms_for = -1;                                                               \
  for (int item = blockIdx.x; item < nimg * pieces; item += gridDim.x)

// relu(GroupNorm(stem)) then 3x3 max pooling, stride 2, padding 1: (nimg, H, W, C) -> (nimg, PH, PW, C).
template <int H, int W, int C, int PH, int PW>
__device__ void pool_phase(const Raw& r, float* out, float* smem, int nimg) {
  float* aff = smem;
  float* scratch = aff + 4 * C;
  constexpr int E = PH * PW * C;
  FOR_PIECES(E, 1) {
    const int n = item / pieces, piece = item % pieces;
    if (n != terms_for) {
      norm_terms({r, r}, 1, n, aff, scratch);
      terms_for = n;
    }
    for (int e = piece * per + threadIdx.x; e < min(E, (piece + 1) * per); e += THREADS) {
      const int ch = e % C, px = (e / C) % PW, py = e / (C * PW);
      float m = 0.f;  // the max of ReLU outputs, every window holding at least one pixel
      for (int ky = 0; ky < 3; ++ky) {
        const int iy = py * 2 - 1 + ky;
        if (iy < 0 || iy >= H) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int ix = px * 2 - 1 + kx;
          if (ix < 0 || ix >= W) continue;
          const float v = __ldcg(r.data + (((size_t)n * H + iy) * W + ix) * C + ch);
          m = fmaxf(m, aff[ch] * v + aff[C + ch]);
        }
      }
      out[(size_t)n * E + e] = m;
    }
  }
}

// The last BasicBlock's output into the kernel's output, in its dtype.
template <int H, int W, int C>
__device__ void final_phase(const Src& src, AT* out, float* smem, int nimg) {
  float* aff = smem;
  float* scratch = aff + 4 * C;
  constexpr int E = H * W * C;
  static_assert(C % 4 == 0);
  FOR_PIECES(E, 4) {
    const int n = item / pieces, piece = item % pieces;
    if (n != terms_for) {
      source_terms(src, n, aff, scratch);
      terms_for = n;
    }
    for (int q = piece * per + threadIdx.x; q < min(E / 4, (piece + 1) * per); q += THREADS) {
      const size_t at = (size_t)n * E + q * 4;
      float v[4], id[4];
      source_load<4>(src, at, v, id);
      source_finish<4>(src, (q * 4) % C, aff, v, id);
#pragma unroll
      for (int i = 0; i < 4; ++i) out[at + i] = static_cast<AT>(v[i]);
    }
  }
}
"""

_BODY = r"""
  extern __shared__ __align__(16) float smem[];  // float4, uint4 and cp.async accesses
  unsigned int generation = 0;
  const int nimg = x_shape[0];  // the workspace's tensors are laid out per image: slot * nimg
  // out stays NaN unless every phase ran: a kernel that gave up at a barrier can't pass for features.
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i < nimg * OUT_PER_IMAGE; i += THREADS)
      out[i] = static_cast<AT>(__int_as_float(0x7fc00000));
"""


@dataclass(frozen=True)
class _Raw:
    """A convolution's output (images, h, w, c) in the workspace at ``slot``, its GroupNorm partials at
    ``stats`` (per image, row tile and ``unit`` channels), and the GroupNorm that follows it."""

    slot: int
    stats: int
    h: int
    w: int
    c: int
    tiles: int
    tile_rows: int
    unit: int
    norm: int  # index of the norm's (gamma, beta) kernel inputs
    group: int
    eps: float

    def cpp(self) -> str:
        return (
            f"Raw{{ws + {self.slot} * nimg, reinterpret_cast<const float2*>(ws + {self.stats} * nimg), "
            f"{self.h}, {self.w}, {self.c}, {self.tiles}, {self.tile_rows}, {self.unit}, {self.group}, "
            f"g{self.norm}, b{self.norm}, {self.eps!r}f}}"
        )


@dataclass(frozen=True)
class _Source:
    """What a phase reads, (images, h, w, c): see the kernel's ``Src``."""

    mode: int
    h: int
    w: int
    c: int
    plain: int = -1  # mode 0: the tensor; mode 2: the residual
    raw: _Raw | None = None
    id: _Raw | None = None
    mat: int = -1

    def cpp(self) -> str:
        def ws(slot: int) -> str:
            return "nullptr" if slot < 0 else f"ws + {slot} * nimg"

        raws = [r.cpp() if r else "Raw{}" for r in (self.raw, self.id)]
        return (
            f"Src{{{self.mode}, {ws(self.plain)}, {'x' if self.mode == 4 else 'nullptr'}, {raws[0]}, "
            f"{raws[1]}, {ws(self.mat)}}}"
        )


@dataclass(frozen=True)
class _Tiling:
    rows: int  # output rows per item (TR)
    channels: int  # output channels per item (NT)
    thread_channels: int  # CT
    thread_pixels: int  # PT
    splits: int  # KS: slices of a weight row
    vec: int
    unit: int  # channels per statistics partial
    window: int  # floats of the staged window or the output tile, whichever is larger (XS)
    shared_floats: int  # the block's shared memory: terms, scratch, window and weight rows


def _pitch_bytes(row_bytes: int, vec: int) -> int:
    """A weight row's pitch in shared memory, as the kernel's PITCH_BYTES."""
    return (-(-row_bytes // 16) | 1) * 16 if vec > 1 else row_bytes


@functools.cache
def _tiling(
    images: int,
    ci: int,
    k: int,
    s: int,
    co: int,
    ho: int,
    wo: int,
    group: int,
    blocks: int,
    itemsize: int,
    shared_bytes: int,
) -> _Tiling:
    """The cheapest tiling of one convolution by a rough model of a block's time per item (thread
    instructions issued for at least four warps a cycle, the staging's batches of L2 round trips, fixed
    costs) times the rounds of items over the blocks, within ``shared_bytes``."""
    vec = 8 if ci % 8 == 0 else 1
    span = k * ci
    cw = 4 if ci % 4 == 0 else 1
    best, best_cost = None, float("inf")
    for ct in (1, 2, 4):
        for nt in range(ct, co + 1, ct):
            if co % nt or not (nt % group == 0 or group % nt == 0):
                continue
            weight_bytes = nt * _pitch_bytes(k * span * itemsize, vec)
            for tr in range(1, ho + 1):
                tiles = -(-ho // tr)
                if tiles * co // min(nt, group) > MAX_PARTIALS:
                    continue
                rounds = -(-images * tiles * (co // nt) // blocks)
                stage = ((tr - 1) * s + k) * ((wo - 1) * s + k) * (ci + 4 if vec > 1 else ci)
                staging = -(-stage // (cw * THREADS * 8)) * ROUND_TRIP + stage / cw / THREADS * 24
                pix = tr * wo
                for ks in range(1, span // vec + 1):
                    if (span // vec) % ks:
                        continue
                    tile = (1 + (ks if ks > 1 else 0)) * pix * nt
                    window = device.round_up(max(stage, tile), 4)
                    shared_floats = 4 * ci + SCRATCH_FLOATS + window + -(-weight_bytes // 4)
                    if shared_floats * 4 > shared_bytes:
                        continue
                    for pt in range(1, 9):
                        pg = -(-pix // pt)
                        active = (nt // ct) * pg * ks
                        if active > THREADS or ct * pt > 16:
                            continue
                        steps = k * span // ks // vec
                        loads = ct * max(1, vec * itemsize // 16) + pt * (2 if vec == 8 else 1)
                        # issue-bound at 4 warps a cycle, plus a latency term that more warps hide
                        compute = steps * (ct * pt * vec + loads) * (-(-active // 32) / 4 + 1)
                        output = (ks + 4) * pix * nt / THREADS * 2 + weight_bytes / 16 / THREADS * 4
                        cost = rounds * (compute + staging + output + 2 * ROUND_TRIP)
                        if cost < best_cost:
                            best_cost = cost
                            best = _Tiling(tr, nt, ct, pt, ks, vec, min(nt, group), window, shared_floats)
    if best is None:
        raise ValueError(f"no tiling of a {k}x{k} convolution of {ci} -> {co} channels fits shared memory")
    return best


class _Program:
    """The phases of the trunk for (images, h, w, c) inputs, as C++ calls, and its kernel inputs. The
    tiles are planned for ``images`` (``PLAN_IMAGES``); the kernel reads the batch size at run time."""

    def __init__(
        self,
        module: ResNet18Trunk,
        shape: tuple[int, int, int, int],
        blocks: int,
        itemsize: int,
        shared_bytes: int,
    ):
        self.images, h, w, c = shape
        self.blocks, self.itemsize, self.shared_bytes = blocks, itemsize, shared_bytes
        self.layers = 0  # convolutions, in the order of ``_layers``
        self.phases: list[str] = []
        self.ws_size = 0
        self.shared_floats = 0
        stem = self._conv_phase(_Source(4, h, w, c), [(module.conv1, module.bn1)])[0]
        ph, pw = (stem.h - 1) // 2 + 1, (stem.w - 1) // 2 + 1
        pooled = self._alloc(ph * pw * stem.c)
        pool = f"pool_phase<{stem.h}, {stem.w}, {stem.c}, {ph}, {pw}>"
        self.phases.append(f"{pool}({stem.cpp()}, ws + {pooled} * nimg, smem, nimg);")
        self.shared_floats = max(self.shared_floats, 4 * stem.c + SCRATCH_FLOATS)
        source = _Source(0, ph, pw, stem.c, plain=pooled)
        for block in module.layer1 + module.layer2 + module.layer3 + module.layer4:
            source = self._basic_block(source, block)
        self.out_per_image = (source.h, source.w, source.c)
        final = f"final_phase<{source.h}, {source.w}, {source.c}>"
        self.phases.append(f"{final}({source.cpp()}, out, smem, nimg);")
        self.shared_floats = max(self.shared_floats, 4 * source.c + SCRATCH_FLOATS)

    def _alloc(self, floats_per_image: int) -> int:
        slot = self.ws_size
        self.ws_size += device.round_up(floats_per_image, 4)  # per image; 16-byte aligned for any batch
        return slot

    def _basic_block(self, source: _Source, block: BasicBlock) -> _Source:
        pairs = [(block.conv1, block.bn1)]
        if "downsample" in block:
            pairs.append(tuple(block.downsample))
        if source.mode in (2, 3):  # the previous block's output: also written out, as this one's residual
            source = _Source(source.mode, source.h, source.w, source.c, source.plain, source.raw, source.id,
                             mat=self._alloc(source.h * source.w * source.c))  # fmt: skip
            residual = source.mat
        else:
            residual = source.plain
        raws = self._conv_phase(source, pairs)
        first = raws[0]
        normed = _Source(1, first.h, first.w, first.c, raw=first)
        out = self._conv_phase(normed, [(block.conv2, block.bn2)])[0]
        if len(raws) == 2:
            return _Source(3, out.h, out.w, out.c, raw=out, id=raws[1])
        return _Source(2, out.h, out.w, out.c, plain=residual, raw=out)

    def _conv_phase(self, source: _Source, pairs: list[tuple[nn.Conv2d, nn.GroupNorm]]) -> list[_Raw]:
        calls, raws, begin = [], [], 0
        staged = np.zeros((source.h, source.w), dtype=bool)  # what the items of channel tile 0 stage
        for conv, norm in pairs:
            co, k, _, ci = conv.weight.shape
            s, p = conv.stride[0], conv.padding[0]
            ho, wo = (source.h + 2 * p - k) // s + 1, (source.w + 2 * p - k) // s + 1
            group = co // norm.num_groups
            shape = (self.images, ci, k, s, co, ho, wo, group)
            t = _tiling(*shape, self.blocks, self.itemsize, self.shared_bytes)
            tiles = -(-ho // t.rows)
            self.layers += 1
            raw = _Raw(
                slot=self._alloc(ho * wo * co),
                stats=self._alloc(2 * tiles * co // t.unit),
                h=ho, w=wo, c=co, tiles=tiles, tile_rows=t.rows, unit=t.unit,
                norm=self.layers - 1, group=group, eps=norm.eps,
            )  # fmt: skip
            args = [source.h, source.w, ci, k, s, p, co, ho, wo, t.rows, t.channels, t.thread_channels,
                    t.thread_pixels, t.splits, t.vec, t.unit, t.window]  # fmt: skip
            calls.append(
                f"conv_phase<{', '.join(map(str, args))}>(src, w{self.layers - 1}, ws + {raw.slot} * nimg, "
                f"reinterpret_cast<float2*>(ws + {raw.stats} * nimg), smem, nimg, {begin} * nimg, "
                "TOTAL * nimg);"
            )
            begin += tiles * (co // t.channels)  # items per image
            for tile in range(tiles):
                top = tile * t.rows * s - p
                staged[max(0, top) : top + (t.rows - 1) * s + k, max(0, -p) : -p + (wo - 1) * s + k] = True
            self.shared_floats = max(self.shared_floats, t.shared_floats)
            raws.append(raw)
        if source.mat >= 0 and not staged.all():
            raise AssertionError("a block output written out by the items that stage it would miss pixels")
        body = "\n    ".join(call.replace("TOTAL", str(begin)) for call in calls)
        self.phases.append(f"{{\n    const Src src = {source.cpp()};\n    {body}\n  }}")
        return raws

    def body(self) -> str:
        barrier = "\n  if (!grid_barrier(sync, generation)) return;\n  "
        return _BODY + "  " + barrier.join(self.phases) + "\n"

    def header(self, dtype: mx.Dtype) -> str:
        defines = {
            "AT": device.WEIGHT_TYPES[dtype],
            "THREADS": THREADS,
            "MAX_PARTIALS": MAX_PARTIALS,
            "MAX_GROUPS": MAX_GROUPS,
            "SCRATCH_FLOATS": SCRATCH_FLOATS,
            "OUT_PER_IMAGE": self.out_per_image[0] * self.out_per_image[1] * self.out_per_image[2],
            **device.COMMON_DEFINES,
        }
        text = "".join(f"#define {name} {value}\n" for name, value in defines.items())
        return text + device.DEVICE_COMMON + _SOURCE


def _layers(module: ResNet18Trunk) -> list[tuple[nn.Conv2d, nn.Module]]:
    """(convolution, norm) pairs in the program's order: the stem, then per BasicBlock its first,
    its downsample and its second."""
    pairs = [(module.conv1, module.bn1)]
    for block in module.layer1 + module.layer2 + module.layer3 + module.layer4:
        pairs.append((block.conv1, block.bn1))
        if "downsample" in block:
            pairs.append(tuple(block.downsample))
        pairs.append((block.conv2, block.bn2))
    return pairs


def _inputs(module: ResNet18Trunk, dtype: mx.Dtype) -> list[mx.array]:
    """The kernel's weight inputs of this module: convolutions, then gammas, then betas."""
    convs, norms = zip(*_layers(module), strict=True)
    arrays = [conv.weight for conv in convs] + [n.weight for n in norms] + [n.bias for n in norms]
    return same_dtype(dtype, *arrays)


def supports(trunk: ResNet18Trunk) -> bool:
    """Whether this trunk can run here in this form: a CUDA device and GroupNorm (not frozen BatchNorm)
    with torch's channel grouping, at most MAX_GROUPS groups and MAX_CHANNELS channels."""
    if not (device.available() and device.sm_count()):
        return False
    return all(
        isinstance(norm, nn.GroupNorm)
        and norm.pytorch_compatible
        and norm.num_groups <= MAX_GROUPS
        and norm.dims <= MAX_CHANNELS
        for _, norm in _layers(trunk)
    )


_KERNELS: dict[tuple, tuple[_Program, object] | None] = {}


def _kernel(module: ResNet18Trunk, shape: tuple[int, ...], dtype: mx.Dtype) -> tuple[_Program, object] | None:
    """The trunk's program and kernel for inputs of ``shape``, or None where a convolution has no tiling
    that fits the device's shared memory (an item spans whole output rows, so large images need more
    than a block has). The program depends on the trunk's shapes and
    GroupNorm settings, not its values."""
    norms = tuple((norm.num_groups, norm.eps) for _, norm in _layers(module))
    key = (tuple(shape[1:]), dtype, module.conv1.weight.shape, norms)
    if key not in _KERNELS:
        blocks, shared = device.sm_count(), device.max_shared_bytes()
        try:
            program = _Program(module, (PLAN_IMAGES, *shape[1:]), blocks, dtype.size, shared)
        except ValueError:
            _KERNELS[key] = None
            return None
        header, body = program.header(dtype), program.body()
        name = "dpmlx_trunk_" + hashlib.sha1((header + body).encode()).hexdigest()[:16]
        n = program.layers
        kernel = mx.fast.cuda_kernel(
            name=name,
            input_names=["x"] + [f"{kind}{i}" for kind in "wgb" for i in range(n)],
            output_names=["ws", "sync", "out"],
            source=body,
            header=header,
            shared_memory=program.shared_floats * 4,
        )
        _KERNELS[key] = (program, kernel)
    return _KERNELS[key]


def trunk(module: ResNet18Trunk, x: mx.array) -> mx.array:
    """``module(x)`` in this form (see ``supports``); inputs too large for the kernel's tiles (``_kernel``)
    go through the modules. x: (N, H, W, C) -> (N, h, w, 512), x's dtype."""
    built = _kernel(module, x.shape, x.dtype)
    # The kernel's workspace offsets are 32-bit ints: ~4000 84x84 images would overflow them.
    if built is None or built[0].ws_size * x.shape[0] >= 2**31:
        return module(x)
    program, kernel = built
    blocks = device.sm_count()
    _, _, out = kernel(
        inputs=[x, *_inputs(module, x.dtype)],
        grid=(blocks * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[
            (program.ws_size * x.shape[0],),
            (device.sync_words(blocks),),
            (x.shape[0], *program.out_per_image),
        ],
        output_dtypes=[mx.float32, mx.uint32, x.dtype],
        init_value=0,
    )
    return out
