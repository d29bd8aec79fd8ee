"""The sampler kernel's largest products alone, three ways, on MLX's CUDA backend (needs a GPU).

One image phase's convolution (2048 rows x 5 taps x 2048 channels, input length 4, batch 1) at the
sampler's occupancy (one 256-thread block per SM, rows round-robin over the blocks), over 9 such layers
(378 MB of bfloat16, more than the L2 holds), timed inside one kernel by the difference of two repeat
counts, so that MLX's launch and completion costs cancel:

- ``ffma``: the sampler's scheme (``policy_core/backends/cuda/sampler.py``): a warp per row, 8 bf16
  weights a lane, float32 FMAs on the staged float32 input;
- ``mma``: a block's 16 rows as one ``mma.m16n8k16`` bf16 tile (the staged input rounded to bf16), its 8
  warps splitting the reduction; each lane loads 16 bytes of a row with the reduction's order permuted so
  that a lane's A fragment is contiguous in memory;
- ``mma8``: int8 rows (16 a lane), turned into exact halves two at a time and multiplied by ``m16n8k16``
  f16 tensor-core products (the input rounded to f16): half the bytes per weight.

Each way is first checked against numpy on the first layer. ``--unroll`` is how many 16-byte loads per
row half a warp issues before its products (the compiler decides how many stay in flight); a value must
divide a warp's share of the reduction (40 steps of 32 bf16, 20 of 64 int8), others are skipped.

    python -m benchmarks.probes.products_microbench --ways ffma,mma,mma8 --unroll 4,8,10,20 \
        --json benchmarks/results/products_microbench_h100.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CIN, ROWS, LAYERS, THREADS, LENGTH, TAPS, PADDING = 2048, 2048, 9, 256, 4, 5, 2
REDUCTION = TAPS * CIN

HEADER = (
    f"#define CIN {CIN}\n#define ROWS {ROWS}\n#define L {LENGTH}\n#define KT {TAPS}\n#define P {PADDING}\n"
)
HEADER += r"""
__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
  unsigned int r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ unsigned int pack_f16(float lo, float hi) {
  unsigned int r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ uint4 ld16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
// Two int8 weights biased to q + 128 (bytes picked by `sel`) as the halves (q, q'): the half whose
// mantissa is u is 1024 + u; minus 1152.
__device__ __forceinline__ unsigned int int8_pair(unsigned int biased, unsigned int sel) {
  unsigned int bits = __byte_perm(biased, 0x64646464u, sel), r;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(bits), "r"(0x64806480u));
  return r;
}
"""
# Every way stages the input (L x CIN float32) in shared memory as the sampler does.
STAGE = r"""
  extern __shared__ float smem[];
  float* xs = smem;
  for (int i = threadIdx.x; i < L * CIN; i += blockDim.x) xs[i] = x[i];
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float sink = 0.f;
"""
FFMA = (
    STAGE
    + r"""
  for (int rep = 0; rep < REP; ++rep)
  for (int layer = 0; layer < LAYERS; ++layer) {
    const __nv_bfloat16* base = w + (size_t)layer * ROWS * KT * CIN;
    for (int r = blockIdx.x + warp * gridDim.x; r < ROWS; r += 8 * gridDim.x) {
      const __nv_bfloat16* row = base + (size_t)r * KT * CIN;
      float acc[16] = {};
      for (int c = lane * 8; c < CIN; c += 256) {
        uint4 wv[KT];
#pragma unroll
        for (int j = 0; j < KT; ++j) wv[j] = __ldg(reinterpret_cast<const uint4*>(row + j * CIN + c));
#pragma unroll
        for (int m = 0; m < L; ++m) {
          const float4 a = *reinterpret_cast<const float4*>(xs + m * CIN + c);
          const float4 b = *reinterpret_cast<const float4*>(xs + m * CIN + c + 4);
          const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
          for (int j = 0; j < KT; ++j) {
            const int t = m - j + P;
            if (t < 0 || t >= 16) continue;  // as the sampler: columns past the output collect strays
            const unsigned int* u = reinterpret_cast<const unsigned int*>(&wv[j]);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              const float wf = __uint_as_float(e % 2 ? u[e / 2] & 0xffff0000u : u[e / 2] << 16);
              acc[t] = fmaf(wf, xv[e], acc[t]);
            }
          }
        }
      }
#pragma unroll
      for (int t = 0; t < L; ++t) {
        float v = acc[t];
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (rep == 0 && layer == 0 && lane == 0) out[r * 8 + t] = v;
        sink += v;
      }
    }
  }
  if (sink == 12345.f) out[0] = sink;  // keeps the products
