"""real-stanford/diffusion_policy workspace checkpoints (``.ckpt``) -> our policy.

A ``.ckpt`` is ``torch.save(payload, pickle_module=dill)`` with ``payload = {"cfg": <OmegaConf config>,
"state_dicts": {"model", "ema_model", "optimizer"}, "pickles": {...}}`` (``pickles`` holds bytes that are
never unpickled here). It is read with ``torch.load(weights_only=True)``, which builds only tensors,
containers and the types of an explicit allowlist: those real checkpoints hold (``ALLOWED_GLOBALS``). A
pickle naming anything else is refused before it is read, naming the type; ``trust_pickle=True``
(``dpmlx convert --trust-pickle``) reads it as upstream does, running whatever it holds. Needs PyTorch
(plus omegaconf, and dill for dill's type loader, for real checkpoints); the server never calls this code.

Supported policies: ``DiffusionUnetHybridImagePolicy`` (robomimic ResNet18 encoder, GroupNorm or
BatchNorm, spatial softmax; observation features concatenated in ``shape_meta.obs`` order) and
``DiffusionUnetLowdimPolicy`` with global conditioning (observation key ``obs``), and their transformer
counterparts ``DiffusionTransformerHybridImagePolicy`` and ``DiffusionTransformerLowdimPolicy`` with the
observations as conditioning (``obs_as_cond``).
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from policy_core.convert.common import (
    ConversionError,
    Converted,
    Rule,
    build,
    check_attention_masks,
    check_keypoint_grid,
    feature_norm,
    get,
    load_weights,
    rename,
    resnet_rules,
    scheduler_config,
    transformer_rules,
    trunk_feature_hw,
    unet_rules,
)
from policy_core.normalizer import LinearNormalizer
from policy_core.policy import DiffusionTransformerPolicy

HYBRID, LOWDIM = "DiffusionUnetHybridImagePolicy", "DiffusionUnetLowdimPolicy"
T_HYBRID, T_LOWDIM = "DiffusionTransformerHybridImagePolicy", "DiffusionTransformerLowdimPolicy"
_IMAGE_FIELDS = {
    "_target_", "shape_meta", "noise_scheduler", "horizon", "n_action_steps", "n_obs_steps",
    "num_inference_steps", "crop_shape", "obs_encoder_group_norm", "eval_fixed_crop",
}  # fmt: skip
_HYBRID_FIELDS = _IMAGE_FIELDS | {
    "obs_as_global_cond", "diffusion_step_embed_dim", "down_dims", "kernel_size", "n_groups",
    "cond_predict_scale",
}  # fmt: skip
# TransformerForDiffusion's arguments, with the hybrid image policy's defaults (our config's names).
_TRANSFORMER_DEFAULTS = {
    "n_layer": 8, "n_head": 4, "n_emb": 256, "p_drop_emb": 0.0, "p_drop_attn": 0.3, "causal_attn": True,
    "time_as_cond": True, "n_cond_layers": 0,
}  # fmt: skip
_T_HYBRID_FIELDS = _IMAGE_FIELDS | set(_TRANSFORMER_DEFAULTS) | {"obs_as_cond", "pred_action_steps_only"}
_T_LOWDIM_FIELDS = {
    "_target_", "model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps",
    "n_obs_steps", "num_inference_steps", "obs_as_cond", "pred_action_steps_only",
}  # fmt: skip
_T_MODEL_FIELDS = set(_TRANSFORMER_DEFAULTS) | {
    "_target_", "input_dim", "output_dim", "horizon", "n_obs_steps", "cond_dim", "obs_as_cond",
}  # fmt: skip
_LOWDIM_FIELDS = {
    "_target_", "model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps",
    "n_obs_steps", "num_inference_steps", "obs_as_local_cond", "obs_as_global_cond",
    "pred_action_steps_only", "oa_step_convention",
}  # fmt: skip
_SCHEDULERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
# Policy state-dict entries that hold no weights: ModuleAttrMixin's empty device probes.
_ALWAYS_IGNORED = [r"_dummy_variable", r"mask_generator\._dummy_variable", r"normalizer\.params_dict\..*"]
# TransformerForDiffusion's own device probe, and its attention masks (checked, not loaded).
_TRANSFORMER_IGNORED = [r"model\._dummy_variable", r"model\.(mask|memory_mask)"]


# What the pickles of upstream workspace checkpoints hold besides tensors and plain containers (found by
# torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints written as upstream writes them):
# the OmegaConf config (its containers, nodes and metadata; typing.Any and a defaultdict in the metadata)
# and dill's loader of builtin types (upstream pickles with dill; plain pickle names the types directly).
ALLOWED_GLOBALS = frozenset({
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.nodes.AnyNode",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata", "typing.Any", "collections.defaultdict",
    "dill._dill._load_type", "builtins.dict", "builtins.list", "builtins.int",
})  # fmt: skip


class UnsafeCheckpointError(ConversionError):
    """A ``.ckpt``'s pickle names a type or function outside ``ALLOWED_GLOBALS``: reading it could run
    anything. The message names it."""


class UnsafePickleWarning(UserWarning):
    """A ``.ckpt`` is read with full unpickling (``trust_pickle=True``): whatever it holds runs."""


def _refuse(path: Path, names: list[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: the checkpoint's pickle refers to {', '.join(map(repr, names))}, which upstream "
        "checkpoints do not hold; unpickling it could run any code. Convert it with --trust-pickle "
        "(trust_pickle=True) only if you trust the file and where it came from"
    )


def load_payload(path: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """``torch.load`` a workspace checkpoint with ``weights_only=True`` and ``ALLOWED_GLOBALS``, or, with
    ``trust_pickle``, as upstream does (a full unpickling: trusted files only)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading a Diffusion Policy .ckpt needs PyTorch (pip install torch; real checkpoints "
            "also need dill and omegaconf)"
        ) from None
    try:
        if trust_pickle:
            warnings.warn(
                f"{path}: fully unpickled (trust_pickle): any code the file holds runs now",
                UnsafePickleWarning,
                stacklevel=2,
            )
            try:
                import dill  # upstream pickles with dill; plain pickle reads what does not need it
            except ImportError:
                dill = None
            kwargs = {"pickle_module": dill} if dill is not None else {}
            payload = torch.load(path, map_location="cpu", weights_only=False, **kwargs)
        else:
            # The pickle's globals are listed from its opcodes, without running any of them.
            named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            refused = sorted(set(named) - ALLOWED_GLOBALS)
            if refused:
                raise _refuse(path, refused)
            allowed = []
            for name in named:
                module, _, attr = name.rpartition(".")
                allowed.append(getattr(importlib.import_module(module), attr))
            with torch.serialization.safe_globals(allowed):
                payload = torch.load(path, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except ModuleNotFoundError as e:
        raise ConversionError(
            f"{path}: unpickling needs the module {e.name!r}: pip install {e.name}"
        ) from None
    except pickle.UnpicklingError as e:
        names = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if names:  # the weights-only unpickler's own refusal
            raise _refuse(path, names) from None
        raise ConversionError(f"{path}: cannot read checkpoint: {e}") from None
    except (OSError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise ConversionError(f"{path}: cannot read checkpoint: {e}") from None
    if not isinstance(payload, Mapping) or "cfg" not in payload or "state_dicts" not in payload:
        raise ConversionError(f"{path}: not a Diffusion Policy workspace checkpoint (no cfg / state_dicts)")
    return dict(payload)


def _plain_config(cfg: Any, where: str) -> Mapping[str, Any]:
    if type(cfg).__module__.split(".")[0] == "omegaconf":
        from omegaconf import OmegaConf

        # resolve=False: never evaluate ${eval:...}; train.py saved the config already resolved.
        return OmegaConf.to_container(cfg, resolve=False)
    if isinstance(cfg, Mapping):
        return cfg
    raise ConversionError(f"{where}: cfg is a {type(cfg).__name__}, expected a mapping")


def _to_numpy(tensor: Any) -> np.ndarray:
    t = tensor.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()


def _scheduler(cfg: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    sched = dict(get(cfg, "policy.noise_scheduler", Mapping, where))
    target = str(sched.pop("_target_", "")).rsplit(".", 1)[-1]
    if target not in _SCHEDULERS:
        raise ConversionError(f"{where}: policy.noise_scheduler._target_ {target!r} is not supported")
    return _SCHEDULERS[target], scheduler_config(sched, f"{where}: policy.noise_scheduler").to_dict()


def _check_fields(policy_cfg: Mapping[str, Any], known: set[str], where: str) -> None:
    # Upstream passes unknown policy kwargs to scheduler.step(); we cannot honour them.
    extra = sorted(set(policy_cfg) - known)
    if extra:
        raise ConversionError(f"{where}: policy field(s) {extra} are not supported")


def _require(cfg: Mapping[str, Any], path: str, want: bool, where: str, default: bool | None = None) -> None:
    """``path`` must be ``want``; ``default``: upstream's value where the config lacks the field."""
    kwargs = {} if default is None else {"default": default}
    if get(cfg, path, bool, where, **kwargs) != want:
        raise ConversionError(f"{where}: {path}={not want} is not supported (only {want})")


def _normalizer(sd: Mapping[str, np.ndarray], dims: dict[str, int], where: str) -> LinearNormalizer:
    """Upstream LinearNormalizer tensors ``normalizer.params_dict.<key>.{scale, offset, input_stats.*}``:
    the affine map is stored, so it is copied exactly."""
    normalizer = LinearNormalizer()
    for key, dim in dims.items():
        head = f"normalizer.params_dict.{key}."
        if head + "scale" not in sd or head + "offset" not in sd:
            raise ConversionError(f"{where}: missing normalizer tensors {head}scale/offset")
        stats = {
            s: sd[f"{head}input_stats.{s}"]
            for s in ("min", "max", "mean", "std")
            if f"{head}input_stats.{s}" in sd
        }
        # The image range normalizer stores (1,)-shaped parameters; feature_norm broadcasts them per channel.
        normalizer[key] = feature_norm(sd[head + "scale"], sd[head + "offset"], stats, dim, key)
    return normalizer


def _base_config(cfg: Mapping[str, Any], where: str, control_hz: float | None) -> dict[str, Any]:
    sampler, sched = _scheduler(cfg, where)
    config = {
        "horizon": get(cfg, "policy.horizon", int, where),
        "n_obs_steps": get(cfg, "policy.n_obs_steps", int, where),
        "n_action_steps": get(cfg, "policy.n_action_steps", int, where),
        "noise_scheduler": sched,
        "sampler": sampler,
        "num_inference_steps": get(cfg, "policy.num_inference_steps", (int, type(None)), where, default=None),
    }
    if control_hz is not None:
        config["control_hz"] = control_hz
    return config


def _image_policy(
    cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray], where: str, config: dict[str, Any]
) -> tuple[list[Rule], list[str], dict[str, int], dict[str, Any]]:
    """What the UNet and transformer hybrid image policies share: ``shape_meta`` and the robomimic
    observation encoder (its rules, its buffers checked), the normalizer's dimensions."""
    shape_meta = get(cfg, "policy.shape_meta", Mapping, where)
    obs_meta = get(shape_meta, "obs", Mapping, f"{where}: policy.shape_meta")
    obs = {}
    for key, attr in obs_meta.items():
        kind = get(attr, "type", str, f"{where}: shape_meta.obs.{key}", default="low_dim")
        if kind not in ("rgb", "low_dim"):
            raise ConversionError(f"{where}: shape_meta.obs.{key}.type {kind!r} is not supported")
        shape = [int(s) for s in get(attr, "shape", (list, tuple), f"{where}: shape_meta.obs.{key}")]
        obs[str(key)] = {"shape": shape, "type": kind}  # order preserved: features concatenate in it
    action_dim = int(get(shape_meta, "action.shape", (list, tuple), f"{where}: policy.shape_meta")[0])
    crop_list = get(cfg, "policy.crop_shape", (list, tuple, type(None)), where, default=(76, 76))
    crop = None if crop_list is None else (int(crop_list[0]), int(crop_list[1]))
    group_norm = get(cfg, "policy.obs_encoder_group_norm", bool, where, default=False)
    config.update(
        shape_meta={"obs": obs, "action": {"shape": [action_dim]}},
        obs_encoder={
            "crop_shape": list(crop) if crop else None,
            "pool": "spatial_softmax",
            "num_keypoints": 32,  # robomimic's image default, as pinned by upstream
            "share_rgb_model": False,  # robomimic builds one VisualCore per rgb key
            "norm": "group" if group_norm else "batch",
        },
    )
    rules: list[Rule] = []
    ignore = [r".*\.num_batches_tracked"]
    for key, attr in obs.items():
        if attr["type"] != "rgb":
            continue
        src = f"obs_encoder.obs_nets.{key}."
        p = re.escape(src)
        rules += resnet_rules(f"{src}backbone.nets.", key)
        rules += [
            (rf"{p}pool\.nets\.(weight|bias)", rf"rgb_encoders.{key}.spatial_softmax.conv.\1"),
            # VisualCore.nets = Sequential(backbone, pool, Flatten, Linear): the Linear is nets.3.
            (rf"{p}nets\.3\.(weight|bias)", rf"rgb_encoders.{key}.out.\1"),
        ]
        # nets.0 / nets.1 re-register backbone / pool (the same tensors under a second name);
        # the pool's position grid and temperature are checked below.
        ignore += [rf"{p}nets\.[01]\..*", rf"{p}pool\.(pos_x|pos_y|temperature)"]
        temperature = sd.get(f"{src}pool.temperature")
        if temperature is not None and not np.allclose(temperature, 1.0):
            raise ConversionError(f"{where}: {src}pool.temperature is {temperature}; only 1.0 is supported")
        hw = crop or tuple(attr["shape"][1:])
        if f"{src}pool.pos_x" not in sd or f"{src}pool.pos_y" not in sd:
            raise ConversionError(f"{where}: missing tensors {src}pool.pos_x / pos_y")
        check_keypoint_grid(sd[f"{src}pool.pos_x"], sd[f"{src}pool.pos_y"], trunk_feature_hw(*hw), where)
    dims = {key: attr["shape"][0] for key, attr in obs.items()} | {"action": action_dim}
    notes = {"eval_fixed_crop": get(cfg, "policy.eval_fixed_crop", bool, where, default=False)}
    return rules, ignore, dims, notes


def _hybrid(
    cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray], where: str, config: dict[str, Any]
) -> tuple[list[Rule], list[str], dict[str, int], dict[str, Any]]:
    _check_fields(get(cfg, "policy", Mapping, where), _HYBRID_FIELDS, where)
    _require(cfg, "policy.obs_as_global_cond", True, where)
    rules, ignore, dims, notes = _image_policy(cfg, sd, where, config)
    config.update(
        down_dims=[
            int(d) for d in get(cfg, "policy.down_dims", (list, tuple), where, default=(256, 512, 1024))
        ],
        kernel_size=get(cfg, "policy.kernel_size", int, where, default=5),
        n_groups=get(cfg, "policy.n_groups", int, where, default=8),
        diffusion_step_embed_dim=get(cfg, "policy.diffusion_step_embed_dim", int, where, default=256),
        cond_predict_scale=get(cfg, "policy.cond_predict_scale", bool, where, default=True),
    )
    return unet_rules("model.", lerobot=False) + rules, ignore, dims, notes


def _transformer_fields(section: Mapping[str, Any], path: str, where: str) -> dict[str, Any]:
    """TransformerForDiffusion's arguments from ``section`` (upstream's defaults where absent)."""
    fields = {}
    for name, default in _TRANSFORMER_DEFAULTS.items():
        kind = float if isinstance(default, float) else type(default)
        fields[name] = get(section, name, kind, f"{where}: {path}", default=default)
    return {"type": "diffusion_transformer", **fields}


def _transformer_hybrid(
    cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray], where: str, config: dict[str, Any]
) -> tuple[list[Rule], list[str], dict[str, int], dict[str, Any]]:
    _check_fields(get(cfg, "policy", Mapping, where), _T_HYBRID_FIELDS, where)
    _require(cfg, "policy.obs_as_cond", True, where, default=True)
    _require(cfg, "policy.pred_action_steps_only", False, where, default=False)
    rules, ignore, dims, notes = _image_policy(cfg, sd, where, config)
    config.update(_transformer_fields(get(cfg, "policy", Mapping, where), "policy", where))
    return transformer_rules("model.") + rules, ignore + _TRANSFORMER_IGNORED, dims, notes


