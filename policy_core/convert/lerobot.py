"""LeRobot diffusion policies (a ``pretrained_model/`` folder) -> our policy. Reads JSON and safetensors
only: no PyTorch, no pickle.

Folder layout: ``config.json`` (``"type": "diffusion"``), ``model.safetensors`` (``diffusion.unet.*``,
``diffusion.rgb_encoder.*``), and the normalization statistics either in ``policy_preprocessor.json`` /
``policy_postprocessor.json`` with their ``*_step_<i>_*.safetensors`` state files (flat
``"<feature>.<stat>"`` keys), or — models saved before LeRobot moved normalization into processors — as
``normalize_inputs.buffer_<feature>.<stat>`` / ``unnormalize_outputs.buffer_<feature>.<stat>`` tensors
inside ``model.safetensors`` (``<feature>`` with '.' written '_').

Observation keys: our keys may not contain '.', so LeRobot feature names are mapped by dropping the
``observation.`` prefix, then an ``images.`` prefix, and writing any remaining '.' as '_':
``observation.state`` -> ``state``, ``observation.image`` -> ``image``, ``observation.images.top`` ->
``top``, ``observation.environment_state`` -> ``environment_state``. The original names are stored in the
checkpoint's provenance. Key order is LeRobot's global-conditioning order per step: state, cameras (in
``input_features`` order), environment state.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from policy_core.convert.common import (
    ConversionError,
    Converted,
    Rule,
    build,
    check_keypoint_grid,
    feature_norm,
    get,
    load_weights,
    rename,
    resnet_rules,
    scheduler_config,
    trunk_feature_hw,
    unet_rules,
)
from policy_core.normalizer import FeatureNorm, LinearNormalizer

STATE, ENV_STATE, ACTION = "observation.state", "observation.environment_state", "action"
# Pipeline steps that leave values unchanged; any other step would transform data in a way we do not.
_NEUTRAL_STEPS = {"rename_observations_processor", "to_batch_processor", "device_processor"}
# MIN_MAX-like modes: the statistics that map to -1 and +1.
_RANGE_STATS = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}
_LEGACY_EPS = 1e-8  # lerobot/common/policies/normalize.py


def our_key(feature: str) -> str:
    """Dot-free observation key for a LeRobot feature name (see the module docstring)."""
    return feature.removeprefix("observation.").removeprefix("images.").replace(".", "_")


def find_model_folder(src: Path) -> Path | None:
    """``src`` itself or its ``pretrained_model/`` subfolder, when it holds a LeRobot config.json."""
    for folder in (src, src / "pretrained_model"):
        if (folder / "config.json").is_file():
            return folder
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return doc


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        arrays = mx.load(str(path))
    except (OSError, RuntimeError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read safetensors: {e}") from None
    # numpy has no bfloat16: widen floating tensors to float32 (the converted policy is float32 anyway).
    return {
        k: np.array(v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in arrays.items()
    }


def _affine(
    mode: str, stats: Mapping[str, np.ndarray], eps: float, *, legacy: bool, inverse: bool, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """LeRobot's (un)normalization of one feature as ``x * scale + offset``, reproducing its exact formula.

    ``inverse`` selects the unnormalization direction (actions), whose formulas differ slightly.
    """

    def stat(s: str) -> np.ndarray:
        if s not in stats:
            raise ConversionError(f"{name}: {mode} normalization needs the '{s}' statistic, which is missing")
        v = np.asarray(stats[s], dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(v)):  # legacy buffers start as inf until statistics are loaded
            raise ConversionError(
                f"{name}: statistic '{s}' is not finite (the model was saved without stats)"
            )
        return v

    if mode == "IDENTITY":
        return np.ones(1), np.zeros(1)
    if mode == "MEAN_STD":
        mean, std = stat("mean"), stat("std")
        # LeRobot normalizes with (x - mean) / (std + eps) but unnormalizes with y * std + mean.
        denom = std if inverse else std + eps
        denom = np.where(denom == 0, eps, denom)
        return 1 / denom, -mean / denom
    if mode in _RANGE_STATS:
        lo, hi = (stat(s) for s in _RANGE_STATS[mode])
        denom = hi - lo
        if legacy and not inverse:
            denom = denom + _LEGACY_EPS  # legacy Normalize: (x - min) / (max - min + 1e-8) * 2 - 1
        denom = np.where(denom == 0, eps, denom)  # processors: a zero range is replaced by eps
        scale = 2 / denom
        return scale, -1 - scale * lo
    raise ConversionError(f"{name}: normalization mode {mode!r} is not supported")


class _Stats:
    """Normalization statistics, modes and eps of either storage format."""

    def __init__(self, folder: Path, cfg: dict[str, Any], weights: dict[str, np.ndarray]):
        where = str(folder / "config.json")
        self.legacy = not (folder / "policy_preprocessor.json").is_file()
        if self.legacy:
            modes = get(cfg, "normalization_mapping", Mapping, where)
            self.inputs = self._from_buffers(weights, "normalize_inputs", modes, cfg["input_features"])
            self.outputs = self._from_buffers(weights, "unnormalize_outputs", modes, cfg["output_features"])
            self.input_eps = self.output_eps = _LEGACY_EPS
        else:
            self.inputs, self.input_eps = self._from_pipeline(
                folder, "policy_preprocessor", "normalizer_processor"
            )
            self.outputs, self.output_eps = self._from_pipeline(
                folder, "policy_postprocessor", "unnormalizer_processor"
            )

    @staticmethod
    def _from_buffers(
        weights: dict[str, np.ndarray], module: str, modes: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
        out = {}
        for feature, spec in features.items():
            mode = modes.get(spec["type"], "IDENTITY")
            head = f"{module}.buffer_{feature.replace('.', '_')}."
            stats = {k[len(head) :]: v for k, v in weights.items() if k.startswith(head)}
            out[feature] = (mode, stats)
        return out

    @staticmethod
    def _from_pipeline(
        folder: Path, pipeline: str, step_name: str
    ) -> tuple[dict[str, tuple[str, dict[str, np.ndarray]]], float]:
        path = folder / f"{pipeline}.json"
        steps = get(_read_json(path), "steps", list, str(path))
        found = None
        for i, step in enumerate(steps):
            name = (step.get("registry_name") or step.get("class")) if isinstance(step, dict) else None
            if name == step_name and found is None:
                found = step
            elif name not in _NEUTRAL_STEPS:
                raise ConversionError(
                    f"{path}: steps[{i}] {name!r} is not supported (it would change values)"
                )
        if found is None:
            raise ConversionError(f"{path}: no {step_name!r} step")
        config = found.get("config") or {}
        where = f"{path}: {step_name}.config"
        eps = get(config, "eps", float, where, default=1e-8)
        norm_map = get(config, "norm_map", Mapping, where)
        features = get(config, "features", Mapping, where)
        only = config.get("normalize_observation_keys")  # None: every feature
        state_file = get(found, "state_file", str, f"{path}: {step_name}")
        flat = _read_tensors(folder / Path(state_file).name)  # a bare file name: never leave the folder
        out = {}
        for feature, spec in features.items():
            mode = norm_map.get(spec["type"], "IDENTITY")
            if only is not None and feature not in only and spec["type"] != "ACTION":
                mode = "IDENTITY"
            head = f"{feature}."
            out[feature] = (mode, {k[len(head) :]: v for k, v in flat.items() if k.startswith(head)})
        return out, eps

    def norm(self, feature: str, dim: int, *, output: bool) -> FeatureNorm:
        table = self.outputs if output else self.inputs
        source = "unnormalization (postprocessor)" if output else "normalization (preprocessor)"
        if feature not in table:
            raise ConversionError(f"{feature}: no {source} entry")
        mode, stats = table[feature]
        name = f"{feature} ({source})"
        eps = self.output_eps if output else self.input_eps
        if mode != "IDENTITY" and not stats:
            raise ConversionError(f"{name}: {mode} normalization but no statistics were saved")
        scale, offset = _affine(mode, stats, eps, legacy=self.legacy, inverse=output, name=name)
        kept = {k: v for k, v in stats.items() if k in ("min", "max", "mean", "std")}
        return feature_norm(scale, offset, kept, dim, name)


def _rgb_rules(prefix: str, key: str) -> list[Rule]:
    """DiffusionRgbEncoder: ``backbone`` (torchvision children), ``pool.nets`` (1x1 conv), ``out`` Linear."""
    p = re.escape(prefix)
    return resnet_rules(f"{prefix}backbone.", key) + [
        (rf"{p}pool\.nets\.(weight|bias)", rf"rgb_encoders.{key}.spatial_softmax.conv.\1"),
        (rf"{p}out\.(weight|bias)", rf"rgb_encoders.{key}.out.\1"),
    ]


def convert_lerobot(src: Path, control_hz: float | None = None) -> Converted:
    """Convert a LeRobot diffusion ``pretrained_model/`` folder (or a folder containing one)."""
    folder = find_model_folder(src)
    if folder is None:
        raise ConversionError(f"{src}: no LeRobot config.json here or in pretrained_model/")
    where = str(folder / "config.json")
    cfg = _read_json(folder / "config.json")
    if cfg.get("type") != "diffusion":
        raise ConversionError(f"{where}: field 'type' is {cfg.get('type')!r}; only 'diffusion' is supported")
    if "input_features" not in cfg:
        raise ConversionError(
            f"{where}: no 'input_features' (a LeRobot config from before 2025); "
            "load and re-save it with a current LeRobot first"
        )
    inputs = get(cfg, "input_features", Mapping, where)
    outputs = get(cfg, "output_features", Mapping, where)
    types = {f: get(spec, "type", str, f"{where}: input_features.{f}") for f, spec in inputs.items()}
    if types.get(STATE) != "STATE":
        raise ConversionError(f"{where}: input_features needs {STATE!r} of type STATE")
    if get(outputs, f"{ACTION}.type", str, f"{where}: output_features") != "ACTION":
        raise ConversionError(f"{where}: output_features needs {ACTION!r} of type ACTION")
    cameras = [f for f, t in types.items() if t == "VISUAL"]
    env = [ENV_STATE] if types.get(ENV_STATE) == "ENV" else []
    if not cameras and not env:
        raise ConversionError(f"{where}: input_features has neither a VISUAL feature nor {ENV_STATE!r}")
    order = [STATE, *cameras, *env]  # LeRobot's per-step global-conditioning order
    keys = {f: our_key(f) for f in order}
    if len(set(keys.values())) != len(keys) or ACTION in keys.values():
        raise ConversionError(
            f"{where}: input feature names collide after mapping to observation keys: {keys}"
        )

    obs = {}
    for f in order:
        shape = [int(s) for s in get(inputs[f], "shape", list, f"{where}: input_features.{f}")]
        obs[keys[f]] = {"shape": shape, "type": "rgb" if f in cameras else "low_dim"}
    action_shape = [int(s) for s in get(outputs, f"{ACTION}.shape", list, f"{where}: output_features")]

    scheduler_type = get(cfg, "noise_scheduler_type", str, where)
    sampler = {"DDPM": "ddpm", "DDIM": "ddim"}.get(scheduler_type)
    if sampler is None:
        raise ConversionError(f"{where}: noise_scheduler_type {scheduler_type!r} is not supported")
    # LeRobot builds its diffusers scheduler from exactly these fields (other settings keep their defaults).
    sched_fields = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                    "clip_sample", "clip_sample_range")  # fmt: skip
    config: dict[str, Any] = {
        "shape_meta": {"obs": obs, "action": {"shape": action_shape}},
        "horizon": get(cfg, "horizon", int, where),
        "n_obs_steps": get(cfg, "n_obs_steps", int, where),
        "n_action_steps": get(cfg, "n_action_steps", int, where),
        "down_dims": [int(d) for d in get(cfg, "down_dims", list, where)],
        "kernel_size": get(cfg, "kernel_size", int, where),
        "n_groups": get(cfg, "n_groups", int, where),
        "diffusion_step_embed_dim": get(cfg, "diffusion_step_embed_dim", int, where),
        "cond_predict_scale": get(cfg, "use_film_scale_modulation", bool, where),
        "noise_scheduler": scheduler_config({k: cfg[k] for k in sched_fields if k in cfg}, where).to_dict(),
        "sampler": sampler,
        "num_inference_steps": get(cfg, "num_inference_steps", (int, type(None)), where, default=None),
    }
    if control_hz is not None:
        config["control_hz"] = control_hz

    rules = unet_rules("diffusion.unet.", lerobot=True)
    ignore = [
        r"(normalize_inputs|normalize_targets|unnormalize_outputs)\..*",  # read by _Stats
        r".*\.num_batches_tracked",  # BatchNorm bookkeeping, unused at inference
        r"diffusion\.rgb_encoder\.(\d+\.)?pool\.pos_grid",  # checked against our grid below
    ]
    separate, crop = _encoder_config(cfg, config, where) if cameras else (False, None)
    weights = _read_tensors(folder / "model.safetensors")
    if cameras:
        # One encoder per camera (ModuleList) or one shared encoder, stored under the first camera's key.
        if separate:
            prefixes = [f"diffusion.rgb_encoder.{i}." for i in range(len(cameras))]
        else:
            prefixes = ["diffusion.rgb_encoder."]
        for prefix, camera in zip(prefixes, cameras, strict=False):
            rules += _rgb_rules(prefix, keys[camera])
            grid = weights.get(f"{prefix}pool.pos_grid")
            if grid is None:
                raise ConversionError(f"{folder / 'model.safetensors'}: missing tensor {prefix}pool.pos_grid")
            hw = crop or tuple(inputs[camera]["shape"][1:])
            check_keypoint_grid(
                grid[:, 0], grid[:, 1], trunk_feature_hw(*hw), str(folder / "model.safetensors")
            )

    stats = _Stats(folder, cfg, weights)
    normalizer = LinearNormalizer()
    for f in order:
        dim = obs[keys[f]]["shape"][0]  # channels for images: statistics are per channel
        normalizer[keys[f]] = stats.norm(f, dim, output=False)
    normalizer[ACTION] = stats.norm(ACTION, action_shape[0], output=True)

    policy = build(config, normalizer, where)
    mapped, _ = rename(weights, rules, ignore, str(folder / "model.safetensors"))
    load_weights(policy, mapped, str(folder / "model.safetensors"), rules)
    provenance = {
        "source_format": "lerobot",
        "source": str(src),
        "source_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
        "lerobot_features": {keys[f]: f for f in order} | {ACTION: ACTION},
        "unused_lerobot_features": [f for f in inputs if f not in keys],
        "normalization_source": "model buffers (legacy)" if stats.legacy else "policy processors",
    }
    if cameras:
        provenance["crop_is_random"] = bool(cfg.get("crop_is_random", True))  # training-time only
        provenance["separate_rgb_encoder_per_camera"] = separate
    return Converted(policy, provenance)


def _encoder_config(
    cfg: dict[str, Any], config: dict[str, Any], where: str
) -> tuple[bool, tuple[int, int] | None]:
    """Map LeRobot's DiffusionRgbEncoder settings onto ``obs_encoder``; returns (separate, crop)."""
    backbone = get(cfg, "vision_backbone", str, where)
    if backbone != "resnet18":
        raise ConversionError(f"{where}: vision_backbone {backbone!r} is not supported (resnet18 only)")
    if get(cfg, "resize_shape", (list, type(None)), where, default=None) is not None:
        raise ConversionError(f"{where}: resize_shape is not supported (images are only cropped)")
    num_kp = get(cfg, "spatial_softmax_num_keypoints", int, where)
    if num_kp != 32:
        # Our projection after the keypoints is fixed at 64 features, LeRobot's is 2 * num_kp.
        raise ConversionError(f"{where}: spatial_softmax_num_keypoints {num_kp} is not supported (32 only)")
    crop_list = get(cfg, "crop_shape", (list, type(None)), where, default=None)
    crop = None if crop_list is None else (int(crop_list[0]), int(crop_list[1]))
    separate = get(cfg, "use_separate_rgb_encoder_per_camera", bool, where, default=False)
    config["obs_encoder"] = {
        "crop_shape": list(crop) if crop else None,
        "pool": "spatial_softmax",
        "num_keypoints": 32,
        "share_rgb_model": not separate,
        # LeRobot keeps torchvision's BatchNorm unless use_group_norm (the pretrained-ImageNet default).
        "norm": "group" if get(cfg, "use_group_norm", bool, where) else "batch",
    }
    return separate, crop
