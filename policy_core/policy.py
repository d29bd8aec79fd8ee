"""Diffusion Policy, with either of upstream's denoisers: ``DiffusionUnetPolicy`` (ConditionalUnet1D,
observations as global FiLM conditioning) and ``DiffusionTransformerPolicy`` (TransformerForDiffusion,
observations as cross-attention memory). ``build_policy`` picks the class from the config's ``type``.

Both serve low-dimensional (state/keypoint) and image (+ state) observations: every ``rgb`` key goes
through a ResNet18-GN encoder, every ``low_dim`` key is used as is, and the per-step features are
concatenated in ``shape_meta.obs`` order, as upstream (the UNet flattens them over the ``n_obs_steps``
axis; the transformer takes one token per step).

A request flows observations -> conditioning -> a sampler -> actions, in ``DiffusionPolicy``, the same for
both. The conditioning is one compiled call: the observations are normalized and encoded, and what the
denoiser needs at every step of the loop is computed at once (the UNet blocks' FiLM rows, their step part
once per schedule and their observation part once per request; the transformer decoder's memory keys and
values). The denoising loop then runs on the first of the policy's backends that takes the request
(``policy_core.backends``); the actions are unnormalized on the host and returned as NumPy.
"""

from __future__ import annotations

import secrets
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from policy_core import backends
from policy_core.backends.base import Backend, BackendUnavailable, Inpainting
from policy_core.config import PolicyConfig
from policy_core.nets.transformer import TransformerForDiffusion
from policy_core.nets.unet import ConditionalUnet1D, mish
from policy_core.nets.vision import RgbEncoder
from policy_core.normalizer import LinearNormalizer
from policy_core.rtc import ActionPrefix
from policy_core.schedulers import Scheduler, make_scheduler
from policy_core.seen_arrays import SeenArrays

MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
FILM_SCHEDULES_CACHED = 8
"""Schedules (sampler, steps) whose FiLM step rows are kept (up to ~0.1 MB a step for the image UNet)."""


class ObservationError(ValueError):
    """An observation does not match the policy's schema; the message names the key."""


class SamplerError(ValueError):
    """A request asks for a sampler or step count this policy does not offer (``PolicyConfig.samplers``)."""


def _as_mx(x: Any) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(np.asarray(x))


def _as_float32(value: Any) -> mx.array:
    """``value`` as a float32 MLX array; one already is passes as it is (astype would add a copy)."""
    value = _as_mx(value)
    return value if value.dtype == mx.float32 else value.astype(mx.float32)


# ``mx.random.normal(shape, key=key)`` compiled: the same values from one fused transform instead of ~6
# operations, each costing MLX's host time (benchmarks/NOTES.md). One function for every shape (its ints
# are compile constants): MLX keys traces by the function's address in a cache per thread, so functions
# made and dropped per shape could, from another thread, find a dead one's trace.
_normal_draw = mx.compile(lambda key, *shape: mx.random.normal(shape, key=key))


