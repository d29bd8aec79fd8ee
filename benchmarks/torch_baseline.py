"""Diffusion Policy inference in PyTorch, device-aware: the baseline ``benchmarks.compare_torch`` times
our MLX policy against.

The architecture is upstream's (real-stanford/diffusion_policy): ``ConditionalUnet1D`` or
``TransformerForDiffusion`` (built from PyTorch's own transformer layers, as upstream builds it) and, for
image observations, robomimic's ResNet18-GroupNorm + SpatialSoftmax VisualCore, written compactly from
the documented architectures with upstream's state-dict names (``tests/convert_reference.py`` imports the
same classes for the converter parity tests). ``TorchPolicy.predict_action`` does per request what our
``DiffusionPolicy.predict_action`` does: normalise the observations (affine), encode images (uint8 HWC ->
float CHW in [0, 1] -> [-1, 1] -> centre crop -> ResNet -> keypoints -> Linear + ReLU), build the
conditioning (global for the UNet, one token per observation step for the transformer), run the DDIM
(eta 0) or DDPM (fixed_small) loop with diffusers' semantics (coefficients precomputed as tensors on the
device), unnormalise and slice the action window. The denoiser is upstream's full forward per step (our
MLX policy hoists the FiLM projections of the observation, and the transformer's memory, out of the
loop; this baseline does not, as upstream does not).

Variants: float32 or bfloat16 (weights and activations cast, as our ``dtype: bfloat16``; the sampler
state stays float32), eager or ``torch.compile`` of the per-step denoiser (``mode="reduce-overhead"``,
i.e. CUDA graphs, on CUDA; default mode on CPU, only when asked). On CUDA, TF32 is disabled for matmuls
and cuDNN so float32 means float32.

Worker entry point (compare_torch runs one per framework variant, so torch never shares a process, and
its CPU thread pool, with MLX):

    python -m benchmarks.torch_baseline --config lowdim --samplers ddim10,ddpm100 --dtype float32 \
        --mode eager --json /tmp/torch.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from benchmarks.compare_torch import cpu_model, summarize, time_requests
from benchmarks.policy_latency import CONFIGS, SAMPLERS

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---- ConditionalUnet1D (upstream names; ``lerobot=True`` gives LeRobot's port's names) ----------


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps -> (N, dim) float32 [sin(t f), cos(t f)]."""
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(cin, cout, k, padding=k // 2), nn.GroupNorm(groups, cout), nn.Mish()
        )

    def forward(self, x):
        return self.block(x)


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout, cond_dim, k, groups, scale, lerobot):
        super().__init__()
        first, second = Conv1dBlock(cin, cout, k, groups), Conv1dBlock(cout, cout, k, groups)
        if lerobot:
            self.conv1, self.conv2 = first, second
        else:
            self.blocks = nn.ModuleList([first, second])
        self.lerobot, self.scale, self.cout = lerobot, scale, cout
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * cout if scale else cout))
        self.residual_conv = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cond):
        first, second = (self.conv1, self.conv2) if self.lerobot else self.blocks
        out = first(x)
        embed = self.cond_encoder(cond).unsqueeze(-1)
        out = embed[:, : self.cout] * out + embed[:, self.cout :] if self.scale else out + embed
        return second(out) + self.residual_conv(x)


