"""The sampler's ConditionalUnet1D trunk: every convolution as one matrix multiply, channels first.

At batch 1 a denoising step is a string of matrix-vector-like products (the activations have 4 to 16
time steps) whose cost is reading the weights. Written as ``W (out, k*in) @ columns (k*in, B*T)``, the
weight is the large left operand that BLAS and cuBLAS stream once, and the product comes out in the
(channels, batch, time) layout the next layer reads, so there are no transposed copies between layers.
MLX's conv weight layout (out, k, in) is already ``W`` after a free reshape: nothing is duplicated, and
a hot-loaded or EMA weight is used as is.

Same parameters and results as ``ConditionalUnet1D.forward_film`` (tests hold them to 1e-5); training
keeps the module path. ``denoise_for_gradients`` is the same trunk with mish's derivative written as one
expression, for the guided sampler's backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from policy_core.nets.unet import (
    ConditionalResidualBlock1D,
    ConditionalUnet1D,
    Conv1dBlock,
    TrunkOps,
    mish,
    stride_padding,
)


def _columns(x: mx.array, kernel: int, stride: int, padding: int) -> mx.array:
    """im2col of (C, B, T) -> (kernel * C, B * T_out), rows ordered (tap, channel) like MLX's weights."""
    channels, batch, length = x.shape
    if kernel == 1 and stride == 1 and padding == 0:
        return x.reshape(channels, batch * length)
    padded = mx.pad(x, [(0, 0), (0, 0), (padding, padding)])
    span = length + 2 * padding
    out_length = (span - kernel) // stride + 1
    taps = mx.as_strided(padded, (kernel, channels, batch, out_length), (1, batch * span, span, stride))
    return taps.reshape(kernel * channels, batch * out_length)


def conv1d(x: mx.array, conv: nn.Conv1d) -> mx.array:
    """``conv`` (zero padding, no dilation or groups) on (C_in, B, T) -> (C_out, B, T_out)."""
    out_channels, kernel, in_channels = conv.weight.shape
    stride, padding = stride_padding(conv)
    batch = x.shape[1]
    cols = _columns(x, kernel, stride, padding)
    y = mx.addmm(conv.bias[:, None], conv.weight.reshape(out_channels, kernel * in_channels), cols)
    return y.reshape(out_channels, batch, -1)


def upsample1d(x: mx.array, conv: nn.ConvTranspose1d) -> mx.array:
    """Upstream's Upsample1d, ConvTranspose1d(kernel 4, stride 2, padding 1), on (C, B, T) -> (C, B, 2T).

    Output 2m gets tap 1 of x[m] and tap 3 of x[m-1]; output 2m+1 gets tap 0 of x[m+1] and tap 2 of
    x[m]. Both phases are one product of the whole (out, 4*in) weight with columns that hold zeros in
    the taps a phase does not use: the weight is read once, and the activations are tiny. (MLX's CPU
    transposed convolution takes ~25x longer than this on these shapes.)
    """
    out_channels, kernel, in_channels = conv.weight.shape
    stride, padding = stride_padding(conv)
    if (kernel, stride, padding) != (4, 2, 1):
        raise ValueError(f"upsample1d needs kernel 4, stride 2, padding 1; got {kernel}, {stride}, {padding}")
    channels, batch, length = x.shape
    padded = mx.pad(x, [(0, 0), (0, 0), (1, 1)])
    previous, current, following = (padded[:, :, i : i + length] for i in range(3))
    zeros = mx.zeros_like(current)
    even = mx.stack([zeros, current, zeros, previous])
    odd = mx.stack([following, zeros, current, zeros])
    cols = mx.stack([even, odd], axis=-1).reshape(kernel * channels, batch * length * 2)
    y = mx.addmm(conv.bias[:, None], conv.weight.reshape(out_channels, kernel * in_channels), cols)
    return y.reshape(out_channels, batch, 2 * length)


