"""The denoising loop as MLX operations: the path of Metal and the CPU, and the fallback everywhere.

The loop runs in ``mx.compile``d chunks of up to ``STEPS_PER_CALL`` steps that take the scheduler's
coefficients as inputs, so one trace serves every step count and position in the schedule (DDIM-10 is one
call, DDPM-100 ten) and the scheduler's update is compiled with the UNet. MLX re-specialises a chunk per
batch size and dtype. Shorter chunks pay more host time per step, longer ones trace longer (an unrolled
100-step trace took over a minute: benchmarks/NOTES.md).

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

from collections.abc import Callable
from functools import partial
from itertools import accumulate

import mlx.core as mx
import numpy as np

from policy_core.backends import matmul_unet
from policy_core.backends.base import Backend, Inpainting
from policy_core.nets.unet import ConditionalUnet1D
from policy_core.schedulers import Scheduler

STEPS_PER_CALL = 10
"""Denoising steps per compiled call: longer chunks trace longer, shorter ones pay more host overhead."""

Trunk = Callable[[ConditionalUnet1D, mx.array, list[mx.array]], mx.array]
"""``ConditionalUnet1D.forward_film`` in some form: (unet, x (B, T, A), per-block FiLM rows) -> output."""


class GenericBackend(Backend):
    """The chunked sampler of one ``ConditionalUnet1D``, with the trunk in the form ``trunk`` (by default
    ``matmul_unet``'s, built for batch 1 on the CPU and Metal) and, where guidance differentiates it, in
    the form ``guided_trunk``."""

    name = "chunked sampler"
    inpaints = True  # the trunk is MLX operations, which mx.value_and_grad differentiates

    def __init__(
        self,
        unet: ConditionalUnet1D,
        trunk: Trunk = matmul_unet.denoise,
        guided_trunk: Trunk = matmul_unet.denoise_for_gradients,
    ):
        self.unet = unet
        self._trunk = trunk
        self._guided_trunk = guided_trunk
        self._compiled: dict[tuple, Callable[..., mx.array]] = {}

    def supports(self, batch: int, horizon: int, scheduler: Scheduler) -> bool:
        return True

    def sample(
        self,
        scheduler: Scheduler,
        x: mx.array,
        films: mx.array,
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
            x = steps(x, films[chunk], step_noise[chunk], coeffs[chunk], *known)
        self.evaluate(x)
        return np.array(x)

    def evaluate(self, x: mx.array) -> None:
        mx.eval(x)

    def _compiled_steps(self, scheduler: Scheduler) -> Callable[..., mx.array]:
        """The chunk for this kind of scheduler, compiled with the UNet's arrays as inputs, so that
        replaced weights (an EMA copy, a hot load) are read rather than baked into the trace. ``update``
        depends on the scheduler's kind and config only, the same for every schedule of a policy."""
        kind = (type(scheduler),)
        if kind not in self._compiled:
            steps = partial(self._steps, scheduler.update)
            self._compiled[kind] = mx.compile(steps, inputs=[self.unet.state])
        return self._compiled[kind]

    def _compiled_inpainting(self, scheduler: Scheduler, guided: bool) -> Callable[..., mx.array]:
        """``_inpainting_steps`` compiled as ``_compiled_steps`` is, with or without guidance (a batch of
        replacement rows only needs no backward pass)."""
        epsilon = scheduler.config.prediction_type == "epsilon"
        kind = (type(scheduler), guided, epsilon)
        if kind not in self._compiled:
            steps = partial(self._inpainting_steps, scheduler.update, guided, epsilon)
            self._compiled[kind] = mx.compile(steps, inputs=[self.unet.state])
        return self._compiled[kind]

    def _block_films(self, films: mx.array) -> list[mx.array]:
        """(S, B, sum m) FiLM rows -> one (S, B, m) per residual block, in the model's dtype."""
        unet = self.unet
        dtype = unet.final_conv[1].weight.dtype
        widths = [blk.cond_encoder.weight.shape[0] for blk in unet.residual_blocks()]
        return [f.astype(dtype) for f in mx.split(films, list(accumulate(widths[:-1])), axis=-1)]

    def _steps(
        self,
        update: Callable[..., mx.array],
        x: mx.array,
        films: mx.array,
        step_noise: mx.array,
        coeffs: mx.array,
    ) -> mx.array:
        """``len(coeffs)`` consecutive denoising steps: films (S, B, sum m) the blocks' FiLM rows,
        step_noise (S, ...), coeffs (S, 5) the scheduler's per-step coefficients."""
        unet = self.unet
        dtype = unet.final_conv[1].weight.dtype
        films = self._block_films(films)
        for j in range(coeffs.shape[0]):
            model_output = self._trunk(unet, x.astype(dtype), [f[j] for f in films])
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
        films: mx.array,
        step_noise: mx.array,
        coeffs: mx.array,
        target: mx.array,
        guide: mx.array,
        max_guidance: mx.array,
        replace: mx.array,
    ) -> mx.array:
        """``_steps`` with an ``Inpainting``'s arrays (see the module's docstring). Replacement re-noises
        with the step's own noise: where it replaces, that noise is not otherwise used."""
        unet = self.unet
        dtype = unet.final_conv[1].weight.dtype
        films = self._block_films(films)
        for j in range(coeffs.shape[0]):
            step_coeffs = tuple(coeffs[j, c] for c in range(coeffs.shape[1]))
            sqrt_beta, sqrt_alpha = step_coeffs[0], step_coeffs[1]  # the step's level, either scheduler
            x = mx.where(replace > 0, sqrt_alpha * target + sqrt_beta * step_noise[j], x)
            step_films = [f[j] for f in films]
            if not guided:
                model_output = self._trunk(unet, x.astype(dtype), step_films).astype(mx.float32)
            else:

                def loss(
                    x: mx.array, films: list = step_films, level: tuple = (sqrt_beta, sqrt_alpha)
                ) -> tuple:
                    output = self._guided_trunk(unet, x.astype(dtype), films).astype(mx.float32)
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
