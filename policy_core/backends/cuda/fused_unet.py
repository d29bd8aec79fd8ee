"""The sampler's ConditionalUnet1D trunk on MLX's CUDA backend: two kernels per convolution.

At batch 1 a step is bound by the number and fixed cost of kernels, not by bytes (benchmarks/NOTES.md):
a cuDNN Conv1d of these shapes costs many times a cuBLAS product whatever its size, and the module path
adds ~8 small kernels per Conv1dBlock after the convolution. Here every convolution is

1. one cuBLAS product ``x (B*T, in) @ W (out*k, in)^T`` giving every tap's contribution
   ``z[b, s, o, k] = W[o, k, :] . x[b, s, :]`` (MLX's (out, k, in) weight is that matrix as a free view;
   the same holds for the transposed convolution of Upsample1d), and
2. one kernel that sums the taps into the output positions they belong to and adds the bias; after the
   Conv1dBlocks' convolutions the same kernel also does GroupNorm + mish + FiLM (scale and bias, or bias)
   + the residual add, one thread block per (sample, group).

Channels-last (B, T, C) like the module path. Same parameters and results as
``ConditionalUnet1D.forward_film`` (tests/test_unet_inference.py, on a GPU). ``FusedUnetBackend`` runs the
generic chunked sampler with it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from policy_core.backends.cuda.device import LAUNCH_LOCK, available
from policy_core.backends.generic import GenericBackend, UnetTrunk
from policy_core.nets.unet import (
    MODULE_OPS,
    ConditionalResidualBlock1D,
    ConditionalUnet1D,
    Conv1dBlock,
    TrunkOps,
    conv_output_length,
    stride_padding,
)
from policy_core.schedulers import Scheduler

THREADS = 256


BLOCK_SUM = """
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by the previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += scratch[w];
  return total;
}
"""

# z: taps (B, LEN, CH, KS) of a stride-1 "same" convolution; bias/gamma/beta: (CH,); film: (B, 2 CH)
# (FILM 1: scale, bias), (B, CH) (FILM 2: bias) or unused (FILM 0); res: (B, LEN, CH) (RES 1) or unused.
# One block per (group, sample); each thread keeps its PER values in registers between the passes.
_NORM_SOURCE = """
  constexpr int CG = CH / GROUPS;
  constexpr int N = LEN * CG;
  constexpr int PER = (N + THREADS - 1) / THREADS;
  const int g = blockIdx.x, b = blockIdx.y;
  __shared__ float scratch[32];
  float vals[PER];
  float s = 0.f;
  for (int j = 0; j < PER; ++j) {
    const int i = threadIdx.x + j * THREADS;
    float v = 0.f;
    if (i < N) {
      const int t = i / CG, ch = g * CG + i % CG;
      v = static_cast<float>(bias[ch]);
      for (int k = 0; k < KS; ++k) {
        const int src = t + k - KS / 2;
        if (src >= 0 && src < LEN)
          v += static_cast<float>(z[(((size_t)b * LEN + src) * CH + ch) * KS + k]);
      }
      s += v;
    }
    vals[j] = v;
  }
  const float mean = block_sum(s, scratch) / N;
  float q = 0.f;
  for (int j = 0; j < PER; ++j) {
    const int i = threadIdx.x + j * THREADS;
    if (i < N) q += (vals[j] - mean) * (vals[j] - mean);
  }
  const float rstd = rsqrtf(block_sum(q, scratch) / N + (float)EPS);
  for (int j = 0; j < PER; ++j) {
    const int i = threadIdx.x + j * THREADS;
    if (i >= N) break;
    const int t = i / CG, ch = g * CG + i % CG;
    const size_t at = ((size_t)b * LEN + t) * CH + ch;
    float v = (vals[j] - mean) * rstd * static_cast<float>(gamma[ch]) + static_cast<float>(beta[ch]);
    const float e = __expf(fminf(v, 20.f));
    const float n = e * (e + 2.f);
    v = v * n / (n + 2.f);
    if (FILM == 1)
      v = v * static_cast<float>(film[b * 2 * CH + ch]) + static_cast<float>(film[b * 2 * CH + CH + ch]);
    if (FILM == 2) v = v + static_cast<float>(film[b * CH + ch]);
    if (RES == 1) v = v + static_cast<float>(res[at]);
    out[at] = static_cast<T>(v);
  }
