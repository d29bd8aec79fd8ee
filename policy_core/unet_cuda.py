"""The sampler's ConditionalUnet1D trunk on MLX's CUDA backend: cuDNN convolutions plus one fused kernel
for everything between two convolutions.

At batch 1 a step is bound by the number of kernels, not by bytes (benchmarks/NOTES.md): the module path
spends ~8 small kernels per Conv1dBlock after the convolution (bias, the GroupNorm transposes and
statistics, affine, mish, FiLM, residual). ``fused_norm`` does conv bias + GroupNorm + mish + FiLM (scale
and bias, or bias) + residual add in one kernel, one thread block per (sample, group). Channels-last
(B, T, C) throughout, so MLX's own (cuDNN) convolutions run unchanged.

Same parameters and results as ``ConditionalUnet1D.forward_film`` (checked on the GPU by
tests/test_unet_inference.py). Only used where ``available()``; the pure-MLX trunks serve elsewhere.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from policy_core.unet import ConditionalResidualBlock1D, ConditionalUnet1D, Conv1dBlock

THREADS = 256

_HEADER = """
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

# y: conv output without bias (B, T, C); bias/gamma/beta: (C,); film: (B, 2C) (FILM 1), (B, C) (FILM 2) or
# unused (FILM 0); res: (B, T, C) (RES 1) or unused. Grid: one block per (group, sample).
_SOURCE = """
  constexpr int CG = CH / GROUPS;
  constexpr int N = LEN * CG;
  const int g = blockIdx.x, b = blockIdx.y;
  __shared__ float scratch[32];
  const size_t base = (size_t)b * LEN * CH + g * CG;
  float s = 0.f;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const int t = i / CG, c = i % CG;
    s += static_cast<float>(y[base + (size_t)t * CH + c]) + static_cast<float>(bias[g * CG + c]);
  }
  const float mean = block_sum(s, scratch) / N;
  float q = 0.f;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const int t = i / CG, c = i % CG;
    const float d =
        static_cast<float>(y[base + (size_t)t * CH + c]) + static_cast<float>(bias[g * CG + c]) - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(block_sum(q, scratch) / N + (float)EPS);
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const int t = i / CG, c = i % CG, ch = g * CG + c;
    const size_t at = base + (size_t)t * CH + c;
    float v = (static_cast<float>(y[at]) + static_cast<float>(bias[ch]) - mean) * rstd;
    v = v * static_cast<float>(gamma[ch]) + static_cast<float>(beta[ch]);
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

_kernels: dict[float, object] = {}


def available() -> bool:
    """True where the fused kernel can run: MLX's CUDA backend is the default device."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def fused_norm(
    y: mx.array,
    bias: mx.array,
    norm: nn.GroupNorm,
    film: mx.array | None = None,
    residual: mx.array | None = None,
) -> mx.array:
    """mish(GroupNorm(y + bias)) [* scale + shift | + shift] [+ residual] on (B, T, C) in one kernel.

    film: (B, 2C) scale-then-shift, (B, C) shift, or None. Statistics and arithmetic in float32.
    """
    if norm.eps not in _kernels:
        _kernels[norm.eps] = mx.fast.cuda_kernel(
            name="dpmlx_conv_bias_group_norm_mish_film",
            input_names=["y", "bias", "gamma", "beta", "film", "res"],
            output_names=["out"],
            source=_SOURCE,
            header=f"#define EPS {norm.eps!r}\n{_HEADER}",
        )
    batch, length, channels = y.shape
    film_mode = 0 if film is None else (1 if film.shape[-1] == 2 * channels else 2)
    placeholder = mx.zeros((1,), dtype=y.dtype)
    return _kernels[norm.eps](
        inputs=[
            y,
            bias,
            norm.weight,
            norm.bias,
            placeholder if film is None else film,
            placeholder if residual is None else residual,
        ],
        template=[
            ("T", y.dtype),
            ("LEN", length),
            ("CH", channels),
            ("GROUPS", norm.num_groups),
            ("FILM", film_mode),
            ("RES", int(residual is not None)),
        ],
        grid=(norm.num_groups * THREADS, batch, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[y.shape],
        output_dtypes=[y.dtype],
    )[0]


def _conv(x: mx.array, conv: nn.Conv1d) -> mx.array:
    """The convolution without its bias (the fused kernel adds it)."""
    return mx.conv1d(x, conv.weight, stride=conv.stride, padding=conv.padding)


def _block(x: mx.array, block: Conv1dBlock, film=None, residual=None) -> mx.array:
    return fused_norm(_conv(x, block.conv), block.conv.bias, block.norm, film, residual)


def _residual_block(x: mx.array, block: ConditionalResidualBlock1D, film: mx.array) -> mx.array:
    out = _block(x, block.blocks[0], film=film)
    residual = block.residual_conv(x)
    return _block(out, block.blocks[1], residual=residual)


def denoise(unet: ConditionalUnet1D, sample: mx.array, films: list[mx.array]) -> mx.array:
    """``unet.forward_film`` with fused kernels. sample: (B, T, input_dim); films: (B, m) per block."""
    films = iter(films)
    x = sample
    skips = []
    for resnet, resnet2, downsample in unet.down_modules:
        x = _residual_block(x, resnet, next(films))
        x = _residual_block(x, resnet2, next(films))
        skips.append(x)
        x = downsample(x)
    for resnet in unet.mid_modules:
        x = _residual_block(x, resnet, next(films))
    for resnet, resnet2, upsample in unet.up_modules:
        x = mx.concatenate([x, skips.pop()], axis=-1)
        x = _residual_block(x, resnet, next(films))
        x = _residual_block(x, resnet2, next(films))
        x = upsample(x)
    final_block, final_conv = unet.final_conv
    return final_conv(_block(x, final_block))
