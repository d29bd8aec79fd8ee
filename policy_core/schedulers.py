"""DDPM / DDIM noise schedulers in MLX with the semantics of current HuggingFace diffusers.

Only what diffusion-policy action sampling needs: "leading" timestep spacing, epsilon/sample prediction,
fixed-small variance, x0 clipping. Parity with diffusers (fp32, full trajectories) is checked against
golden vectors in tests/golden/schedulers.npz.

Design: every schedule coefficient is precomputed in numpy (float32, in diffusers' order of operations).
`step` takes the timestep as a Python int and looks its coefficients up; `update` is the step's arithmetic
given the coefficients, which a compiled sampler passes as a float32 table (`coefficient_table`) so one
trace serves every timestep. Neither draws random numbers: callers pass `noise` explicitly, which keeps
sampling reproducible.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_VARIANCE_TYPES = ("fixed_small", "fixed_small_log")
_PREDICTION_TYPES = ("epsilon", "sample")
_F32 = np.float32


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "squaredcos_cap_v2"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = True  # DDIM only
    steps_offset: int = 0
    eta: float = 0.0  # DDIM only

    def __post_init__(self) -> None:
        _check_int(self, "num_train_timesteps", minimum=1)
        _check_int(self, "steps_offset", minimum=0)
        _check_float(self, "beta_start", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _check_float(self, "beta_end", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        _check_float(self, "clip_sample_range", lambda v: v > 0.0, "> 0")
        # eta > 1 makes DDIM's direction term sqrt(1 - a_prev - std^2) imaginary.
        _check_float(self, "eta", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        _check_choice(self, "beta_schedule", _BETA_SCHEDULES)
        _check_choice(self, "variance_type", _VARIANCE_TYPES)
        _check_choice(self, "prediction_type", _PREDICTION_TYPES)
        for name in ("clip_sample", "set_alpha_to_one"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown scheduler config key {key!r}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_int(cfg: SchedulerConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    # bool is an int subclass; True as a step count is almost certainly a config mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    object.__setattr__(cfg, name, int(value))


def _check_float(cfg: SchedulerConfig, name: str, ok: Callable[[float], bool], expected: str) -> None:
    value = getattr(cfg, name)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")
    object.__setattr__(cfg, name, float(value))


def _check_choice(cfg: SchedulerConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {getattr(cfg, name)!r}")


def _betas(cfg: SchedulerConfig) -> np.ndarray:
    """float32 betas as diffusers builds them (float32 tensors)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        # torch's float32 linspace may differ from the correctly rounded value by 1 ulp (its SIMD path is
        # CPU dependent); that is far below the parity tolerance, so use the platform-independent value.
        return np.linspace(cfg.beta_start, cfg.beta_end, T).astype(_F32)
    if cfg.beta_schedule == "scaled_linear":
        root = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T).astype(_F32)
        return root * root  # squared in float32, as diffusers does

    # squaredcos_cap_v2 (Nichol & Dhariwal 2021): betas from the cosine alpha_bar, capped at 0.999, computed
    # in double precision with Python's math (same order of operations as diffusers) and stored as float32.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return np.asarray(betas, dtype=_F32)


@dataclass(frozen=True)
class ConsistencyConfig:
    """A consistency policy's time parameterisation (``policy_core.consistency``): distilled from a
    diffusion policy on the grid t_n = n * skip (n >= 1) of its training timesteps, DDIM's "leading"
    times, with the boundary t = 0 where f(x, 0) = x. ``chains[k - 1]`` are the grid times a k-step
    request visits; the first is the top of the grid, T - skip, where x_T is drawn as DDIM's is (the
    very last timesteps of a capped cosine schedule keep too little signal for an x0 prediction)."""

    skip: int
    chains: tuple[tuple[int, ...], ...]
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0  # per 1000 training timesteps, as Latent Consistency Models

    def check(self, num_train_timesteps: int) -> None:
        """ValueError unless the chains lie on the grid of a schedule of ``num_train_timesteps``."""
        T = num_train_timesteps
        if (
            isinstance(self.skip, bool)
            or not isinstance(self.skip, int)
            or not 1 <= self.skip <= T
            or T % self.skip
        ):
            raise ValueError(f"skip must divide num_train_timesteps {T}, got {self.skip!r}")
        if not self.chains:
            raise ValueError("chains must hold at least the 1-step chain")
        grid = set(range(self.skip, T, self.skip))
        for chain in self.chains:
            ok = bool(chain) and chain[0] == T - self.skip and all(t in grid for t in chain)
            if not ok or any(a <= b for a, b in zip(chain[:-1], chain[1:], strict=True)):
                raise ValueError(
                    f"chain {list(chain)} must start at {T - self.skip} and descend on the grid "
                    f"{sorted(grid)}"
                )
        for name in ("sigma_data", "timestep_scaling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict) -> ConsistencyConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - known or not {"skip", "chains"} <= set(d):
            raise ValueError(f"expected a map with skip and chains (fields {sorted(known)}), got {d!r}")
        try:
            chains = tuple(tuple(int(t) for t in chain) for chain in d["chains"])
        except (TypeError, ValueError):
            raise ValueError(f"chains must be lists of timesteps, got {d['chains']!r}") from None
        return cls(**{**d, "chains": chains})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "chains": [list(chain) for chain in self.chains]}


