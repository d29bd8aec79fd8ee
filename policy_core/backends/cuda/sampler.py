"""The whole denoising loop on MLX's CUDA backend as one persistent kernel.

At batch 1 the chunked sampler pays MLX's fixed cost per primitive (~65 kernels and ~200 views per step)
far above the time to read the weights (benchmarks/NOTES.md). Here a request's
every step is one kernel launch: one thread block per SM stays resident and walks a program of *phases*,
with a grid-wide barrier between them. A phase

1. stages its input trajectory in shared memory, building it from earlier phases' raw outputs:
   GroupNorm (statistics combined from the producer's per-row mean and sum of squared deviations) +
   mish + FiLM + residual add, and the skip concatenation of the up path; and
2. computes the output rows of one or two convolutions (a Conv1dBlock's and the residual 1x1's share
   the input), rows spread round-robin over the blocks and each streamed once for every output
   position by one warp (or by several, splitting its input channels, where a block has fewer rows
   than warps). Before the grid barrier each warp loads its first slice of the next phase's first
   row into registers (weights don't wait for the previous phase), and starts the next phase's
   biases, GroupNorm vectors and (where they take at most a sixth of the L2) rows on their way to L2. The
   last convolution's rows apply the scheduler's update to the trajectory.

Activations and arithmetic are float32 whatever the weights' dtype. The program is recorded by running
``ConditionalUnet1D.forward_film`` with symbolic tensors (the topology is written once, there);
tests/test_cuda_sampler.py interprets it in numpy against ``forward_film`` on any machine and runs the
kernel against the chunked sampler on a GPU. The barrier needs every block resident: the grid is one
block per SM, one such kernel runs at a time per process, and a barrier that waits past ``TIMEOUT_S``
aborts the kernel (``KernelAborted``; the policy reruns the request on the chunked sampler) instead of
hanging. Used where ``CudaSampler.supports()``.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from policy_core.backends.base import Backend, BackendUnavailable
from policy_core.backends.cuda import device
from policy_core.backends.cuda import trunk as trunk_kernel
from policy_core.backends.cuda.device import (
    COMMON_DEFINES,
    DEVICE_COMMON,
    LAUNCH_LOCK,
    TIMEOUT_S,
    WEIGHT_TYPES,
    round_up,
    sync_words,
)
from policy_core.backends.cuda.host_arrays import HostUploads
from policy_core.nets.unet import (
    ConditionalResidualBlock1D,
    ConditionalUnet1D,
    Conv1dBlock,
    TrunkOps,
    conv_output_length,
    stride_padding,
)
from policy_core.nets.vision import ResNet18Trunk
from policy_core.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from policy_core.seen_arrays import SeenArrays

THREADS = 256
MAX_ACCUMULATORS = 64  # batch * horizon: each lane keeps one float per output column
MAX_BATCH = 32  # a row's statistics are written by one lane per sample
RESULT_DONE, RESULT_ABORTED = 1.0, 2.0  # the kernel's completion word (0 while it runs)
MAX_GROUP_ROWS = 256  # channels per GroupNorm group: each lane combines up to 8 rows' statistics
WEIGHT_ALIGN = 8  # elements

# A phase record: header, two input sources, two row sets (ints; field names shared with the kernel).
HEADER_FIELDS = ("NSRC", "LEN", "CIN", "NROWSETS", "STAGE_W")
SOURCE_FIELDS = (
    "SLOT", "CH", "NORMED", "ROW_STATS", "GAMMA", "BETA", "GROUPS", "EPS",
    "FILM_MODE", "FILM_OFF", "RES", "MAT",
)  # fmt: skip
ROWSET_FIELDS = ("VARIANT", "W", "B", "OUT", "OUT_LEN", "OUT_SLOT", "STATS_SLOT", "ROW_ELEMS", "EPILOGUE")
SRC0 = len(HEADER_FIELDS)
RS0 = SRC0 + 2 * len(SOURCE_FIELDS)
REC = RS0 + 2 * len(ROWSET_FIELDS)


@dataclass(frozen=True)
class _Plain:
    """A (B, length, channels) float32 tensor at ``slot`` in the workspace; a convolution's output also
    has its rows' (mean, sum of squared deviations) at ``row_stats``, (B, channels, 2), for GroupNorm."""

    slot: int
    channels: int
    length: int
    row_stats: int = -1


@dataclass(frozen=True)
class _Normed:
    """mish(GroupNorm(raw)) [FiLM] [+ residual], built where it is consumed."""

    raw: _Plain
    norm: nn.GroupNorm
    film: tuple[int, int] | None = None  # (mode 1 scale+bias | 2 bias, offset in the FiLM row)
    residual: _Plain | None = None

    @property
    def channels(self) -> int:
        return self.raw.channels

    @property
    def length(self) -> int:
        return self.raw.length


@dataclass(frozen=True)
class _Concat:
    parts: tuple[_Plain | _Normed, _Plain | _Normed]

    @property
    def channels(self) -> int:
        return sum(p.channels for p in self.parts)

    @property
    def length(self) -> int:
        return self.parts[0].length


