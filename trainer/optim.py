"""AdamW with parameter groups, as upstream builds ``torch.optim.AdamW`` from ``get_optim_groups``.

Upstream's groups differ in their weight decay only (the transformer's decayed weights, its biases,
LayerNorm weights and position embeddings undecayed, the observation encoder at its own rate), so one
optimizer with a weight decay per parameter is the same thing: ``AdamWGroups`` takes a tree of weight
decays shaped as the parameters. Its state is Adam's (``m``, ``v``, ``step``, ``learning_rate``), the
layout checkpoints store for MLX's AdamW too.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map


class AdamWGroups(optim.Adam):
    """MLX's AdamW with ``weight_decay`` a tree of floats, one per parameter: each step decays a parameter
    by ``1 - lr * weight_decay`` (decoupled, at the step's learning rate), then applies Adam's update.
    With one value everywhere it computes exactly what ``optim.AdamW`` does."""

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array],
        weight_decay: dict,
        betas: list[float],
        eps: float = 1e-8,
        bias_correction: bool = False,
    ):
        super().__init__(learning_rate=learning_rate, betas=betas, eps=eps, bias_correction=bias_correction)
        self.weight_decay = weight_decay

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        # The learning rate of this step: Optimizer.apply_gradients evaluates the schedule at the step
        # before counting it, and Adam's update uses the same value.
        schedule = self._schedulers.get("learning_rate")
        lr = schedule(self.step) if schedule is not None else self.learning_rate
        decayed = tree_map(
            lambda g, p, wd: p * (1 - lr.astype(g.dtype) * wd), gradients, parameters, self.weight_decay
        )
        return super().apply_gradients(gradients, decayed)