def _transformer_lowdim(
    cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray], where: str, config: dict[str, Any]
) -> tuple[list[Rule], list[str], dict[str, int], dict[str, Any]]:
    _check_fields(get(cfg, "policy", Mapping, where), _T_LOWDIM_FIELDS, where)
    # Without obs_as_cond upstream inpaints the observations into the trajectory (input_dim obs + action).
    _require(cfg, "policy.obs_as_cond", True, where, default=False)
    _require(cfg, "policy.pred_action_steps_only", False, where, default=False)
    obs_dim = get(cfg, "policy.obs_dim", int, where)
    action_dim = get(cfg, "policy.action_dim", int, where)
    model = get(cfg, "policy.model", Mapping, where)
    mwhere = f"{where}: policy.model"
    _check_fields(model, _T_MODEL_FIELDS, mwhere)
    for name, want in (
        ("input_dim", action_dim), ("output_dim", action_dim), ("cond_dim", obs_dim),
        ("horizon", config["horizon"]), ("n_obs_steps", config["n_obs_steps"]),
    ):  # fmt: skip
        if get(model, name, int, mwhere) != want:
            raise ConversionError(f"{mwhere}: {name} must be {want} (the policy's, observations as cond)")
    config.update(
        shape_meta={
            "obs": {"obs": {"shape": [obs_dim], "type": "low_dim"}},
            "action": {"shape": [action_dim]},
        },
        **_transformer_fields(model, "policy.model", where),
    )
    rules = transformer_rules("model.")
    return rules, list(_TRANSFORMER_IGNORED), {"obs": obs_dim, "action": action_dim}, {}


