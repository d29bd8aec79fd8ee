"""Checkpoint converters: numerical parity with PyTorch reference models in the original on-disk layouts.

For the same weights, observation and x_T, the converted policy's denoiser output (UNet or transformer)
and its DDIM action chunk must match the PyTorch implementation within 1e-4 relative error (fp32). The
reference models (tests/convert_reference.py) need torch, an optional test dependency: those tests skip
without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import dpmlx
from policy_core import load_policy, read_checkpoint
from policy_core.convert import ConversionError, UnsafeCheckpointError, convert, convert_lerobot

TOL = 1e-4
B, TO, HORIZON, N_ACTION, ACTION_DIM = 2, 2, 8, 4, 2
IMAGE, CROP = (72, 72), (64, 64)
UNET = {"dsed": 32, "down_dims": (32, 64), "k": 3, "groups": 8, "scale": True}
DDIM_STEPS, TIMESTEPS = 10, (0, 37, 99)
SCHEDULER = {"num_train_timesteps": 100, "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True,
             "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}  # fmt: skip
DP = "diffusion_policy."  # upstream module paths in _target_ fields


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="converter parity tests build PyTorch reference models")
    # Tiny reference models: one thread, or torch's workers fight MLX's BLAS threads (~300x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(torch):
    import convert_reference

    return convert_reference


def _images(rng, n_cams: int) -> np.ndarray:
    return rng.integers(0, 256, (B, TO, n_cams, *IMAGE, 3), dtype=np.uint8)


def _check(name, policy, global_cond_ref, net_ref, unnormalize_ref, obs, torch, ref) -> dict[str, float]:
    """Denoiser outputs at a few timesteps and the full DDIM chunk, ours vs the reference."""
    rng = np.random.default_rng(1)
    x_t = rng.standard_normal((B, HORIZON, ACTION_DIM)).astype(np.float32)
    gc_ref = global_cond_ref()
    gc = policy.encode_obs(policy.normalize_obs(obs))
    errors = {"global_cond": ref.rel_err(gc, gc_ref.detach().numpy())}
    with torch.no_grad():
        denoise = max(
            ref.rel_err(
                policy.network(mx.array(x_t), mx.full((B,), t), gc),
                net_ref(torch.from_numpy(x_t), torch.full((B,), t), gc_ref).numpy(),
            )
            for t in TIMESTEPS
        )
        chunk_ref = ref.ddim_sample(
            lambda x, t: net_ref(x, t, gc_ref), torch.from_numpy(x_t), 100, DDIM_STEPS
        )
        chunk_ref = unnormalize_ref(chunk_ref).numpy()
    got = policy.predict_action(obs, noise=x_t, scheduler="ddim", num_inference_steps=DDIM_STEPS)
    errors["denoiser"] = denoise
    errors["ddim_action_pred"] = ref.rel_err(got["action_pred"], chunk_ref)
    errors["ddim_action"] = ref.rel_err(got["action"], chunk_ref[:, TO - 1 : TO - 1 + N_ACTION])
    print(f"\n{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < TOL, errors
    return errors


# ---- LeRobot ----------------------------------------------------------------------------------------

STATS = {
    "observation.state": {"min": [13.5, 32.9], "max": [496.1, 511.0], "mean": [250.0, 260.0],
                          "std": [120.0, 95.0]},
    "observation.environment_state": {"min": [0.0, -2.0, 5.0, 1.0], "max": [512.0, 3.0, 9.0, 4.0],
                                      "mean": [256.0, 0.1, 7.0, 2.0], "std": [100.0, 1.5, 1.0, 0.7]},
    "action": {"min": [12.0, 25.0], "max": [511.0, 511.0], "mean": [240.0, 250.0], "std": [110.0, 90.0]},
}  # fmt: skip
IMAGE_STATS = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "min": [0.0] * 3,
    "max": [1.0] * 3,
}
LEROBOT_CASES = {
    # Current layout: processor files; one camera; GroupNorm; DDIM as the configured scheduler.
    "lerobot_processor_1cam_gn": dict(
        cameras=["observation.image"], env=False, bn=False, separate=False, legacy=False, scheduler="DDIM",
        mapping={"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"},
    ),
    # Older layout: statistics as buffers in model.safetensors; state + environment state, no camera;
    # ENV absent from the mapping (identity).
    "lerobot_legacy_env_state": dict(
        cameras=[], env=True, bn=False, separate=False, legacy=True, scheduler="DDPM",
        mapping={"STATE": "MIN_MAX", "ACTION": "MEAN_STD"},
    ),
    # LeRobot's current default encoder: BatchNorm (pretrained ImageNet weights), one encoder per camera.
    "lerobot_processor_2cam_bn": dict(
        cameras=["observation.images.top", "observation.images.wrist"], env=True, bn=True, separate=True,
        legacy=False, scheduler="DDPM",
        mapping={"VISUAL": "MEAN_STD", "STATE": "MEAN_STD", "ENV": "MIN_MAX", "ACTION": "MIN_MAX"},
    ),
}  # fmt: skip


def lerobot_config(case: dict) -> dict:
    inputs = {cam: {"type": "VISUAL", "shape": [3, *IMAGE]} for cam in case["cameras"]}  # cameras first
    inputs["observation.state"] = {"type": "STATE", "shape": [2]}
    if case["env"]:
        inputs["observation.environment_state"] = {"type": "ENV", "shape": [4]}
    return {
        "type": "diffusion", "n_obs_steps": TO, "horizon": HORIZON, "n_action_steps": N_ACTION,
        "input_features": inputs, "output_features": {"action": {"type": "ACTION", "shape": [ACTION_DIM]}},
        "normalization_mapping": case["mapping"], "device": "cpu", "use_amp": False,
        "vision_backbone": "resnet18", "resize_shape": None, "crop_ratio": 1.0, "crop_shape": list(CROP),
        "crop_is_random": True, "use_group_norm": not case["bn"],
        "pretrained_backbone_weights": "ResNet18_Weights.IMAGENET1K_V1" if case["bn"] else None,
        "spatial_softmax_num_keypoints": 32, "use_separate_rgb_encoder_per_camera": case["separate"],
        "down_dims": list(UNET["down_dims"]), "kernel_size": UNET["k"], "n_groups": UNET["groups"],
        "diffusion_step_embed_dim": UNET["dsed"], "use_film_scale_modulation": UNET["scale"],
        "noise_scheduler_type": case["scheduler"], **SCHEDULER, "clip_sample_range": 1.0,
        "num_inference_steps": None, "drop_n_last_frames": 7, "optimizer_lr": 1e-4,
    }  # fmt: skip


def lerobot_stats(case: dict) -> dict:
    stats = {k: {s: np.asarray(v, np.float32) for s, v in st.items()} for k, st in STATS.items()}
    for cam in case["cameras"]:
        stats[cam] = {s: np.asarray(v, np.float32).reshape(3, 1, 1) for s, v in IMAGE_STATS.items()}
    if not case["env"]:
        del stats["observation.environment_state"]
    return stats


@pytest.fixture(scope="module")
def lerobot_sources(ref, tmp_path_factory):
    """{case: (folder, torch policy, stats)}, built on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            case = LEROBOT_CASES[name]
            config, stats = lerobot_config(case), lerobot_stats(case)
            model = ref.LeRobotPolicy(
                2, case["cameras"], 4 if case["env"] else 0, ACTION_DIM, TO, IMAGE, CROP, case["bn"],
                case["separate"], UNET,
            )  # fmt: skip
            ref.randomize(model, seed=len(cache))
            folder = tmp_path_factory.mktemp(name) / "pretrained_model"
            ref.write_lerobot_folder(folder, config, model, stats, case["legacy"])
            cache[name] = (folder, model, stats)
        return cache[name]

    return get