"""
)
# A block's tile: rows blockIdx.x + i * gridDim.x, i < 16; lane (g, q) = (lane / 4, lane % 4) holds A rows
# i = g and g + 8. Warps split the reduction, then meet in shared memory: red[warp][16 rows][8 columns].
TILE_HEAD = (
    STAGE
    + r"""
  float* red = smem + L * CIN;
  const int g = lane >> 2, q = lane & 3;
  const int r_lo = blockIdx.x + g * gridDim.x, r_hi = blockIdx.x + (g + 8) * gridDim.x;
  for (int rep = 0; rep < REP; ++rep)
  for (int layer = 0; layer < LAYERS; ++layer) {
    float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f, d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
"""
)
TILE_TAIL = r"""
    c0 += d0; c1 += d1; c2 += d2; c3 += d3;
    float* mine = red + warp * 128;
    mine[g * 8 + 2 * q] = c0; mine[g * 8 + 2 * q + 1] = c1;
    mine[(g + 8) * 8 + 2 * q] = c2; mine[(g + 8) * 8 + 2 * q + 1] = c3;
    __syncthreads();
    if (threadIdx.x < 128) {
      float v = 0.f;
#pragma unroll
      for (int other = 0; other < 8; ++other) v += red[other * 128 + threadIdx.x];
      const int i = threadIdx.x / 8, n = threadIdx.x % 8, r = blockIdx.x + i * gridDim.x;
      if (rep == 0 && layer == 0 && r < ROWS) out[r * 8 + n] = v;
      sink += v;
    }
    __syncthreads();
  }
  if (sink == 12345.f) out[0] = sink;
"""
# The reduction index k of a 16-wide step, as the fragments number it (2q, 2q+1, 2q+8, 2q+9 for lane q),
# is the row's element 4q..4q+3 of that step's 16: a lane's share of a row is contiguous.
MMA_STEP = r"""
        const unsigned int a0 = A_LO0, a2 = A_LO1, a1 = A_HI0, a3 = A_HI1;
        if (s % 2 == 0)
          asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.TYPE.TYPE.f32 "
                       "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                       : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
                       : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        else
          asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.TYPE.TYPE.f32 "
                       "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                       : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
                       : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
"""
# A warp's share of the tile's reduction in steps of WIDTH weights (16 bytes a lane and row), U steps'
# loads issued before their products; rows past the end read row 0 and count as zeros.
TILE_LOADS = r"""
    const WT* base = w + (size_t)layer * ROWS * KT * CIN;
    const WT* lo = base + (size_t)(r_lo < ROWS ? r_lo : 0) * KT * CIN + WIDTH / 4 * q;
    const WT* hi = base + (size_t)(r_hi < ROWS ? r_hi : 0) * KT * CIN + WIDTH / 4 * q;
    constexpr int PER = KT * CIN / WIDTH / 8;
    for (int k0 = warp * PER; k0 < (warp + 1) * PER; k0 += U) {
      uint4 as[U], bs[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        as[u] = ld16(lo + (k0 + u) * WIDTH);
        bs[u] = ld16(hi + (k0 + u) * WIDTH);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kb = k0 + u;
        const uint4 a = as[u], b = r_hi < ROWS ? bs[u] : make_uint4(0, 0, 0, 0);
        const int j = (kb * WIDTH) / CIN, c = (kb * WIDTH) % CIN, m = g + j - P;  // output position g
"""
MMA = (
    TILE_HEAD
    + TILE_LOADS.replace("WT", "__nv_bfloat16").replace("WIDTH", "32")
    + r"""#pragma unroll
        for (int s = 0; s < 2; ++s) {
          unsigned int b0 = 0, b1 = 0;
          if (m >= 0 && m < L) {
            const float4 xv = *reinterpret_cast<const float4*>(xs + m * CIN + c + 8 * q + 4 * s);
            b0 = pack_bf16(xv.x, xv.y); b1 = pack_bf16(xv.z, xv.w);
          }
"""
    + MMA_STEP.replace("TYPE", "bf16")
    .replace("A_LO0", "s ? a.z : a.x")
    .replace("A_LO1", "s ? a.w : a.y")
    .replace("A_HI0", "s ? b.z : b.x")
    .replace("A_HI1", "s ? b.w : b.y")
    + r"""
        }
      }
    }
"""
    + TILE_TAIL
)
MMA8 = (
    TILE_HEAD
    + TILE_LOADS.replace("WT", "signed char").replace("WIDTH", "64")
    + r"""
        const unsigned int aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          unsigned int b0 = 0, b1 = 0;
          if (m >= 0 && m < L) {
            const float4 xv = *reinterpret_cast<const float4*>(xs + m * CIN + c + 16 * q + 4 * s);
            b0 = pack_f16(xv.x, xv.y); b1 = pack_f16(xv.z, xv.w);
          }
          const unsigned int ab = aw[s] ^ 0x80808080u, bb = bw[s] ^ 0x80808080u;
"""
    + MMA_STEP.replace("TYPE", "f16")
    .replace("A_LO0", "int8_pair(ab, 0x4140)")
    .replace("A_LO1", "int8_pair(ab, 0x4342)")
    .replace("A_HI0", "int8_pair(bb, 0x4140)")
    .replace("A_HI1", "int8_pair(bb, 0x4342)")
    + r"""
        }
      }
    }