def _lowdim(
    cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray], where: str, config: dict[str, Any]
) -> tuple[list[Rule], list[str], dict[str, int], dict[str, Any]]:
    _check_fields(get(cfg, "policy", Mapping, where), _LOWDIM_FIELDS, where)
    _require(cfg, "policy.obs_as_global_cond", True, where)
    _require(cfg, "policy.obs_as_local_cond", False, where)
    _require(cfg, "policy.pred_action_steps_only", False, where)
    # Without the obs/action step convention upstream's action chunk starts one step later than ours.
    _require(cfg, "policy.oa_step_convention", True, where)
    if any(k.startswith("model.local_cond_encoder.") for k in sd):
        raise ConversionError(f"{where}: local conditioning (model.local_cond_encoder) is not supported")
    obs_dim = get(cfg, "policy.obs_dim", int, where)
    action_dim = get(cfg, "policy.action_dim", int, where)
    model = get(cfg, "policy.model", Mapping, where)
    mwhere = f"{where}: policy.model"
    if get(model, "input_dim", int, mwhere) != action_dim:
        raise ConversionError(f"{mwhere}: input_dim must equal policy.action_dim (global conditioning)")
    config.update(
        shape_meta={
            "obs": {"obs": {"shape": [obs_dim], "type": "low_dim"}},
            "action": {"shape": [action_dim]},
        },
        down_dims=[int(d) for d in get(model, "down_dims", (list, tuple), mwhere)],
        kernel_size=get(model, "kernel_size", int, mwhere),
        n_groups=get(model, "n_groups", int, mwhere),
        diffusion_step_embed_dim=get(model, "diffusion_step_embed_dim", int, mwhere),
        cond_predict_scale=get(model, "cond_predict_scale", bool, mwhere),
    )
    return unet_rules("model.", lerobot=False), [], {"obs": obs_dim, "action": action_dim}, {}