def _lerobot_obs(case: dict, seed: int = 0) -> tuple[dict, dict]:
    """Raw observations for our policy (dot-free keys, uint8 HWC images) and for LeRobot (CHW in [0, 1])."""
    rng = np.random.default_rng(seed)
    state = rng.uniform(20, 490, (B, TO, 2)).astype(np.float32)
    ours, theirs = {"state": state}, {"observation.state": state}
    if case["cameras"]:
        images = _images(rng, len(case["cameras"]))
        for i, cam in enumerate(case["cameras"]):
            ours[cam.rsplit(".", 1)[-1]] = images[:, :, i]
        theirs["observation.images"] = images.transpose(0, 1, 2, 5, 3, 4).astype(np.float32) / 255.0
    if case["env"]:
        env = rng.uniform([0, -2, 5, 1], [512, 3, 9, 4], (B, TO, 4)).astype(np.float32)
        ours["environment_state"], theirs["observation.environment_state"] = env, env
    return ours, theirs


@pytest.mark.parametrize("name", list(LEROBOT_CASES))
def test_lerobot_matches_pytorch(name, lerobot_sources, torch, ref, tmp_path):
    case = LEROBOT_CASES[name]
    folder, model, stats = lerobot_sources(name)
    converted, _ = convert(folder, tmp_path / "out.safetensors")
    policy = load_policy(tmp_path / "out.safetensors")  # what `dpmlx serve` loads
    expected_keys = [
        "state",
        *(c.rsplit(".", 1)[-1] for c in case["cameras"]),
        *(["environment_state"] * case["env"]),
    ]
    assert list(policy.config.obs) == expected_keys  # LeRobot's conditioning order
    assert policy.config.obs_encoder.norm == ("batch" if case["bn"] else "group") or not case["cameras"]
    assert policy.config.sampler == case["scheduler"].lower()
    ours, theirs = _lerobot_obs(case)

    def normalize(feature, x, inverse=False):
        types = {**lerobot_config(case)["input_features"], "action": {"type": "ACTION"}}
        mode = case["mapping"].get(types[feature]["type"], "IDENTITY")
        return ref.lerobot_normalize(x, mode, stats[feature], 1e-8, case["legacy"], inverse)

    def global_cond():
        batch = {k: normalize(k, torch.from_numpy(v)) for k, v in theirs.items() if k != "observation.images"}
        if case["cameras"]:
            images = torch.from_numpy(theirs["observation.images"])
            batch["observation.images"] = torch.stack(
                [normalize(cam, images[:, :, i]) for i, cam in enumerate(case["cameras"])], dim=2
            )
        return model.global_cond(batch)

    _check(
        name, policy, global_cond, model.diffusion.unet, lambda a: normalize("action", a, inverse=True),
        ours, torch, ref,
    )  # fmt: skip
    prov = read_checkpoint(tmp_path / "out.safetensors").metadata["provenance"]
    assert prov["source_format"] == "lerobot" and prov["converter"] == "dpmlx convert"
    assert prov["lerobot_features"]["state"] == "observation.state"
    assert prov["normalization_source"] == (
        "model buffers (legacy)" if case["legacy"] else "policy processors"
    )
    assert converted.policy.config == policy.config


