"""Compact PyTorch re-implementations of the policies the converters read, with the original state-dict
names, plus writers for their on-disk layouts. Test-only: written from the documented architectures of
real-stanford/diffusion_policy (ConditionalUnet1D, TransformerForDiffusion, robomimic VisualCore),
LeRobot (DiffusionModel, DiffusionRgbEncoder, normalization processors) and diffusers' DDIM step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from torch import nn

from benchmarks.torch_baseline import (
    TransformerForDiffusion,
    Unet,
    VisualCore,
    center_crop,
    feature_hw,
    resnet18_trunk,
)

# ConditionalUnet1D, TransformerForDiffusion, the ResNet18 trunk and robomimic's VisualCore live in
# benchmarks/torch_baseline.py (the PyTorch inference baseline of benchmarks/compare_torch.py), so there
# is one copy of each.

# ---- Diffusion Policy hybrid and lowdim policies --------------------------------------------------------


class HybridPolicy(nn.Module):
    """DiffusionUnetHybridImagePolicy's module tree: obs_encoder (robomimic ObservationEncoder), model;
    DiffusionTransformerHybridImagePolicy's with ``transformer`` (TransformerForDiffusion's arguments
    after input_dim, output_dim and cond_dim)."""

    def __init__(self, obs_meta, action_dim, n_obs_steps, crop, bn, unet_kwargs=None, transformer=None):
        super().__init__()
        self._dummy_variable = nn.Parameter(torch.zeros(0))
        self.obs_meta, self.crop = obs_meta, crop
        self.obs_encoder = nn.Module()
        self.obs_encoder.obs_nets = nn.ModuleDict(
            {k: VisualCore(crop, bn) for k, m in obs_meta.items() if m["type"] == "rgb"}
        )
        feat = sum(64 if m["type"] == "rgb" else m["shape"][0] for m in obs_meta.values())
        if transformer is not None:
            self.model = TransformerForDiffusion(action_dim, action_dim, cond_dim=feat, **transformer)
        else:
            self.model = Unet(action_dim, feat * n_obs_steps, **unet_kwargs)
        self.n_obs_steps = n_obs_steps
        self.mask_generator = nn.Module()
        self.mask_generator._dummy_variable = nn.Parameter(torch.zeros(0))
        self.normalizer = nn.Module()
        self.normalizer.params_dict = nn.ParameterDict()

    def global_cond(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """nobs: normalized (B, To, ...) observations, images channel-first."""
        batch = next(iter(nobs.values())).shape[0]
        feats = []
        for key, meta in self.obs_meta.items():
            x = nobs[key].flatten(0, 1)
            if meta["type"] == "rgb":
                x = torch.relu(
                    self.obs_encoder.obs_nets[key](center_crop(x, self.crop))
                )  # feature_activation
            feats.append(x)
        return torch.cat(feats, dim=-1).reshape(batch, -1)

    def cond(self, nobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's conditioning: the features per observation step (B, To, F)."""
        return self.global_cond(nobs).reshape(-1, self.n_obs_steps, self.model.cond_obs_emb.in_features)


class TransformerLowdimPolicy(nn.Module):
    """DiffusionTransformerLowdimPolicy(obs_as_cond=True)'s module tree."""

    def __init__(self, obs_dim, action_dim, transformer):
        super().__init__()
        self._dummy_variable = nn.Parameter(torch.zeros(0))
        self.model = TransformerForDiffusion(action_dim, action_dim, cond_dim=obs_dim, **transformer)
        self.mask_generator = nn.Module()
        self.mask_generator._dummy_variable = nn.Parameter(torch.zeros(0))
        self.normalizer = nn.Module()
        self.normalizer.params_dict = nn.ParameterDict()

    def cond(self, nobs):
        return nobs["obs"]


class LowdimPolicy(nn.Module):
    def __init__(self, obs_dim, action_dim, n_obs_steps, unet_kwargs):
        super().__init__()
        self._dummy_variable = nn.Parameter(torch.zeros(0))
        self.model = Unet(action_dim, obs_dim * n_obs_steps, **unet_kwargs)
        self.mask_generator = nn.Module()
        self.mask_generator._dummy_variable = nn.Parameter(torch.zeros(0))
        self.normalizer = nn.Module()
        self.normalizer.params_dict = nn.ParameterDict()

    def global_cond(self, nobs):
        return nobs["obs"].reshape(nobs["obs"].shape[0], -1)


