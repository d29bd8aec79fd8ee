"""ConditionalUnet1D of Diffusion Policy (real-stanford/diffusion_policy), in MLX.

Layout is channels-last: trajectories are (B, T, C) throughout. The architecture follows upstream exactly
(same blocks, FiLM with the first half of the conditioning projection as scale and the second half as
bias, an Upsample1d on every up level, the level-0 skip left unused, a final Conv1dBlock with 8 groups),
so parameter counts equal upstream's and PyTorch weights map 1:1.

Besides the reference ``__call__`` used for training, the model exposes the pieces the sampler needs to
compute the FiLM conditioning of every step once per request (``encode_timesteps``, ``residual_blocks``)
and to run the trunk on precomputed FiLM vectors (``forward_film``, which the backends run in their own
forms, ``policy_core/backends``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def mish(x: mx.array) -> mx.array:
    """x * tanh(softplus(x)) with one exp: tanh(log(1 + e)) = n / (n + 2) for n = e (e + 2), e = exp(x).

    Equal to ``nn.mish`` within 2e-6 and faster on CPU, where transcendentals dominate small
    activations. Computed in float32 (n overflows float16 past x ~ 5.5); clamping x at 20 changes nothing
    in float32, where n / (n + 2) is already 1 there.
    """
    x32 = x.astype(mx.float32)
    e = mx.exp(mx.minimum(x32, 20.0))
    n = e * (e + 2.0)
    return (x32 * n / (n + 2.0)).astype(x.dtype)


def sinusoidal_embedding(timesteps: mx.array, dim: int) -> mx.array:
    """(N,) timesteps -> (N, dim) as upstream's SinusoidalPosEmb: [sin(t f), cos(t f)]."""
    half = dim // 2
    freqs = mx.exp(mx.arange(half, dtype=mx.float32) * -(math.log(10000.0) / (half - 1)))
    args = timesteps.astype(mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.sin(args), mx.cos(args)], axis=-1)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        # pytorch_compatible: groups of contiguous channels, as torch.nn.GroupNorm.
        self.norm = nn.GroupNorm(n_groups, out_channels, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        return mish(self.norm(self.conv(x)))


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1dBlocks with FiLM conditioning in between, plus a residual connection."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        kernel_size: int,
        n_groups: int,
        cond_predict_scale: bool,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.cond_predict_scale = cond_predict_scale
        self.blocks = [
            Conv1dBlock(in_channels, out_channels, kernel_size, n_groups),
            Conv1dBlock(out_channels, out_channels, kernel_size, n_groups),
        ]
        # Applied to mish(cond); with scale prediction the first half is the scale, the second the bias.
        self.cond_encoder = nn.Linear(cond_dim, 2 * out_channels if cond_predict_scale else out_channels)
        self.residual_conv = (
            nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def __call__(self, x: mx.array, film: mx.array) -> mx.array:
        """x: (B, T, in); film: (B, 2*out or out) = cond_encoder(mish(cond))."""
        out = self.blocks[0](x)
        film = film[:, None, :]
        if self.cond_predict_scale:
            out = film[..., : self.out_channels] * out + film[..., self.out_channels :]
        else:
            out = out + film
        out = self.blocks[1](out)
        return out + self.residual_conv(x)


@dataclass(frozen=True)
class TrunkOps:
    """How ``forward_film`` computes the trunk's pieces; the topology is written once, there."""

    residual_block: Callable[[mx.array, ConditionalResidualBlock1D, mx.array], mx.array]
    conv_block: Callable[[mx.array, Conv1dBlock], mx.array]
    conv: Callable[[mx.array, nn.Conv1d | nn.ConvTranspose1d], mx.array]  # Down/Upsample1d, final 1x1
    concat: Callable[[mx.array, mx.array], mx.array]  # an up level's input with its skip, along channels


def stride_padding(conv: nn.Conv1d | nn.ConvTranspose1d) -> tuple[int, int]:
    """A 1-D (transposed) convolution's stride and padding as ints, for the trunks that do its work."""
    first = [value if isinstance(value, int) else value[0] for value in (conv.stride, conv.padding)]
    return first[0], first[1]


def conv_output_length(length: int, kernel: int, stride: int, padding: int, transposed: bool) -> int:
    """Output length of a 1-D convolution, or of a transposed one, over ``length`` positions."""
    if transposed:
        return (length - 1) * stride - 2 * padding + kernel
    return (length + 2 * padding - kernel) // stride + 1


MODULE_OPS = TrunkOps(
    residual_block=lambda x, block, film: block(x, film),
    conv_block=lambda x, block: block(x),
    conv=lambda x, conv: conv(x),
    concat=lambda x, skip: mx.concatenate([x, skip], axis=-1),
)


class ConditionalUnet1D(nn.Module):
    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        diffusion_step_embed_dim: int = 256,
        down_dims: tuple[int, ...] = (256, 512, 1024),
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ):
        super().__init__()
        dsed = diffusion_step_embed_dim
        self.step_embed_dim = dsed
        self.diffusion_step_encoder = [nn.Linear(dsed, dsed * 4), nn.Linear(dsed * 4, dsed)]
        cond_dim = dsed + global_cond_dim

        def crb(cin: int, cout: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(cin, cout, cond_dim, kernel_size, n_groups, cond_predict_scale)

        all_dims = [input_dim, *down_dims]
        in_out = list(zip(all_dims[:-1], all_dims[1:], strict=True))
        self.down_modules = []
        for i, (cin, cout) in enumerate(in_out):
            is_last = i == len(in_out) - 1
            down = nn.Identity() if is_last else nn.Conv1d(cout, cout, 3, stride=2, padding=1)
            self.down_modules.append([crb(cin, cout), crb(cout, cout), down])
        mid = down_dims[-1]
        self.mid_modules = [crb(mid, mid), crb(mid, mid)]
        # Upstream's is_last test on the up path is never true: every up level upsamples.
        self.up_modules = [
            [crb(cout * 2, cin), crb(cin, cin), nn.ConvTranspose1d(cin, cin, 4, stride=2, padding=1)]
            for cin, cout in reversed(in_out[1:])
        ]
        # The final Conv1dBlock uses the default 8 groups, not n_groups (as upstream).
        self.final_conv = [
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size),
            nn.Conv1d(down_dims[0], input_dim, 1),
        ]

    @property
    def dtype(self) -> mx.Dtype:
        return self.final_conv[1].weight.dtype

    def residual_blocks(self) -> list[ConditionalResidualBlock1D]:
        """All FiLM blocks in forward order; ``forward_film`` consumes one film per entry."""
        blocks = [b for level in self.down_modules for b in level[:2]]
        blocks += self.mid_modules
        blocks += [b for level in self.up_modules for b in level[:2]]
        return blocks

    def encode_timesteps(self, timesteps: mx.array) -> mx.array:
        """(N,) integer timesteps -> (N, dsed) step embeddings."""
        h = sinusoidal_embedding(timesteps, self.step_embed_dim)
        return self.diffusion_step_encoder[1](mish(self.diffusion_step_encoder[0](h)))

    def forward_film(self, sample: mx.array, films: list[mx.array], ops: TrunkOps | None = None) -> mx.array:
        """Denoiser trunk given precomputed per-block FiLM vectors (B, m), in forward order.

        sample: (B, T, input_dim), or whatever layout ``ops`` works in (the sampler's fast trunks pass
        their own ``TrunkOps``; the default runs the modules, the reference path used for training).
        """
        ops = ops or MODULE_OPS
        films = iter(films)
        x = sample
        skips = []
        for resnet, resnet2, downsample in self.down_modules:
            x = ops.residual_block(x, resnet, next(films))
            x = ops.residual_block(x, resnet2, next(films))
            skips.append(x)
            if not isinstance(downsample, nn.Identity):
                x = ops.conv(x, downsample)
        for resnet in self.mid_modules:
            x = ops.residual_block(x, resnet, next(films))
        # Only len(up_modules) skips are consumed: the level-0 skip is never used (as upstream).
        for resnet, resnet2, upsample in self.up_modules:
            x = ops.concat(x, skips.pop())
            x = ops.residual_block(x, resnet, next(films))
            x = ops.residual_block(x, resnet2, next(films))
            x = ops.conv(x, upsample)
        final_block, final_conv = self.final_conv
        return ops.conv(ops.conv_block(x, final_block), final_conv)

    def __call__(self, sample: mx.array, timestep: mx.array | int, global_cond: mx.array) -> mx.array:
        """Reference path. sample (B, T, input_dim); timestep scalar or (B,); global_cond (B, G)."""
        batch = sample.shape[0]
        timestep = mx.broadcast_to(mx.array(timestep), (batch,))
        cond = mish(mx.concatenate([self.encode_timesteps(timestep), global_cond], axis=-1))
        films = [blk.cond_encoder(cond) for blk in self.residual_blocks()]
        return self.forward_film(sample, films)
