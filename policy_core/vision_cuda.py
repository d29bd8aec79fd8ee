"""The image encoder's ResNet18-GN trunk on MLX's CUDA backend, for inference: two kernels per convolution.

On CUDA the module trunk costs ~1.5 ms for two 84x84 images on an H200, a chain of ~60 small kernels
(cuDNN convolutions and GroupNorm's reductions and elementwise passes), not arithmetic
(benchmarks/NOTES.md). Here each 3x3 or 1x1 convolution of the BasicBlocks is

1. one cuBLAS product ``x (N*H*W, in) @ W (out*kh*kw, in)^T`` giving every tap's contribution at every
   input pixel (MLX's (out, kh, kw, in) weight is that matrix as a free view), and
2. one kernel that sums the taps landing on each output pixel (stride and zero padding) and applies
   GroupNorm [+ the residual] [+ ReLU], one thread block per (group, image).

The stem's 7x7 convolution stays MLX's (its taps would be 49 per pixel); its GroupNorm + ReLU is the same
kernel over its output. Same parameters and results as ``ResNet18Trunk`` (tests/test_vision.py, on a
GPU); no gradients (the custom kernels have none), so only the inference conditioning uses it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from policy_core import unet_cuda
from policy_core.vision import BasicBlock, ResNet18Trunk

# z: taps (B, H, W, CH, KH * KW) at the input pixels; out: (B, HO, WO, CH). One block per (group, image);
# each thread keeps its PER values in registers between the statistics and the output where PER <= 32,
# and sums their taps again where it has more (the stem's GroupNorm: one tap each).
_NORM2D_SOURCE = """
  constexpr int CG = CH / GROUPS;
  constexpr int N = HO * WO * CG;
  constexpr int PER = (N + THREADS - 1) / THREADS;
  constexpr bool KEEP = PER <= 32;
  const int g = blockIdx.x, b = blockIdx.y;
  __shared__ float scratch[32];
  auto value = [&](int i) {
    const int pixel = i / CG, ch = g * CG + i % CG, oy = pixel / WO, ox = pixel % WO;
    float v = 0.f;
    for (int ky = 0; ky < KH; ++ky) {
      const int iy = oy * STRIDE + ky - PAD;
      if (iy < 0 || iy >= H) continue;
      for (int kx = 0; kx < KW; ++kx) {
        const int ix = ox * STRIDE + kx - PAD;
        if (ix < 0 || ix >= W) continue;
        v += static_cast<float>(z[((((size_t)b * H + iy) * W + ix) * CH + ch) * (KH * KW) + ky * KW + kx]);
      }
    }
    return v;
  };
  float vals[KEEP ? PER : 1];
  float s = 0.f;
  for (int j = 0; j < PER; ++j) {
    const int i = threadIdx.x + j * THREADS;
    const float v = i < N ? value(i) : 0.f;
    if (KEEP) vals[j] = v;
    s += v;
  }
  const float mean = block_sum(s, scratch) / N;
  float q = 0.f;
  for (int j = 0; j < PER; ++j) {
    const int i = threadIdx.x + j * THREADS;
    if (i >= N) break;
    const float d = (KEEP ? vals[j] : value(i)) - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(block_sum(q, scratch) / N + (float)EPS);
  for (int j = 0; j < PER; ++j) {
    const int i = threadIdx.x + j * THREADS;
    if (i >= N) break;
    const int pixel = i / CG, ch = g * CG + i % CG;
    const size_t at = ((size_t)b * HO * WO + pixel) * CH + ch;
    float v = ((KEEP ? vals[j] : value(i)) - mean) * rstd * static_cast<float>(gamma[ch]);
    v += static_cast<float>(beta[ch]);
    if (RES) v += static_cast<float>(res[at]);
    if (RELU) v = fmaxf(v, 0.f);
    out[at] = static_cast<T>(v);
  }
"""


def supports(trunk: ResNet18Trunk) -> bool:
    """Whether this trunk can run here in this form: a CUDA device and GroupNorm (not frozen BatchNorm)."""
    return unet_cuda.available() and isinstance(trunk.bn1, nn.GroupNorm)


def taps2d(x: mx.array, weight: mx.array) -> mx.array:
    """Each tap's contribution at every input pixel: (B, H, W, in) -> (B, H, W, out, kh * kw)."""
    batch, height, width, in_channels = x.shape
    out_channels, kh, kw, _ = weight.shape
    z = x.reshape(-1, in_channels) @ weight.reshape(out_channels * kh * kw, in_channels).T
    return z.reshape(batch, height, width, out_channels, kh * kw)


def norm_taps2d(
    z: mx.array,
    kernel_size: tuple[int, int],
    stride: int,
    padding: int,
    norm: nn.GroupNorm,
    residual: mx.array | None = None,
    relu: bool = True,
) -> mx.array:
    """[ReLU](GroupNorm(the convolution summed from its taps ``z``) [+ residual]), float32 arithmetic."""
    batch, height, width, channels, _ = z.shape
    kh, kw = kernel_size
    out_h = (height + 2 * padding - kh) // stride + 1
    out_w = (width + 2 * padding - kw) // stride + 1
    values = out_h * out_w * channels // norm.num_groups
    threads = 256 if values <= 256 * 32 else 512
    gamma, beta, residual = unet_cuda.same_dtype(z.dtype, norm.weight, norm.bias, residual)
    header = f"#define EPS {norm.eps!r}\n#define THREADS {threads}\n{unet_cuda.BLOCK_SUM}"
    name = f"dpmlx_taps2d_group_norm_eps{unet_cuda.eps_tag(norm.eps)}_threads{threads}"
    kernel = unet_cuda.cached_kernel(name, ["z", "gamma", "beta", "res"], _NORM2D_SOURCE, header)
    return kernel(
        # An unused input is never read (RES 0): pass any array rather than make one.
        inputs=[z, gamma, beta, gamma if residual is None else residual],
        template=[
            ("T", z.dtype),
            ("H", height),
            ("W", width),
            ("HO", out_h),
            ("WO", out_w),
            ("CH", channels),
            ("KH", kh),
            ("KW", kw),
            ("STRIDE", stride),
            ("PAD", padding),
            ("GROUPS", norm.num_groups),
            ("RES", int(residual is not None)),
            ("RELU", int(relu)),
        ],
        grid=(norm.num_groups * threads, batch, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(batch, out_h, out_w, channels)],
        output_dtypes=[z.dtype],
    )[0]


def _conv_norm(
    x: mx.array, conv: nn.Conv2d, norm: nn.GroupNorm, residual: mx.array | None = None, relu: bool = True
) -> mx.array:
    kh, kw = conv.weight.shape[1:3]
    return norm_taps2d(
        taps2d(x, conv.weight), (kh, kw), conv.stride[0], conv.padding[0], norm, residual, relu
    )


def _basic_block(x: mx.array, block: BasicBlock) -> mx.array:
    out = _conv_norm(x, block.conv1, block.bn1)
    identity = x
    if "downsample" in block:
        conv, norm = block.downsample
        identity = _conv_norm(x, conv, norm, relu=False)
    return _conv_norm(out, block.conv2, block.bn2, residual=identity)


def trunk(module: ResNet18Trunk, x: mx.array) -> mx.array:
    """``module(x)`` in this form (see ``supports``). x: (N, H, W, C) -> (N, h, w, 512)."""
    stem = module.conv1(x)
    x = module.maxpool(norm_taps2d(stem[..., None], (1, 1), 1, 0, module.bn1))
    for block in module.layer1 + module.layer2 + module.layer3 + module.layer4:
        x = _basic_block(x, block)
    return x