class Scheduler(ABC):
    """Shared schedule tables, timestep spacing and the forward (noising) process."""

    def __init__(self, config: SchedulerConfig | None = None, **overrides) -> None:
        base = (config or SchedulerConfig()).to_dict()
        self.config = SchedulerConfig.from_dict({**base, **overrides})
        alphas = _F32(1.0) - _betas(self.config)
        # torch's CPU cumprod accumulates in float64 and rounds each output to float32; doing the same keeps
        # alphas_cumprod bit-identical to diffusers instead of drifting by a few ulps over 1000 steps.
        self.alphas_cumprod: np.ndarray = np.cumprod(alphas.astype(np.float64)).astype(_F32)
        self._alphas_cumprod_mx = mx.array(self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.timesteps: list[int] = []
        self._coeffs: dict[int, tuple[float, ...]] = {}
        self._coefficient_table: mx.array | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """diffusers' default "leading" spacing: t_k = k * (T // n) + steps_offset, descending."""
        T = self.config.num_train_timesteps
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")
        n = int(n)
        ratio = T // n
        timesteps = [k * ratio + self.config.steps_offset for k in range(n - 1, -1, -1)]
        if timesteps[0] >= T:
            # diffusers would fail later with an IndexError inside step().
            raise ValueError(
                f"steps_offset={self.config.steps_offset} pushes timestep {timesteps[0]} past "
                f"num_train_timesteps={T} for num_inference_steps={n}"
            )
        self._use_schedule(timesteps, self._previous_timesteps(timesteps, ratio))

    def _use_schedule(self, timesteps: list[int], previous: list[int]) -> None:
        """Make ``timesteps`` (each stepping to its entry of ``previous``) the schedule: its coefficients
        by timestep and as ``coefficient_table``."""
        self.num_inference_steps = len(timesteps)
        self.timesteps = timesteps
        self._coeffs = {t: self._step_coeffs(t, p) for t, p in zip(timesteps, previous, strict=True)}
        self._coefficient_table = mx.array([self._coeffs[t] for t in timesteps], dtype=mx.float32)

    def coefficient_table(self) -> mx.array:
        """(num_inference_steps, 5) float32: ``update``'s coefficients for each entry of ``timesteps``, so a
        compiled sampler can take them as inputs instead of baking one timestep's into its trace. Made once
        per ``set_timesteps``: an array written on the host costs a CUDA request a page migration."""
        if self._coefficient_table is None:
            raise ValueError("call set_timesteps() before coefficient_table()")
        return self._coefficient_table

    def step(
        self, model_output: mx.array, timestep: int, sample: mx.array, noise: mx.array | None = None
    ) -> mx.array:
        """One reverse step x_t -> x_prev at ``timestep`` (a Python int from ``timesteps``).

        ``noise`` (standard normal) is required where the step draws noise (``needs_noise``).
        """
        coeffs = self._lookup(timestep)
        if self.needs_noise(timestep) and noise is None:
            raise ValueError(f"{type(self).__name__} step at timestep {timestep} needs explicit noise")
        return self.update(model_output, sample, coeffs, noise)

    @abstractmethod
    def needs_noise(self, timestep: int) -> bool:
        """Whether the step at ``timestep`` adds noise."""

    @abstractmethod
    def update(
        self,
        model_output: mx.array,
        sample: mx.array,
        coeffs: tuple[float | mx.array, ...],
        noise: mx.array | None = None,
    ) -> mx.array:
        """The step's arithmetic given its coefficients (Python floats, or float32 scalars from
        ``coefficient_table``; the same float32 values either way). Noise is added when given."""

    def _alpha_prod(self, t: int, final: np.float32) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else final

    def _lookup(self, timestep: int) -> tuple[float, ...]:
        if not self._coeffs:
            raise ValueError("call set_timesteps() before step()")
        # A Python int from the schedule: the coefficients are looked up, not computed from an array.
        if (
            isinstance(timestep, bool)
            or not isinstance(timestep, numbers.Integral)
            or timestep not in self._coeffs
        ):
            raise ValueError(f"timestep must be a Python int from self.timesteps, got {timestep!r}")
        return self._coeffs[int(timestep)]

    def _pred_original(
        self, model_output: mx.array, sample: mx.array, sqrt_beta: float, sqrt_alpha: float
    ) -> mx.array:
        if self.config.prediction_type == "epsilon":
            return (sample - sqrt_beta * model_output) / sqrt_alpha
        return model_output

    def _clip(self, x0: mx.array) -> mx.array:
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            return mx.clip(x0, -r, r)
        return x0

    def add_noise(self, original_samples: mx.array, noise: mx.array, timesteps: mx.array) -> mx.array:
        """Forward process q(x_t | x_0): sqrt(a_t) * x_0 + sqrt(1 - a_t) * noise, per batch element.

        `timesteps` is an int array of shape (B,); indices are not range-checked (that would need an eval).
        """
        dtype = original_samples.dtype
        a = self._alphas_cumprod_mx.astype(dtype)[timesteps]
        a = a.reshape((-1,) + (1,) * (original_samples.ndim - 1))
        return mx.sqrt(a) * original_samples + mx.sqrt(1 - a) * noise.astype(dtype)

    @abstractmethod
    def _previous_timesteps(self, timesteps: list[int], ratio: int) -> list[int]:
        """Previous timestep for each entry of the schedule (< 0 means "past the end": x_0)."""

    @abstractmethod
    def _step_coeffs(self, t: int, prev_t: int) -> tuple[float, ...]:
        """Python-float coefficients that step() needs at timestep t."""


class DDPMScheduler(Scheduler):
    """Ancestral DDPM sampling (Ho et al. 2020) over a possibly strided timestep subset."""

    def _previous_timesteps(self, timesteps: list[int], ratio: int) -> list[int]:
        # Current diffusers: the previous timestep is the next entry of the schedule, -1 after the last one.
        # (Not t - T//n: with steps_offset >= T//n the last step would wrongly land on a real timestep.)
        return timesteps[1:] + [-1]

    def _step_coeffs(self, t: int, prev_t: int) -> tuple[float, ...]:
        # float32 scalar arithmetic in diffusers' order of operations, so the coefficients equal its tensors.
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha_prod(prev_t, _F32(1.0))
        beta_prod = _F32(1.0) - a_t
        beta_prod_prev = _F32(1.0) - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = _F32(1.0) - cur_alpha
        x0_coeff = np.sqrt(a_prev) * cur_beta / beta_prod
        sample_coeff = np.sqrt(cur_alpha) * beta_prod_prev / beta_prod
        # Posterior variance of q(x_prev | x_t, x_0); clamped like diffusers (it may be exactly 0).
        variance = np.maximum(beta_prod_prev / beta_prod * cur_beta, _F32(1e-20))
        if self.config.variance_type == "fixed_small":
            std = np.sqrt(variance)
        else:  # fixed_small_log: same std, computed through the log domain as diffusers does
            std = np.exp(_F32(0.5) * np.log(variance))
        if not self.needs_noise(t):
            std = _F32(0.0)  # the last step adds no noise, even where a table-driven sampler passes some
        return tuple(float(c) for c in (np.sqrt(beta_prod), np.sqrt(a_t), x0_coeff, sample_coeff, std))

    def needs_noise(self, timestep: int) -> bool:
        return timestep > 0  # diffusers adds no noise on the step from t == 0

    def update(self, model_output, sample, coeffs, noise=None):
        sqrt_beta, sqrt_alpha, x0_coeff, sample_coeff, std = coeffs
        model_output = model_output.astype(sample.dtype)
        x0 = self._clip(self._pred_original(model_output, sample, sqrt_beta, sqrt_alpha))
        prev = x0_coeff * x0 + sample_coeff * sample
        if noise is not None:
            prev = prev + std * noise.astype(sample.dtype)
        return prev


class DDIMScheduler(Scheduler):
    """DDIM sampling (Song et al. 2021); `config.eta` runs from deterministic (0) to DDPM-like (1)."""

    def _previous_timesteps(self, timesteps: list[int], ratio: int) -> list[int]:
        return [t - ratio for t in timesteps]  # diffusers' DDIM rule: t - T // n

    def _step_coeffs(self, t: int, prev_t: int) -> tuple[float, ...]:
        # float32 scalar arithmetic in diffusers' order of operations, so the coefficients equal its tensors.
        final = _F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        a_t = self.alphas_cumprod[t]
        a_prev = self._alpha_prod(prev_t, final)
        beta_prod = _F32(1.0) - a_t
        beta_prod_prev = _F32(1.0) - a_prev
        variance = beta_prod_prev / beta_prod * (_F32(1.0) - a_t / a_prev)
        std = _F32(self.config.eta) * np.sqrt(variance)
        direction_coeff = np.sqrt(_F32(1.0) - a_prev - std * std)
        return tuple(
            float(c) for c in (np.sqrt(beta_prod), np.sqrt(a_t), np.sqrt(a_prev), direction_coeff, std)
        )

    def needs_noise(self, timestep: int) -> bool:
        return self.config.eta > 0

    def update(self, model_output, sample, coeffs, noise=None):
        sqrt_beta, sqrt_alpha, sqrt_alpha_prev, direction_coeff, std = coeffs
        model_output = model_output.astype(sample.dtype)
        x0 = self._pred_original(model_output, sample, sqrt_beta, sqrt_alpha)
        if self.config.prediction_type == "epsilon":
            eps = model_output
        else:  # epsilon implied by the *unclipped* x0 prediction, as in diffusers
            eps = (sample - sqrt_alpha * x0) / sqrt_beta
        prev = sqrt_alpha_prev * self._clip(x0) + direction_coeff * eps
        if noise is not None and self.config.eta > 0:
            prev = prev + std * noise.astype(sample.dtype)
        return prev


def boundary_coefficients(
    timesteps: np.ndarray, num_train_timesteps: int, sigma_data: float, timestep_scaling: float
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (c_skip, c_out) of a consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) at
    integer ``timesteps``: Latent Consistency Models' form, c_skip = s^2 / ((k t)^2 + s^2) and
    c_out = k t / sqrt((k t)^2 + s^2) with k = timestep_scaling * 1000 / T, so f(x, 0) = x exactly and
    f is the denoiser's x0 (c_skip < 3e-3) from t = 1 on."""
    scaled = np.asarray(timesteps, np.float64) * timestep_scaling * 1000.0 / num_train_timesteps
    sd2 = sigma_data * sigma_data
    c_skip = sd2 / (scaled * scaled + sd2)
    c_out = scaled / np.sqrt(scaled * scaled + sd2)
    return c_skip.astype(_F32), c_out.astype(_F32)


class ConsistencyScheduler(DDPMScheduler):
    """Multistep consistency sampling (Song et al. 2023) of a consistency policy: at each time of the
    chain, f(x, t) = c_skip x + c_out clip(x0), re-noised to the chain's next time with fresh noise (not
    after the last). That is a DDPM step's arithmetic (clipped x0 and x weighted, noise added) with other
    weights, so every backend that runs DDPM runs it from the same coefficient table. ``set_timesteps(k)``
    takes the preset chain of k steps (``ConsistencyConfig.chains``)."""

    def __init__(self, config: SchedulerConfig, consistency: ConsistencyConfig) -> None:
        super().__init__(config)
        consistency.check(self.config.num_train_timesteps)
        self.consistency = consistency

    def set_timesteps(self, num_inference_steps: int) -> None:
        chains = self.consistency.chains
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= len(chains):
            raise ValueError(f"num_inference_steps must be an int in [1, {len(chains)}], got {n!r}")
        timesteps = list(chains[n - 1])
        # DDPM's rule: each time steps to the chain's next, the last to x_0.
        self._use_schedule(timesteps, self._previous_timesteps(timesteps, ratio=0))

    def _step_coeffs(self, t: int, next_t: int) -> tuple[float, ...]:
        c = self.consistency
        c_skip, c_out = boundary_coefficients(
            np.array([t]), self.config.num_train_timesteps, c.sigma_data, c.timestep_scaling
        )
        a_t = self.alphas_cumprod[t]
        a_next = self._alpha_prod(next_t, _F32(1.0))
        return tuple(
            float(v)
            for v in (
                np.sqrt(_F32(1.0) - a_t),
                np.sqrt(a_t),
                np.sqrt(a_next) * c_out[0],
                np.sqrt(a_next) * c_skip[0],
                np.sqrt(_F32(1.0) - a_next),  # 0 after the last time (a_next = 1)
            )
        )

    def needs_noise(self, timestep: int) -> bool:
        return timestep != self.timesteps[-1]


def make_scheduler(
    kind: str, config: SchedulerConfig, consistency: ConsistencyConfig | None = None
) -> Scheduler:
    """The scheduler ``kind``; "consistency" needs the policy's ``ConsistencyConfig``."""
    if kind == "consistency":
        if consistency is None:
            raise ValueError("the consistency sampler needs a consistency policy")
        return ConsistencyScheduler(config, consistency)
    schedulers = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if kind not in schedulers:
        raise ValueError(f"scheduler kind must be one of {[*schedulers, 'consistency']}, got {kind!r}")
    return schedulers[kind](config)