def set_dp_normalizer(policy: nn.Module, params: dict[str, dict[str, np.ndarray]]) -> None:
    """``normalizer.params_dict.<key>.{scale, offset, input_stats.{min,max,mean,std}}``."""
    for key, p in params.items():
        stats = nn.ParameterDict(
            {s: nn.Parameter(torch.tensor(p[s]), requires_grad=False) for s in ("min", "max", "mean", "std")}
        )
        policy.normalizer.params_dict[key] = nn.ParameterDict(
            {
                "scale": nn.Parameter(torch.tensor(p["scale"]), requires_grad=False),
                "offset": nn.Parameter(torch.tensor(p["offset"]), requires_grad=False),
                "input_stats": stats,
            }
        )


# ---- LeRobot DiffusionModel ------------------------------------------------------------------------


class LeRobotSpatialSoftmax(nn.Module):
    def __init__(self, in_c, h, w, num_kp=32):
        super().__init__()
        self.nets = nn.Conv2d(in_c, num_kp, 1)
        self.h, self.w, self.num_kp = h, w, num_kp
        pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, w), np.linspace(-1.0, 1.0, h))
        grid = np.stack([pos_x.reshape(-1), pos_y.reshape(-1)], axis=1)
        self.register_buffer("pos_grid", torch.from_numpy(grid).float())

    def forward(self, features):
        attention = torch.softmax(self.nets(features).reshape(-1, self.h * self.w), dim=-1)
        return (attention @ self.pos_grid).view(-1, self.num_kp, 2)


class LeRobotRgbEncoder(nn.Module):
    def __init__(self, image_hw, crop, bn):
        super().__init__()
        self.crop = crop
        self.backbone = resnet18_trunk(bn)
        h, w = crop or image_hw
        self.pool = LeRobotSpatialSoftmax(512, feature_hw(h), feature_hw(w))
        self.out = nn.Linear(64, 64)

    def forward(self, x):
        x = torch.flatten(self.pool(self.backbone(center_crop(x, self.crop))), start_dim=1)
        return torch.relu(self.out(x))


class LeRobotPolicy(nn.Module):
    """DiffusionPolicy: everything under ``diffusion`` (``rgb_encoder``, ``unet``)."""

    def __init__(
        self, state_dim, cameras, env_dim, action_dim, n_obs_steps, image_hw, crop, bn, separate, unet_kwargs
    ):
        super().__init__()
        self.cameras, self.separate = cameras, separate
        self.diffusion = nn.Module()
        if cameras:
            if separate:
                self.diffusion.rgb_encoder = nn.ModuleList(
                    LeRobotRgbEncoder(image_hw, crop, bn) for _ in cameras
                )
            else:
                self.diffusion.rgb_encoder = LeRobotRgbEncoder(image_hw, crop, bn)
        feat = state_dim + 64 * len(cameras) + env_dim
        self.diffusion.unet = Unet(action_dim, feat * n_obs_steps, lerobot=True, **unet_kwargs)

    def global_cond(self, batch):
        """batch: normalized observation.state (B, To, D), observation.images (B, To, N, C, H, W), env."""
        b, to = batch["observation.state"].shape[:2]
        feats = [batch["observation.state"]]
        if self.cameras:
            images = batch["observation.images"]
            if self.separate:
                per_cam = [
                    enc(images[:, :, i].flatten(0, 1)) for i, enc in enumerate(self.diffusion.rgb_encoder)
                ]
                feats.append(torch.stack(per_cam, dim=1).reshape(b, to, -1))  # per step: cam0, cam1, ...
            else:
                feats.append(self.diffusion.rgb_encoder(images.flatten(0, 2)).reshape(b, to, -1))
        if "observation.environment_state" in batch:
            feats.append(batch["observation.environment_state"])
        return torch.cat(feats, dim=-1).flatten(start_dim=1)


