"""Consistency distillation of a diffusion policy into a 1-3 step consistency policy.

The variant: consistency distillation (CD; Song, Dhariwal, Chen, Sutskever, ICML 2023) in the teacher's
own discrete DDPM time, as Latent Consistency Models (Luo et al. 2023) distil a DDPM, with Consistency
Policy's (Prasad et al., RSS 2024) choices where they carry over: the student starts as the teacher and
multistep requests chain through evenly spread preset times. CP's own objective, consistency trajectory
distillation (CTM), needs a network that also takes the time to jump to: another architecture than the
teacher's, which neither the teacher's weights nor the server's kernels fit. CD keeps the student the
teacher's network, initialised from it exactly and sampled by the same backends (``ConsistencyScheduler``
is a DDPM step's arithmetic with other coefficients). CTM's denoising score matching term has no CD
counterpart: on f it would pull the one-step output back to the teacher's x0 prediction, the average of
the modes that one step must not blur, so it is left out. The target network is an EMA of the student
(mu 0.95, CD's and LCM's; CP's stop-gradient student, mu 0, drifted away from the teacher's samples here:
benchmarks/NOTES.md).

The consistency function of a network with x0 prediction ``x0(x, t)`` (clipped, as the teacher samples):
f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (``boundary_coefficients``; f(x, 0) = x exactly). Training on
a window with actions x: t ~ U{skip, 2 skip, .., T - skip} (the teacher's DDIM-(T / skip) times),
s = t - skip; x_t ~ q(x_t | x); x_s is the teacher's DDIM step (eta 0) from x_t; the loss is
mean ||f_student(x_t, t) - f_target(x_s, s)||^2, the target under a stop-gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import numpy as np

from policy_core.policy import DiffusionPolicy, _as_mx
from policy_core.schedulers import boundary_coefficients


class DistillationError(ValueError):
    """A teacher and student that cannot be distilled (the message says why)."""


def check_pair(student: DiffusionPolicy, teacher: DiffusionPolicy) -> None:
    """DistillationError unless ``teacher`` is a diffusion policy and ``student`` a consistency policy of
    the same network, normalizer and schedule."""
    if teacher.config.consistency is not None:
        raise DistillationError("the teacher is a consistency policy; distil from a diffusion policy")
    if student.config.consistency is None:
        raise DistillationError("the student has no consistency section")
    if student.config.noise_scheduler.prediction_type != "epsilon":
        raise DistillationError("consistency distillation needs an epsilon-predicting teacher")
    plain = dataclasses.replace(
        student.config,
        consistency=None,
        sampler=teacher.config.sampler,
        num_inference_steps=teacher.config.num_inference_steps,
    )
    if plain != teacher.config:
        raise DistillationError("the student's network, schedule or observations differ from the teacher's")


class Distillation:
    """The consistency distillation loss of ``student`` from ``teacher`` (both built; the teacher is only
    read). ``loss(batch, noise, grid_index)`` has the signature of ``DiffusionPolicy.compute_loss``, with
    grid indices 0..grid_size-1 (t = (index + 1) skip) in place of timesteps, so the trainer draws and
    compiles both the same way."""

    def __init__(
        self, student: DiffusionPolicy, teacher: DiffusionPolicy, target: DiffusionPolicy | None = None
    ):
        check_pair(student, teacher)
        # ``target``: the network whose f at s the student's f at t learns (the trainer keeps it as an EMA
        # of the student); None: the student itself. Either is under a stop-gradient.
        self.student, self.teacher, self.target = student, teacher, target or student
        consistency = student.config.consistency
        sched = student.config.noise_scheduler
        T, skip = sched.num_train_timesteps, consistency.skip
        self.grid_size = T // skip - 1
        self.skip = skip
        alphas = student.noise_scheduler.alphas_cumprod
        c_skip, c_out = boundary_coefficients(
            np.arange(T), T, consistency.sigma_data, consistency.timestep_scaling
        )
        # Per timestep, float32 as the sampler's table: sqrt(a_t), sqrt(1 - a_t), c_skip, c_out.
        table = np.stack([np.sqrt(alphas), np.sqrt(1 - alphas), c_skip, c_out], axis=1)
        self._table = mx.array(table.astype(np.float32))
        self._clip = sched.clip_sample_range if sched.clip_sample else None

    def _levels(self, timesteps: mx.array) -> list[mx.array]:
        """The table's columns at ``timesteps`` (B,), each (B, 1, 1) to broadcast over a trajectory."""
        rows = self._table[timesteps][:, None, None, :]
        return [rows[..., i] for i in range(4)]

    def _x0(self, output: mx.array, x: mx.array, sqrt_alpha: mx.array, sqrt_beta: mx.array) -> mx.array:
        x0 = (x - sqrt_beta * output) / sqrt_alpha
        return x0 if self._clip is None else mx.clip(x0, -self._clip, self._clip)

    def consistency_function(
        self, x: mx.array, timesteps: mx.array, cond: mx.array, policy: DiffusionPolicy | None = None
    ) -> mx.array:
        """The student's (or ``policy``'s) f(x, t) = c_skip(t) x + c_out(t) clip(x0(x, t)) on normalized
        trajectories x (B, horizon, action_dim) float32 at integer ``timesteps`` (B,), given its
        conditioning."""
        policy = policy or self.student
        sqrt_alpha, sqrt_beta, c_skip, c_out = self._levels(timesteps)
        output = policy.network(x.astype(policy.dtype), timesteps, cond).astype(mx.float32)
        return c_skip * x + c_out * self._x0(output, x, sqrt_alpha, sqrt_beta)

    def teacher_step(self, x: mx.array, t: mx.array, s: mx.array, teacher_cond: mx.array) -> mx.array:
        """The teacher's DDIM step (eta 0) from x at timesteps ``t`` to ``s`` (B,), with its clipped x0 as
        its sampler takes it."""
        teacher = self.teacher
        sqrt_a_t, sqrt_b_t, _, _ = self._levels(t)
        sqrt_a_s, sqrt_b_s, _, _ = self._levels(s)
        eps = teacher.network(x.astype(teacher.dtype), t, teacher_cond).astype(mx.float32)
        return sqrt_a_s * self._x0(eps, x, sqrt_a_t, sqrt_b_t) + sqrt_b_s * eps

    def conditioning(self, batch: dict[str, Any]) -> tuple[mx.array, mx.array, mx.array]:
        """The student's, the teacher's and the target's conditioning of a batch's observations, on the
        same random crops."""
        student, cfg = self.student, self.student.config
        obs = {k: _as_mx(v)[:, : cfg.n_obs_steps] for k, v in batch["obs"].items()}
        nobs = student.crop_images(student.normalize_obs(obs))
        cond = student.encode_obs(nobs)
        teacher_cond = self.teacher.encode_obs([x.astype(self.teacher.dtype) for x in nobs])
        target_cond = cond if self.target is student else self.target.encode_obs(nobs)
        return cond, teacher_cond, target_cond

    def loss(
        self, batch: dict[str, Any], noise: mx.array | None = None, grid_index: mx.array | None = None
    ) -> mx.array:
        """Mean squared consistency error over a batch; ``noise`` (B, horizon, action_dim) and
        ``grid_index`` (B,) are drawn from MLX's global RNG when not given."""
        actions = self.student.normalizer.normalize("action", _as_mx(batch["action"]).astype(mx.float32))
        if noise is None:
            noise = mx.random.normal(actions.shape)
        if grid_index is None:
            grid_index = mx.random.randint(0, self.grid_size, (actions.shape[0],))
        cond, teacher_cond, target_cond = self.conditioning(batch)
        t = (grid_index + 1) * self.skip
        s = t - self.skip
        sqrt_a_t, sqrt_b_t, _, _ = self._levels(t)
        x_t = sqrt_a_t * actions + sqrt_b_t * noise
        x_s = mx.stop_gradient(self.teacher_step(x_t, t, s, teacher_cond))
        online = self.consistency_function(x_t, t, cond)
        target = mx.stop_gradient(self.consistency_function(x_s, s, target_cond, self.target))
        return mx.mean(mx.square(online - target))
