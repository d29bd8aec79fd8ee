"""The denoising loop as MLX operations: the path of Metal and the CPU, and the fallback everywhere.

The loop runs in ``mx.compile``d chunks of up to ``STEPS_PER_CALL`` steps that take the scheduler's
coefficients as inputs, so one trace serves every step count and position in the schedule (DDIM-10 is one
call, DDPM-100 ten) and the scheduler's update is compiled with the denoiser. MLX re-specialises a chunk
per batch size and dtype. Shorter chunks pay more host time per step, longer ones trace longer (an
unrolled 100-step trace took over a minute: benchmarks/NOTES.md).

A denoiser runs in the loop as a ``Trunk``: the network's step given its share of the request's
conditioning (``UnetTrunk``: the blocks' FiLM rows; ``TransformerTrunk``: the decoder layers' memory keys
and values).

Inpainting (real-time chunking, ``policy_core/rtc.py``) runs in chunks of the same kind. Replacement
sets the known actions to the target re-noised to the step's level before every step. Guidance is the
paper's pseudo-inverse guidance (PiGDM) carried over from its flow parameterisation to DDIM/DDPM's: with
a = the step's cumulative alpha, the denoised estimate x0 = (x - sqrt(1 - a) eps) / sqrt(a) is pulled
toward the target y through g = J^T W (y - x0), J = dx0/dx (one backward pass of the trunk:
``mx.value_and_grad`` of 1/2 sum W (y - x0)^2), and the step uses eps - sqrt(a) w g, i.e. the estimate
x0 + sqrt(1 - a) w g, with w = min(max_guidance, 1 / sqrt(a (1 - a))). That is the paper's guided
velocity at the same signal-to-noise ratio (flow time tau = sqrt(a) / (sqrt(a) + sqrt(1 - a)): its
weight (1 - tau) / tau / r^2 with r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2) is 1 / sqrt(a (1 - a))),
integrated by the scheduler's own update instead of an Euler step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from itertools import accumulate
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from policy_core.backends import matmul_unet
from policy_core.backends.base import Backend, Inpainting
from policy_core.nets.transformer import TransformerForDiffusion
from policy_core.nets.unet import ConditionalUnet1D
from policy_core.schedulers import Scheduler

STEPS_PER_CALL = 10
"""Denoising steps per compiled call: longer chunks trace longer, shorter ones pay more host overhead."""

Denoise = Callable[[ConditionalUnet1D, mx.array, list[mx.array]], mx.array]
"""``ConditionalUnet1D.forward_film`` in some form: (unet, x (B, T, A), per-block FiLM rows) -> output."""


class Trunk(ABC):
    """A denoiser as the chunked sampler runs it: one step of the network given that step's share of the
    conditioning the policy computed for the request (``Backend.sample``'s ``conditioning``)."""

    module: nn.Module
    """The network: its arrays are inputs of the compiled chunks, so replaced weights are read."""

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype the network computes in."""
        return self.module.dtype

    @abstractmethod
    def split(self, conditioning: mx.array) -> Any:
        """A chunk's conditioning (S, ...) in the form ``__call__`` takes a step of (once per chunk)."""

    @abstractmethod
    def __call__(self, x: mx.array, conditioning: Any, j: int) -> mx.array:
        """The network's output for x (B, T, A) in ``dtype`` at step ``j`` of the chunk."""

    def for_gradients(self, x: mx.array, conditioning: Any, j: int) -> mx.array:
        """``__call__`` in the form guidance differentiates (``mx.value_and_grad`` through it)."""
        return self(x, conditioning, j)


class UnetTrunk(Trunk):
    """A ``ConditionalUnet1D`` given the blocks' FiLM rows, its trunk in the form ``denoise`` (by default
    ``matmul_unet``'s, built for batch 1 on the CPU and Metal)."""

    def __init__(
        self,
        unet: ConditionalUnet1D,
        denoise: Denoise = matmul_unet.denoise,
        denoise_for_gradients: Denoise = matmul_unet.denoise_for_gradients,
    ):
        self.module = unet
        self._denoise = denoise
        self._denoise_for_gradients = denoise_for_gradients

    def split(self, conditioning: mx.array) -> list[mx.array]:
        """(S, B, sum of the blocks' m) float32 -> one (S, B, m) per block, in the UNet's dtype."""
        widths = [blk.cond_encoder.weight.shape[0] for blk in self.module.residual_blocks()]
        films = mx.split(conditioning, list(accumulate(widths[:-1])), axis=-1)
        return [f.astype(self.dtype) for f in films]

    def __call__(self, x: mx.array, conditioning: list[mx.array], j: int) -> mx.array:
        return self._denoise(self.module, x, [f[j] for f in conditioning])

    def for_gradients(self, x: mx.array, conditioning: list[mx.array], j: int) -> mx.array:
        return self._denoise_for_gradients(self.module, x, [f[j] for f in conditioning])


class TransformerTrunk(Trunk):
    """A ``TransformerForDiffusion``'s decoder given the memory's keys and values
    (``memory_keys_values``): the memory is computed once per request, not once per step."""

    def __init__(self, transformer: TransformerForDiffusion):
        self.module = transformer

    def split(self, conditioning: mx.array) -> mx.array:
        return conditioning.astype(self.dtype)

    def __call__(self, x: mx.array, conditioning: mx.array, j: int) -> mx.array:
        return self.module.decode(x, conditioning[j])


class GenericBackend(Backend):
    """The chunked sampler of one denoiser, run as ``trunk``."""

    name = "chunked sampler"
    inpaints = True  # the trunk is MLX operations, which mx.value_and_grad differentiates

    def __init__(self, trunk: Trunk):
        self.trunk = trunk
        self._compiled: dict[tuple, Callable[..., mx.array]] = {}

    def supports(self, batch: int, horizon: int, scheduler: Scheduler) -> bool:
        return True

    def sample(
        self,
        scheduler: Scheduler,
        x: mx.array,
        conditioning: mx.array,
        step_noise: mx.array,
        inpainting: Inpainting | None = None,
    ) -> np.ndarray:
        coeffs = scheduler.coefficient_table()
        if inpainting is None:
            steps, known = self._compiled_steps(scheduler), ()
        else:
            steps = self._compiled_inpainting(scheduler, inpainting.guided)
            known = (inpainting.target, inpainting.guide, inpainting.max_guidance, inpainting.replace)
        for start in range(0, len(scheduler.timesteps), STEPS_PER_CALL):
            chunk = slice(start, start + STEPS_PER_CALL)
            x = steps(x, conditioning[chunk], step_noise[chunk], coeffs[chunk], *known)
        self.evaluate(x)
        return np.array(x)

    def evaluate(self, x: mx.array) -> None:
        mx.eval(x)

    def _compiled_steps(self, scheduler: Scheduler) -> Callable[..., mx.array]:
        """The chunk for this kind of scheduler, compiled with the network's arrays as inputs, so that
        replaced weights (an EMA copy, a hot load) are read rather than baked into the trace. ``update``
        depends on the scheduler's kind and config only, the same for every schedule of a policy."""
        kind = (type(scheduler),)
        if kind not in self._compiled:
            steps = partial(self._steps, scheduler.update)
            self._compiled[kind] = mx.compile(steps, inputs=[self.trunk.module.state])
        return self._compiled[kind]

    def _compiled_inpainting(self, scheduler: Scheduler, guided: bool) -> Callable[..., mx.array]:
        """``_inpainting_steps`` compiled as ``_compiled_steps`` is, with or without guidance (a batch of
        replacement rows only needs no backward pass)."""
        epsilon = scheduler.config.prediction_type == "epsilon"
        kind = (type(scheduler), guided, epsilon)
        if kind not in self._compiled:
            steps = partial(self._inpainting_steps, scheduler.update, guided, epsilon)
            self._compiled[kind] = mx.compile(steps, inputs=[self.trunk.module.state])
        return self._compiled[kind]

    def _steps(
        self,
        update: Callable[..., mx.array],
        x: mx.array,
        conditioning: mx.array,
        step_noise: mx.array,
        coeffs: mx.array,
    ) -> mx.array:
        """``len(coeffs)`` consecutive denoising steps: conditioning (S, ...) the steps' conditioning,
        step_noise (S, ...), coeffs (S, 5) the scheduler's per-step coefficients."""
        trunk = self.trunk
        dtype = trunk.dtype
        conditioning = trunk.split(conditioning)
        for j in range(coeffs.shape[0]):
            model_output = trunk(x.astype(dtype), conditioning, j)
            step_coeffs = tuple(coeffs[j, c] for c in range(coeffs.shape[1]))
            # Noise is passed to every step: the table's std is 0 where a step adds none (DDPM's last),
            # and deterministic DDIM ignores it (so it is never computed).
            x = update(model_output.astype(mx.float32), x, step_coeffs, step_noise[j])
        return x

    def _inpainting_steps(
        self,
        update: Callable[..., mx.array],
        guided: bool,
        epsilon: bool,
        x: mx.array,
        conditioning: mx.array,
        step_noise: mx.array,
        coeffs: mx.array,
        target: mx.array,
        guide: mx.array,
        max_guidance: mx.array,
        replace: mx.array,
    ) -> mx.array:
        """``_steps`` with an ``Inpainting``'s arrays (see the module's docstring). Replacement re-noises
        with the step's own noise: where it replaces, that noise is not otherwise used."""
        trunk = self.trunk
        dtype = trunk.dtype
        conditioning = trunk.split(conditioning)
        for j in range(coeffs.shape[0]):
            step_coeffs = tuple(coeffs[j, c] for c in range(coeffs.shape[1]))
            sqrt_beta, sqrt_alpha = step_coeffs[0], step_coeffs[1]  # the step's level, either scheduler
            x = mx.where(replace > 0, sqrt_alpha * target + sqrt_beta * step_noise[j], x)
            if not guided:
                model_output = trunk(x.astype(dtype), conditioning, j).astype(mx.float32)
            else:

                def loss(x: mx.array, j: int = j, level: tuple = (sqrt_beta, sqrt_alpha)) -> tuple:
                    output = trunk.for_gradients(x.astype(dtype), conditioning, j).astype(mx.float32)
                    x0 = (x - level[0] * output) / level[1] if epsilon else output
                    return 0.5 * mx.sum(guide * mx.square(target - x0)), output

                (_, model_output), grad = mx.value_and_grad(loss)(x)
                weight = mx.minimum(max_guidance, 1.0 / (sqrt_alpha * sqrt_beta))
                # -grad = J^T W (y - x0); moving x0 by sqrt(1 - a) w g is moving eps by -sqrt(a) w g.
                if epsilon:
                    model_output = model_output + sqrt_alpha * weight * grad
                else:
                    model_output = model_output - sqrt_beta * weight * grad
            x = update(model_output, x, step_coeffs, step_noise[j])
        return x