"""
    + TILE_TAIL
)
WAYS = {"ffma": FFMA, "mma": MMA, "mma8": MMA8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ways", default="ffma,mma,mma8", help=f"comma list of {sorted(WAYS)}")
    parser.add_argument(
        "--unroll", default="4,8", help="comma list of loads per row half before the products (mma ways)"
    )
    parser.add_argument(
        "--runs", type=int, default=7, help="timed launches per repeat count (first 2 dropped)"
    )
    parser.add_argument("--json", type=Path, default=None)


def _reference(weights, x):
    """Layer 0's out[r, t] = sum_j sum_c W[r, j, c] x[t + j - PADDING, c], in float64."""
    import numpy as np

    rows = weights.reshape(ROWS, TAPS, CIN).astype(np.float64)
    out = np.zeros((ROWS, LENGTH))
    for t in range(LENGTH):
        for j in range(TAPS):
            if 0 <= t + j - PADDING < LENGTH:
                out[:, t] += rows[:, j] @ x[t + j - PADDING].astype(np.float64)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from benchmarks import mlx_core
    from policy_core.backends.cuda import device
    from policy_core.info import environment_report

    mx = mlx_core()

    blocks = device.sm_count()
    if not blocks:
        raise SystemExit("needs MLX's CUDA backend")
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(LENGTH, CIN)).astype(np.float32)
    x = mx.array(x_np)
    weights = mx.random.normal((LAYERS * ROWS * REDUCTION,), key=mx.random.key(0)) * 0.02
    w16 = weights.astype(mx.bfloat16)
    w8 = mx.clip(mx.round(weights * 3000), -127, 127).astype(mx.int8)
    mx.eval(w16, w8)
    first = ROWS * REDUCTION
    # Each way's weights, and the numpy view of layer 0 with the input as that way rounds it.
    inputs = {
        "ffma": lambda: (w16, np.array(w16[:first].astype(mx.float32)), x_np),
        "mma": lambda: (
            w16,
            np.array(w16[:first].astype(mx.float32)),
            np.array(x.astype(mx.bfloat16).astype(mx.float32)),
        ),
        "mma8": lambda: (w8, np.array(w8[:first]).astype(np.float32), x_np.astype(np.float16)),
    }
    rows = []
    for way in args.ways.split(","):
        w, layer0, x_rounded = inputs[way]()
        expected = _reference(layer0, x_rounded)
        steps = {"ffma": 8, "mma": REDUCTION // 32 // 8, "mma8": REDUCTION // 64 // 8}[way]
        for unroll in [8] if way == "ffma" else [int(u) for u in args.unroll.split(",")]:
            if steps % unroll:
                print(f"{way}: unroll {unroll} does not divide a warp's {steps} steps; skipped")
                continue

            def kernel(repeats: int, way=way, unroll=unroll):
                return mx.fast.cuda_kernel(
                    name=f"products_{way}_{repeats}_{unroll}",
                    input_names=["w", "x"],
                    output_names=["out"],
                    source=WAYS[way],
                    header=HEADER + f"#define REP {repeats}\n#define LAYERS {LAYERS}\n#define U {unroll}\n",
                    shared_memory=(LENGTH * CIN + 8 * 128) * 4,
                )

            def launch(k, w=w):
                return k(
                    inputs=[w, x],
                    grid=(blocks * THREADS, 1, 1),  # one block an SM, as the sampler
                    threadgroup=(THREADS, 1, 1),
                    output_shapes=[(ROWS * 8,)],
                    output_dtypes=[mx.float32],
                    init_value=0,
                )[0]

            once, thrice = kernel(1), kernel(3)
            got = np.array(launch(once)).reshape(ROWS, 8)[:, :LENGTH]
            error = float(np.abs(got - expected).max() / np.abs(expected).max())
            times = {1: [], 3: []}
            for _ in range(args.runs):
                for repeats, k in ((1, once), (3, thrice)):
                    start = time.perf_counter()
                    mx.eval(launch(k))
                    times[repeats].append(time.perf_counter() - start)
            layer_s = (np.median(times[3][2:]) - np.median(times[1][2:])) / 2 / LAYERS
            layer_bytes = ROWS * REDUCTION * w.dtype.size
            row = {
                "way": way,
                "unroll": unroll,
                "max_relative_error": error,
                "layer_us": layer_s * 1e6,
                "layer_mb": layer_bytes / 1e6,
                "tb_per_s": layer_bytes / layer_s / 1e12,
            }
            rows.append(row)
            print(
                f"{way:5s} unroll {unroll:3d}: max rel error {error:.1e}; "
                f"a layer of {row['layer_mb']:.1f} MB in {row['layer_us']:6.2f} us "
                f"= {row['tb_per_s']:.2f} TB/s",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": environment_report(), "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