def lerobot_normalize(x, mode, stats, eps, legacy, inverse):
    """LeRobot's formulas: processors (``legacy=False``) and the older Normalize/Unnormalize modules."""
    t = {k: torch.tensor(v) for k, v in stats.items()}
    if mode == "IDENTITY":
        return x
    if mode == "MEAN_STD":
        return x * t["std"] + t["mean"] if inverse else (x - t["mean"]) / (t["std"] + eps)
    denom = t["max"] - t["min"]
    if legacy:
        return (x + 1) / 2 * denom + t["min"] if inverse else (x - t["min"]) / (denom + 1e-8) * 2 - 1
    denom = torch.where(denom == 0, torch.tensor(eps), denom)
    return (x + 1) / 2 * denom + t["min"] if inverse else 2 * (x - t["min"]) / denom - 1


# ---- sampling, weights, files ----------------------------------------------------------------------


def ddim_sample(
    denoise, x: torch.Tensor, num_train: int, steps: int, clip: float | None = 1.0
) -> torch.Tensor:
    """diffusers' DDIMScheduler (squaredcos_cap_v2, epsilon, eta 0, set_alpha_to_one, leading spacing)."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor(
        [min(1 - alpha_bar((i + 1) / num_train) / alpha_bar(i / num_train), 0.999) for i in range(num_train)],
        dtype=torch.float32,
    )
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    ratio = num_train // steps
    for t in (np.arange(0, steps) * ratio)[::-1]:
        eps = denoise(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[t - ratio] if t - ratio >= 0 else torch.tensor(1.0)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights with non-trivial norm affines and BatchNorm running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm | nn.BatchNorm2d | nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.ConvTranspose1d | nn.Linear):
                fan_in = (
                    m.weight[0].numel()
                    if not isinstance(m, nn.ConvTranspose1d)
                    else m.weight.shape[0] * m.weight.shape[2]
                )
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (1.5 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight.copy_(
                    torch.randn(m.in_proj_weight.shape, generator=gen) * (1.5 / m.embed_dim) ** 0.5
                )
                m.in_proj_bias.copy_(0.1 * torch.randn(m.in_proj_bias.shape, generator=gen))
            if isinstance(m, TransformerForDiffusion):
                for p in (m.pos_emb, m.cond_pos_emb):
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return module.eval()


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    mx.save_safetensors(str(path), {k: mx.array(v.detach().cpu().numpy()) for k, v in tensors.items()})


def write_lerobot_folder(folder: Path, config: dict, policy: nn.Module, stats: dict, legacy: bool) -> Path:
    """A ``pretrained_model/`` folder: config.json, model.safetensors and the normalization statistics
    (processor JSON + step files, or the legacy buffers inside model.safetensors)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = dict(policy.state_dict())
    features = {**config["input_features"], **config["output_features"]}
    if legacy:
        # Normalize/Unnormalize modules registered stats buffers only for non-IDENTITY features.
        modes = config["normalization_mapping"]
        for module, names in (
            ("normalize_inputs", config["input_features"]),
            ("normalize_targets", config["output_features"]),
            ("unnormalize_outputs", config["output_features"]),
        ):
            for feature in names:
                mode = modes.get(features[feature]["type"], "IDENTITY")
                keep = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max")}.get(mode, ())
                for stat in keep:
                    tensors[f"{module}.buffer_{feature.replace('.', '_')}.{stat}"] = torch.tensor(
                        stats[feature][stat]
                    )
    else:
        flat = {f"{f}.{s}": torch.tensor(v) for f, st in stats.items() for s, v in st.items()}
        norm_cfg = {"eps": 1e-8, "norm_map": config["normalization_mapping"]}
        pre = [
            {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
            {"registry_name": "to_batch_processor", "config": {}},
            {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
            {"registry_name": "normalizer_processor", "config": {**norm_cfg, "features": features},
             "state_file": "policy_preprocessor_step_3_normalizer_processor.safetensors"},
        ]  # fmt: skip
        outputs = {**norm_cfg, "features": config["output_features"]}
        post = [
            {"registry_name": "unnormalizer_processor", "config": outputs,
             "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors"},
            {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
        ]  # fmt: skip
        (folder / "policy_preprocessor.json").write_text(
            json.dumps({"name": "policy_preprocessor", "steps": pre})
        )
        (folder / "policy_postprocessor.json").write_text(
            json.dumps({"name": "policy_postprocessor", "steps": post})
        )
        save_safetensors(folder / pre[3]["state_file"], flat)
        save_safetensors(
            folder / post[0]["state_file"], {k: v for k, v in flat.items() if k.startswith("action.")}
        )
    save_safetensors(folder / "model.safetensors", tensors)
    return folder


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