class _Program:
    """The phases of one denoising step, recorded from ``forward_film``."""

    def __init__(self, unet: ConditionalUnet1D, batch: int, horizon: int):
        self.batch = batch
        self.refs: list[tuple[nn.Module, str]] = []  # the weights, by (module, attribute)
        self._ref_index: dict[tuple[int, str], int] = {}
        self.variants: dict[tuple[int, ...], int] = {}
        self.records: list[list[int]] = []
        self.ws_size = 0
        self.max_stage = 0  # floats of the largest staged input
        self.max_groups = 1
        self.max_group_rows = 0
        self.x = self._alloc(_input_dim(unet), horizon)
        films, offset = [], 0
        for block in unet.residual_blocks():
            films.append((1 if block.cond_predict_scale else 2, offset))
            offset += block.cond_encoder.weight.shape[0]
        self.film_width = offset
        ops = TrunkOps(
            residual_block=self._residual_block,
            conv_block=self._conv_block,
            conv=self._conv,
            concat=lambda x, skip: _Concat((x, skip)),
        )
        out = unet.forward_film(self.x, films, ops)
        # The last phase is the final 1x1 convolution: its rows update the trajectory in place.
        last = self.records[-1]
        if not (isinstance(out, _Plain) and last[RS0 + ROWSET_FIELDS.index("OUT_SLOT")] == out.slot):
            raise AssertionError("the trunk must end in a convolution")
        if (out.channels, out.length) != (self.x.channels, self.x.length):
            raise AssertionError("the trunk must map the trajectory to its own shape")
        last[RS0 + ROWSET_FIELDS.index("OUT_SLOT")] = self.x.slot
        last[RS0 + ROWSET_FIELDS.index("EPILOGUE")] = 1
        # The weights' places in the one array the kernel takes: each starts on 16 bytes (rows are read
        # 16 bytes at a time; an element is at most 4 bytes, so 8 elements suffice for any dtype).
        self.shapes = [module[name].shape for module, name in self.refs]
        self.offsets, self.weight_elems = [], 0
        for shape in self.shapes:
            self.offsets.append(self.weight_elems)
            self.weight_elems += round_up(int(np.prod(shape)), WEIGHT_ALIGN)

    @property
    def stage_floats(self) -> int:
        return round_up(self.max_stage, 4)  # keeps the statistics 16-byte aligned

    @property
    def stats_floats(self) -> int:
        return 2 * self.batch * self.max_groups * 2  # (source, sample, group) -> mean, 1 / std

    @property
    def param_floats(self) -> int:
        return round_up(2 * len(self.refs), 4)  # the parameters' 8-byte pointers

    @property
    def partial_floats(self) -> int:
        return (THREADS // 32) * self.batch * self.x.length  # a warp's share of a split row's products

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory: the parameters' pointers, the staged input, GroupNorm statistics, the
        products of split rows and the phase records."""
        floats = self.param_floats + self.stage_floats + self.stats_floats + self.partial_floats
        return 4 * (floats + REC * len(self.records))

    def _alloc(self, channels: int, length: int, row_stats: bool = False) -> _Plain:
        """Workspace slots start on 16 bytes: the kernel reads and writes them 4 floats at a time."""
        slot = self.ws_size
        self.ws_size += round_up(self.batch * length * channels, 4)
        if not row_stats:
            return _Plain(slot, channels, length)
        stats = self.ws_size
        self.ws_size += round_up(self.batch * channels * 2, 4)
        return _Plain(slot, channels, length, stats)

    def _ref(self, module: nn.Module, name: str) -> int:
        key = (id(module), name)
        if key not in self._ref_index:
            self._ref_index[key] = len(self.refs)
            self.refs.append((module, name))
        return self._ref_index[key]

    def _source(self, src: _Plain | _Normed, materialize: _Plain | None) -> list[int]:
        fields = dict.fromkeys(SOURCE_FIELDS, 0)
        fields.update(
            CH=src.channels, FILM_OFF=0, RES=-1, MAT=-1 if materialize is None else materialize.slot
        )
        if isinstance(src, _Plain):
            fields["SLOT"] = src.slot
        else:
            norm = src.norm
            self.max_groups = max(self.max_groups, norm.num_groups)
            self.max_group_rows = max(self.max_group_rows, src.channels // norm.num_groups)
            fields.update(
                SLOT=src.raw.slot,
                NORMED=1,
                ROW_STATS=src.raw.row_stats,
                GAMMA=self._ref(norm, "weight"),
                BETA=self._ref(norm, "bias"),
                GROUPS=norm.num_groups,
                EPS=int(np.array(norm.eps, dtype=np.float32).view(np.int32)),
                RES=-1 if src.residual is None else src.residual.slot,
            )
            if src.film is not None:
                fields["FILM_MODE"], fields["FILM_OFF"] = src.film
        return [fields[name] for name in SOURCE_FIELDS]

    def _phase(
        self,
        src: _Plain | _Normed | _Concat,
        convs: list[tuple[nn.Conv1d | nn.ConvTranspose1d, _Plain]],
        materialize: _Plain | None = None,
    ) -> None:
        parts = src.parts if isinstance(src, _Concat) else (src,)
        length, cin = src.length, src.channels
        self.max_stage = max(self.max_stage, self.batch * length * cin)
        stage_width = 4 if all(p.channels % 4 == 0 for p in parts) else 1
        record = [len(parts), length, cin, len(convs), stage_width]
        for i in range(2):
            record += self._source(parts[i], materialize) if i < len(parts) else [0] * len(SOURCE_FIELDS)
        for i in range(2):
            if i >= len(convs):
                record += [0] * len(ROWSET_FIELDS)
                continue
            conv, out = convs[i]
            out_channels, kernel, in_channels = conv.weight.shape
            if in_channels != cin:
                raise AssertionError(f"convolution expects {in_channels} channels, its input has {cin}")
            stride, padding = stride_padding(conv)
            # Lengths are runtime arguments: fewer instantiations keep the kernel's code in cache.
            variant = (
                kernel,
                stride,
                padding,
                int(isinstance(conv, nn.ConvTranspose1d)),
                8 if cin % 8 == 0 else 1,
            )
            self.variants.setdefault(variant, len(self.variants))
            bias = self._ref(conv, "bias")
            record += [
                self.variants[variant],
                self._ref(conv, "weight"),
                bias,
                out_channels,
                out.length,
                out.slot,
                out.row_stats,
                kernel * in_channels,
                0,
            ]
        self.records.append(record)

    def _conv_out(self, x, conv: nn.Conv1d | nn.ConvTranspose1d) -> _Plain:
        out_channels, kernel, _ = conv.weight.shape
        transposed = isinstance(conv, nn.ConvTranspose1d)
        length = conv_output_length(x.length, kernel, *stride_padding(conv), transposed)
        return self._alloc(out_channels, length, row_stats=True)

    def _conv(self, x, conv: nn.Conv1d | nn.ConvTranspose1d) -> _Plain:
        out = self._conv_out(x, conv)
        self._phase(x, [(conv, out)])
        return out

    def _conv_block(self, x, block: Conv1dBlock) -> _Normed:
        return _Normed(self._conv(x, block.conv), block.norm)

    def _residual_block(self, x, block: ConditionalResidualBlock1D, film: tuple[int, int]) -> _Normed:
        first, second = block.blocks
        hidden = self._conv_out(x, first.conv)
        convs = [(first.conv, hidden)]
        materialize = None
        if isinstance(block.residual_conv, nn.Identity):
            if isinstance(x, _Concat):
                raise AssertionError("an identity residual of a concatenation")
            # The input is the residual two phases on: a normed input is written out while staged.
            residual = x if isinstance(x, _Plain) else self._alloc(x.channels, x.length)
            materialize = None if isinstance(x, _Plain) else residual
        else:
            residual = self._conv_out(x, block.residual_conv)
            convs.append((block.residual_conv, residual))
        self._phase(x, convs, materialize)
        out = self._conv(_Normed(hidden, first.norm, film), second.conv)
        return _Normed(out, second.norm, residual=residual)


def _input_dim(unet: ConditionalUnet1D) -> int:
    return unet.final_conv[1].weight.shape[0]


# Device helpers and one convolution row; WT, BATCH, HORIZON, ADIM, ... are #defined per program.
_HELPERS = r"""
// The request's completion word, after the trajectory it covers (block 0's writes): the host waits on it
// in host memory. Every writing thread's system fence, then the block's barrier, comes before the word.
__device__ __forceinline__ void publish(const float* result, float word) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0)
    *reinterpret_cast<volatile float*>(const_cast<float*>(result) + BATCH * HORIZON * ADIM) = word;
}