class Sampler(nn.Module):
    """Upstream's Downsample1d / Upsample1d: the conv sits under ``.conv``."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


class Unet(nn.Module):
    """ConditionalUnet1D with global conditioning. forward: sample (B, T, input_dim), timesteps (B,),
    global_cond (B, G) -> (B, T, input_dim), in the dtype of ``sample``."""

    def __init__(self, input_dim, global_cond_dim, dsed, down_dims, k, groups, scale, lerobot=False):
        super().__init__()
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed)
        )
        cond_dim = dsed + global_cond_dim
        dims = [input_dim, *down_dims]
        in_out = list(zip(dims[:-1], dims[1:], strict=True))

        def crb(cin, cout):
            return ResidualBlock(cin, cout, cond_dim, k, groups, scale, lerobot)

        def sampler(conv):
            return conv if lerobot else Sampler(conv)

        self.down_modules = nn.ModuleList()
        for i, (cin, cout) in enumerate(in_out):
            last = i == len(in_out) - 1
            down = nn.Identity() if last else sampler(nn.Conv1d(cout, cout, 3, 2, 1))
            self.down_modules.append(nn.ModuleList([crb(cin, cout), crb(cout, cout), down]))
        self.mid_modules = nn.ModuleList([crb(dims[-1], dims[-1]), crb(dims[-1], dims[-1])])
        self.up_modules = nn.ModuleList(
            nn.ModuleList([crb(cout * 2, cin), crb(cin, cin), sampler(nn.ConvTranspose1d(cin, cin, 4, 2, 1))])
            for cin, cout in reversed(in_out[1:])
        )
        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], k), nn.Conv1d(down_dims[0], input_dim, 1)
        )

    def forward(self, sample, timesteps, global_cond):
        x = sample.transpose(1, 2)
        # The sinusoidal embedding is float32; the MLP after it runs in the model's dtype.
        step = self.diffusion_step_encoder[0](timesteps).to(sample.dtype)
        cond = torch.cat([self.diffusion_step_encoder[1:](step), global_cond], dim=-1)
        skips = []
        for resnet, resnet2, down in self.down_modules:
            x = resnet2(resnet(x, cond), cond)
            skips.append(x)
            x = down(x)
        for mid in self.mid_modules:
            x = mid(x, cond)
        for resnet, resnet2, up in self.up_modules:
            x = up(resnet2(resnet(torch.cat([x, skips.pop()], dim=1), cond), cond))
        return self.final_conv(x).transpose(1, 2)


# ---- TransformerForDiffusion (upstream names) --------------------------------------------------------


class TransformerForDiffusion(nn.Module):
    """Upstream's TransformerForDiffusion with the step and the observations as the memory
    (``time_as_cond``, ``obs_as_cond``). forward: sample (B, T, input_dim), timesteps (B,), cond (B, To,
    cond_dim) -> (B, T, output_dim). Causal masks as upstream's additive buffers ``mask`` / ``memory_mask``
    (action t sees actions <= t, the step token and observation steps <= t)."""

    def __init__(
        self, input_dim, output_dim, horizon, n_obs_steps, cond_dim, n_layer, n_head, n_emb, p_drop_emb,
        p_drop_attn, causal_attn, n_cond_layers,
    ):  # fmt: skip
        super().__init__()
        self._dummy_variable = nn.Parameter(torch.zeros(0))  # upstream's ModuleAttrMixin
        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, 1 + n_obs_steps, n_emb))
        layer = {"d_model": n_emb, "nhead": n_head, "dim_feedforward": 4 * n_emb, "dropout": p_drop_attn,
                 "activation": "gelu", "batch_first": True, "norm_first": True}  # fmt: skip
        if n_cond_layers > 0:
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(**layer), n_cond_layers, enable_nested_tensor=False
            )
        else:
            self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), n_layer)
        if causal_attn:
            t = torch.arange(horizon)[:, None]
            allowed = {
                "mask": t >= torch.arange(horizon)[None],
                "memory_mask": t >= torch.arange(1 + n_obs_steps) - 1,
            }
            for name, where in allowed.items():
                self.register_buffer(name, torch.zeros(where.shape).masked_fill(~where, float("-inf")))
        else:
            self.mask = self.memory_mask = None
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, output_dim)

    def forward(self, sample, timesteps, cond):
        step = self.time_emb(timesteps).to(sample.dtype)[:, None]
        memory = self.encoder(
            self.drop(torch.cat([step, self.cond_obs_emb(cond)], dim=1) + self.cond_pos_emb)
        )
        x = self.drop(self.input_emb(sample) + self.pos_emb[:, : sample.shape[1]])
        # tgt_is_causal: the mask is causal; saying so spares torch.compile a data-dependent check of it.
        causal = self.mask is not None
        x = self.decoder(x, memory, tgt_mask=self.mask, memory_mask=self.memory_mask, tgt_is_causal=causal)
        return self.head(self.ln_f(x))


def transformer_from_config(
    section: dict[str, Any], action_dim: int, cond_dim: int
) -> TransformerForDiffusion:
    """The transformer of a ``type: diffusion_transformer`` policy section (our config's defaults)."""
    return TransformerForDiffusion(
        action_dim, action_dim, int(section.get("horizon", 16)), int(section.get("n_obs_steps", 2)), cond_dim,
        int(section.get("n_layer", 8)), int(section.get("n_head", 4)), int(section.get("n_emb", 256)),
        float(section.get("p_drop_emb", 0.0)), float(section.get("p_drop_attn", 0.3)),
        bool(section.get("causal_attn", True)), int(section.get("n_cond_layers", 0)),
    )  # fmt: skip


# ---- ResNet18 trunk (torchvision names, as Sequential children 0..7) ---------------------------------


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.GroupNorm(channels // 16, channels)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(cout, bn)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(cout, bn)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout, bn))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18_trunk(bn: bool) -> nn.Sequential:
    def layer(cin, cout, stride):
        return nn.Sequential(BasicBlock(cin, cout, stride, bn), BasicBlock(cout, cout, 1, bn))

    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), _norm(64, bn), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        layer(64, 64, 1), layer(64, 128, 2), layer(128, 256, 2), layer(256, 512, 2),
    )  # fmt: skip


