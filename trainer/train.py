"""``dpmlx train``: offline training that writes hot-loadable policy checkpoints.

Upstream's recipe: AdamW (UNet: lr 1e-4, betas 0.95/0.999, weight decay 1e-6; transformer: betas
0.9/0.95 and weight decay on the weights of its Linear layers and attention projections only, upstream's
get_optim_groups; bias-corrected as torch's), the image encoders at ``obs_encoder_weight_decay``, cosine
schedule with linear warm-up (diffusers' get_cosine_schedule_with_warmup, stepped per batch), an EMA of the
weights (power 0.75, max 0.9999; served by default), optional gradient clipping. The whole train step
(loss, gradients, dropout, clipping, optimizer update, RNG) is one ``mx.compile``d function; the policy is
in training mode for it and in eval mode for the validation loss (no dropout), as upstream.

Checkpoints (policy_core format) carry the weights, the EMA weights and the optimizer state (moments
and step), so ``--resume`` continues exactly: the data order and the training noise (MLX's RNG is
re-seeded from (seed, step) before every step) are functions of the step. ``latest.safetensors`` is
replaced atomically at every checkpoint (what ``dpmlx serve --watch`` follows); the best ``keep_top_k``
by validation loss are kept as ``step_*.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, get_type_hints

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from policy_core import ConfigError, PolicyConfig, build_policy, read_checkpoint, save_policy
from policy_core.checkpoint import policy_from_checkpoint, remove_stale_temp_files
from policy_core.consistency import Distillation, DistillationError, check_pair
from policy_core.schedulers import ConsistencyConfig
from trainer.data import (
    TASKS,
    BatchSpec,
    SequenceSampler,
    batches,
    fit_normalizer,
    prefetch,
    split_episodes,
    task_arrays,
)
from trainer.optim import AdamWGroups


@dataclass
class TrainConfig:
    seed: int = 42
    batch_size: int = 256
    num_steps: int = 100_000
    lr: float = 1.0e-4
    betas: tuple[float, float] = (0.95, 0.999)
    eps: float = 1.0e-8
    weight_decay: float = 1.0e-6  # the denoiser's decayed group (upstream's transformer_weight_decay)
    obs_encoder_weight_decay: float | None = None  # the image encoders' (None: weight_decay)
    warmup_steps: int = 500
    ema: bool = True
    ema_power: float = 0.75
    ema_max: float = 0.9999
    grad_clip: float | None = None
    log_every: int = 50
    val_every: int = 1000
    val_batches: int = 8
    checkpoint_every: int = 1000
    keep_top_k: int = 3
    rollout_every: int = 0  # steps between PushT rollouts of the EMA policy (0: off); ranks checkpoints
    rollout_episodes: int = 10
    rollout_start_seed: int = 1_000_000  # apart from training (0..) and upstream's test seeds (100000..)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        config = cls(**_checked_fields(cls, "train", d))
        for name in ("batch_size", "num_steps", "log_every", "val_every", "val_batches", "checkpoint_every"):
            if getattr(config, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(config, name)}")
        if config.lr <= 0 or config.warmup_steps < 0 or config.keep_top_k < 0 or config.rollout_every < 0:
            raise ConfigError("train.lr must be > 0; warmup_steps, keep_top_k and rollout_every >= 0")
        return config


# Fields that shape the optimisation's trajectory: --resume continues exactly only if they stay as they
# were (a new num_steps would stretch the cosine schedule mid-run).
RESUME_FIXED = ("seed", "batch_size", "num_steps", "lr", "warmup_steps", "betas", "eps", "weight_decay",
                "obs_encoder_weight_decay", "ema", "ema_power", "ema_max", "grad_clip")  # fmt: skip


@dataclass
class DataConfig:
    task: str
    path: str
    val_ratio: float = 0.02
    max_train_episodes: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        checked = _checked_fields(cls, "data", d)
        for name in ("task", "path"):
            if name not in checked:
                raise ConfigError(f"data.{name} is required")
        config = cls(**checked)
        if config.task not in TASKS:
            raise ConfigError(f"data.task must be one of {TASKS}, got {config.task!r}")
        if not 0 <= config.val_ratio < 1:
            raise ConfigError(f"data.val_ratio must be in [0, 1), got {config.val_ratio}")
        return config


@dataclass
class DistillConfig:
    """``distill:`` (or ``dpmlx train --distill TEACHER``): train a consistency policy from a diffusion
    policy checkpoint (``policy_core.consistency``). The student is the teacher's network, starts as the
    teacher's served (EMA) weights and keeps its normalizer; the config's ``policy:`` section, if any,
    must describe the teacher's network."""

    teacher: str
    skip: int = 10  # the teacher's DDIM step between grid times: T // skip - 1 grid times
    max_steps: int = 3  # preset chains of 1..max_steps steps, evenly spread over the grid
    default_steps: int = 1  # what a request without num_inference_steps gets
    # The target network's EMA of the student (Song et al.'s mu; 0.95 as their CD and Latent Consistency
    # Models; 0: the student itself under a stop-gradient).
    target_ema: float = 0.95

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        checked = _checked_fields(cls, "distill", d)
        if "teacher" not in checked:
            raise ConfigError("distill.teacher (a diffusion policy checkpoint) is required")
        config = cls(**checked)
        if config.skip < 1 or not 1 <= config.default_steps <= config.max_steps:
            raise ConfigError("distill.skip must be >= 1 and 1 <= distill.default_steps <= max_steps")
        if not 0 <= config.target_ema < 1:
            raise ConfigError(f"distill.target_ema must be in [0, 1), got {config.target_ema}")
        return config

    def consistency(self, num_train_timesteps: int) -> ConsistencyConfig:
        """The student's time parameterisation: chain k starts at the grid's top and visits k evenly
        spread grid times (Consistency Policy's heuristic), e.g. 90 / 90, 50 / 90, 60, 30."""
        top = num_train_timesteps // self.skip - 1  # grid index of T - skip
        if not 1 <= self.max_steps <= top:
            raise ConfigError(f"distill.max_steps must be in [1, {top}] for skip {self.skip}")
        chains = tuple(
            tuple(self.skip * math.floor(top * (1 - j / k) + 0.5) for j in range(k))
            for k in range(1, self.max_steps + 1)
        )
        return ConsistencyConfig(skip=self.skip, chains=chains)


