"""The denoising loop as MLX operations: the path of Metal and the CPU, and the fallback everywhere.

The loop runs in ``mx.compile``d chunks of up to ``STEPS_PER_CALL`` steps that take the scheduler's
coefficients as inputs, so one trace serves every step count and position in the schedule (DDIM-10 is one
call, DDPM-100 ten) and the scheduler's update is compiled with the UNet. MLX re-specialises a chunk per
batch size and dtype. Shorter chunks pay more host time per step, longer ones trace longer (an unrolled
100-step trace took over a minute: benchmarks/NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from itertools import accumulate

import mlx.core as mx
import numpy as np

from policy_core.backends import matmul_unet
from policy_core.backends.base import Backend
from policy_core.nets.unet import ConditionalUnet1D
from policy_core.schedulers import Scheduler

STEPS_PER_CALL = 10
"""Denoising steps per compiled call: longer chunks trace longer, shorter ones pay more host overhead."""

Trunk = Callable[[ConditionalUnet1D, mx.array, list[mx.array]], mx.array]
"""``ConditionalUnet1D.forward_film`` in some form: (unet, x (B, T, A), per-block FiLM rows) -> output."""


class GenericBackend(Backend):
    """The chunked sampler of one ``ConditionalUnet1D``, with the trunk in the form ``trunk`` (by default
    ``matmul_unet``'s, built for batch 1 on the CPU and Metal)."""

    name = "chunked sampler"

    def __init__(self, unet: ConditionalUnet1D, trunk: Trunk = matmul_unet.denoise):
        self.unet = unet
        self._trunk = trunk
        self._compiled: dict[type, Callable[..., mx.array]] = {}

    def supports(self, batch: int, horizon: int, scheduler: Scheduler) -> bool:
        return True

    def sample(self, scheduler: Scheduler, x: mx.array, films: mx.array, step_noise: mx.array) -> np.ndarray:
        steps = self._compiled_steps(scheduler)
        coeffs = scheduler.coefficient_table()
        for start in range(0, len(scheduler.timesteps), STEPS_PER_CALL):
            chunk = slice(start, start + STEPS_PER_CALL)
            x = steps(x, films[chunk], step_noise[chunk], coeffs[chunk])
        self.evaluate(x)
        return np.array(x)

    def evaluate(self, x: mx.array) -> None:
        mx.eval(x)

    def _compiled_steps(self, scheduler: Scheduler) -> Callable[..., mx.array]:
        """The chunk for this kind of scheduler, compiled with the UNet's arrays as inputs, so that
        replaced weights (an EMA copy, a hot load) are read rather than baked into the trace. ``update``
        depends on the scheduler's kind and config only, the same for every schedule of a policy."""
        kind = type(scheduler)
        if kind not in self._compiled:
            steps = partial(self._steps, scheduler.update)
            self._compiled[kind] = mx.compile(steps, inputs=[self.unet.state])
        return self._compiled[kind]

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
        widths = [blk.cond_encoder.weight.shape[0] for blk in unet.residual_blocks()]
        films = [f.astype(dtype) for f in mx.split(films, list(accumulate(widths[:-1])), axis=-1)]
        for j in range(coeffs.shape[0]):
            model_output = self._trunk(unet, x.astype(dtype), [f[j] for f in films])
            step_coeffs = tuple(coeffs[j, c] for c in range(coeffs.shape[1]))
            # Noise is passed to every step: the table's std is 0 where a step adds none (DDPM's last),
            # and deterministic DDIM ignores it (so it is never computed).
            x = update(model_output.astype(mx.float32), x, step_coeffs, step_noise[j])
        return x