def center_crop(x: torch.Tensor, crop: tuple[int, int] | None) -> torch.Tensor:
    if crop is None:
        return x
    h, w = x.shape[-2:]
    top, left = int(round((h - crop[0]) / 2.0)), int(round((w - crop[1]) / 2.0))
    return x[..., top : top + crop[0], left : left + crop[1]]


def feature_hw(size: int) -> int:
    return math.ceil(size / 32)  # robomimic's ResNet18Conv.output_shape (exact for the sizes used here)


# ---- robomimic VisualCore ------------------------------------------------------------------------------


class RobomimicSpatialSoftmax(nn.Module):
    def __init__(self, in_c, h, w, num_kp=32):
        super().__init__()
        self.nets = nn.Conv2d(in_c, num_kp, 1)
        self.num_kp, self.h, self.w = num_kp, h, w
        pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, w), np.linspace(-1.0, 1.0, h))
        self.register_buffer("pos_x", torch.from_numpy(pos_x.reshape(1, h * w)).float())
        self.register_buffer("pos_y", torch.from_numpy(pos_y.reshape(1, h * w)).float())
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, feature):
        attention = torch.softmax(self.nets(feature).reshape(-1, self.h * self.w) / self.temperature, dim=-1)
        x = torch.sum(self.pos_x * attention, dim=1, keepdim=True)
        y = torch.sum(self.pos_y * attention, dim=1, keepdim=True)
        return torch.cat([x, y], 1).view(-1, self.num_kp, 2)


class VisualCore(nn.Module):
    """ResNet18 trunk -> SpatialSoftmax -> Flatten -> Linear(2 * num_kp, 64); (N, 3, h, w) cropped images.
    Diffusion Policy's ObservationEncoder applies a ReLU (feature activation) after it."""

    def __init__(self, crop, bn, num_kp=32):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.nets = resnet18_trunk(bn)
        self.pool = RobomimicSpatialSoftmax(512, feature_hw(crop[0]), feature_hw(crop[1]), num_kp)
        # The same modules registered a second time: upstream checkpoints carry both names.
        self.nets = nn.Sequential(self.backbone, self.pool, nn.Flatten(1), nn.Linear(2 * num_kp, 64))

    def forward(self, x):
        return self.nets[3](self.nets[2](self.pool(self.backbone.nets(x))))