"""

# z: taps (B, LIN, CH, KS); out: (B, LOUT, CH) = bias + the taps landing on each output position, for a
# convolution (input position o * STRIDE + k - PAD) or a transposed one (o = i * STRIDE + k - PAD).
_TAPS_SOURCE = """
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)BATCH * LOUT * CH) return;
  const int ch = idx % CH;
  const int o = (idx / CH) % LOUT;
  const int b = idx / ((size_t)CH * LOUT);
  float v = static_cast<float>(bias[ch]);
  for (int k = 0; k < KS; ++k) {
    int i;
    if (TRANSPOSED) {
      const int num = o + PAD - k;
      if (num < 0 || num % STRIDE != 0) continue;
      i = num / STRIDE;
    } else {
      i = o * STRIDE + k - PAD;
    }
    if (i >= 0 && i < LIN) v += static_cast<float>(z[(((size_t)b * LIN + i) * CH + ch) * KS + k]);
  }
  out[idx] = static_cast<T>(v);
"""

_kernels: dict[tuple, object] = {}


def cached_kernel(name: str, inputs: list[str], source: str, header: str = ""):
    """A one-output ``mx.fast.cuda_kernel``, made once per (name, header)."""
    # MLX caches the compiled kernel by name and template arguments only: whatever the header fixes
    # must be in the name (and every input must have the dtype T, see same_dtype).
    key = (name, header)
    if key not in _kernels:
        _kernels[key] = mx.fast.cuda_kernel(
            name=name, input_names=inputs, output_names=["out"], source=source, header=header
        )
    return _kernels[key]


def eps_tag(eps: float) -> str:
    """A GroupNorm epsilon as it can appear in a kernel's name."""
    return f"{eps:.3e}".replace(".", "_").replace("-", "m").replace("+", "p")


def same_dtype(dtype: mx.Dtype, *arrays: mx.array | None) -> list[mx.array | None]:
    """The kernels are compiled per T only, so every input is given in T (a no-op for a uniform model)."""
    return [a if a is None or a.dtype == dtype else a.astype(dtype) for a in arrays]


def taps(x: mx.array, weight: mx.array) -> mx.array:
    """Every tap's contribution of a (transposed) convolution: (B, T, in) -> (B, T, out, k)."""
    batch, length, in_channels = x.shape
    out_channels, kernel, _ = weight.shape
    z = x.reshape(batch * length, in_channels) @ weight.reshape(out_channels * kernel, in_channels).T
    return z.reshape(batch, length, out_channels, kernel)