def test_lerobot_conversion_needs_no_torch(lerobot_sources, monkeypatch, tmp_path):
    folder, _, _ = lerobot_sources("lerobot_processor_1cam_gn")
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    converted = convert_lerobot(folder)
    assert converted.policy.config.image_keys == ["image"]


def test_converted_lerobot_checkpoint_serves(lerobot_sources, tmp_path):
    """The server loads checkpoints with load_policy and answers with predict_action."""
    folder, _, _ = lerobot_sources("lerobot_processor_1cam_gn")
    out = tmp_path / "served.safetensors"
    assert dpmlx.main(["convert", str(folder.parent), "--out", str(out), "--control-hz", "12.5"]) == 0
    policy = load_policy(out)
    assert policy.config.control_hz == 12.5
    obs, _ = _lerobot_obs(LEROBOT_CASES["lerobot_processor_1cam_gn"], seed=3)
    result = policy.predict_action(obs, seed=0, num_inference_steps=4)  # few steps: a quick compile
    assert result["action"].shape == (B, N_ACTION, ACTION_DIM)
    assert np.isfinite(result["action"]).all()
    meta = read_checkpoint(out).metadata
    assert meta["obs_schema"]["image"] == {"shape": [TO, *IMAGE, 3], "dtype": "uint8"}


# ---- Diffusion Policy (real-stanford) ---------------------------------------------------------------

DP_CASES = {
    # pusht_image.yaml's key order (image first), GroupNorm encoder as published.
    "dp_hybrid_image_first_gn": dict(order=["image", "agent_pos"], bn=False),
    # The published PushT yaml's (sorted) order, and the BatchNorm encoder (obs_encoder_group_norm false).
    "dp_hybrid_state_first_bn": dict(order=["agent_pos", "image"], bn=True),
}


def _limits(lo, hi) -> dict[str, np.ndarray]:
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    scale = 2 / (hi - lo)
    return {
        "scale": scale,
        "offset": -1 - scale * lo,
        "min": lo,
        "max": hi,
        "mean": (lo + hi) / 2,
        "std": (hi - lo) / 4,
    }


# Upstream's image range normalizer: (1,)-shaped parameters, [0, 1] -> [-1, 1].
_RANGE = {"scale": 2, "offset": -1, "min": 0, "max": 1, "mean": 0.5, "std": np.sqrt(1 / 12)}
IMAGE_RANGE = {k: np.float32([v]) for k, v in _RANGE.items()}


def dp_cfg(policy: dict, shape_meta: dict, target_workspace: str) -> dict:
    """A resolved upstream config (train.py saves it resolved), as a plain mapping."""
    scheduler = {"_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler", **SCHEDULER,
                 "variance_type": "fixed_small"}  # fmt: skip
    return {
        "_target_": f"diffusion_policy.workspace.{target_workspace}",
        "horizon": HORIZON, "n_obs_steps": TO, "n_action_steps": N_ACTION, "n_latency_steps": 0,
        "shape_meta": shape_meta, "training": {"use_ema": True},
        "policy": {"noise_scheduler": scheduler, "horizon": HORIZON, "n_action_steps": N_ACTION,
                   "n_obs_steps": TO, "num_inference_steps": 100, "obs_as_global_cond": True, **policy},
    }  # fmt: skip


def write_dp_ckpt(torch, path: Path, cfg: dict, ema, model) -> Path:
    state_dicts = {"model": model.state_dict(), "ema_model": ema.state_dict(), "optimizer": {}}
    payload = {"cfg": cfg, "state_dicts": state_dicts, "pickles": {}}
    torch.save(payload, path)
    return path