# ---- configuration and schedules ---------------------------------------------------------------------


def load_policy_section(config: str | Path) -> dict[str, Any]:
    """The ``policy:`` section of a config YAML, given a name from ``CONFIGS`` or a path."""
    root = Path(__file__).resolve().parent.parent
    path = root / CONFIGS[config] if config in CONFIGS else Path(config)
    return yaml.safe_load(path.read_text())["policy"]


def _betas(cfg: dict[str, Any]) -> np.ndarray:
    """float32 betas as diffusers builds them."""
    n = int(cfg.get("num_train_timesteps", 100))
    schedule = cfg.get("beta_schedule", "squaredcos_cap_v2")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if schedule == "linear":
        return np.linspace(start, end, n).astype(np.float32)
    if schedule == "scaled_linear":
        root = np.linspace(start**0.5, end**0.5, n).astype(np.float32)
        return root * root
    if schedule != "squaredcos_cap_v2":
        raise ValueError(f"unsupported beta_schedule {schedule!r}")

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.asarray(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32
    )


class Schedule:
    """One sampler's timesteps and per-step coefficients, as tensors on the device.

    diffusers semantics ("leading" spacing, epsilon prediction, optional x0 clipping): DDIM with eta 0
    and ``set_alpha_to_one``, or DDPM with the fixed_small variance. Coefficients are computed in
    float32 in diffusers' order of operations (as policy_core/schedulers.py does).
    """

    def __init__(self, kind: str, steps: int, cfg: dict[str, Any], batch: int, device: torch.device):
        if kind not in ("ddim", "ddpm"):
            raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("the torch baseline implements epsilon prediction only")
        if cfg.get("variance_type", "fixed_small") != "fixed_small" and kind == "ddpm":
            raise ValueError("the torch baseline implements DDPM's fixed_small variance only")
        if float(cfg.get("eta", 0.0)) != 0.0 and kind == "ddim":
            raise ValueError("the torch baseline implements DDIM with eta 0 only")
        n_train = int(cfg.get("num_train_timesteps", 100))
        offset = int(cfg.get("steps_offset", 0))
        self.kind, self.steps = kind, steps
        self.clip = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", True) else None
        one = np.float32(1.0)
        alphas_cumprod = np.cumprod((one - _betas(cfg)).astype(np.float64)).astype(np.float32)
        ratio = n_train // steps
        timesteps = [k * ratio + offset for k in range(steps - 1, -1, -1)]
        prev = [t - ratio for t in timesteps] if kind == "ddim" else timesteps[1:] + [-1]
        rows = []
        for t, p in zip(timesteps, prev, strict=True):
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[p] if p >= 0 else one
            beta_prod, beta_prod_prev = one - a_t, one - a_prev
            if kind == "ddim":  # eta 0: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
                rows.append((np.sqrt(beta_prod), np.sqrt(a_t), np.sqrt(a_prev), np.sqrt(beta_prod_prev), 0.0))
            else:
                cur_alpha = a_t / a_prev
                cur_beta = one - cur_alpha
                variance = np.maximum(beta_prod_prev / beta_prod * cur_beta, np.float32(1e-20))
                rows.append(
                    (
                        np.sqrt(beta_prod),
                        np.sqrt(a_t),
                        np.sqrt(a_prev) * cur_beta / beta_prod,
                        np.sqrt(cur_alpha) * beta_prod_prev / beta_prod,
                        np.sqrt(variance) if t > 0 else 0.0,  # no noise on the step from t == 0
                    )
                )
        coeffs = torch.tensor(np.asarray(rows, np.float32), device=device)
        self.coeffs = [tuple(row.unbind()) for row in coeffs]  # 0-d device tensors
        self.timesteps = [torch.full((batch,), t, dtype=torch.long, device=device) for t in timesteps]
        self.noisy_steps = [i for i, t in enumerate(timesteps) if t > 0] if kind == "ddpm" else []

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        c0, c1, c2, c3, c4 = self.coeffs[i]
        x0 = (x - c0 * eps) / c1
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        if self.kind == "ddim":
            return c2 * x0 + c3 * eps
        prev = c2 * x0 + c3 * x
        return prev + c4 * noise if noise is not None else prev