class DiffusionPolicy(nn.Module, ABC):
    """What the policies of both denoisers share: observations, noise, the sampling loop's dispatch to
    the backends, and the training loss. A subclass builds its network (``_build_network``), says what
    its network conditions on (``_network_cond``) and computes the conditioning of the loop
    (``_loop_tables``, ``_loop_conditioning``).

    Built in eval mode (no dropout in a direct call of the network); the trainer switches to training
    mode for its steps. Inference never runs dropout, in either mode."""

    def __init__(self, config: PolicyConfig, normalizer: LinearNormalizer | None = None):
        super().__init__()
        self.config = config
        self.normalizer = normalizer if normalizer is not None else LinearNormalizer()
        enc = config.obs_encoder
        image_keys = config.image_keys
        # A shared encoder is stored under the first camera's key, so one camera looks the same either way.
        encoder_keys = image_keys[:1] if enc.share_rgb_model else image_keys
        self.rgb_encoders = {
            key: RgbEncoder(config.obs[key].hwc_shape, enc.crop_shape, enc.pool, enc.num_keypoints, enc.norm)
            for key in encoder_keys
        }
        self._build_network(
            sum(self._encoder_for(k).output_dim if f.is_image else f.shape[0] for k, f in config.obs.items())
        )
        if config.dtype != "float32":
            self.set_dtype(MX_DTYPES[config.dtype])
        self.eval()
        # The training-time forward process (add_noise) is the same for either sampler.
        self.noise_scheduler = make_scheduler("ddpm", config.noise_scheduler)
        # Set past Module.__setattr__ so these stay out of the module's state tree. The compiled
        # conditioning reads the image encoders' arrays as inputs (``_conditioning_inputs``), so a weight
        # update (EMA copy, hot load) is seen without flattening the whole state on every call. It holds
        # the ``rgb_encoders`` dict itself, so it is compiled for the dict in place when called and again
        # after a new dict is assigned (``_compiled_conditioning``).
        object.__setattr__(self, "_compiled_conditioning_fn", None)
        object.__setattr__(self, "_compiled_encoders", None)
        object.__setattr__(self, "_backends", self._network_backends())
        object.__setattr__(self, "_schedulers", {})

    # ---- the denoiser, per subclass ---------------------------------------------------------------

    @property
    @abstractmethod
    def network(self) -> nn.Module:
        """The denoiser: ``network(sample, timesteps, cond)`` is its reference forward pass."""

    @abstractmethod
    def _build_network(self, feature_dim: int) -> None:
        """Create the denoiser for ``feature_dim`` observation features per step."""

    @abstractmethod
    def _network_backends(self) -> list[Backend]:
        """The backends that run this denoiser here, in the order they are asked."""

    @abstractmethod
    def _network_cond(self, features: mx.array) -> mx.array:
        """Observation features (B, n_obs_steps, F) -> what the denoiser conditions on."""

    @abstractmethod
    def _loop_tables(self, kind: str, num_steps: int) -> tuple[mx.array, ...]:
        """Arrays of a schedule that ``_loop_conditioning`` takes as arguments (computed outside it)."""

    @abstractmethod
    def _loop_conditioning(self, cond: mx.array, *tables: mx.array) -> mx.array:
        """The denoiser's conditioning at every step of the loop (S, ...), from ``_network_cond``'s output:
        what ``Backend.sample`` takes. Traced in the compiled conditioning."""

    def _conditioning_inputs(self) -> list[Any]:
        """The arrays the compiled conditioning reads as inputs rather than constants of its trace."""
        return [self.rgb_encoders]

    def _undecayed_parameters(self) -> set[str]:
        """The denoiser's parameters upstream's optimizer gives no weight decay (none for the UNet: its
        AdamW decays every parameter)."""
        return set()

    def parameter_groups(self) -> dict[str, str]:
        """Each trainable parameter's group in upstream's optimizer: ``obs_encoder`` (the image encoders),
        ``decay`` or ``no_decay`` (the denoiser's)."""
        undecayed = self._undecayed_parameters()
        return {
            name: "obs_encoder"
            if name.startswith("rgb_encoders.")
            else ("no_decay" if name in undecayed else "decay")
            for name, _ in tree_flatten(self.trainable_parameters())
        }

    @property
    def dtype(self) -> mx.Dtype:
        return self.network.dtype

    def _encoder_for(self, key: str) -> RgbEncoder:
        shared = self.config.obs_encoder.share_rgb_model
        return self.rgb_encoders[self.config.image_keys[0] if shared else key]

    # ---- observations ---------------------------------------------------------------------------

    def validate_obs(self, obs: dict[str, Any]) -> int:
        """Check keys and shapes of (B, n_obs_steps, ...) observations; return B."""
        cfg = self.config
        missing = [k for k in cfg.obs if k not in obs]
        if missing:
            raise ObservationError(f"missing observation key(s): {missing}")
        batch = None
        for key, feat in cfg.obs.items():
            shape = tuple(obs[key].shape)
            expected = (cfg.n_obs_steps, *feat.hwc_shape)
            if len(shape) != len(expected) + 1 or shape[1:] != expected:
                raise ObservationError(
                    f"obs[{key!r}] has shape {shape}, expected (B, {', '.join(map(str, expected))})"
                )
            if batch is None:
                batch = shape[0]
            elif shape[0] != batch:
                raise ObservationError(f"obs[{key!r}] has batch size {shape[0]}, other keys have {batch}")
        if not batch:
            raise ObservationError("batch size must be >= 1")
        return batch

    def normalize_obs(
        self, obs: dict[str, Any], affines: list[tuple[mx.array, mx.array]] | None = None
    ) -> list[mx.array]:
        """Normalized observations in ``shape_meta.obs`` order, cast to the model dtype.

        Images may be uint8 in [0, 255] or float in [0, 1]; they are normalized per channel. ``affines``
        are the normalizer's (scale, offset) per key (``_obs_affines``), passed by the compiled
        conditioning as inputs; by default they are read from the normalizer.
        """
        affines = affines if affines is not None else self._obs_affines()
        out = []
        for (key, feat), affine in zip(self.config.obs.items(), affines, strict=True):
            x = _as_mx(obs[key])
            if feat.is_image and x.dtype == mx.uint8:
                x = x.astype(mx.float32) / 255.0
            x = self.normalizer.normalize(key, x.astype(mx.float32), affine)
            out.append(x.astype(self.dtype))
        return out

    def _obs_affines(self) -> list[tuple[mx.array, mx.array]]:
        return [self.normalizer.affine(key) for key in self.config.obs]

    def crop_images(self, nobs: list[mx.array]) -> list[mx.array]:
        """Normalized (B, T, ...) observations with every camera's images randomly cropped (training
        augmentation), for two networks that must see the same crops: the encoders' centre crop of a
        cropped image is the image itself."""
        out = list(nobs)
        for i, (key, feat) in enumerate(self.config.obs.items()):
            if feat.is_image:
                x = nobs[i]
                flat = self._encoder_for(key).crop(x.reshape(-1, *x.shape[2:]), random_crop=True)
                out[i] = flat.reshape(*x.shape[:2], *flat.shape[1:])
        return out

    def encode_obs(
        self, nobs: list[mx.array], random_crop: bool = False, inference: bool = False
    ) -> mx.array:
        """Normalized (B, T, ...) observations -> what the denoiser conditions on: the per-step features
        (B, T, feature_dim), flattened to global conditioning (B, T * feature_dim) for the UNet.

        ``inference`` runs the image trunks in the form the preferred backend offers (the same results,
        no gradients), where it offers one."""
        features = []
        for (key, feat), x in zip(self.config.obs.items(), nobs, strict=True):
            batch, steps = x.shape[:2]
            if feat.is_image:
                encoder = self._encoder_for(key)
                trunk = self._backends[0].image_trunk(encoder.trunk) if inference else None
                y = encoder(x.reshape(batch * steps, *x.shape[2:]), random_crop, trunk)
                x = y.reshape(batch, steps, -1)
            features.append(x)
        return self._network_cond(mx.concatenate(features, axis=-1))

    # ---- sampling -------------------------------------------------------------------------------

    def _scheduler(self, kind: str, num_steps: int) -> Scheduler:
        key = (kind, num_steps)
        if key not in self._schedulers:
            scheduler = make_scheduler(kind, self.config.noise_scheduler, self.config.consistency)
            scheduler.set_timesteps(num_steps)
            self._schedulers[key] = scheduler
        return self._schedulers[key]

    def _conditioning(
        self, obs: dict[str, mx.array], affines: list[tuple[mx.array, mx.array]], *tables: mx.array
    ) -> mx.array:
        """Raw observations -> the denoiser's conditioning of every step at once (``_loop_conditioning``,
        given the schedule's ``tables``). Compiled with the normalisation (``affines``), so a request's
        elementwise work is fused kernels; what can change between calls is an input, never a constant
        of the trace."""
        cond = self.encode_obs(self.normalize_obs(obs, affines), inference=True)
        return self._loop_conditioning(cond, *tables)

    def _compiled_conditioning(self) -> Callable[..., mx.array]:
        """``_conditioning`` compiled with the ``rgb_encoders`` dict's arrays (``_conditioning_inputs``) as
        inputs, rebuilt when that attribute is another dict than the one it was built for: the old
        function would keep reading the old dict's encoders (an identity check, not a flattening of the
        state, on every request)."""
        if self._compiled_encoders is not self.rgb_encoders:
            compiled = mx.compile(self._conditioning, inputs=self._conditioning_inputs())
            object.__setattr__(self, "_compiled_conditioning_fn", compiled)
            object.__setattr__(self, "_compiled_encoders", self.rgb_encoders)
        return self._compiled_conditioning_fn

    def _sample(
        self,
        kind: str,
        num_steps: int,
        obs: dict[str, mx.array],
        x: mx.array,
        step_noise: mx.array,
        inpainting: Inpainting | None = None,
    ) -> np.ndarray:
        """Raw observations -> the normalized action trajectory (B, horizon, action_dim), float32 on the
        host: the conditioning as one compiled call, then the denoising loop on the first backend that
        takes the request (and, with ``inpainting``, that ``inpaints``). A backend that gives
        up on a request it took (``BackendUnavailable``) declines later ones; the request reruns on the
        next."""
        scheduler = self._scheduler(kind, num_steps)
        tables = self._loop_tables(kind, num_steps)
        conditioning = self._compiled_conditioning()(obs, self._obs_affines(), *tables)
        batch, horizon = x.shape[:2]
        known = () if inpainting is None else (inpainting,)
        failed = None
        for backend in self._backends:
            if (known and not backend.inpaints) or not backend.supports(batch, horizon, scheduler):
                continue
            if failed is not None:
                warnings.warn(f"{failed}; this and later requests run on the {backend.name}", stacklevel=2)
            try:
                return backend.sample(scheduler, x, conditioning, step_noise, *known)
            except BackendUnavailable as error:
                failed = error
        raise AssertionError("the generic backend takes every request")

    def _inpainting(self, prefixes: Sequence[ActionPrefix | None], batch: int) -> Inpainting | None:
        """The rows' prefixes as a backend's ``Inpainting`` over the normalized trajectory, or None where
        no row constrains anything (a plain request). Prefix row i is ``action_pred[n_obs_steps - 1 + i]``,
        the chunk's action i."""
        cfg = self.config
        if len(prefixes) != batch:
            raise ValueError(f"{len(prefixes)} prefixes for a batch of {batch}")
        start, action = cfg.n_obs_steps - 1, self.normalizer["action"]
        shape = (batch, cfg.horizon)
        target = np.zeros((*shape, cfg.action_dim), np.float32)
        guide, replace = np.zeros((*shape, 1), np.float32), np.zeros((*shape, 1), np.float32)
        max_guidance = np.ones((batch, 1, 1), np.float32)
        for row, prefix in enumerate(prefixes):
            if prefix is None:
                continue
            k, dim = prefix.actions.shape
            if dim != cfg.action_dim or k > cfg.horizon - start:
                raise ValueError(
                    f"prefix has shape {(k, dim)}, expected at most ({cfg.horizon - start}, {cfg.action_dim})"
                )
            target[row, start : start + k] = prefix.actions * action.scale + action.offset
            if prefix.method == "guided":
                guide[row, start : start + k, 0] = prefix.weights()
                max_guidance[row] = prefix.max_guidance
            else:
                replace[row, start : start + prefix.delay] = 1.0
        guided = bool(guide.any())
        if not guided and not replace.any():
            return None
        arrays = (mx.array(a) for a in (target, guide, max_guidance, replace))
        return Inpainting(*arrays, guided=guided)

    def _backend_for(self, batch: int, horizon: int, scheduler: Scheduler) -> Backend:
        return next(b for b in self._backends if b.supports(batch, horizon, scheduler))

    def unpadded_batch_sizes(self, max_batch: int) -> list[int]:
        """The batch sizes up to ``max_batch`` that the default sampler runs on a backend whose time grows
        with every row, padding rows included (on CUDA the sampler kernel; none elsewhere): a server
        batching requests should run these sizes as they are rather than pad them."""
        cfg = self.config
        scheduler = self._scheduler(cfg.sampler, cfg.default_inference_steps)
        sizes = range(1, max_batch + 1)
        return [b for b in sizes if self._backend_for(b, cfg.horizon, scheduler).unpadded]

    def sample_noise(self, batch: int, num_steps: int, seed: int | None = None) -> tuple[mx.array, mx.array]:
        """The initial trajectory x_T (B, horizon, action_dim) and the per-step sampler noise
        (num_steps, B, horizon, action_dim) that ``predict_action(seed=seed)`` uses."""
        shape = (batch, self.config.horizon, self.config.action_dim)
        key = mx.random.key(secrets.randbits(63) if seed is None else seed)
        noise = _normal_draw(key, 1 + num_steps, *shape)  # one draw for x_T and every step
        return noise[0], noise[1:]

    def predict_action(
        self,
        obs: dict[str, Any],
        *,
        num_inference_steps: int | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        noise: Any = None,
        step_noise: Any = None,
        prefixes: Sequence[ActionPrefix | None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Sample an action chunk. obs: {key: (B, n_obs_steps, ...)}, images channel-last.

        Returns ``action`` (B, n_action_steps, action_dim) and ``action_pred`` (B, horizon, action_dim),
        float32 NumPy arrays (``action`` a view of ``action_pred``). ``seed`` makes the initial and
        per-step noise reproducible; ``noise`` is an explicit x_T (B, horizon, action_dim) and
        ``step_noise`` explicit per-step noise (steps, B, horizon, action_dim), both overriding what the
        seed would give (a server batching several requests passes each request's own). ``scheduler``
        switches the sampler without reloading weights: "ddim" | "ddpm" for a diffusion policy,
        "consistency" (1 to ``len(chains)`` steps) for a consistency policy; another is a ``SamplerError``.
        ``prefixes`` (one per row, None for a plain row) makes the chunks continue known actions
        (real-time chunking, ``policy_core.rtc``); a row's frozen actions come back as given where its
        method is "replace". One call at a time per
        policy: a backend may write the observations into arrays it keeps.
        """
        cfg = self.config
        batch = self.validate_obs(obs)
        kind = scheduler or cfg.sampler
        steps = num_inference_steps or cfg.default_inference_steps
        if kind not in cfg.samplers:
            what = "a consistency policy" if cfg.consistency is not None else "a diffusion policy"
            raise SamplerError(f"scheduler {kind!r}: {what} samples with {sorted(cfg.samplers)}")
        if not 1 <= steps <= cfg.samplers[kind]:
            raise SamplerError(f"num_inference_steps of {kind} must be in [1, {cfg.samplers[kind]}]")
        # Draw only what is not given (the server passes both: each request's own noise).
        drawn = self.sample_noise(batch, steps, seed) if noise is None or step_noise is None else (None, None)
        x_init = drawn[0] if noise is None else _as_float32(noise)
        noise_per_step = drawn[1] if step_noise is None else _as_float32(step_noise)
        for name, value, shape in (
            ("noise", x_init, (batch, cfg.horizon, cfg.action_dim)),
            ("step_noise", noise_per_step, (steps, batch, cfg.horizon, cfg.action_dim)),
        ):
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")
        inpainting = None if prefixes is None else self._inpainting(prefixes, batch)
        # The preferred backend may write them into arrays it keeps (on CUDA, host memory the GPU reads):
        # one request at a time per policy (the server's worker per model).
        obs = {k: self._backends[0].host_array(k, obs[k]) for k in cfg.obs}
        naction = self._sample(kind, steps, obs, x_init, noise_per_step, inpainting)
        action_pred = self.normalizer.unnormalize("action", naction)
        start = cfg.n_obs_steps - 1
        for row, prefix in enumerate(prefixes if inpainting is not None else ()):
            if prefix is not None and prefix.method == "replace":  # as given, not unnormalize's rounding
                action_pred[row, start : start + prefix.delay] = prefix.actions[: prefix.delay]
        return {"action": action_pred[:, start : start + cfg.n_action_steps], "action_pred": action_pred}

    # ---- training -------------------------------------------------------------------------------

    def compute_loss(
        self, batch: dict[str, Any], noise: mx.array | None = None, timesteps: mx.array | None = None
    ) -> mx.array:
        """Denoising MSE with uniformly drawn timesteps (epsilon or sample target, per the scheduler).

        batch: ``obs`` {key: (B, >= n_obs_steps, ...)}, ``action`` (B, horizon, action_dim).
        ``noise`` (B, horizon, action_dim) and ``timesteps`` (B,) may be given (a data-parallel trainer
        passes each process its slice of the global batch's draws); otherwise they, like the random crops,
        come from MLX's global RNG, so a compiled train step must capture ``mx.random.state``.
        """
        cfg = self.config
        to = cfg.n_obs_steps
        nobs = self.normalize_obs({k: _as_mx(v)[:, :to] for k, v in batch["obs"].items()})
        naction = self.normalizer.normalize("action", _as_mx(batch["action"]).astype(mx.float32))
        cond = self.encode_obs(nobs, random_crop=True)
        sched = cfg.noise_scheduler
        if noise is None:
            noise = mx.random.normal(naction.shape)
        if timesteps is None:
            timesteps = mx.random.randint(0, sched.num_train_timesteps, (naction.shape[0],))
        noisy = self.noise_scheduler.add_noise(naction, noise, timesteps)
        pred = self.network(noisy.astype(self.dtype), timesteps, cond).astype(mx.float32)
        target = noise if sched.prediction_type == "epsilon" else naction
        return mx.mean(mx.square(pred - target))


class DiffusionUnetPolicy(DiffusionPolicy):
    """Upstream's DiffusionUnetHybridImagePolicy / DiffusionUnetLowdimPolicy (global conditioning)."""

    def __init__(self, config: PolicyConfig, normalizer: LinearNormalizer | None = None):
        super().__init__(config, normalizer)
        object.__setattr__(self, "_film_cache", (None, {}))
        object.__setattr__(self, "_film_arrays", SeenArrays())

    @property
    def network(self) -> ConditionalUnet1D:
        return self.unet

    def _build_network(self, feature_dim: int) -> None:
        config = self.config
        self.unet = ConditionalUnet1D(
            input_dim=config.action_dim,
            global_cond_dim=feature_dim * config.n_obs_steps,
            diffusion_step_embed_dim=config.diffusion_step_embed_dim,
            down_dims=config.down_dims,
            kernel_size=config.kernel_size,
            n_groups=config.n_groups,
            cond_predict_scale=config.cond_predict_scale,
        )

    def _network_backends(self) -> list[Backend]:
        return backends.for_unet(self.unet)

    def _network_cond(self, features: mx.array) -> mx.array:
        return features.reshape(features.shape[0], -1)

    def _loop_tables(self, kind: str, num_steps: int) -> tuple[mx.array, mx.array]:
        """Every residual block's ``cond_encoder`` (a Linear of [step embedding, observation features])
        split in two: ``step_rows`` (steps, sum of the blocks' m) float32, the step columns applied to
        the schedule's step embeddings plus the biases, and ``obs_weight`` (sum m, global_cond_dim), the
        observation columns stacked. The step part is the same for every request of a schedule, so it is
        computed once per schedule and weights (two evaluations when built); a request multiplies its
        features by ``obs_weight`` (one product for all blocks). Rebuilt whenever a block's or the step
        encoder's arrays are other objects than those it was built from (``SeenArrays``: after an update,
        a load, or a new trace of a compiled function that takes the state as inputs); an item write
        into a weight array in place would not be seen."""
        unet = self.unet
        layers = [blk.cond_encoder for blk in unet.residual_blocks()]
        linears = (*layers, *unet.diffusion_step_encoder)
        arrays = [a for layer in linears for a in (layer["weight"], layer["bias"])]
        obs_weight, step_rows = self._film_cache
        if not self._film_arrays.same(arrays):
            weight = mx.concatenate([layer["weight"] for layer in layers])
            obs_weight = mx.contiguous(weight[:, unet.step_embed_dim :])
            mx.eval(obs_weight)
            step_rows = {}
            object.__setattr__(self, "_film_cache", (obs_weight, step_rows))
            self._film_arrays.remember(arrays)
        key = (kind, num_steps)
        if key not in step_rows:
            if len(step_rows) >= FILM_SCHEDULES_CACHED:
                del step_rows[next(iter(step_rows))]  # the schedule cached first
            weight = mx.concatenate([layer["weight"][:, : unet.step_embed_dim] for layer in layers])
            bias = mx.concatenate([layer["bias"] for layer in layers])
            embedding = unet.encode_timesteps(mx.array(self._scheduler(kind, num_steps).timesteps))
            f32 = mx.float32
            step_rows[key] = mx.addmm(bias.astype(f32), mish(embedding).astype(f32), weight.astype(f32).T)
            mx.eval(step_rows[key])
        return step_rows[key], obs_weight

    def _loop_conditioning(
        self, global_cond: mx.array, step_rows: mx.array, obs_weight: mx.array
    ) -> mx.array:
        """The FiLM rows of every step at once, (steps, B, sum of the blocks' m) float32: ``step_rows``
        (``_loop_tables``) plus the observation features' part, mish(features) times ``obs_weight``, one
        product for every block."""
        obs_rows = (mish(global_cond) @ obs_weight.T).astype(mx.float32)
        return step_rows[:, None] + obs_rows[None]


class DiffusionTransformerPolicy(DiffusionPolicy):
    """Upstream's DiffusionTransformerHybridImagePolicy / DiffusionTransformerLowdimPolicy with the
    observations as conditioning (``obs_as_cond``): one memory token per observation step."""

    @property
    def network(self) -> TransformerForDiffusion:
        return self.transformer

    def _build_network(self, feature_dim: int) -> None:
        config = self.config
        self.transformer = TransformerForDiffusion(
            input_dim=config.action_dim,
            output_dim=config.action_dim,
            horizon=config.horizon,
            n_obs_steps=config.n_obs_steps,
            cond_dim=feature_dim,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_emb=config.n_emb,
            p_drop_emb=config.p_drop_emb,
            p_drop_attn=config.p_drop_attn,
            causal_attn=config.causal_attn,
            n_cond_layers=config.n_cond_layers,
        )

    def _network_backends(self) -> list[Backend]:
        return backends.for_transformer(self.transformer)

    def _network_cond(self, features: mx.array) -> mx.array:
        return features

    def _conditioning_inputs(self) -> list[Any]:
        # The memory is computed in the compiled conditioning: the transformer's arrays are inputs too.
        return [*super()._conditioning_inputs(), self.transformer.state]

    def _undecayed_parameters(self) -> set[str]:
        # Upstream's get_optim_groups: biases, LayerNorm weights and the position embeddings.
        decayed = set(self.transformer.decayed_parameters())
        names = (name for name, _ in tree_flatten(self.transformer.parameters()))
        return {f"transformer.{name}" for name in names if name not in decayed}

    def _loop_tables(self, kind: str, num_steps: int) -> tuple[mx.array]:
        """The schedule's timesteps (S,)."""
        return (mx.array(self._scheduler(kind, num_steps).timesteps),)

    def _loop_conditioning(self, cond: mx.array, timesteps: mx.array) -> mx.array:
        """Every decoder layer's memory keys and values at every step, (S, B, L, 2, H, 1 + To, D) in the
        model's dtype."""
        transformer = self.transformer
        return transformer.memory_keys_values(transformer.step_tokens(timesteps), cond)


POLICY_CLASSES: dict[str, type[DiffusionPolicy]] = {
    "diffusion_unet": DiffusionUnetPolicy,
    "diffusion_transformer": DiffusionTransformerPolicy,
}


def build_policy(
    config: PolicyConfig | dict[str, Any], normalizer: LinearNormalizer | None = None
) -> DiffusionPolicy:
    """Build the policy of a ``PolicyConfig`` or a plain dict (a YAML ``policy:`` section): the class of
    its ``type``."""
    if not isinstance(config, PolicyConfig):
        config = PolicyConfig.from_dict(config)
    return POLICY_CLASSES[config.type](config, normalizer)