def _checked_fields(cls: type, section: str, d: Any) -> dict[str, Any]:
    """``d``'s fields of dataclass ``cls``, each checked against (and converted to) its annotated type, so
    that a wrong config or --set value is reported by name instead of failing deep inside training."""
    if not isinstance(d, dict):
        raise ConfigError(f"{section}: expected a mapping of fields, got {d!r}")
    hints = get_type_hints(cls)
    unknown = set(d) - set(hints)
    if unknown:
        raise ConfigError(f"unknown {section} config field(s): {sorted(unknown)}")
    return {name: _checked(f"{section}.{name}", value, hints[name]) for name, value in d.items()}


def _checked(key: str, value: Any, hint: Any) -> Any:
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    if optional:
        if value is None:
            return None
        (hint,) = [t for t in hint.__args__ if t is not type(None)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with suppress(ValueError):
                value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    # tuple[float, ...] (betas)
    if not isinstance(value, list | tuple) or len(value) != len(hint.__args__):
        raise ConfigError(f"{key} must be a list of {len(hint.__args__)} numbers, got {value!r}")
    return tuple(
        _checked(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, hint.__args__, strict=True))
    )


def cosine_with_warmup(base_lr: float, warmup: int, total: int) -> Callable[[mx.array], mx.array]:
    """diffusers' get_cosine_schedule_with_warmup as an MLX schedule of the optimizer step."""

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        warm = step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1.0 + mx.cos(math.pi * mx.clip(progress, 0.0, 1.0)))
        return base_lr * mx.where(step < warmup, warm, cosine)

    return schedule


