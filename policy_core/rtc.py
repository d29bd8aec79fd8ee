"""Real-time chunking (Black, Galliker, Levine, "Real-Time Execution of Action Chunking Flow Policies",
arXiv 2506.07339): a new action chunk sampled as an inpainting of the actions the robot will still
execute from its current chunk, so that switching chunks does not jump between modes of the policy.

A request carries a *prefix*: the k actions (action units) the robot has left of its current chunk,
row i aligned with the new chunk's action i (``action_pred[n_obs_steps - 1 + i]``), and a *delay* d: the
ticks that pass before the new chunk can be used, during which the robot executes the prefix's first d
actions. Those d are frozen (weight 1), the rest of the prefix is softly kept (weights decaying to 0 at
k), what comes after is free. Two ways to impose them, per row:

- ``guided`` (the paper's method): pseudo-inverse guidance (PiGDM) of every denoising step toward the
  prefix through the vector-Jacobian product of the denoised estimate; see ``backends.generic``.
- ``replace``: the frozen actions replaced by the prefix re-noised to each step's noise level (classic
  diffusion inpainting): no extra network work, no soft part.

Pure NumPy: the policy turns prefixes into the per-row arrays a backend's sampler reads.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("exp", "linear", "hard")
METHODS = ("guided", "replace")
DEFAULT_SCHEDULE = "exp"
DEFAULT_METHOD = "guided"
DEFAULT_MAX_GUIDANCE = 40.0
"""The guidance weight's clip, beta. The weight 1 / sqrt(a (1 - a)) (a: the step's cumulative alpha)
grows without bound at both ends of the schedule; the clip keeps it finite there. The paper's 5 suits
its 5-step flow grid, whose last step starts at a ~ 0.94; DDIM's and DDPM's last step starts at t = 0
(a = 0.9994 for squaredcos_cap_v2, weight 40), where 5 moves the denoised estimate 1/8 of the way to
the prefix and 40 all the way (benchmarks/NOTES.md, "Real-time chunking")."""


@dataclass(frozen=True)
class ActionPrefix:
    """One row's constraint: ``actions`` (k, action_dim) in action units, the first ``delay`` frozen."""

    actions: np.ndarray
    delay: int
    schedule: str = DEFAULT_SCHEDULE
    max_guidance: float = DEFAULT_MAX_GUIDANCE
    method: str = DEFAULT_METHOD

    def __post_init__(self) -> None:
        actions = np.asarray(self.actions, dtype=np.float32)
        if actions.ndim != 2:
            raise ValueError(f"prefix must be (k, action_dim), got shape {actions.shape}")
        if not np.isfinite(actions).all():
            raise ValueError("prefix contains NaN or Inf")
        object.__setattr__(self, "actions", actions)
        delay = self.delay
        if (
            isinstance(delay, bool)
            or not isinstance(delay, numbers.Integral)
            or not 0 <= delay <= len(actions)
        ):
            raise ValueError(f"delay must be an int in [0, k={len(actions)}], got {delay!r}")
        object.__setattr__(self, "delay", int(delay))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        beta = self.max_guidance
        if (
            isinstance(beta, bool)
            or not isinstance(beta, numbers.Real)
            or not math.isfinite(beta)
            or beta <= 0
        ):
            raise ValueError(f"max_guidance must be a finite number > 0, got {beta!r}")
        object.__setattr__(self, "max_guidance", float(beta))

    def weights(self) -> np.ndarray:
        """(k,) float32: how strongly each prefix action is kept (``prefix_weights``)."""
        return prefix_weights(len(self.actions), self.delay, self.schedule)


def prefix_weights(k: int, delay: int, schedule: str) -> np.ndarray:
    """(k,) float32 weights: 1 on the first ``delay`` (frozen), then, for i in [delay, k), with
    c_i = (k - i) / (k - delay + 1): c_i for "linear", c_i (e^c_i - 1) / (e - 1) for "exp" (the paper's
    soft mask, from just under 1 down toward 0 at k), 0 for "hard"."""
    i = np.arange(k, dtype=np.float64)
    c = (k - i) / (k - delay + 1)
    if schedule == "exp":
        soft = c * np.expm1(c) / (math.e - 1)
    elif schedule == "linear":
        soft = c
    elif schedule == "hard":
        soft = np.zeros(k)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return np.where(i < delay, 1.0, soft).astype(np.float32)