// A lane's slice of one tap of a weight row, VEC weights as loaded: 16-bit weights stay packed two to a
// register until used, which halves the registers that hold a slice of every tap.
constexpr int SLICE_WORDS = sizeof(WT) == 2 ? 4 : 8;

struct Slice {
  unsigned int bits[SLICE_WORDS];

  template <int VEC>
  __device__ static constexpr bool packed() { return VEC == 8 && sizeof(WT) == 2; }

  template <int VEC>
  __device__ __forceinline__ void load(const WT* p) {
    if constexpr (VEC == 1) {
      bits[0] = __float_as_uint(as_float(__ldg(p)));
    } else if constexpr (packed<VEC>()) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
      bits[0] = u.x; bits[1] = u.y; bits[2] = u.z; bits[3] = u.w;
    } else {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
      const uint4 b = __ldg(reinterpret_cast<const uint4*>(p) + 1);
      bits[0] = a.x; bits[1] = a.y; bits[2] = a.z; bits[3] = a.w;
      bits[4] = b.x; bits[5] = b.y; bits[6] = b.z; bits[7] = b.w;
    }
  }

  template <int VEC>
  __device__ __forceinline__ float get(int e) const {
    if constexpr (!packed<VEC>()) {
      return __uint_as_float(bits[e]);
    } else {
      const unsigned short h = e % 2 ? bits[e / 2] >> 16 : bits[e / 2] & 0xffffu;
      return as_float(*reinterpret_cast<const WT*>(&h));
    }
  }
};

// Same arithmetic as policy_core.schedulers' update() given one row of coefficient_table().
__device__ __forceinline__ float scheduler_update(float out, float x, const float* c, float noise) {
  const float x0 = PRED_EPS ? (x - c[0] * out) / c[1] : out;
  // A NaN stays NaN (as through mx.clip; fminf/fmaxf would pin it to the range's edge: finite actions).
  const float x0c = CLIP ? (x0 < -CLIP_RANGE ? -CLIP_RANGE : (x0 > CLIP_RANGE ? CLIP_RANGE : x0)) : x0;
#if DDPM
  return (c[2] * x0c + c[3] * x) + c[4] * noise;
#else
  const float eps = PRED_EPS ? out : (x - c[1] * x0) / c[0];
  const float prev = c[2] * x0c + c[3] * eps;
  return ADD_NOISE ? prev + c[4] * noise : prev;
#endif
}

__device__ __forceinline__ float mish(float v) {
  const float e = __expf(fminf(v, 20.f));
  const float n = e * (e + 2.f);
  return v * __fdividef(n, n + 2.f);
}

struct Ctx {
  const WT* const* p;
  float* ws;
  const float* films;
  const float* noise;
  const float* coeffs;
  int step;
};

// The first slice of every tap of output channel o that this lane reads (see conv_products), loaded
// ahead: for the next phase's first row before the grid barrier, so that the weights' latency overlaps
// the barrier and the staging (on most small layers a lane's whole share of a row is this one slice).
template <int K, int VEC>
__device__ __forceinline__ void conv_first_slice(
    const int* rs, int o, int cin, const Ctx& cx, int split, Slice (&wv)[KMAX]) {
  const WT* w = cx.p[rs[R_W]] + (size_t)o * K * cin;
  const int c = (split * 32 + (threadIdx.x & 31)) * VEC;
  if (c >= cin) return;
#pragma unroll
  for (int j = 0; j < K; ++j) wv[j].template load<VEC>(w + j * cin + c);
}

// Output channel o of a (transposed) convolution, every batch * output position, over the input
// channels of one split: each lane strides over them VEC at a time holding that slice of every tap's
// weights (the first slice loaded ahead, in wv), and slides over the staged input positions. Leaves the
// lane's partial sums in acc. Position arithmetic is compile-time after unrolling.
template <int K, int S, int P, bool TR, int VEC>
__device__ __forceinline__ void conv_products(
    const int* rs, int o, int cin, int lin, const float* xs, const Ctx& cx, int split, int splits,
    Slice (&wv)[KMAX], float (&acc)[BATCH][HORIZON]) {
  const WT* w = cx.p[rs[R_W]] + (size_t)o * K * cin;
  for (int c = (split * 32 + (threadIdx.x & 31)) * VEC; c < cin;) {
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
#pragma unroll
      for (int m = 0; m < HORIZON; ++m) {
        if (m >= lin) break;
        float xv[VEC];
        load_staged<VEC>(xs + (b * lin + m) * cin + c, xv);
#pragma unroll
        for (int j = 0; j < K; ++j) {
          int t;
          if constexpr (TR) {
            t = m * S + j - P;
          } else {
            const int num = m - j + P;
            if (num % S != 0) continue;
            t = num / S;
          }
          // Columns t >= lout collect stray products and are never written out.
          if (t < 0 || t >= HORIZON) continue;
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[b][t] = fmaf(wv[j].template get<VEC>(e), xv[e], acc[b][t]);
        }
      }
    }
    c += 32 * VEC * splits;
    if (c >= cin) break;
#pragma unroll
    for (int j = 0; j < K; ++j) wv[j].template load<VEC>(w + j * cin + c);
  }
}

constexpr int COLS = BATCH * HORIZON, COLS_PER_LANE = (COLS + 31) / 32;