def _hybrid_source(torch, ref, tmp_path, case):
    shape_meta = {
        "obs": {k: {"shape": [3, *IMAGE], "type": "rgb"} if k == "image"
                else {"shape": [2], "type": "low_dim"} for k in case["order"]},
        "action": {"shape": [ACTION_DIM]},
    }  # fmt: skip
    policy_cfg = {
        "_target_": f"{DP}policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy",
        "shape_meta": shape_meta, "crop_shape": list(CROP), "diffusion_step_embed_dim": UNET["dsed"],
        "down_dims": list(UNET["down_dims"]), "kernel_size": UNET["k"], "n_groups": UNET["groups"],
        "cond_predict_scale": True, "obs_encoder_group_norm": not case["bn"], "eval_fixed_crop": True,
    }  # fmt: skip
    cfg = dp_cfg(
        policy_cfg, shape_meta, "train_diffusion_unet_hybrid_workspace.TrainDiffusionUnetHybridWorkspace"
    )
    norm = {
        "agent_pos": _limits([13.5, 32.9], [496.1, 511.0]),
        "image": IMAGE_RANGE,
        "action": _limits([12, 25], [511, 511]),
    }
    models = []
    for seed in (10, 11):  # ema_model, model
        m = ref.HybridPolicy(shape_meta["obs"], ACTION_DIM, TO, CROP, case["bn"], UNET)
        ref.set_dp_normalizer(ref.randomize(m, seed), norm)
        models.append(m)
    return write_dp_ckpt(torch, tmp_path / "hybrid.ckpt", cfg, *models), models, norm


@pytest.mark.parametrize("name", list(DP_CASES))
def test_dp_hybrid_matches_pytorch(name, torch, ref, tmp_path):
    case = DP_CASES[name]
    ckpt, (ema, _), norm = _hybrid_source(torch, ref, tmp_path, case)
    convert(ckpt, tmp_path / "out.safetensors")
    policy = load_policy(tmp_path / "out.safetensors")
    assert list(policy.config.obs) == case["order"]
    rng = np.random.default_rng(0)
    image = _images(rng, 1)[:, :, 0]
    state = rng.uniform(20, 490, (B, TO, 2)).astype(np.float32)

    def n(key, x):
        return x * torch.from_numpy(norm[key]["scale"]) + torch.from_numpy(norm[key]["offset"])

    def global_cond():
        chw = torch.from_numpy(image.transpose(0, 1, 4, 2, 3).astype(np.float32) / 255.0)
        return ema.global_cond(
            {"image": n("image", chw), "agent_pos": n("agent_pos", torch.from_numpy(state))}
        )

    def unnormalize(a):
        return (a - torch.from_numpy(norm["action"]["offset"])) / torch.from_numpy(norm["action"]["scale"])

    _check(
        name, policy, global_cond, ema.model, unnormalize, {"image": image, "agent_pos": state}, torch, ref
    )
    prov = read_checkpoint(tmp_path / "out.safetensors").metadata["provenance"]
    assert prov["weights"] == "ema_model" and prov["policy_target"] == "DiffusionUnetHybridImagePolicy"


@pytest.fixture()
def lowdim_ckpt(torch, ref, tmp_path):
    def build(**policy_overrides):
        model_cfg = {
            "_target_": f"{DP}model.diffusion.conditional_unet1d.ConditionalUnet1D",
            "input_dim": ACTION_DIM,
            "local_cond_dim": None,
            "global_cond_dim": 5 * TO,
            "diffusion_step_embed_dim": UNET["dsed"],
            "down_dims": list(UNET["down_dims"]),
            "kernel_size": UNET["k"],
            "n_groups": UNET["groups"],
            "cond_predict_scale": True,
        }
        policy_cfg = {
            "_target_": f"{DP}policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy",
            "model": model_cfg,
            "obs_dim": 5,
            "action_dim": ACTION_DIM,
            "obs_as_local_cond": False,
            "pred_action_steps_only": False,
            "oa_step_convention": True,
            **policy_overrides,
        }
        cfg = dp_cfg(
            policy_cfg, {}, "train_diffusion_unet_lowdim_workspace.TrainDiffusionUnetLowdimWorkspace"
        )
        # The DDIM scheduler as upstream's real-robot configs use it.
        ddim = "diffusers.schedulers.scheduling_ddim.DDIMScheduler"
        cfg["policy"]["noise_scheduler"] = {"_target_": ddim, **SCHEDULER, "set_alpha_to_one": True,
                                            "steps_offset": 0}  # fmt: skip
        norm = {
            "obs": _limits([0, 0, -1, 5, 100], [512, 512, 1, 6, 300]),
            "action": _limits([12, 25], [511, 511]),
        }
        models = []
        for seed in (20, 21):  # ema_model, model
            m = ref.LowdimPolicy(5, ACTION_DIM, TO, UNET)
            ref.set_dp_normalizer(ref.randomize(m, seed), norm)
            models.append(m)
        return write_dp_ckpt(torch, tmp_path / "lowdim.ckpt", cfg, *models), models, norm

    return build


