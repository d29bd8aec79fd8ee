"""Inference on MLX's CUDA backend: persistent kernels for the denoising loop and the image trunk, fused
kernels for the UNet beyond the sampler kernel's batch sizes (see ``policy_core/backends/README.md``)."""

from __future__ import annotations

from policy_core.backends.base import Backend
from policy_core.backends.cuda.device import available, use_direct_launches
from policy_core.backends.cuda.fused_unet import FusedUnetBackend
from policy_core.backends.cuda.sampler import CudaSampler
from policy_core.nets.unet import ConditionalUnet1D

__all__ = ["available", "backends", "use_direct_launches"]


def backends(unet: ConditionalUnet1D) -> list[Backend]:
    """The sampler kernel first, then the chunked sampler with fused kernels; each declines requests
    where MLX's default device is not CUDA."""
    return [CudaSampler(unet), FusedUnetBackend(unet)]