// Lane l's columns b * HORIZON + t = l + 32 h of a row's sums, which every lane holds (a register
// array can't be indexed by the lane).
__device__ __forceinline__ void own_columns(
    const float (&acc)[BATCH][HORIZON], float (&mine)[COLS_PER_LANE], int lane) {
#pragma unroll
  for (int b = 0; b < BATCH; ++b)
#pragma unroll
    for (int t = 0; t < HORIZON; ++t)
      if (lane == (b * HORIZON + t) % 32) mine[(b * HORIZON + t) / 32] = acc[b][t];
}

// Writes output channel o from its sums, each lane its own columns (so the store and the scheduler's
// update are compiled once, not once per column): bias added or the update applied, and the row's
// per-sample (mean, M2) for its consumer's GroupNorm.
__device__ __forceinline__ void finish_row(
    const int* rs, int o, float bias, const float (&mine)[COLS_PER_LANE], const Ctx& cx, int lane) {
  const int lout = rs[R_OUT_LEN], out_channels = rs[R_OUT];
  float* out = cx.ws + rs[R_OUT_SLOT];
#pragma unroll
  for (int h = 0; h < COLS_PER_LANE; ++h) {
    const int col = h * 32 + lane, b = col / HORIZON, t = col % HORIZON;
    if (col >= COLS || t >= lout) continue;
    const size_t at = (size_t)(b * lout + t) * out_channels + o;
    const float v = mine[h] + bias;
    if (rs[R_EPILOGUE]) {
      const size_t noise_at = (((size_t)cx.step * BATCH + b) * lout + t) * ADIM + o;
      const float noise = ADD_NOISE ? cx.noise[noise_at] : 0.f;
      out[at] = scheduler_update(v, __ldcg(out + at), cx.coeffs + cx.step * 5, noise);
    } else {
      out[at] = v;
    }
  }
  if (rs[R_STATS_SLOT] < 0) return;
#pragma unroll
  for (int b = 0; b < BATCH; ++b) {
    float sum = 0.f;
#pragma unroll
    for (int h = 0; h < COLS_PER_LANE; ++h) {
      const int col = h * 32 + lane;
      if (col < COLS && col / HORIZON == b && col % HORIZON < lout) sum += mine[h];
    }
    const float mean = warp_sum(sum) / lout;
    float m2 = 0.f;
#pragma unroll
    for (int h = 0; h < COLS_PER_LANE; ++h) {
      const int col = h * 32 + lane;
      if (col < COLS && col / HORIZON == b && col % HORIZON < lout) m2 += (mine[h] - mean) * (mine[h] - mean);
    }
    m2 = warp_sum(m2);
    float* stats = cx.ws + rs[R_STATS_SLOT] + ((size_t)b * out_channels + o) * 2;
    if (lane == 0) *reinterpret_cast<float2*>(stats) = make_float2(mean + bias, m2);
  }
}

__device__ __forceinline__ void warp_sum_all(float (&acc)[BATCH][HORIZON]) {
#pragma unroll
  for (int b = 0; b < BATCH; ++b)
#pragma unroll
    for (int t = 0; t < HORIZON; ++t) acc[b][t] = warp_sum(acc[b][t]);
}

// How a phase's rows are shared out. Rows go round-robin over the blocks. A block with fewer rows than
// warps splits each row's input channels over `splits` warps, whose sums meet in shared memory: every
// SM streams weights. With splits > 1 a warp takes at most one row, so rounds == 1 and the block meets
// at one __syncthreads.
struct Share {
  int rows0, rows, per_block, splits, rounds;
};

__device__ __forceinline__ Share share_rows(const int* rec) {
  Share sh;
  sh.rows0 = rec[RS0 + R_OUT];
  sh.rows = sh.rows0 + (rec[F_NROWSETS] > 1 ? rec[RS0 + ROWSET_FIELDS + R_OUT] : 0);
  sh.per_block = (sh.rows + gridDim.x - 1) / gridDim.x;
  sh.splits = 1;
  while (sh.splits * 2 * sh.per_block <= WARPS) sh.splits *= 2;
  sh.rounds = (sh.per_block * sh.splits + WARPS - 1) / WARPS;
  return sh;
}

// A warp's row in one round: its row set and output channel, if it has one.
struct Task {
  bool has_row;
  const int* rs;
  int o;
};

__device__ __forceinline__ Task task(const int* rec, const Share& sh, int round, int warp) {
  const int j = round * (WARPS / sh.splits) + warp / sh.splits, row = blockIdx.x + j * gridDim.x;
  return {j < sh.per_block && row < sh.rows, rec + RS0 + (row < sh.rows0 ? 0 : ROWSET_FIELDS),
          row < sh.rows0 ? row : row - sh.rows0};
}

__device__ __forceinline__ void prefetch_vector(const void* p, int bytes, int tid, int threads) {
  for (int offset = tid * 128; offset < bytes; offset += threads * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(reinterpret_cast<const char*>(p) + offset));
}

// Starts moving a phase's weight rows for this warp from HBM to L2 (Hopper bulk prefetch), and its
// biases and GroupNorm affine vectors (small, but each a dependent load on the critical path), so
// their loads overlap the barrier and the staging before them. Rows are left to the demand loads where
// they take more than a sixth of the L2 (8 MB on an H100): the prefetch's traffic then slows the grid
// barrier's L2 round trips (release after the last arrival 3.3 us instead of 1.5 on 10 MB phases), and
// over half the L2 its lines land while the current phase streams its own, unevenly (benchmarks/NOTES.md).
__device__ __forceinline__ void prefetch_phase(const int* rec, const Ctx& cx, int warp_id, int warps) {
  const int rows0 = rec[RS0 + R_OUT];
  const int rows = rows0 + (rec[F_NROWSETS] > 1 ? rec[RS0 + ROWSET_FIELDS + R_OUT] : 0);
  const int tid = warp_id * 32 + (threadIdx.x & 31), threads = warps * 32;
  long long row_bytes = 0;
  for (int i = 0; i < rec[F_NROWSETS]; ++i) {
    const int* rs = rec + RS0 + i * ROWSET_FIELDS;
    prefetch_vector(cx.p[rs[R_B]], rs[R_OUT] * (int)sizeof(WT), tid, threads);
    row_bytes += (long long)rs[R_OUT] * rs[R_ROW_ELEMS] * sizeof(WT);
  }
  for (int i = 0; i < rec[F_NSRC]; ++i) {
    const int* src = rec + SRC0 + i * SRC_FIELDS;
    if (!src[S_NORMED]) continue;
    prefetch_vector(cx.p[src[S_GAMMA]], src[S_CH] * (int)sizeof(WT), tid, threads);
    prefetch_vector(cx.p[src[S_BETA]], src[S_CH] * (int)sizeof(WT), tid, threads);
  }
#if __CUDA_ARCH__ >= 900
  if (row_bytes > PREFETCH_MAX_BYTES) return;
  for (int row = warp_id; row < rows; row += warps) {
    const int* rs = rec + RS0 + (row < rows0 ? 0 : ROWSET_FIELDS);
    const int o = row < rows0 ? row : row - rows0;
    const unsigned int bytes = (unsigned int)(rs[R_ROW_ELEMS] * sizeof(WT));
    if (bytes % 16 != 0 || (threadIdx.x & 31) != 0) continue;
    const WT* w = cx.p[rs[R_W]] + (size_t)o * rs[R_ROW_ELEMS];
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(w), "r"(bytes) : "memory");
  }