@pytest.mark.parametrize("use_ema", [None, False])
def test_dp_lowdim_matches_pytorch(use_ema, lowdim_ckpt, torch, ref, tmp_path):
    ckpt, (ema, model), norm = lowdim_ckpt()
    source = ema if use_ema is None else model
    converted, _ = convert(ckpt, tmp_path / "out.safetensors", use_ema=use_ema)
    policy = converted.policy
    assert list(policy.config.obs) == ["obs"] and policy.config.sampler == "ddim"
    assert converted.provenance["weights"] == ("ema_model" if use_ema is None else "model")
    obs = (
        np.random.default_rng(0)
        .uniform([0, 0, -1, 5, 100], [512, 512, 1, 6, 300], (B, TO, 5))
        .astype(np.float32)
    )

    def global_cond():
        nobs = torch.from_numpy(obs) * torch.from_numpy(norm["obs"]["scale"]) + torch.from_numpy(
            norm["obs"]["offset"]
        )
        return source.global_cond({"obs": nobs})

    def unnormalize(a):
        return (a - torch.from_numpy(norm["action"]["offset"])) / torch.from_numpy(norm["action"]["scale"])

    _check(
        f"dp_lowdim(use_ema={use_ema})",
        policy,
        global_cond,
        source.model,
        unnormalize,
        {"obs": obs},
        torch,
        ref,
    )


# ---- Diffusion Policy transformer policies --------------------------------------------------------------

# TransformerForDiffusion's arguments past input/output/cond dims; dropout on, as upstream trains it (the
# converted policy must not apply it).
TRANSFORMER = {"horizon": HORIZON, "n_obs_steps": TO, "n_layer": 2, "n_head": 2, "n_emb": 32,
               "p_drop_emb": 0.1, "p_drop_attn": 0.3, "causal_attn": True, "n_cond_layers": 0}  # fmt: skip
DP_TRANSFORMER_CASES = {
    "dp_transformer_hybrid_gn": dict(kind="hybrid", order=["image", "agent_pos"], bn=False),
    "dp_transformer_hybrid_state_first_bn": dict(kind="hybrid", order=["agent_pos", "image"], bn=True),
    "dp_transformer_lowdim": dict(kind="lowdim"),
    # A transformer memory encoder and full attention (no mask buffers in the checkpoint).
    "dp_transformer_lowdim_encoder_full_attention": dict(
        kind="lowdim", overrides={"n_cond_layers": 1, "causal_attn": False}
    ),
}
_TARGETS = {
    "hybrid": (f"{DP}policy.diffusion_transformer_hybrid_image_policy.DiffusionTransformerHybridImagePolicy",
               "train_diffusion_transformer_hybrid_workspace.TrainDiffusionTransformerHybridWorkspace"),
    "lowdim": (f"{DP}policy.diffusion_transformer_lowdim_policy.DiffusionTransformerLowdimPolicy",
               "train_diffusion_transformer_lowdim_workspace.TrainDiffusionTransformerLowdimWorkspace"),
}  # fmt: skip
LOWDIM_OBS = ([0, 0, -1, 5, 100], [512, 512, 1, 6, 300])


def _transformer_source(torch, ref, path: Path, case: dict, **policy_overrides):
    """An upstream transformer workspace checkpoint: its cfg, EMA and plain weights, and normalizer."""
    kwargs = {**TRANSFORMER, **case.get("overrides", {})}
    arch = {k: v for k, v in kwargs.items() if k not in ("horizon", "n_obs_steps")}
    target, workspace = _TARGETS[case["kind"]]
    if case["kind"] == "hybrid":
        shape_meta = {
            "obs": {k: {"shape": [3, *IMAGE], "type": "rgb"} if k == "image"
                    else {"shape": [2], "type": "low_dim"} for k in case["order"]},
            "action": {"shape": [ACTION_DIM]},
        }  # fmt: skip
        policy_cfg = {"_target_": target, "shape_meta": shape_meta, "crop_shape": list(CROP),
                      "obs_encoder_group_norm": not case["bn"], "eval_fixed_crop": True, **arch,
                      "time_as_cond": True, "obs_as_cond": True, "pred_action_steps_only": False}  # fmt: skip
        norm = {"agent_pos": _limits([13.5, 32.9], [496.1, 511.0]), "image": IMAGE_RANGE,
                "action": _limits([12, 25], [511, 511])}  # fmt: skip

        def module():
            return ref.HybridPolicy(shape_meta["obs"], ACTION_DIM, TO, CROP, case["bn"], transformer=kwargs)
    else:
        shape_meta = {}
        model_cfg = {"_target_": f"{DP}model.diffusion.transformer_for_diffusion.TransformerForDiffusion",
                     "input_dim": ACTION_DIM, "output_dim": ACTION_DIM, "horizon": HORIZON, "n_obs_steps": TO,
                     "cond_dim": 5, **arch, "time_as_cond": True, "obs_as_cond": True}  # fmt: skip
        policy_cfg = {"_target_": target, "model": model_cfg, "obs_dim": 5, "action_dim": ACTION_DIM,
                      "obs_as_cond": True, "pred_action_steps_only": False}  # fmt: skip
        norm = {"obs": _limits(*LOWDIM_OBS), "action": _limits([12, 25], [511, 511])}

        def module():
            return ref.TransformerLowdimPolicy(5, ACTION_DIM, kwargs)

    cfg = dp_cfg({**policy_cfg, **policy_overrides}, shape_meta, workspace)
    del cfg["policy"]["obs_as_global_cond"]  # a UNet field
    models = []
    for seed in (30, 31):  # ema_model, model
        m = module()
        ref.set_dp_normalizer(ref.randomize(m, seed), norm)
        models.append(m)
    return write_dp_ckpt(torch, path, cfg, *models), models, norm