@mx.custom_function
def differentiable_mish(x: mx.array) -> mx.array:
    """``mish`` with a vector-Jacobian product of one fused expression (below)."""
    return mish(x)


@differentiable_mish.vjp
def _mish_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    """mish'(x) = t + x (1 - t^2) sigmoid(x), t = tanh(softplus(x)), from mish's one exp: MLX's derivative
    of each of mish's operations made a guided step's backward pass ~20% slower on the CPU."""
    x32 = x.astype(mx.float32)
    e = mx.exp(mx.minimum(x32, 20.0))
    n = e * (e + 2.0)
    t = n / (n + 2.0)
    return (cotangent.astype(mx.float32) * (t + x32 * (1.0 - t * t) * e / (1.0 + e))).astype(x.dtype)


Activation = Callable[[mx.array], mx.array]


def group_norm_mish(x: mx.array, norm: nn.GroupNorm, activation: Activation = mish) -> mx.array:
    """mish(GroupNorm(x)) on (C, B, T), torch semantics, statistics in float32."""
    channels, batch, length = x.shape
    groups = norm.num_groups
    xg = x.astype(mx.float32).reshape(groups, channels // groups, batch, length)
    count = (channels // groups) * length
    mean = xg.sum(axis=(1, 3), keepdims=True) / count
    centred = xg - mean
    var = mx.square(centred).sum(axis=(1, 3), keepdims=True) / count
    y = (centred * mx.rsqrt(var + norm.eps)).reshape(channels, batch, length)
    return activation(y * norm.weight[:, None, None] + norm.bias[:, None, None]).astype(x.dtype)


def _block(x: mx.array, block: Conv1dBlock, activation: Activation = mish) -> mx.array:
    return group_norm_mish(conv1d(x, block.conv), block.norm, activation)


def _residual_block(
    x: mx.array, block: ConditionalResidualBlock1D, film: mx.array, activation: Activation = mish
) -> mx.array:
    """film: (B, 2*out or out), the block's FiLM vector."""
    out = _block(x, block.blocks[0], activation)
    film = film.T[:, :, None]
    channels = block.out_channels
    out = film[:channels] * out + film[channels:] if block.cond_predict_scale else out + film
    out = _block(out, block.blocks[1], activation)
    residual = x if isinstance(block.residual_conv, nn.Identity) else conv1d(x, block.residual_conv)
    return out + residual


def _conv(x: mx.array, conv: nn.Conv1d | nn.ConvTranspose1d) -> mx.array:
    return upsample1d(x, conv) if isinstance(conv, nn.ConvTranspose1d) else conv1d(x, conv)


CHANNELS_FIRST_OPS = TrunkOps(
    residual_block=_residual_block,
    conv_block=_block,
    conv=_conv,
    concat=lambda x, skip: mx.concatenate([x, skip], axis=0),
)
GRADIENT_OPS = TrunkOps(
    residual_block=partial(_residual_block, activation=differentiable_mish),
    conv_block=partial(_block, activation=differentiable_mish),
    conv=_conv,
    concat=CHANNELS_FIRST_OPS.concat,
)


def denoise(unet: ConditionalUnet1D, sample: mx.array, films: list[mx.array]) -> mx.array:
    """``unet.forward_film`` in the channels-first GEMM form: same arguments, same result.

    sample: (B, T, input_dim); films: one (B, 2*out or out) per residual block, in forward order.
    """
    return unet.forward_film(sample.transpose(2, 0, 1), films, CHANNELS_FIRST_OPS).transpose(1, 2, 0)


def denoise_for_gradients(unet: ConditionalUnet1D, sample: mx.array, films: list[mx.array]) -> mx.array:
    """``denoise`` with ``differentiable_mish``: the same values, a cheaper backward pass."""
    return unet.forward_film(sample.transpose(2, 0, 1), films, GRADIENT_OPS).transpose(1, 2, 0)