#endif
}

// Builds a phase's input (B, LEN, CIN) in shared memory from its one or two sources, W channels at a
// time. A raw source is copied (global loads issued UNROLL at a time before their stores). A normed
// source is built in one pass over its producer's output once its GroupNorm statistics are combined
// from the producer's per-row (mean, M2): each thread holds W channels' affine terms and loads NROWS
// rows' raw values and residuals at once (registers), then stores GroupNorm + mish + FiLM + residual.
// Each batch of rows is an L2 round trip (~0.6 us measured): at batch 1 eight rows take all of a
// thread's rows of one quad in every PushT phase at once; at larger batches eight would spill registers.
template <int W>
__device__ void stage(const int* rec, const Ctx& cx, float* xs, float* stats) {
  constexpr int UNROLL = 4, NROWS = BATCH == 1 ? 8 : 2;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int len = rec[F_LEN], cin = rec[F_CIN], nsrc = rec[F_NSRC], rows = BATCH * len;
  // GroupNorm statistics from the producer's per-row (mean, M2): Chan et al.'s pairwise combination.
  for (int i = 0; i < nsrc; ++i) {
    const int* src = rec + SRC0 + i * SRC_FIELDS;
    if (!src[S_NORMED]) continue;
    const int ch = src[S_CH], groups = src[S_GROUPS], cg = ch / groups;
    for (int pair = warp; pair < BATCH * groups; pair += WARPS) {
      const int b = pair / groups, g = pair % groups;
      const float* rows = cx.ws + src[S_ROW_STATS] + ((size_t)b * ch + g * cg) * 2;
      float2 part[MAX_GROUP_ROWS / 32];
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < MAX_GROUP_ROWS / 32; ++j) {
        const int r = lane + 32 * j;
        part[j] = r < cg ? __ldcg(reinterpret_cast<const float2*>(rows) + r) : make_float2(0.f, 0.f);
        sum += part[j].x;
      }
      const float mean = warp_sum(sum) / cg;
      float m2 = 0.f;
#pragma unroll
      for (int j = 0; j < MAX_GROUP_ROWS / 32; ++j) {
        const float d = part[j].x - mean;
        if (lane + 32 * j < cg) m2 += part[j].y + len * d * d;
      }
      const float var = warp_sum(m2) / (cg * len);
      if (lane == 0) {
        float* st = stats + ((i * BATCH + b) * GMAX + g) * 2;
        st[0] = mean;
        st[1] = rsqrtf(var + __int_as_float(src[S_EPS]));
      }
    }
  }
  for (int i = 0, offset = 0; i < nsrc; offset += rec[SRC0 + i * SRC_FIELDS + S_CH], ++i) {
    const int* src = rec + SRC0 + i * SRC_FIELDS;
    if (src[S_NORMED]) continue;
    const int ch = src[S_CH], per_row = ch / W, n = rows * per_row;
    const float* raw = cx.ws + src[S_SLOT];
    for (int first = threadIdx.x; first < n; first += THREADS * UNROLL) {
      float v[UNROLL][W];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int e = first + u * THREADS, bl = e / per_row, c = (e - bl * per_row) * W;
        if (e < n) load_cg<W>(raw + (size_t)bl * ch + c, v[u]);
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int e = first + u * THREADS, bl = e / per_row, c = (e - bl * per_row) * W;
        if (e < n) store<W>(xs + bl * cin + offset + c, v[u]);
      }
    }
  }
  __syncthreads();
  for (int i = 0, offset = 0; i < nsrc; offset += rec[SRC0 + i * SRC_FIELDS + S_CH], ++i) {
    const int* src = rec + SRC0 + i * SRC_FIELDS;
    if (!src[S_NORMED]) continue;
    const int ch = src[S_CH], quads = ch / W, cg = ch / src[S_GROUPS], film_mode = src[S_FILM_MODE];
    const int q_threads = min(quads, THREADS), row_threads = THREADS / q_threads;
    const int row0 = threadIdx.x / q_threads;
    if (row0 >= row_threads) continue;
    const float* raw = cx.ws + src[S_SLOT];
    const float* residual = src[S_RES] >= 0 ? cx.ws + src[S_RES] : nullptr;
    float* copy = src[S_MAT] >= 0 ? cx.ws + src[S_MAT] : nullptr;
    for (int q = threadIdx.x % q_threads; q < quads; q += q_threads) {
      const int c = q * W;
      // GroupNorm's affine folded per sample: mish(x * gain + offset) * fscale + fshift.
      float gain[BATCH][W], offset_[BATCH][W], fscale[BATCH][W], fshift[BATCH][W];
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float scale = as_float(__ldg(cx.p[src[S_GAMMA]] + c + k));
        const float shift = as_float(__ldg(cx.p[src[S_BETA]] + c + k));
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
          const float* st = stats + ((i * BATCH + b) * GMAX + (c + k) / cg) * 2;
          const float* film = cx.films + ((size_t)cx.step * BATCH + b) * FILM_WIDTH + src[S_FILM_OFF];
          gain[b][k] = st[1] * scale;
          offset_[b][k] = shift - st[0] * gain[b][k];
          fscale[b][k] = film_mode == 1 ? __ldg(film + c + k) : 1.f;
          const float* shift_at = film_mode == 1 ? film + ch + c + k : film + c + k;
          fshift[b][k] = film_mode ? __ldg(shift_at) : 0.f;
        }
      }
      for (int first = row0; first < rows; first += row_threads * NROWS) {
        float x[NROWS][W], r[NROWS][W];
#pragma unroll
        for (int u = 0; u < NROWS; ++u) {
          const int bl = first + u * row_threads;
          if (bl >= rows) break;
          load_cg<W>(raw + (size_t)bl * ch + c, x[u]);
          if (residual) load_cg<W>(residual + (size_t)bl * ch + c, r[u]);
        }
#pragma unroll
        for (int u = 0; u < NROWS; ++u) {
          const int bl = first + u * row_threads;
          if (bl >= rows) break;
          float* at = xs + bl * cin + offset + c;
          float v[W];
#pragma unroll
          for (int b = 0; b < BATCH; ++b) {
            if (bl / len != b) continue;
#pragma unroll
            for (int k = 0; k < W; ++k) {
              const float y = mish(fmaf(x[u][k], gain[b][k], offset_[b][k]));
              v[k] = y * fscale[b][k] + fshift[b][k] + (residual ? r[u][k] : 0.f);
            }
          }
          store<W>(at, v);
          if (copy && bl % gridDim.x == blockIdx.x) store<W>(copy + (size_t)bl * ch + c, v);
        }
      }
    }
  }
  __syncthreads();
}
"""

_BODY = r"""
  extern __shared__ float smem[];
  // The parameters' pointers in shared memory: a per-thread array would live in local memory, a
  // dependent L2 round trip before each row's weights.
  const WT** params = reinterpret_cast<const WT**>(smem);
  float* xs = smem + PARAM_FLOATS;
  float* stats = xs + STAGE_FLOATS;
  float* partial = stats + STATS_FLOATS;
  int* records = reinterpret_cast<int*>(partial + PARTIAL_FLOATS);
  for (int i = threadIdx.x; i < NPHASES * REC; i += THREADS) records[i] = program[i];
  if (threadIdx.x == 0) {
PARAMS_TO_SHARED
  }
  __syncthreads();
  Ctx cx{params, ws, films, noise, coeffs, 0};
  unsigned int generation = 0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i < BATCH * HORIZON * ADIM; i += THREADS) ws[i] = x_init[i];
  prefetch_phase(records, cx, blockIdx.x * WARPS + warp, gridDim.x * WARPS);
  Slice wv[KMAX];  // this warp's first slice of its next row's weights, loaded ahead
  first_slice(records, cx, warp, wv);
  if (!grid_barrier(sync, generation)) return publish(result, RESULT_ABORTED);
  const int steps = coeffs_shape[0];
  for (int step = 0; step < steps; ++step) {
    cx.step = step;
    for (int phase = 0; phase < NPHASES; ++phase) {
      const int* rec = records + phase * REC;
      if (rec[F_STAGE_W] == 4) stage<4>(rec, cx, xs, stats);
      else stage<1>(rec, cx, xs, stats);
      const int cin = rec[F_CIN], len = rec[F_LEN];
      const Share sh = share_rows(rec);
      const int splits = sh.splits, split = warp % splits, lead = warp - split;
      for (int round = 0; round < sh.rounds; ++round) {
        const auto [has_row, rs, o] = task(rec, sh, round, warp);
        float mine[COLS_PER_LANE] = {};
        float bias = 0.f;
        if (has_row) {
          bias = as_float(cx.p[rs[R_B]][o]);
          if (round > 0) row_first_slice(rs, o, cin, cx, split, wv);
          float acc[BATCH][HORIZON] = {};
          row_products(rs, o, cin, len, xs, cx, split, splits, wv, acc);
          warp_sum_all(acc);
          own_columns(acc, mine, lane);
        }
        if (splits > 1) {
#pragma unroll
          for (int h = 0; h < COLS_PER_LANE; ++h)
            if (has_row && h * 32 + lane < COLS) partial[warp * COLS + h * 32 + lane] = mine[h];
          __syncthreads();
#pragma unroll
          for (int h = 0; h < COLS_PER_LANE; ++h) {
            if (!has_row || split != 0 || h * 32 + lane >= COLS) continue;
            float sum = 0.f;
            for (int q = 0; q < splits; ++q) sum += partial[(lead + q) * COLS + h * 32 + lane];
            mine[h] = sum;
          }
        }
        if (has_row && split == 0) finish_row(rs, o, bias, mine, cx, lane);
      }
      const int next = phase + 1 < NPHASES ? phase + 1 : (step + 1 < steps ? 0 : -1);
      if (next >= 0) {
        prefetch_phase(records + next * REC, cx, blockIdx.x * WARPS + warp, gridDim.x * WARPS);
        first_slice(records + next * REC, cx, warp, wv);
      }
      if (!grid_barrier(sync, generation)) return publish(result, RESULT_ABORTED);
    }
  }
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < BATCH * HORIZON * ADIM; i += THREADS)
      const_cast<float*>(result)[i] = __ldcg(ws + i);
    publish(result, RESULT_DONE);
  }