def convert_upstream(
    path: Path, use_ema: bool | None = None, control_hz: float | None = None, trust_pickle: bool = False
) -> Converted:
    """Convert a Diffusion Policy ``.ckpt``: EMA weights when present (``use_ema=None``), or as asked.
    ``trust_pickle``: read it with full unpickling (see ``load_payload``)."""
    where = str(path)
    payload = load_payload(path, trust_pickle)
    cfg = _plain_config(payload["cfg"], where)
    state_dicts = payload["state_dicts"]
    if use_ema is None:
        use_ema = "ema_model" in state_dicts
    which = "ema_model" if use_ema else "model"
    if which not in state_dicts:
        raise ConversionError(f"{where}: no state_dicts[{which!r}] (use --{'no-' if use_ema else ''}ema)")
    sd = {k: _to_numpy(v) for k, v in state_dicts[which].items()}

    target = get(cfg, "policy._target_", str, where).rsplit(".", 1)[-1]
    converters = {
        HYBRID: _hybrid,
        LOWDIM: _lowdim,
        T_HYBRID: _transformer_hybrid,
        T_LOWDIM: _transformer_lowdim,
    }
    if target not in converters:
        raise ConversionError(
            f"{where}: policy._target_ {target!r} is not supported ({', '.join(converters)})"
        )
    config = _base_config(cfg, where, control_hz)
    rules, ignore, dims, notes = converters[target](cfg, sd, where, config)

    policy = build(config, _normalizer(sd, dims, where), where)
    if isinstance(policy, DiffusionTransformerPolicy):
        check_attention_masks(sd, "model.", policy.transformer, f"{where}: state_dicts[{which!r}]")
    mapped, _ = rename(sd, rules, ignore + _ALWAYS_IGNORED, f"{where}: state_dicts[{which!r}]")
    load_weights(policy, mapped, f"{where}: state_dicts[{which!r}]", rules)
    provenance = {
        "source_format": "diffusion_policy",
        "source": str(path),
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "policy_target": target,
        "weights": which,
        **notes,
    }
    return Converted(policy, provenance)