# ---- the policy ----------------------------------------------------------------------------------------


def default_normalizer(section: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (scale, offset)} of untrained PushT stand-ins: pixels 0..512 -> [-1, 1] for low-dim keys and
    the action, image pixels [0, 1] -> [-1, 1] (what benchmarks/policy_latency.py's policy uses)."""
    out = {}
    shapes = {k: v for k, v in section["shape_meta"]["obs"].items()}
    shapes["action"] = {"shape": section["shape_meta"]["action"]["shape"], "type": "low_dim"}
    for key, meta in shapes.items():
        dim = int(meta["shape"][0])
        if meta.get("type", "low_dim") == "rgb":
            out[key] = (np.full(dim, 2.0, np.float32), np.full(dim, -1.0, np.float32))
        else:
            out[key] = (np.full(dim, 2 / 512, np.float32), np.full(dim, -1.0, np.float32))
    return out


class TorchPolicy(nn.Module):
    """Upstream Diffusion Policy inference for one of our ``policy:`` config sections.

    Parameters are ``unet.*`` (upstream ConditionalUnet1D names) or ``transformer.*`` (upstream
    TransformerForDiffusion names, for ``type: diffusion_transformer``) and ``encoders.<key>.*``
    (robomimic VisualCore names) per rgb key. ``normalizer``: {key: (scale, offset)} for every
    observation key and ``action`` (defaults: ``default_normalizer``). ``compile``: wrap the per-step
    denoiser in ``torch.compile`` (reduce-overhead on CUDA, default mode elsewhere).
    """

    def __init__(
        self,
        section: dict[str, Any],
        normalizer: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        compile: bool = False,
    ):
        super().__init__()
        meta = section["shape_meta"]
        self.obs_meta = {
            k: {"shape": list(v["shape"]), "type": v.get("type", "low_dim")} for k, v in meta["obs"].items()
        }
        self.action_dim = int(meta["action"]["shape"][0])
        self.horizon = int(section.get("horizon", 16))
        self.n_obs_steps = int(section.get("n_obs_steps", 2))
        self.n_action_steps = int(section.get("n_action_steps", 8))
        self.scheduler_cfg = dict(section.get("noise_scheduler", {}))
        enc = {"crop_shape": (84, 84), "pool": "spatial_softmax", "num_keypoints": 32,
               "share_rgb_model": False, "norm": "group", **section.get("obs_encoder", {})}  # fmt: skip
        if enc["pool"] != "spatial_softmax" or enc["share_rgb_model"]:
            raise ValueError("the torch baseline implements one spatial-softmax encoder per camera only")
        self.crop = tuple(enc["crop_shape"]) if enc["crop_shape"] is not None else None
        self.encoders = nn.ModuleDict()
        feature_dim = 0
        for key, m in self.obs_meta.items():
            if m["type"] == "rgb":
                crop = self.crop or tuple(m["shape"][1:])
                self.encoders[key] = VisualCore(crop, enc["norm"] == "batch", enc["num_keypoints"])
                feature_dim += 64
            else:
                feature_dim += m["shape"][0]
        self.is_transformer = section.get("type", "diffusion_unet") == "diffusion_transformer"
        if self.is_transformer:
            self.transformer = transformer_from_config(section, self.action_dim, feature_dim)
        else:
            self.unet = Unet(
                self.action_dim,
                feature_dim * self.n_obs_steps,
                int(section.get("diffusion_step_embed_dim", 256)),
                [int(d) for d in section.get("down_dims", (256, 512, 1024))],
                int(section.get("kernel_size", 5)),
                int(section.get("n_groups", 8)),
                bool(section.get("cond_predict_scale", True)),
            )
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[dtype]
        self.eval().to(self.device, self.dtype)
        norm = normalizer or default_normalizer(section)
        self.norm = {
            k: tuple(torch.tensor(np.asarray(a, np.float32), device=self.device) for a in norm[k])
            for k in [*self.obs_meta, "action"]
        }
        self.compiled = compile
        denoise = self.transformer if self.is_transformer else self.unet
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            denoise = torch.compile(denoise, mode=mode, fullgraph=True, dynamic=False)
        # Past Module.__setattr__: the per-step denoiser is no second copy of the network in the state dict.
        object.__setattr__(self, "denoise", denoise)
        self.generator = torch.Generator(self.device)
        self._schedules: dict[tuple[str, int, int], Schedule] = {}

    def schedule(self, kind: str, steps: int, batch: int) -> Schedule:
        key = (kind, steps, batch)
        if key not in self._schedules:
            self._schedules[key] = Schedule(kind, steps, self.scheduler_cfg, batch, self.device)
        return self._schedules[key]

    def _tensor(self, x: Any) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return t.to(self.device, non_blocking=True)

    def condition(self, obs: dict[str, Any]) -> torch.Tensor:
        """What the denoiser conditions on: ``global_cond`` for the UNet, the per-step features (B, To,
        features) for the transformer."""
        features = self.global_cond(obs)
        return features.reshape(features.shape[0], self.n_obs_steps, -1) if self.is_transformer else features

    def global_cond(self, obs: dict[str, Any]) -> torch.Tensor:
        """Raw (B, n_obs_steps, ...) observations, images uint8 or [0, 1] float HWC -> (B, To * features)."""
        features = []
        for key, meta in self.obs_meta.items():
            x = self._tensor(obs[key])
            batch, steps = x.shape[:2]
            if meta["type"] == "rgb":
                x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            scale, offset = self.norm[key]
            x = (x.float() * scale + offset).to(self.dtype)  # per channel: the last axis
            if meta["type"] == "rgb":
                x = center_crop(x.flatten(0, 1).permute(0, 3, 1, 2), self.crop)
                x = torch.relu(self.encoders[key](x)).reshape(batch, steps, -1)
            features.append(x)
        return torch.cat(features, dim=-1).reshape(batch, -1)

    @torch.inference_mode()
    def predict_action(
        self,
        obs: dict[str, Any],
        *,
        num_inference_steps: int = 10,
        scheduler: str = "ddim",
        seed: int | None = None,
        noise: Any = None,
        step_noise: Any = None,
    ) -> dict[str, torch.Tensor]:
        """As ``DiffusionUnetPolicy.predict_action``: ``action`` (B, n_action_steps, A) and ``action_pred``
        (B, horizon, A), float32 on the device (not synchronised)."""
        gcond = self.condition(obs)
        batch = gcond.shape[0]
        sched = self.schedule(scheduler, num_inference_steps, batch)
        shape = (batch, self.horizon, self.action_dim)
        if seed is not None:
            self.generator.manual_seed(seed)
        f32 = {"device": self.device, "dtype": torch.float32}
        x = (
            self._tensor(noise).float()
            if noise is not None
            else torch.randn(shape, generator=self.generator, **f32)
        )
        if scheduler == "ddpm":
            if step_noise is not None:
                step_noise = self._tensor(step_noise).float()
            else:
                step_noise = torch.randn((num_inference_steps, *shape), generator=self.generator, **f32)
        cudagraphs = self.compiled and self.device.type == "cuda"
        for i, t in enumerate(sched.timesteps):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            eps = self.denoise(x.to(self.dtype), t, gcond).float()
            x = sched.step(i, eps, x, step_noise[i] if i in sched.noisy_steps else None)
        scale, offset = self.norm["action"]
        action_pred = (x - offset) / scale
        start = self.n_obs_steps - 1
        return {"action": action_pred[:, start : start + self.n_action_steps], "action_pred": action_pred}


# ---- timing worker ------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def observation(section: dict[str, Any], batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Random raw observations of the config's shapes and dtypes (uint8 HWC images), as the MLX side's."""
    rng = np.random.default_rng(seed)
    to = int(section.get("n_obs_steps", 2))
    obs = {}
    for key, m in section["shape_meta"]["obs"].items():
        if m.get("type", "low_dim") == "rgb":
            c, h, w = m["shape"]
            obs[key] = rng.integers(0, 256, (batch, to, h, w, c), dtype=np.uint8)
        else:
            obs[key] = rng.uniform(0, 512, (batch, to, *m["shape"])).astype(np.float32)
    return obs


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # float32 means float32: no TF32 in matmuls or convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    framework = f"torch-{args.mode}"
    env = {
        "torch": torch.__version__,
        "torch_device": str(device),
        "torch_device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "python": sys.version.split()[0],
    }
    print(
        f"[{framework}] torch {torch.__version__} on {device} ({env['torch_device_name']}), "
        f"{env['torch_threads']} threads, TF32 off (matmul {env['cuda_matmul_allow_tf32']}, "
        f"cudnn {env['cudnn_allow_tf32']})",
        flush=True,
    )
    report: dict[str, Any] = {"environment": env, "rows": []}
    base = {"config": args.name or str(args.config), "dtype": args.dtype, "framework": framework}
    samplers = args.samplers.split(",")
    if args.mode == "compile" and device.type != "cuda" and not args.allow_cpu_compile:
        reason = "torch.compile runs on CUDA only unless --torch-compile is given"
        report["rows"] = [{**base, "sampler": s, "batch": args.batch, "skipped": reason} for s in samplers]
        print(f"[{framework}] skipped: {reason}", flush=True)
        return report
    section = load_policy_section(args.config)
    torch.manual_seed(0)
    policy = TorchPolicy(section, device=device, dtype=args.dtype, compile=args.mode == "compile")
    obs = observation(section, args.batch)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for sampler_name in samplers:
        kind, steps = SAMPLERS[sampler_name]
        row = {**base, "sampler": sampler_name, "batch": args.batch}

        def call(i: int, kind=kind, steps=steps) -> None:
            policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=i)
            sync()

        try:
            warm_start = time.perf_counter()
            times = time_requests(call, args.iters, args.warmup, args.max_seconds)
            row["warmup_s"] = round(time.perf_counter() - warm_start - sum(times) / 1e3, 3)
        except Exception as e:  # a failed compile is reported, not fatal (CPU compile needs a compiler)
            if args.mode != "compile":
                raise
            row["skipped"] = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"[{framework}] {sampler_name}: skipped: {row['skipped']}", flush=True)
            report["rows"].append(row)
            continue
        row.update(summarize(times))
        report["rows"].append(row)
        print(
            f"[{framework}] {row['config']:7s} {args.dtype:9s} {sampler_name:8s} B={args.batch:<3d} "
            f"n={row['n']:<4d} p50 {row['p50_ms']:9.2f} ms   p99 {row['p99_ms']:9.2f} ms",
            flush=True,
        )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="lowdim", help=f"one of {sorted(CONFIGS)} or a YAML path")
    parser.add_argument("--name", default=None, help="config label in the output (default: --config)")
    parser.add_argument("--samplers", default="ddim10", help=f"comma list of {sorted(SAMPLERS)}")
    parser.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES))
    parser.add_argument("--mode", default="eager", choices=("eager", "compile"))
    parser.add_argument(
        "--allow-cpu-compile", action="store_true", help="try torch.compile (default mode) on the CPU"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cap on timed seconds per row")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the rows and environment here")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    report = run_worker(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