"""


class KernelAborted(BackendUnavailable):
    """The kernel gave up at a barrier: not every block could be resident. The request can be rerun."""


def _header(
    program: _Program, dtype: mx.Dtype, scheduler: DDPMScheduler | DDIMScheduler, horizon: int
) -> str:
    cfg = scheduler.config
    defines = {
        "WT": WEIGHT_TYPES[dtype],
        "THREADS": THREADS,
        "WARPS": THREADS // 32,
        "BATCH": program.batch,
        "HORIZON": horizon,
        "ADIM": program.x.channels,
        "GMAX": program.max_groups,
        "KMAX": max(variant[0] for variant in program.variants),
        "MAX_GROUP_ROWS": MAX_GROUP_ROWS,
        "FILM_WIDTH": program.film_width,
        "STAGE_FLOATS": program.stage_floats,
        "PARAM_FLOATS": program.param_floats,
        "STATS_FLOATS": program.stats_floats,
        "PARTIAL_FLOATS": program.partial_floats,
        "NPHASES": len(program.records),
        "REC": REC,
        "SRC0": SRC0,
        "RS0": RS0,
        "SRC_FIELDS": len(SOURCE_FIELDS),
        "ROWSET_FIELDS": len(ROWSET_FIELDS),
        "DDPM": int(isinstance(scheduler, DDPMScheduler)),
        "PRED_EPS": int(cfg.prediction_type == "epsilon"),
        "CLIP": int(cfg.clip_sample),
        "CLIP_RANGE": f"{cfg.clip_sample_range!r}f",
        "ADD_NOISE": int(isinstance(scheduler, DDPMScheduler) or cfg.eta > 0),
        **COMMON_DEFINES,
        "RESULT_DONE": f"{RESULT_DONE!r}f",
        "RESULT_ABORTED": f"{RESULT_ABORTED!r}f",
        "PREFETCH_MAX_BYTES": f"{device.l2_bytes() // 6}ll",
    }
    defines |= {f"F_{name}": i for i, name in enumerate(HEADER_FIELDS)}
    defines |= {f"S_{name}": i for i, name in enumerate(SOURCE_FIELDS)}
    defines |= {f"R_{name}": i for i, name in enumerate(ROWSET_FIELDS)}
    defines_text = "".join(f"#define {name} {value}\n" for name, value in defines.items())
    return defines_text + DEVICE_COMMON + _HELPERS + _row_products(program)


def _row_products(program: _Program) -> str:
    """The program's convolution variants, dispatched by a row set's VARIANT field: a row's first
    weight slice, and its products."""
    slices, products = [], []
    for variant, index in program.variants.items():
        k, s, p, transposed, vec = variant
        args = f"{k}, {s}, {p}, {'true' if transposed else 'false'}, {vec}"
        slices.append(f"    case {index}: conv_first_slice<{k}, {vec}>(rs, o, cin, cx, split, wv); break;")
        call = f"conv_products<{args}>(rs, o, cin, lin, xs, cx, split, splits, wv, acc)"
        products.append(f"    case {index}: {call}; break;")
    return (
        "__device__ __forceinline__ void row_first_slice(const int* rs, int o, int cin, const Ctx& cx, "
        "int split, Slice (&wv)[KMAX]) {\n"
        "  switch (rs[R_VARIANT]) {\n" + "\n".join(slices) + "\n  }\n}\n"
        "__device__ __forceinline__ void row_products(const int* rs, int o, int cin, int lin, "
        "const float* xs, const Ctx& cx, int split, int splits, Slice (&wv)[KMAX], "
        "float (&acc)[BATCH][HORIZON]) {\n"
        "  switch (rs[R_VARIANT]) {\n" + "\n".join(products) + "\n  }\n}\n"
        "// Loads this warp's first slice of its first row of a phase.\n"
        "__device__ __forceinline__ void first_slice(const int* rec, const Ctx& cx, int warp, "
        "Slice (&wv)[KMAX]) {\n"
        "  const Share sh = share_rows(rec);\n"
        "  const Task t = task(rec, sh, 0, warp);\n"
        "  if (t.has_row) row_first_slice(t.rs, t.o, rec[F_CIN], cx, warp % sh.splits, wv);\n"
        "}\n"
    )


def _body(program: _Program) -> str:
    stores = "\n".join(f"    params[{i}] = weights + {offset};" for i, offset in enumerate(program.offsets))
    return _BODY.replace("PARAMS_TO_SHARED", stores)


def _params(program: _Program) -> list[mx.array]:
    """The program's parameter arrays, looked up per request (a hot load replaces them). A module is a
    dict of its parameters: item access is much faster than attribute access."""
    return [module[name] for module, name in program.refs]


def pack(arrays: list[mx.array], offsets: list[int], size: int) -> tuple[mx.array, list[mx.array]]:
    """``arrays`` (of one dtype) laid out flat at ``offsets`` in one array of ``size`` elements, zeros
    between them, and views of that array shaped as ``arrays``."""
    pieces, end = [], 0
    for a, offset in zip(arrays, offsets, strict=True):
        if offset < end:
            raise ValueError(f"an array of {a.size} elements overlaps the one before it at offset {offset}")
        pieces += [mx.zeros((offset - end,), a.dtype)] if offset > end else []
        pieces.append(a.reshape(-1))
        end = offset + a.size
    pieces += [mx.zeros((size - end,), arrays[-1].dtype)] if size > end else []
    packed = mx.concatenate(pieces)
    return packed, [packed[o : o + a.size].reshape(a.shape) for a, o in zip(arrays, offsets, strict=True)]


def _float32(a: mx.array) -> mx.array:
    return a if a.dtype == mx.float32 else a.astype(mx.float32)


class CudaSampler(Backend):
    """The persistent-kernel sampler of one ``ConditionalUnet1D`` (programs are built per batch size). As
    the first backend on CUDA it also prepares a request's inputs: observations in host memory the GPU
    reads (``HostUploads``) and image trunks as ``trunk``'s kernel."""

    name = "sampler kernel"
    unpadded = True  # every row, padding included, adds a sample's rows to every phase

    def __init__(self, unet: ConditionalUnet1D):
        self.unet = unet
        self._programs: dict[tuple[int, int], tuple[_Program, mx.array]] = {}
        self._kernels: dict[tuple, object] = {}
        self._dtype_params, self._params_dtype = SeenArrays(), None
        self._packed_params, self._packed = SeenArrays(), None
        # Set after a kernel gave up at a barrier (the GPU is shared): later requests go chunked at once.
        self.disabled = False
        self._results = HostUploads()
        self._uploads = HostUploads()

    def host_array(self, key: str, value: Any) -> mx.array:
        return self._uploads(key, value)

    def image_trunk(self, trunk: ResNet18Trunk) -> Callable[[mx.array], mx.array] | None:
        return functools.partial(trunk_kernel.trunk, trunk) if trunk_kernel.supports(trunk) else None

    def _program(self, batch: int, horizon: int) -> tuple[_Program, mx.array]:
        key = (batch, horizon)
        if key not in self._programs:
            program = _Program(self.unet, batch, horizon)
            for other, _ in self._programs.values():  # so that one packed array serves every program
                same_refs = [(id(m), n) for m, n in other.refs] == [(id(m), n) for m, n in program.refs]
                if not (same_refs and other.offsets == program.offsets):
                    raise AssertionError("the programs of one trunk must take the same weights in order")
            table = mx.array(np.asarray(program.records, dtype=np.int32).reshape(-1))
            self._programs[key] = (program, table)
        return self._programs[key]

    def _dtype(self, params: list[mx.array]) -> mx.Dtype | None:
        """The weights' one dtype, or None where they are mixed or of a type the kernel doesn't read.
        Kept for the arrays last seen: comparing the arrays is cheaper than reading their dtypes."""
        if not self._dtype_params.same(params):
            dtypes = {a.dtype for a in params}
            only = dtypes.pop() if len(dtypes) == 1 else None
            self._params_dtype = only if only in WEIGHT_TYPES else None
            self._dtype_params.remember(params)
        return self._params_dtype

    def _weights(self, program: _Program, params: list[mx.array]) -> mx.array:
        """The weights as one array: one kernel argument instead of ~120 (MLX's host time grows with every
        argument). The modules then hold views of it, so the weights are in memory once where nothing else
        holds the originals. A module's replaced array (``update``, a load, ``set_dtype``, a training
        step: MLX swaps arrays) is seen and packed again on the next call; an array written in place
        (``w += d`` keeps the object) is not, as for every cache of ``seen_arrays``. Its dtype is the
        kernel's weight type."""
        if not self._packed_params.same(params):
            if self._dtype(params) is None:
                raise ValueError("the UNet's weights must share one dtype the sampler kernel reads")
            if [a.shape for a in params] != program.shapes:
                raise ValueError("the UNet's weight shapes changed since its sampler program was recorded")
            packed, views = pack(params, program.offsets, program.weight_elems)
            mx.eval(packed, *views)
            for (module, name), view in zip(program.refs, views, strict=True):
                module[name] = view
            self._packed = packed
            self._packed_params.remember(views)
        return self._packed

    def _kernel(self, program: _Program, dtype: mx.Dtype, scheduler, horizon: int):
        cfg = scheduler.config
        key = (
            id(program),
            dtype,
            type(scheduler),
            cfg.prediction_type,
            cfg.clip_sample,
            cfg.clip_sample_range,
            cfg.eta,
        )
        if key not in self._kernels:
            header = _header(program, dtype, scheduler, horizon)
            body = _body(program)
            # MLX caches kernels by name: the name carries the whole source.
            name = "dpmlx_sampler_" + hashlib.sha1((header + body).encode()).hexdigest()[:16]
            # ``result`` is written, though an input: host memory MLX neither reads nor orders (``__call__``).
            inputs = ["program", "x_init", "films", "noise", "coeffs", "weights", "result"]
            self._kernels[key] = mx.fast.cuda_kernel(
                name=name,
                input_names=inputs,
                output_names=["ws", "sync"],
                source=body,
                header=header,
                shared_memory=program.shared_bytes,
            )
        return self._kernels[key]

    def fits(self, batch: int, horizon: int, shared_bytes: int) -> bool:
        """Whether the kernel can take this model and shape within ``shared_bytes`` of shared memory."""
        if batch > MAX_BATCH or batch * horizon > MAX_ACCUMULATORS:
            return False
        program, _ = self._program(batch, horizon)
        return (
            self._dtype(_params(program)) is not None
            and program.shared_bytes <= shared_bytes
            and program.max_group_rows <= MAX_GROUP_ROWS
        )

    def supports(self, batch: int, horizon: int, scheduler: Scheduler) -> bool:
        """Whether this device, shape and sampler can run the kernel (else the next backend serves)."""
        if self.disabled or not device.available() or not device.sm_count():
            return False
        return isinstance(scheduler, (DDPMScheduler, DDIMScheduler)) and self.fits(
            batch, horizon, device.max_shared_bytes()
        )

    def sample(self, scheduler: Scheduler, x: mx.array, films: mx.array, step_noise: mx.array) -> np.ndarray:
        """All steps from x (B, T, A): films (S, B, sum m) the blocks' float32 FiLM rows, step_noise
        (S, B, T, A). Returns the float32 trajectory (B, T, A) on the host.

        The kernel writes the trajectory and then a completion word into host memory (``HostUploads``'
        kept array), and the host spins on that word, sooner than MLX's own wait for a kernel (a blocking
        CUDA event) plus the copy of a device array to the host (benchmarks/NOTES.md). The wait holds a
        CPU core, yielding the GIL at every check."""
        batch, horizon, _ = x.shape
        program, table = self._program(batch, horizon)
        weights = self._weights(program, _params(program))
        kernel = self._kernel(program, weights.dtype, scheduler, horizon)
        coeffs = scheduler.coefficient_table()
        blocks = device.sm_count()
        size = x.size
        result = self._results("result", np.zeros(size + 1, np.float32))  # the word starts at 0
        host = np.asarray(result)  # the same memory
        # One kernel in flight per process: two persistent grids sharing the SMs (a model warming up
        # during a hot swap while another serves) could each hold blocks the other's barrier waits for.
        # A word that says done comes after the grid's last barrier; otherwise the grid must end before
        # the lock goes (blocks never resident until others gave up still run; an interrupted wait left
        # all of it running), and MLX's wait for it raises a CUDA error the kernel met.
        with LAUNCH_LOCK:
            _, sync = kernel(
                inputs=[table, _float32(x), films, _float32(step_noise), coeffs, weights, result],
                grid=(blocks * THREADS, 1, 1),
                threadgroup=(THREADS, 1, 1),
                output_shapes=[(program.ws_size,), (sync_words(blocks),)],
                output_dtypes=[mx.float32, mx.uint32],
                init_value=0,
            )
            mx.async_eval(sync)
            try:
                word = _wait_for_word(host, size)
            except BaseException:
                mx.eval(sync)
                raise
            if word != RESULT_DONE:
                mx.eval(sync)
                word = float(host[size])
        if word == RESULT_ABORTED:
            self.disabled = True
            raise KernelAborted(
                f"the sampler kernel's grid barrier waited over {TIMEOUT_S} s: not all {blocks} blocks "
                "were resident (another process's kernels on this GPU?)"
            )
        if word != RESULT_DONE:
            raise RuntimeError(f"the sampler kernel ended without its result (completion word {word})")
        return host[:size].reshape(x.shape).copy()


def _wait_for_word(host: np.ndarray, size: int) -> float:
    """The kernel's completion word at ``host[size]``, polled until it is set or ``TIMEOUT_S`` has passed
    (then 0: a kernel that failed never sets it, and one that gives up does so only after a barrier waited
    that long)."""
    deadline = time.perf_counter() + TIMEOUT_S
    while True:
        word = float(host[size])
        # Other threads get the GIL; its hand-off (a mutex's release and acquire) also keeps the
        # trajectory's loads after this one on weakly ordered hosts.
        time.sleep(0)
        if word or time.perf_counter() > deadline:
            return word