@pytest.mark.parametrize("name", list(DP_TRANSFORMER_CASES))
def test_dp_transformer_matches_pytorch(name, torch, ref, tmp_path):
    case = DP_TRANSFORMER_CASES[name]
    ckpt, (ema, _), norm = _transformer_source(torch, ref, tmp_path / "t.ckpt", case)
    convert(ckpt, tmp_path / "out.safetensors")
    policy = load_policy(tmp_path / "out.safetensors")
    assert policy.config.type == "diffusion_transformer" and not policy.training
    rng = np.random.default_rng(0)

    def n(key, x):
        return x * torch.from_numpy(norm[key]["scale"]) + torch.from_numpy(norm[key]["offset"])

    if case["kind"] == "hybrid":
        assert list(policy.config.obs) == case["order"]
        image = _images(rng, 1)[:, :, 0]
        state = rng.uniform(20, 490, (B, TO, 2)).astype(np.float32)
        obs = {"image": image, "agent_pos": state}

        def cond():
            chw = torch.from_numpy(image.transpose(0, 1, 4, 2, 3).astype(np.float32) / 255.0)
            return ema.cond({"image": n("image", chw), "agent_pos": n("agent_pos", torch.from_numpy(state))})
    else:
        obs = {"obs": rng.uniform(*LOWDIM_OBS, (B, TO, 5)).astype(np.float32)}

        def cond():
            return ema.cond({"obs": n("obs", torch.from_numpy(obs["obs"]))})

    def unnormalize(a):
        return (a - torch.from_numpy(norm["action"]["offset"])) / torch.from_numpy(norm["action"]["scale"])

    _check(name, policy, cond, ema.model, unnormalize, obs, torch, ref)
    prov = read_checkpoint(tmp_path / "out.safetensors").metadata["provenance"]
    assert prov["weights"] == "ema_model" and prov["policy_target"].startswith("DiffusionTransformer")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"obs_as_cond": False}, "policy.obs_as_cond"),
        ({"pred_action_steps_only": True}, "policy.pred_action_steps_only"),
        ({"n_emb_typo": 3}, "n_emb_typo"),
    ],
)
def test_dp_transformer_unsupported_fields_are_named(overrides, field, torch, ref, tmp_path):
    case = DP_TRANSFORMER_CASES["dp_transformer_lowdim"]
    ckpt, _, _ = _transformer_source(torch, ref, tmp_path / "t.ckpt", case, **overrides)
    with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
        convert(ckpt, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_dp_transformer_checkpoint_as_upstream_writes_it_reads_weights_only(torch, ref, tmp_path):
    """An OmegaConf cfg pickled by dill, read with the weights-only allowlist (no --trust-pickle)."""
    omegaconf = pytest.importorskip("omegaconf", reason="real upstream cfgs are OmegaConf objects")
    dill = pytest.importorskip("dill", reason="upstream pickles its checkpoints with dill")
    case = DP_TRANSFORMER_CASES["dp_transformer_hybrid_gn"]
    ckpt, (ema, _), _ = _transformer_source(torch, ref, tmp_path / "t.ckpt", case)
    payload = torch.load(ckpt, weights_only=False)
    payload["cfg"] = omegaconf.OmegaConf.create(payload["cfg"])
    torch.save(payload, ckpt, pickle_module=dill)
    policy = convert(ckpt, tmp_path / "out.safetensors")[0].policy
    want = ema.model.decoder.layers[1].multihead_attn.in_proj_weight.detach().numpy()
    assert np.array_equal(np.array(policy.transformer.decoder.layers[1].multihead_attn.in_proj_weight), want)


def test_dp_transformer_model_fields_are_checked(torch, ref, tmp_path):
    case = DP_TRANSFORMER_CASES["dp_transformer_lowdim"]
    ckpt, _, _ = _transformer_source(torch, ref, tmp_path / "t.ckpt", case)
    payload = torch.load(ckpt, weights_only=False)
    payload["cfg"]["policy"]["model"]["time_as_cond"] = False  # the encoder-only variant
    torch.save(payload, ckpt)
    with pytest.raises(ConversionError, match="time_as_cond"):
        convert(ckpt, tmp_path / "out.safetensors")
    payload["cfg"]["policy"]["model"].update(time_as_cond=True, n_head=3)
    torch.save(payload, ckpt)
    with pytest.raises(ConversionError, match=r"n_emb \(32\) must be divisible by n_head \(3\)"):
        convert(ckpt, tmp_path / "out.safetensors")


def test_dp_transformer_mask_buffers_are_checked(torch, ref, tmp_path):
    """Upstream's causal masks travel as buffers: one that is not the configuration's is refused."""
    case = DP_TRANSFORMER_CASES["dp_transformer_lowdim"]
    ckpt, _, _ = _transformer_source(torch, ref, tmp_path / "t.ckpt", case)
    payload = torch.load(ckpt, weights_only=False)
    payload["state_dicts"]["ema_model"]["model.memory_mask"].zero_()  # every action sees every step
    torch.save(payload, ckpt)
    with pytest.raises(ConversionError, match=r"model\.memory_mask is not the causal mask"):
        convert(ckpt, tmp_path / "out.safetensors")
    payload["cfg"]["policy"]["model"]["causal_attn"] = False
    del payload["state_dicts"]["ema_model"]["model.memory_mask"]
    torch.save(payload, ckpt)
    with pytest.raises(ConversionError, match=r"model\.mask is present but causal_attn is False"):
        convert(ckpt, tmp_path / "out.safetensors")


# ---- unsupported sources fail with typed errors naming the field ----------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"_target_": f"{DP}policy.bet_lowdim_policy.BETLowdimPolicy"}, "policy._target_"),
        ({"obs_as_local_cond": True}, "policy.obs_as_local_cond"),
        ({"obs_as_global_cond": False}, "policy.obs_as_global_cond"),
        ({"oa_step_convention": False}, "policy.oa_step_convention"),
        ({"eta": 0.5}, "['eta']"),
        ({"n_action_steps": "${eval:'${n_action_steps}+${n_latency_steps}'}"}, "policy.n_action_steps"),
    ],
)  # fmt: skip
def test_dp_unsupported_fields_are_named(overrides, field, lowdim_ckpt, tmp_path):
    ckpt, _, _ = lowdim_ckpt(**overrides)
    with pytest.raises(ConversionError, match=field.replace(".", r"\.").replace("[", r"\[")):
        convert(ckpt, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_dp_checkpoint_with_omegaconf_cfg_pickled_by_dill(lowdim_ckpt, torch, tmp_path):
    """Real upstream checkpoints: cfg is an OmegaConf DictConfig and the file is written with dill."""
    omegaconf = pytest.importorskip("omegaconf", reason="real upstream cfgs are OmegaConf objects")
    dill = pytest.importorskip("dill", reason="upstream pickles its checkpoints with dill")
    ckpt, (ema, _), _ = lowdim_ckpt()
    payload = torch.load(ckpt, weights_only=False)
    payload["cfg"] = omegaconf.OmegaConf.create(payload["cfg"])
    torch.save(payload, ckpt, pickle_module=dill)
    policy = convert(ckpt, tmp_path / "out.safetensors")[0].policy
    want = ema.model.final_conv[1].weight.detach().numpy().transpose(0, 2, 1)
    assert np.array_equal(np.array(policy.unet.final_conv[1].weight), want)


def test_dp_unexpected_tensor_is_named(lowdim_ckpt, torch, tmp_path):
    ckpt, _, _ = lowdim_ckpt()
    payload = torch.load(ckpt, weights_only=False)
    payload["state_dicts"]["ema_model"]["model.extra_head.weight"] = torch.zeros(3)
    torch.save(payload, ckpt)
    with pytest.raises(ConversionError, match=r"unexpected tensor 'model\.extra_head\.weight'"):
        convert(ckpt, tmp_path / "out.safetensors")


def test_dp_checkpoint_with_omegaconf_cfg_pickled_by_plain_pickle(lowdim_ckpt, torch, tmp_path):
    """Re-saved without dill, an OmegaConf config names the builtin types itself; the workspace's
    ``pickles`` (dill bytes upstream) are bytes, never unpickled."""
    omegaconf = pytest.importorskip("omegaconf", reason="real upstream cfgs are OmegaConf objects")
    dill = pytest.importorskip("dill", reason="upstream pickles its workspace attributes with dill")
    ckpt, (ema, _), _ = lowdim_ckpt()
    payload = torch.load(ckpt, weights_only=False)
    payload["cfg"] = omegaconf.OmegaConf.create(payload["cfg"])
    payload["pickles"] = {"_output_dir": dill.dumps("/data/outputs/2023.01.01")}
    torch.save(payload, ckpt)
    policy = convert(ckpt, tmp_path / "out.safetensors")[0].policy
    want = ema.model.final_conv[1].weight.detach().numpy().transpose(0, 2, 1)
    assert np.array_equal(np.array(policy.unet.final_conv[1].weight), want)


class _RunsCode:
    """Unpickled, it calls ``call(*args)``: what a hostile ``.ckpt`` can hold."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("kind", ["exec", "system"])
def test_a_ckpt_whose_pickle_runs_code_is_refused_and_nothing_runs(
    kind, lowdim_ckpt, torch, tmp_path, capsys
):
    import os

    ckpt, _, _ = lowdim_ckpt()
    marker = tmp_path / "ran"
    payload = torch.load(ckpt, weights_only=False)
    evil = (
        _RunsCode(exec, f"open({str(marker)!r}, 'w').write('ran')")
        if kind == "exec"
        else _RunsCode(os.system, f"touch {marker}")
    )
    payload["pickles"]["evil"] = evil
    torch.save(payload, ckpt)
    name = "builtins.exec" if kind == "exec" else f"{os.system.__module__}.system"
    out = tmp_path / "out.safetensors"
    with pytest.raises(UnsafeCheckpointError, match=f"refers to '{name}'"):
        convert(ckpt, out)
    assert dpmlx.main(["convert", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert name in err and "--trust-pickle" in err
    assert not marker.exists() and not out.exists()
    # The old behaviour, asked for: the file's code runs, after a warning.
    assert dpmlx.main(["convert", str(ckpt), "--out", str(out), "--trust-pickle"]) == 0
    assert "warning: --trust-pickle" in capsys.readouterr().err
    assert marker.exists() and out.exists()


def test_dp_missing_tensor_is_named_as_in_the_source(lowdim_ckpt, torch, tmp_path):
    ckpt, _, _ = lowdim_ckpt()
    payload = torch.load(ckpt, weights_only=False)
    del payload["state_dicts"]["ema_model"]["model.mid_modules.1.blocks.0.block.1.weight"]
    torch.save(payload, ckpt)
    with pytest.raises(
        ConversionError,
        match=r"missing source tensor\(s\) 'model\.mid_modules\.1\.blocks\.0\.block\.1\.weight' "
        r"\(our 'unet\.mid_modules\.1\.blocks\.0\.norm\.weight'\)",
    ):
        convert(ckpt, tmp_path / "out.safetensors")


def test_ckpt_without_torch_fails_clearly(tmp_path, monkeypatch):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConversionError, match="needs PyTorch"):
        convert(ckpt, tmp_path / "out.safetensors")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "act"}, "'type'"),
        ({"vision_backbone": "resnet34"}, "vision_backbone"),
        ({"resize_shape": [96, 96]}, "resize_shape"),
        ({"spatial_softmax_num_keypoints": 16}, "spatial_softmax_num_keypoints"),
        ({"noise_scheduler_type": "DPMSolver"}, "noise_scheduler_type"),
        ({"input_features": None}, "input_features"),
    ],
)
def test_lerobot_unsupported_config_is_named(change, field, tmp_path):
    """Config checks come before any weight is read, so these need no model files (and no torch)."""
    config = lerobot_config(LEROBOT_CASES["lerobot_processor_1cam_gn"]) | change
    if config["input_features"] is None:
        del config["input_features"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=field):
        convert(tmp_path, tmp_path / "out.safetensors")


def test_lerobot_unknown_processor_step_is_named(lerobot_sources, tmp_path):
    folder, _, _ = lerobot_sources("lerobot_processor_1cam_gn")
    copy = tmp_path / "pretrained_model"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    pre = json.loads((copy / "policy_preprocessor.json").read_text())
    pre["steps"].insert(1, {"registry_name": "delta_action_processor", "config": {}})
    (copy / "policy_preprocessor.json").write_text(json.dumps(pre))
    with pytest.raises(ConversionError, match="delta_action_processor"):
        convert(copy, tmp_path / "out.safetensors")


def test_cli_reports_errors_and_warns_about_pickles(tmp_path, capsys):
    assert dpmlx.main(["convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dpmlx.main(["convert", "--help"])
    assert "only files you trust" in " ".join(capsys.readouterr().out.split())


def test_batchnorm_statistics_are_frozen_buffers_in_the_checkpoint(lerobot_sources, tmp_path):
    folder, _, _ = lerobot_sources("lerobot_processor_2cam_bn")
    policy = convert_lerobot(folder).policy
    names = dict(tree_flatten(policy.parameters()))
    trainable = dict(tree_flatten(policy.trainable_parameters()))
    stat = "rgb_encoders.wrist.trunk.layer3.0.downsample.1.running_var"
    assert stat in names and stat not in trainable
    assert "rgb_encoders.wrist.trunk.layer3.0.downsample.1.weight" in trainable