def sum_taps(
    z: mx.array, bias: mx.array, stride: int = 1, padding: int = 0, transposed: bool = False
) -> mx.array:
    """bias + the taps ``z`` (B, T_in, C, k) landing on each output position -> (B, T_out, C)."""
    batch, length, channels, kernel = z.shape
    out_length = conv_output_length(length, kernel, stride, padding, transposed)
    size = batch * out_length * channels
    (bias,) = same_dtype(z.dtype, bias)
    return cached_kernel("dpmlx_sum_taps", ["z", "bias"], _TAPS_SOURCE)(
        inputs=[z, bias],
        template=[
            ("T", z.dtype),
            ("BATCH", batch),
            ("LIN", length),
            ("LOUT", out_length),
            ("CH", channels),
            ("KS", kernel),
            ("STRIDE", stride),
            ("PAD", padding),
            ("TRANSPOSED", int(transposed)),
        ],
        grid=((size + THREADS - 1) // THREADS * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(batch, out_length, channels)],
        output_dtypes=[z.dtype],
    )[0]


def norm_taps(
    z: mx.array,
    bias: mx.array,
    norm: nn.GroupNorm,
    film: mx.array | None = None,
    residual: mx.array | None = None,
) -> mx.array:
    """mish(GroupNorm(same-padded conv from taps ``z`` + bias)) [* scale + shift | + shift] [+ residual].

    z: (B, T, C, k); film: (B, 2C) scale-then-shift, (B, C) shift, or None. Arithmetic in float32.
    """
    batch, length, channels, kernel = z.shape
    film_mode = 0 if film is None else (1 if film.shape[-1] == 2 * channels else 2)
    bias, gamma, beta, film, residual = same_dtype(z.dtype, bias, norm.weight, norm.bias, film, residual)
    header = f"#define EPS {norm.eps!r}\n#define THREADS {THREADS}\n{BLOCK_SUM}"
    inputs = ["z", "bias", "gamma", "beta", "film", "res"]
    name = f"dpmlx_taps_group_norm_mish_film_eps{eps_tag(norm.eps)}"
    kernel_fn = cached_kernel(name, inputs, _NORM_SOURCE, header)
    return kernel_fn(
        inputs=[
            z,
            bias,
            gamma,
            beta,
            # An unused input is never read (FILM 0, RES 0): pass any array rather than make one.
            bias if film is None else film,
            bias if residual is None else residual,
        ],
        template=[
            ("T", z.dtype),
            ("LEN", length),
            ("CH", channels),
            ("KS", kernel),
            ("GROUPS", norm.num_groups),
            ("FILM", film_mode),
            ("RES", int(residual is not None)),
        ],
        grid=(norm.num_groups * THREADS, batch, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(batch, length, channels)],
        output_dtypes=[z.dtype],
    )[0]


def conv1d(x: mx.array, conv: nn.Conv1d | nn.ConvTranspose1d) -> mx.array:
    """A plain (transposed) convolution with bias, channels-last, in two kernels."""
    transposed = isinstance(conv, nn.ConvTranspose1d)
    return sum_taps(taps(x, conv.weight), conv.bias, *stride_padding(conv), transposed)


def _block(x: mx.array, block: Conv1dBlock, film=None, residual=None) -> mx.array:
    return norm_taps(taps(x, block.conv.weight), block.conv.bias, block.norm, film, residual)


def _residual_block(x: mx.array, block: ConditionalResidualBlock1D, film: mx.array) -> mx.array:
    out = _block(x, block.blocks[0], film=film)
    residual = x if isinstance(block.residual_conv, nn.Identity) else conv1d(x, block.residual_conv)
    return _block(out, block.blocks[1], residual=residual)


CUDA_OPS = TrunkOps(
    residual_block=_residual_block,
    conv_block=_block,
    conv=conv1d,
    concat=MODULE_OPS.concat,  # channels last, as the modules
)


def denoise(unet: ConditionalUnet1D, sample: mx.array, films: list[mx.array]) -> mx.array:
    """``unet.forward_film`` in this form. sample: (B, T, input_dim); films: (B, m) per block."""
    return unet.forward_film(sample, films, CUDA_OPS)


class FusedUnetBackend(GenericBackend):
    """The generic chunked sampler with this module's trunk: on CUDA, the batches and samplers the
    persistent sampler kernel does not take."""

    inpaints = False  # its kernels have no vector-Jacobian product: the generic backend guides

    def __init__(self, unet: ConditionalUnet1D):
        super().__init__(UnetTrunk(unet, denoise))

    def supports(self, batch: int, horizon: int, scheduler: Scheduler) -> bool:
        return available()

    def evaluate(self, x: mx.array) -> None:
        # The conditioning evaluated with the trajectory may hold the image trunk's persistent kernel.
        with LAUNCH_LOCK:
            mx.eval(x)
