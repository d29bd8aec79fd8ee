"""The ways a policy's inference runs on this machine, behind one interface (``base.Backend``).

- ``generic``: the denoising loop as ``mx.compile``d MLX operations, the UNet as matrix products
  (``matmul_unet``), the transformer's decoder on its memory computed once: Metal, the CPU, and the
  fallback everywhere.
- ``cuda``: MLX's CUDA backend: the whole loop as one persistent kernel (``cuda.sampler``), the image
  trunk as another (``cuda.trunk``), observations in host memory the GPU reads (``cuda.host_arrays``),
  and the generic loop with fused UNet kernels for what the sampler kernel does not take
  (``cuda.fused_unet``).
- ``cpu_blas``: binds MLX's CPU products to an optimised BLAS (with ``cblas_shim.c``); it runs when
  ``policy_core`` is imported, before anything imports ``mlx.core``, so this package imports nothing at
  its top.

See README.md in this folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policy_core.backends.base import Backend
    from policy_core.nets.transformer import TransformerForDiffusion
    from policy_core.nets.unet import ConditionalUnet1D


def for_unet(unet: ConditionalUnet1D) -> list[Backend]:
    """The backends for ``unet`` on this machine, in the order a policy asks them; the last, the generic
    one, takes every request."""
    import mlx.core as mx  # here, not at the top: see the module's docstring

    from policy_core.backends.generic import GenericBackend, UnetTrunk

    found: list[Backend] = []
    if mx.cuda.is_available():
        from policy_core.backends import cuda

        found += cuda.backends(unet)
    return [*found, GenericBackend(UnetTrunk(unet))]


def for_transformer(transformer: TransformerForDiffusion) -> list[Backend]:
    """The backends for ``transformer``: the generic one everywhere (the CUDA kernels are the UNet's)."""
    from policy_core.backends.generic import GenericBackend, TransformerTrunk

    return [GenericBackend(TransformerTrunk(transformer))]