def ema_decay(step: int, power: float, max_value: float) -> float:
    """Upstream's EMAModel decay at optimisation step ``step`` (0 for the first update: a plain copy)."""
    n = max(0, step - 1)
    if n <= 0:
        return 0.0
    return min(max(1 - (1 + n) ** -power, 0.0), max_value)


class Trainer:
    def __init__(
        self,
        config: dict[str, Any],
        out_dir: Path,
        resume: bool = False,
        group: mx.distributed.Group | None = None,
    ):
        self.config = config
        self.out_dir = Path(out_dir)
        unknown = set(config) - {"policy", "data", "train", "distill"}
        if unknown or "data" not in config or ("policy" not in config and "distill" not in config):
            raise ConfigError(
                "a config has sections policy, data and train (train optional; distill optional, and "
                f"with it policy: the teacher's), got {sorted(config)}"
            )
        remove_stale_temp_files(self.out_dir)  # left by a run killed mid-save
        self.train = TrainConfig.from_dict(config.get("train") or {})
        self.data_cfg = DataConfig.from_dict(config["data"])
        self.group = group  # mx.distributed group for data parallelism (None: one process)
        self.rank = group.rank() if group is not None else 0
        self.world = group.size() if group is not None else 1

        try:
            arrays, ends = task_arrays(self.data_cfg.task, self.data_cfg.path)
        except (FileNotFoundError, KeyError) as e:
            raise ConfigError(f"data.path: {e.args[0] if isinstance(e, KeyError) else e}") from None
        mx.random.seed(self.train.seed)  # weight initialisation
        try:
            declared = PolicyConfig.from_dict(config["policy"]) if "policy" in config else None
        except (TypeError, AttributeError) as e:  # a field of the wrong type, e.g. horizon: "16x"
            raise ConfigError(f"policy: a field has the wrong type ({e})") from None
        self.distill = DistillConfig.from_dict(config["distill"]) if "distill" in config else None
        self.teacher = self.target = None
        if self.distill is None:
            self.policy = build_policy(declared)
        else:
            self.policy, self.teacher = self._student(declared)
        pcfg = self.policy.config
        missing = [k for k in [*pcfg.obs, "action"] if k not in arrays]
        if missing:
            raise ConfigError(
                f"data task {self.data_cfg.task} provides {sorted(arrays)}, the policy needs {missing}"
            )
        if self.teacher is None:  # a student keeps the teacher's normalizer: its trajectories' space
            self.policy.normalizer = fit_normalizer(
                {k: arrays[k] for k in [*pcfg.obs, "action"]}, pcfg.image_keys
            )
        self.arrays = {k: arrays[k] for k in [*pcfg.obs, "action"]}

        val_mask = split_episodes(len(ends), self.data_cfg.val_ratio, self.train.seed)
        train_mask = ~val_mask
        if self.data_cfg.max_train_episodes is not None:
            train_ids = np.flatnonzero(train_mask)
            keep = np.random.default_rng(self.train.seed).choice(
                train_ids, size=min(self.data_cfg.max_train_episodes, len(train_ids)), replace=False
            )
            train_mask = np.zeros_like(train_mask)
            train_mask[keep] = True
        pad_before, pad_after = pcfg.n_obs_steps - 1, pcfg.n_action_steps - 1
        self.train_sampler = SequenceSampler(ends, pcfg.horizon, pad_before, pad_after, train_mask)
        self.val_sampler = SequenceSampler(ends, pcfg.horizon, pad_before, pad_after, val_mask)
        self.obs_steps = {k: pcfg.n_obs_steps for k in pcfg.obs}
        if len(self.train_sampler) < self.train.batch_size:
            windows, batch = len(self.train_sampler), self.train.batch_size
            raise ConfigError(f"{windows} training windows are fewer than one batch of {batch}")
        if self.train.batch_size % self.world:
            raise ConfigError(
                f"batch_size {self.train.batch_size} is not divisible by {self.world} processes"
            )

        self.optimizer = AdamWGroups(
            learning_rate=cosine_with_warmup(self.train.lr, self.train.warmup_steps, self.train.num_steps),
            weight_decay=self._weight_decays(),
            betas=list(self.train.betas),
            eps=self.train.eps,
            bias_correction=True,  # as torch.optim.AdamW
        )
        self.optimizer.init(self.policy.trainable_parameters())
        if self.teacher is None:
            self.loss, self.loss_draws = self.policy.compute_loss, pcfg.noise_scheduler.num_train_timesteps
        else:
            if self.distill.target_ema > 0:
                self.target = build_policy(pcfg, self.policy.normalizer)
                self.target.update(self.policy.parameters())
            distillation = Distillation(self.policy, self.teacher, self.target)
            self.loss, self.loss_draws = distillation.loss, distillation.grid_size
        self.policy.train()  # dropout in the train step (the policy is built in eval mode)
        self.ema = tree_map(lambda p: p, self.policy.parameters()) if self.train.ema else None
        self.step = 0
        self.best: list[tuple[float, Path]] = []
        self.history: list[dict[str, float]] = []
        self.interrupted = False  # set when a run stopped early on Ctrl-C (latest.safetensors saved)
        if resume:
            self._restore(self.out_dir / "latest.safetensors")
        self._compile()
        self._compiled = False  # until the first step has run (mx.compile traces it then)

    def _student(self, declared: PolicyConfig | None) -> tuple[Any, Any]:
        """The consistency student and its teacher (``distill``)."""
        distill = self.distill
        checkpoint = read_checkpoint(distill.teacher)
        teacher, self.teacher_sha256 = policy_from_checkpoint(checkpoint), checkpoint.sha256
        tcfg = teacher.config
        if declared is not None:
            as_teacher = dataclasses.replace(
                declared, sampler=tcfg.sampler, num_inference_steps=tcfg.num_inference_steps
            )
            differ = [
                f.name
                for f in dataclasses.fields(tcfg)
                if getattr(as_teacher, f.name) != getattr(tcfg, f.name)
            ]
            if differ:
                raise ConfigError(f"policy: {differ} differ from the teacher's ({distill.teacher})")
        config = dataclasses.replace(
            tcfg,
            consistency=distill.consistency(tcfg.noise_scheduler.num_train_timesteps),
            sampler="consistency",
            num_inference_steps=distill.default_steps,
        )
        student = build_policy(config, teacher.normalizer)
        student.update(teacher.parameters())
        try:
            check_pair(student, teacher)
        except DistillationError as e:
            raise ConfigError(f"distill.teacher {distill.teacher}: {e}") from None
        return student, teacher

    def _weight_decays(self) -> dict:
        """The weight decay of every trainable parameter, by its group (``parameter_groups``)."""
        train = self.train
        encoder = train.obs_encoder_weight_decay
        rates = {
            "decay": train.weight_decay,
            "no_decay": 0.0,
            "obs_encoder": train.weight_decay if encoder is None else encoder,
        }
        groups = self.policy.parameter_groups()
        return tree_map_with_path(lambda path, _: rates[groups[path]], self.policy.trainable_parameters())

    # ---- the compiled step ------------------------------------------------------------------------

    def _compile(self) -> None:
        policy, optimizer, clip = self.policy, self.optimizer, self.train.grad_clip
        loss_and_grad = nn.value_and_grad(policy, self.loss)
        target = self.target
        state = [policy.state, optimizer.state, mx.random.state, *([target.state] if target else [])]
        inputs = state if self.teacher is None else [*state, self.teacher.state]
        mu = self.distill.target_ema if target is not None else 0.0
        distributed = self.world > 1
        cfg = policy.config
        global_batch, per_rank = self.train.batch_size, self.train.batch_size // self.world
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank

        draws = self.loss_draws

        @partial(mx.compile, inputs=inputs, outputs=state)
        def train_step(batch: dict) -> tuple[mx.array, mx.array]:
            # Draw the noise of the whole global batch and keep this process's rows, so N processes
            # compute what one process would on the combined batch (up to summation order; image crops
            # are still drawn per process). Timesteps, or a distillation's grid indices.
            noise = mx.random.normal((global_batch, cfg.horizon, cfg.action_dim))[lo:hi]
            timesteps = mx.random.randint(0, draws, (global_batch,))[lo:hi]
            loss, grads = loss_and_grad(batch, noise, timesteps)
            if distributed:
                grads = nn.average_gradients(grads)
                loss = mx.distributed.all_sum(loss) / self.world
            grad_norm = mx.array(0.0)
            if clip is not None:
                grads, grad_norm = optim.clip_grad_norm(grads, clip)
            optimizer.update(policy, grads)
            if target is not None:
                target.update(
                    tree_map(lambda t, p: mu * t + (1 - mu) * p, target.parameters(), policy.parameters())
                )
            return loss, grad_norm

        @mx.compile
        def ema_update(ema: dict, params: dict, decay: mx.array) -> dict:
            return tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)

        self._train_step, self._ema_update = train_step, ema_update

    # ---- checkpoints ------------------------------------------------------------------------------

    def _state(self) -> list[Any]:
        """Everything a step changes: weights, optimizer, and the EMA and target weights where kept."""
        kept = (self.ema, self.target.state if self.target is not None else None)
        return [self.policy.state, self.optimizer.state, *(tree for tree in kept if tree is not None)]

    def _train_state(self) -> dict[str, mx.array]:
        state = {f"train.opt.{k}": v for k, v in tree_flatten(self.optimizer.state)}
        if self.target is not None:  # a distillation's target network
            state.update({f"train.target.{k}": v for k, v in tree_flatten(self.target.parameters())})
        return state

    def _seed_step(self) -> None:
        """Noise, timesteps and crops of step k depend on (seed, k) only: resuming needs no RNG state."""
        mx.random.seed(self.train.seed * 1_000_003 + self.step)

    def _restore(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"--resume: there is no {path} to continue from")
        ckpt = read_checkpoint(path)
        if bool(ckpt.metadata.get("has_ema")) != self.train.ema:
            raise ConfigError(
                f"{path}: has_ema={ckpt.metadata.get('has_ema')} but the config says ema={self.train.ema}"
            )
        saved = ckpt.metadata.get("provenance", {}).get("train", {})
        now = json.loads(json.dumps(asdict(self.train)))  # tuples as lists, as saved
        changed = [k for k in RESUME_FIXED if k in saved and saved[k] != now[k]]
        was_distilled = ckpt.metadata.get("provenance", {}).get("distill")
        if was_distilled != self._distill_provenance():
            raise ConfigError(
                f"--resume: {path} was trained with distill {was_distilled}, this config says "
                f"{self._distill_provenance()}; train into a new --out"
            )
        if changed:
            was = ", ".join(f"train.{k}={saved[k]}" for k in changed)
            new = ", ".join(f"{now[k]}" for k in changed)
            raise ConfigError(
                f"--resume: {path} was trained with {was}, this config says {new}; resuming keeps the "
                "run's learning-rate schedule and data order, so set them back (or train into a new --out)"
            )
        self.policy.update(tree_unflatten(list(ckpt.group("model").items())))
        if self.ema is not None:
            self.ema = tree_unflatten(list(ckpt.group("ema").items()))
        self.optimizer.state = tree_unflatten(list(ckpt.group("train.opt").items()))
        if self.target is not None:
            self.target.update(tree_unflatten(list(ckpt.group("train.target").items())))
        self.step = int(ckpt.metadata["training_step"])
        self.best = [
            (float(b["rank_by"]), Path(b["path"])) for b in ckpt.metadata["provenance"].get("top_k", [])
        ]
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.exists():
            # Drop records written after the checkpoint (by a run that went on and was stopped).
            self.history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            self.history = [h for h in self.history if h["step"] <= self.step]
            metrics.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        mx.eval(self._state())

    def _distill_provenance(self) -> dict[str, Any] | None:
        """The distillation's settings and its teacher's content hash (None: ordinary training)."""
        if self.distill is None:
            return None
        return {**asdict(self.distill), "teacher_sha256": self.teacher_sha256}

    def save(self, rank_by: float | None) -> Path:
        """Write latest.safetensors; keep this step among the best if ``rank_by`` (lower is better) ranks."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "latest.safetensors"
        if rank_by is not None and self.train.keep_top_k > 0:
            ranked = sorted([*self.best, (rank_by, self.out_dir / f"step_{self.step:07d}.safetensors")])
            keep, drop = ranked[: self.train.keep_top_k], ranked[self.train.keep_top_k :]
            for _, old in drop:
                old.unlink(missing_ok=True)
            self.best = keep
        provenance = {
            "trainer": "dpmlx train",
            "data": asdict(self.data_cfg),
            "train": asdict(self.train),
            "top_k": [{"rank_by": v, "path": str(p)} for v, p in self.best],
        }
        if self.distill is not None:
            provenance["distill"] = self._distill_provenance()
        kwargs = dict(
            ema_params=self.ema,
            extra_tensors=self._train_state(),
            training_step=self.step,
            provenance=provenance,
        )
        save_policy(self.policy, path, **kwargs)
        for _, best_path in self.best:
            if best_path.name == f"step_{self.step:07d}.safetensors":
                save_policy(self.policy, best_path, **kwargs)
        return path

    # ---- loop -------------------------------------------------------------------------------------

    def validation_loss(self) -> float | None:
        if len(self.val_sampler) == 0:
            return None
        mx.random.seed(self.train.seed + 1)  # the same noise at every evaluation
        spec = BatchSpec(min(self.train.batch_size, len(self.val_sampler)), self.train.seed, self.obs_steps)
        stream = batches(self.arrays, self.val_sampler, spec)
        self.policy.eval()
        try:
            losses = [float(self.loss(next(stream)).item()) for _ in range(self.train.val_batches)]
        finally:
            self.policy.train()
        return float(np.mean(losses))

    def rollout_score(self) -> float:
        """Mean PushT score of the EMA policy (the one that is served) over the rollout seeds."""
        from trainer.rollout import rollout_score

        seeds = list(
            range(self.train.rollout_start_seed, self.train.rollout_start_seed + self.train.rollout_episodes)
        )
        trained = self.policy.parameters()
        if self.ema is not None:
            self.policy.update(self.ema)
        try:
            return rollout_score(self.policy, seeds)
        finally:
            self.policy.update(trained)

    def _log(self, record: dict[str, float]) -> None:
        self.history.append(record)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def run(self, num_steps: int | None = None, progress: bool = True) -> dict[str, float]:
        """Train until ``num_steps`` (default: the config's), checkpointing as configured.

        Ctrl-C (SIGINT, in the main thread of a single-process run) stops after the step in progress and
        saves ``latest.safetensors``, so ``--resume`` continues from there; ``interrupted`` tells."""
        from tqdm import tqdm

        end = num_steps if num_steps is not None else self.train.num_steps
        per_rank = self.train.batch_size // self.world
        # Every rank walks the same global batch stream and takes its own slice of each batch.
        spec = BatchSpec(self.train.batch_size, self.train.seed, self.obs_steps)
        stream = prefetch(batches(self.arrays, self.train_sampler, spec, start_step=self.step))
        show = progress and self.rank == 0
        bar = tqdm(total=end, initial=self.step, desc="train", disable=not show)
        window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
        last: dict[str, float] = {}
        saved_step = self.step
        with self._stop_on_sigint(bar) as stop_requested:
            while self.step < end and not stop_requested.is_set():
                batch = next(stream)
                if self.world > 1:
                    lo = self.rank * per_rank
                    batch = {
                        "obs": {k: v[lo : lo + per_rank] for k, v in batch["obs"].items()},
                        "action": batch["action"][lo : lo + per_rank],
                    }
                with self._compiling(bar, show):
                    self._seed_step()
                    loss, _ = self._train_step(tree_map(mx.array, batch))
                    if self.ema is not None:
                        decay = ema_decay(self.step, self.train.ema_power, self.train.ema_max)
                        self.ema = self._ema_update(self.ema, self.policy.parameters(), mx.array(decay))
                    mx.eval(loss, self._state())
                self.step += 1
                window_loss += loss.item()
                window_steps += 1
                bar.update(1)
                at_log = self.step % self.train.log_every == 0 or self.step == end
                at_val = self.step % self.train.val_every == 0 or self.step == end
                at_ckpt = self.step % self.train.checkpoint_every == 0 or self.step == end
                if at_log or at_val or at_ckpt:
                    elapsed = time.perf_counter() - window_start
                    last = {
                        "step": self.step,
                        "loss": window_loss / window_steps,
                        "lr": float(self.optimizer.learning_rate.item()),
                        "samples_per_s": window_steps * self.train.batch_size / elapsed,
                    }
                    if at_val:
                        val = self.validation_loss()
                        if val is not None:
                            last["val_loss"] = val
                    rollouts = self.train.rollout_every > 0 and self.rank == 0
                    if rollouts and (self.step % self.train.rollout_every == 0 or self.step == end):
                        last["rollout_score"] = self.rollout_score()
                    self._log(last)
                    bar.set_postfix(
                        loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", sps=f"{last['samples_per_s']:.0f}"
                    )
                    window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
                    if at_ckpt and self.rank == 0:
                        # Rank by rollout score (higher is better) when rollouts are on, else by val loss.
                        score = last.get("rollout_score")
                        self.save(
                            -score if score is not None else (None if rollouts else last.get("val_loss"))
                        )
                        saved_step = self.step
            self.interrupted = stop_requested.is_set()
        if self.interrupted and self.rank == 0 and self.step > saved_step:
            self.save(None)  # latest only: an interrupted step is not ranked among the best
        bar.close()
        if self.rank == 0:
            self.plot()
        return last

    @contextmanager
    def _stop_on_sigint(self, bar: Any) -> Iterator[threading.Event]:
        """An event set by the first Ctrl-C; a second one interrupts at once (nothing more is saved)."""
        stop = threading.Event()
        # Only the main thread receives signals; processes of a distributed run must stop at the same step.
        if threading.current_thread() is not threading.main_thread() or self.world > 1:
            yield stop
            return

        def request_stop(signum: int, frame: Any) -> None:
            stop.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            bar.write(
                "stopping after this step to save latest.safetensors (Ctrl-C again: quit, unsaved)",
                sys.stderr,
            )

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield stop
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextmanager
    def _compiling(self, bar: Any, show: bool) -> Iterator[None]:
        """Around the first step, which compiles the train step (minutes on a small CPU): say so, with
        the elapsed time, instead of a silent 0/N bar."""
        if self._compiled or not show:
            self._compiled = True
            yield
            return
        bar.set_description_str("compiling the train step…")
        start = time.perf_counter()
        done = threading.Event()

        def tick() -> None:  # the bar shows the elapsed time when refreshed
            while not done.wait(1.0):
                bar.refresh()

        ticker = threading.Thread(target=tick, name="compile-ticker", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
            bar.set_description_str("train")
        self._compiled = True
        bar.write(f"compiled the train step in {time.perf_counter() - start:.1f} s", sys.stderr)

    def plot(self) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        if not self.history:
            return None
        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, [h["loss"] for h in self.history], label="train loss")
        val = [(h["step"], h["val_loss"]) for h in self.history if "val_loss" in h]
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = self.out_dir / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
