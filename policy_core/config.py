"""Policy configuration: the ``policy:`` section of a YAML in ``configs/``, with upstream's field names.

``shape_meta`` follows upstream Diffusion Policy: ``obs: {key: {shape, type}}`` with ``type`` ``low_dim``
or ``rgb`` (rgb shapes written channel-first ``[C, H, W]`` as upstream), and ``action: {shape: [D]}``.
Observations passed to the policy are channel-last ``(H, W, C)``, as cameras deliver them.

``type`` picks the denoiser: ``diffusion_unet`` (ConditionalUnet1D) or ``diffusion_transformer``
(TransformerForDiffusion). Its fields sit beside the others, flat, as upstream's hybrid image policies take
them; a config names the fields of its own denoiser only (``DENOISER_FIELDS``), and the other's defaults
mean nothing for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from policy_core.nets.vision import NORMS
from policy_core.schedulers import ConsistencyConfig, SchedulerConfig

DTYPES = ("float32", "bfloat16", "float16")
SAMPLERS = ("ddpm", "ddim")  # a diffusion policy's; a consistency policy samples with "consistency" only
POOLS = ("spatial_softmax", "avg")
DENOISER_FIELDS = {
    "diffusion_unet": (
        "down_dims", "kernel_size", "n_groups", "diffusion_step_embed_dim", "cond_predict_scale",
    ),
    "diffusion_transformer": (
        "n_layer", "n_head", "n_emb", "p_drop_emb", "p_drop_attn", "causal_attn", "time_as_cond",
        "obs_as_cond", "n_cond_layers",
    ),
}  # fmt: skip


class ConfigError(ValueError):
    """A policy configuration is invalid; the message names the field."""


@dataclass(frozen=True)
class ObsFeature:
    shape: tuple[int, ...]
    type: str  # "low_dim" | "rgb"

    @property
    def is_image(self) -> bool:
        return self.type == "rgb"

    @property
    def hwc_shape(self) -> tuple[int, ...]:
        """The shape one observation has when passed to the policy (channel-last for images)."""
        if self.is_image:
            c, h, w = self.shape
            return (h, w, c)
        return self.shape


@dataclass(frozen=True)
class ObsEncoderConfig:
    crop_shape: tuple[int, int] | None = (84, 84)
    pool: str = "spatial_softmax"
    num_keypoints: int = 32
    # One encoder per camera (robomimic's default) or one shared by all cameras.
    share_rgb_model: bool = False
    # "group": ResNet18-GN as Diffusion Policy. "batch": frozen BatchNorm that always uses the stored
    # running statistics (for converted BatchNorm backbones, e.g. LeRobot's pretrained ResNet18).
    norm: str = "group"


@dataclass(frozen=True)
class PolicyConfig:
    obs: dict[str, ObsFeature]
    action_dim: int
    type: str = "diffusion_unet"
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    down_dims: tuple[int, ...] = (256, 512, 1024)
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 256
    cond_predict_scale: bool = True
    # TransformerForDiffusion, upstream's hybrid image policy's defaults.
    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 256
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.3
    causal_attn: bool = True
    time_as_cond: bool = True
    obs_as_cond: bool = True
    n_cond_layers: int = 0
    noise_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampler: str = "ddpm"
    num_inference_steps: int | None = None  # None: num_train_timesteps
    obs_encoder: ObsEncoderConfig = field(default_factory=ObsEncoderConfig)
    # Set on a consistency policy (distilled by ``dpmlx train --distill``); its sampler is "consistency".
    consistency: ConsistencyConfig | None = None
    control_hz: float = 10.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.obs:
            raise ConfigError("shape_meta.obs: at least one observation key is required")
        for key, feat in self.obs.items():
            if not key or "." in key:
                # Keys name parameter subtrees (rgb_encoders.<key>) and tensors (normalizer.<key>.<stat>).
                raise ConfigError(f"shape_meta.obs key {key!r} must be non-empty and contain no '.'")
            if feat.type not in ("low_dim", "rgb"):
                raise ConfigError(f"shape_meta.obs.{key}.type must be 'low_dim' or 'rgb', got {feat.type!r}")
            if feat.is_image and len(feat.shape) != 3:
                raise ConfigError(f"shape_meta.obs.{key}.shape must be [C, H, W] for rgb, got {feat.shape}")
            if not feat.is_image and len(feat.shape) != 1:
                raise ConfigError(f"shape_meta.obs.{key}.shape must be [D] for low_dim, got {feat.shape}")
        if self.action_dim < 1:
            raise ConfigError("shape_meta.action.shape must be [D] with D >= 1")
        if self.type not in DENOISER_FIELDS:
            raise ConfigError(f"type must be one of {tuple(DENOISER_FIELDS)}, got {self.type!r}")
        if not 1 <= self.n_obs_steps <= self.horizon:
            raise ConfigError("n_obs_steps must be in [1, horizon]")
        if not 1 <= self.n_action_steps <= self.horizon - self.n_obs_steps + 1:
            raise ConfigError("n_action_steps must be in [1, horizon - n_obs_steps + 1]")
        if self.sampler not in self.samplers:
            raise ConfigError(f"sampler must be one of {tuple(self.samplers)}, got {self.sampler!r}")
        if self.consistency is not None:
            try:
                self.consistency.check(self.noise_scheduler.num_train_timesteps)
            except ValueError as e:
                raise ConfigError(f"consistency: {e}") from None
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.obs_encoder.pool not in POOLS:
            raise ConfigError(f"obs_encoder.pool must be one of {POOLS}, got {self.obs_encoder.pool!r}")
        if self.obs_encoder.norm not in NORMS:
            raise ConfigError(f"obs_encoder.norm must be one of {NORMS}, got {self.obs_encoder.norm!r}")
        steps = self.num_inference_steps
        if steps is not None and not 1 <= steps <= self.samplers[self.sampler]:
            raise ConfigError(f"num_inference_steps must be in [1, {self.samplers[self.sampler]}]")
        if self.type == "diffusion_unet":
            self._check_unet()
        else:
            self._check_transformer()

    def _check_unet(self) -> None:
        levels = len(self.down_dims)
        if self.horizon % (2 ** (levels - 1)) != 0:
            raise ConfigError(
                f"horizon {self.horizon} must be divisible by {2 ** (levels - 1)} for down_dims"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError("kernel_size must be odd (upstream pads by kernel_size // 2 on each side)")
        if any(d % self.n_groups for d in self.down_dims) or self.down_dims[0] % 8:
            raise ConfigError("down_dims must be divisible by n_groups (and down_dims[0] by 8)")

    def _check_transformer(self) -> None:
        for name in ("n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_cond_layers < 0:
            raise ConfigError(f"n_cond_layers must be >= 0 (0: an MLP encoder), got {self.n_cond_layers}")
        if self.n_emb < 4 or self.n_emb % 2:
            # The step's sinusoidal embedding is n_emb / 2 sines and as many cosines.
            raise ConfigError(f"n_emb must be even and at least 4, got {self.n_emb}")
        if self.n_emb % self.n_head:
            raise ConfigError(f"n_emb ({self.n_emb}) must be divisible by n_head ({self.n_head})")
        for name in ("p_drop_emb", "p_drop_attn"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        # Upstream's other variants condition on observations by inpainting them into the trajectory.
        if not self.obs_as_cond:
            raise ConfigError("obs_as_cond: false (inpainting observations) is not supported")
        if not self.time_as_cond:
            raise ConfigError("time_as_cond: false (the encoder-only, inpainting variant) is not supported")

    @property
    def image_keys(self) -> list[str]:
        return [k for k, f in self.obs.items() if f.is_image]

    @property
    def samplers(self) -> dict[str, int]:
        """The samplers this policy offers, each with its most steps."""
        if self.consistency is not None:
            return {"consistency": len(self.consistency.chains)}
        return dict.fromkeys(SAMPLERS, self.noise_scheduler.num_train_timesteps)

    @property
    def default_inference_steps(self) -> int:
        return self.num_inference_steps or self.samplers[self.sampler]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicyConfig:
        """Build from a plain dict (a YAML ``policy:`` section); unknown keys are errors, not ignored."""
        d = dict(d)
        kind = d.get("type", "diffusion_unet")
        if kind not in DENOISER_FIELDS:
            raise ConfigError(f"type must be one of {tuple(DENOISER_FIELDS)}, got {kind!r}")
        foreign = sorted({f for t, names in DENOISER_FIELDS.items() if t != kind for f in names} & set(d))
        if foreign:
            raise ConfigError(f"field(s) {foreign} are not fields of a policy of type {kind!r}")
        shape_meta = d.pop("shape_meta", None)
        if not isinstance(shape_meta, dict) or "obs" not in shape_meta or "action" not in shape_meta:
            raise ConfigError("shape_meta with 'obs' and 'action' is required")
        try:
            obs = {
                str(k): ObsFeature(tuple(int(s) for s in v["shape"]), str(v.get("type", "low_dim")))
                for k, v in shape_meta["obs"].items()
            }
            action_shape = [int(s) for s in shape_meta["action"]["shape"]]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"shape_meta is malformed: {e!r}") from None
        if len(action_shape) != 1:
            raise ConfigError("shape_meta.action.shape must be [D]")
        known = {f.name for f in fields(cls)} - {"obs", "action_dim"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown policy config field(s): {sorted(unknown)}")
        if "noise_scheduler" in d:
            try:
                d["noise_scheduler"] = SchedulerConfig.from_dict(d["noise_scheduler"])
            except ValueError as e:
                raise ConfigError(f"noise_scheduler: {e}") from None
        if "obs_encoder" in d:
            enc = dict(d["obs_encoder"])
            enc_known = {f.name for f in fields(ObsEncoderConfig)}
            if set(enc) - enc_known:
                raise ConfigError(f"unknown obs_encoder field(s): {sorted(set(enc) - enc_known)}")
            if enc.get("crop_shape") is not None:
                enc["crop_shape"] = tuple(int(s) for s in enc["crop_shape"])
            d["obs_encoder"] = ObsEncoderConfig(**enc)
        if d.get("consistency") is not None:
            try:
                d["consistency"] = ConsistencyConfig.from_dict(d["consistency"])
            except ValueError as e:
                raise ConfigError(f"consistency: {e}") from None
        if "down_dims" in d:
            d["down_dims"] = tuple(int(x) for x in d["down_dims"])
        return cls(obs=obs, action_dim=action_shape[0], **d)

    def to_dict(self) -> dict[str, Any]:
        """Inverse of ``from_dict`` (JSON-serialisable): the fields of this config's denoiser only."""
        d = asdict(self)
        for name in ("obs", "action_dim", "type"):
            d.pop(name)
        for kind, names in DENOISER_FIELDS.items():
            if kind != self.type:
                for name in names:
                    d.pop(name)
        d["noise_scheduler"] = self.noise_scheduler.to_dict()
        if self.consistency is None:
            del d["consistency"]  # a diffusion policy's config reads as it did before consistency policies
        else:
            d["consistency"] = self.consistency.to_dict()
        if "down_dims" in d:
            d["down_dims"] = list(self.down_dims)
        enc = d["obs_encoder"]
        enc["crop_shape"] = list(enc["crop_shape"]) if enc["crop_shape"] is not None else None
        d["shape_meta"] = {
            "obs": {k: {"shape": list(f.shape), "type": f.type} for k, f in self.obs.items()},
            "action": {"shape": [self.action_dim]},
        }
        return {"type": self.type, **d}
