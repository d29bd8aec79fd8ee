"""The transformer denoiser (upstream's TransformerForDiffusion) and its policy."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import yaml
from helpers import observation, tiny_policy, tiny_transformer_config, tiny_transformer_policy, training_batch
from mlx.utils import tree_flatten, tree_map
from server_helpers import RawClient, http, running_server

from policy_core import (
    ConfigError,
    DiffusionTransformerPolicy,
    build_policy,
    load_policy,
    read_checkpoint,
    save_policy,
)
from policy_core.checkpoint import CheckpointMetadataError, write_safetensors_atomic
from policy_core.nets.transformer import TransformerForDiffusion
from policy_core.schedulers import DDIMScheduler, DDPMScheduler
from proto.messages import PROTOCOL_VERSION

ROOT = Path(__file__).resolve().parent.parent


def n_params(module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


# Computed by upstream's own transformer_for_diffusion.py (real-stanford/diffusion_policy at 5ba07ac) with
# torch 2.13, in a scratch environment outside the repository: sum(p.numel() for p in model.parameters()).
UPSTREAM_TRANSFORMER_PARAMS = {
    "lowdim": 8_963_586,  # cond_dim 20 (9 keypoints + agent xy), horizon 10, n_obs_steps 2
    "image": 8_975_362,  # cond_dim 66 (64 image features + agent xy)
    "lowdim, horizon 16, n_cond_layers 2": 10_019_074,
}
RESNET18_GN_ENCODER = 11_197_088  # one robomimic VisualCore per camera (tests/test_policy.py)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("configs/pusht_transformer_lowdim.yaml", UPSTREAM_TRANSFORMER_PARAMS["lowdim"]),
        ("configs/pusht_transformer_image.yaml", UPSTREAM_TRANSFORMER_PARAMS["image"] + RESNET18_GN_ENCODER),
    ],
)
def test_pusht_configs_build_with_upstream_sizes(path, expected):
    config = yaml.safe_load((ROOT / path).read_text())["policy"]
    policy = build_policy(config)
    assert isinstance(policy, DiffusionTransformerPolicy)
    assert n_params(policy) == expected
    # Upstream's model has 159 parameters, one of them ModuleAttrMixin's empty _dummy_variable.
    assert len(tree_flatten(policy.transformer.parameters())) == 158
    assert (config["horizon"], config["n_obs_steps"], config["n_action_steps"]) == (10, 2, 8)


def test_transformer_encoder_memory_has_upstream_size():
    net = TransformerForDiffusion(2, 2, 16, 2, 20, n_layer=8, n_head=4, n_emb=256, n_cond_layers=2)
    assert n_params(net) == UPSTREAM_TRANSFORMER_PARAMS["lowdim, horizon 16, n_cond_layers 2"]


def test_decay_groups_are_upstreams():
    """Upstream's get_optim_groups on TransformerForDiffusion(n_layer=2, n_cond_layers=1): 19 decayed
    parameters, 40 not (one of them the empty _dummy_variable)."""
    net = TransformerForDiffusion(2, 2, 10, 2, 20, n_layer=2, n_head=4, n_emb=32, n_cond_layers=1)
    names = [k for k, _ in tree_flatten(net.parameters())]
    decayed = set(net.decayed_parameters())
    assert decayed <= set(names) and len(decayed) == 19 and len(names) - len(decayed) == 39
    assert {"decoder.layers.1.multihead_attn.in_proj_weight", "encoder.layers.0.linear2.weight"} <= decayed
    assert not decayed & {"pos_emb", "cond_pos_emb", "ln_f.weight", "decoder.layers.0.norm3.weight"}
    assert not any(k.endswith("bias") for k in decayed)


def test_every_parameter_gets_a_gradient_and_moves():
    for n_cond_layers in (0, 1):
        policy = tiny_transformer_policy(image=True, n_cond_layers=n_cond_layers)
        policy.train()
        params = dict(tree_flatten(policy.trainable_parameters()))
        assert len(params) == len(tree_flatten(policy.parameters()))
        loss, grads = nn.value_and_grad(policy, policy.compute_loss)(training_batch(policy))
        assert np.isfinite(loss.item())
        flat = dict(tree_flatten(grads))
        assert flat.keys() == params.keys()
        assert [k for k, g in flat.items() if not mx.any(g != 0).item()] == []
        before = {k: np.array(v) for k, v in params.items()}
        optim.AdamW(learning_rate=1e-3).update(policy, grads)
        after = dict(tree_flatten(policy.parameters()))
        assert [k for k in before if np.array_equal(before[k], np.array(after[k]))] == []


def test_dropout_in_training_mode_only():
    policy = tiny_transformer_policy(image=False, p_drop_attn=0.5, p_drop_emb=0.5)
    batch = training_batch(policy)
    noise, t = mx.random.normal((3, 8, 2)), mx.array([3, 50, 90])
    assert not policy.training  # built for inference
    a, b = (policy.compute_loss(batch, noise, t).item() for _ in range(2))
    assert a == b
    policy.train()
    c, d = (policy.compute_loss(batch, noise, t).item() for _ in range(2))
    assert c != d


def _net(causal: bool) -> TransformerForDiffusion:
    mx.random.seed(0)
    net = TransformerForDiffusion(3, 3, 8, 3, 5, n_layer=2, n_head=2, n_emb=16, causal_attn=causal)
    # Weights larger than the N(0, 0.02) initialisation, so that every dependence shows.
    net.update(tree_map(lambda p: 0.3 * mx.random.normal(p.shape), net.parameters()))
    return net.eval()  # no dropout


def _changed(a: mx.array, b: mx.array) -> np.ndarray:
    """Per action token: whether any output differs (exactly equal where attention cannot look)."""
    return (np.abs(np.array(a - b)) > 0).any(axis=(0, 2))


@pytest.mark.parametrize("causal", [True, False])
def test_causal_attention(causal):
    """With causal_attn an action token's output depends on the action tokens up to it only, and on the
    step token and the observation steps up to its own (upstream's memory_mask t >= s - 1, the memory
    being [step, observation 0, ...]); without, on everything."""
    net = _net(causal)
    x, cond = mx.random.normal((2, 8, 3)), mx.random.normal((2, 3, 5))
    t = mx.array([7, 60])
    base = net(x, t, cond)
    k = 5
    changed = _changed(net(x.at[:, k].add(1.0), t, cond), base)
    assert changed.tolist() == [not causal] * k + [True] * (8 - k)
    changed = _changed(net(x, t, cond.at[:, 2].add(1.0)), base)  # the last observation step
    assert changed.tolist() == [not causal] * 2 + [True] * 6
    changed = _changed(net(x, t, cond.at[:, 0].add(1.0)), base)  # the first: seen by every action
    assert changed.all()
    # The sampler's form, on the memory computed once for a schedule, is the same function.
    kv = net.memory_keys_values(net.step_tokens(mx.array([60, 7])), cond)  # (S, B, ...)
    assert mx.allclose(net.decode(x[1:], kv[0, 1:]), base[1:], atol=1e-5).item()
    assert mx.allclose(net.decode(x[:1], kv[1, :1]), base[:1], atol=1e-5).item()


def _reference_sample(policy, obs, kind, steps, x_init, step_noise):
    """A plain loop over the transformer's reference forward: what predict_action must equal."""
    scheduler = (DDIMScheduler if kind == "ddim" else DDPMScheduler)(policy.config.noise_scheduler)
    scheduler.set_timesteps(steps)
    cond = policy.encode_obs(policy.normalize_obs(obs))
    x = x_init
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(policy.transformer(x, t, cond), t, x, noise=step_noise[i])
    return policy.normalizer.unnormalize("action", x)


@pytest.mark.parametrize(
    "kind, steps, overrides",
    [
        ("ddim", 5, {}),
        ("ddpm", 13, {"n_cond_layers": 1}),  # chunks of 10 + 3 steps; a transformer memory encoder
        ("ddim", 4, {"causal_attn": False}),
    ],
)
def test_predict_action_matches_the_reference_loop(kind, steps, overrides):
    mx.random.seed(0)
    policy = tiny_transformer_policy(image=True, **overrides)
    obs = observation(policy, batch=2)
    out = policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=3)
    x_init, step_noise = policy.sample_noise(2, steps, 3)
    ref = _reference_sample(policy, obs, kind, steps, x_init, step_noise)
    assert np.abs(out["action_pred"] - np.array(ref)).max() < 2e-3  # pixels
    cfg = policy.config
    assert out["action"].shape == (2, cfg.n_action_steps, 2)
    start = cfg.n_obs_steps - 1
    assert np.array_equal(out["action"], out["action_pred"][:, start : start + cfg.n_action_steps])


def test_batched_request_equals_single_requests_and_new_weights_are_seen():
    policy = tiny_transformer_policy(image=False)
    obs = observation(policy, batch=3)
    noise = np.random.default_rng(1).normal(size=(3, 8, 2)).astype(np.float32)
    both = policy.predict_action(obs, noise=noise)["action_pred"]
    for i in range(3):
        one = policy.predict_action({k: v[i : i + 1] for k, v in obs.items()}, noise=noise[i : i + 1])
        assert np.abs(both[i] - one["action_pred"][0]).max() < 1e-3
    # The compiled conditioning and chunks take the transformer's arrays as inputs (a hot load, EMA).
    policy.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), policy.parameters()))
    after = policy.predict_action(obs, noise=noise)["action_pred"]
    assert not np.allclose(after, both)
    x_init, step_noise = mx.array(noise), mx.zeros((5, 3, 8, 2))
    ref = _reference_sample(policy, obs, "ddim", 5, x_init, step_noise)
    assert np.abs(after - np.array(ref)).max() < 2e-3


def test_bfloat16_weights():
    policy = tiny_transformer_policy(image=True, dtype="bfloat16")
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(policy.parameters()))
    out = policy.predict_action(observation(policy), seed=0)
    assert out["action"].dtype == np.float32 and np.isfinite(out["action_pred"]).all()
    loss = policy.compute_loss(training_batch(policy))
    assert loss.dtype == mx.float32 and np.isfinite(loss.item())


def test_parameter_groups():
    groups = tiny_transformer_policy(image=True).parameter_groups()
    assert groups["transformer.decoder.layers.0.self_attn.in_proj_weight"] == "decay"
    assert groups["transformer.head.weight"] == "decay"
    for name in ("transformer.pos_emb", "transformer.cond_pos_emb", "transformer.ln_f.weight",
                 "transformer.decoder.layers.1.linear1.bias"):  # fmt: skip
        assert groups[name] == "no_decay", name
    encoder = [k for k in groups if k.startswith("rgb_encoders.")]
    assert encoder and all(groups[k] == "obs_encoder" for k in encoder)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"n_emb": 18, "n_head": 4}, r"n_emb \(18\) must be divisible by n_head \(4\)"),
        ({"n_emb": 15, "n_head": 3}, "n_emb must be even"),
        ({"n_layer": 0}, "n_layer must be at least 1"),
        ({"n_cond_layers": -1}, "n_cond_layers"),
        ({"p_drop_attn": 1.0}, "p_drop_attn"),
        ({"obs_as_cond": False}, "obs_as_cond"),
        ({"time_as_cond": False}, "time_as_cond"),
        ({"down_dims": [16, 32]}, r"\['down_dims'\] are not fields of a policy of type 'diffusion_tr"),
        ({"type": "diffusion_lstm"}, "type must be one of"),
        ({"n_layers": 2}, "unknown policy config field"),
    ],
)
def test_config_errors_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        build_policy(tiny_transformer_config(image=False, **change))


def test_a_unet_config_refuses_transformer_fields():
    from helpers import tiny_config

    with pytest.raises(ConfigError, match=r"\['n_head'\] are not fields of a policy of type 'diffusion_unet"):
        build_policy(tiny_config(image=False, n_head=4))


# ---- checkpoints and the server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    mx.random.seed(4)
    policy = tiny_transformer_policy(image=True)
    path = tmp_path_factory.mktemp("transformer") / "t.safetensors"
    ema = tree_map(lambda p: p + 0.01, policy.parameters())
    save_policy(policy, path, ema_params=ema, training_step=7, provenance={"name": "tiny transformer"})
    return policy, path


def test_checkpoint_round_trip_is_bit_exact(saved):
    policy, path = saved
    doc = read_checkpoint(path).metadata
    assert doc["policy_type"] == doc["config"]["type"] == "diffusion_transformer"
    assert "down_dims" not in doc["config"] and doc["config"]["n_layer"] == 2
    loaded = load_policy(path, use_ema=False)
    assert isinstance(loaded, DiffusionTransformerPolicy) and loaded.config == policy.config
    assert not loaded.training  # a loaded policy runs no dropout
    want, got = dict(tree_flatten(policy.parameters())), dict(tree_flatten(loaded.parameters()))
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and np.array_equal(np.array(want[k]), np.array(got[k])), k
    obs = observation(policy)
    for kind, steps in (("ddim", 5), ("ddpm", 12)):
        a = policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=11)
        b = loaded.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=11)
        assert np.array_equal(a["action_pred"], b["action_pred"])
    ema = load_policy(path)  # the EMA weights by default
    assert np.array_equal(np.array(ema.transformer.head.bias), np.array(policy.transformer.head.bias) + 0.01)


def test_a_checkpoint_whose_type_disagrees_with_its_config_is_refused(saved, tmp_path):
    _, path = saved
    ckpt = read_checkpoint(path)
    doc = {**ckpt.metadata, "policy_type": "diffusion_unet"}
    doc.pop("content_sha256")
    bad = tmp_path / "bad.safetensors"
    write_safetensors_atomic(bad, ckpt.tensors, doc)
    with pytest.raises(CheckpointMetadataError, match="policy_type 'diffusion_unet' disagrees"):
        load_policy(bad)


def test_served_end_to_end_and_swapped_with_a_unet(saved, tmp_path):
    policy, path = saved
    root = tmp_path / "models"
    root.mkdir()
    (root / "t.safetensors").write_bytes(path.read_bytes())
    save_policy(tiny_policy(image=False), root / "unet.safetensors")
    reference = load_policy(root / "t.safetensors")
    obs = {k: v[0] for k, v in observation(reference, batch=1, seed=2).items()}
    with running_server(root, root / "t.safetensors") as srv:
        client = RawClient(srv.zmq_endpoint)
        try:
            hello = client.call({"type": "hello", "id": 1, "protocol": PROTOCOL_VERSION})
            assert hello["ok"] and hello["model"]["name"] == "tiny transformer"
            assert hello["action"] == {"dim": 2, "horizon": 8, "n_action_steps": 4}
            for options in ({"seed": 5}, {"seed": 6, "scheduler": "ddpm", "num_inference_steps": 10}):
                reply = client.call({"type": "infer", "id": 2, "obs": obs, "options": options})
                assert reply["ok"], reply
                kwargs = {k: v for k, v in options.items() if k != "seed"}
                want = reference.predict_action(
                    {k: v[None] for k, v in obs.items()}, seed=options["seed"], **kwargs
                )
                np.testing.assert_allclose(reply["action"], want["action"][0], rtol=1e-4, atol=1e-3)
            batched = client.call({"type": "infer", "id": 3, "obs": observation(reference, batch=3)})
            assert batched["ok"] and batched["action"].shape == (3, 4, 2)
            # Hot swap to a UNet checkpoint (another architecture) and back.
            for name, version in (("unet.safetensors", 2), ("t.safetensors", 3)):
                status, _ = http("POST", srv.http_url + "/v1/models/load", {"path": name})
                assert status == 202 and srv.manager.wait_for_load(120), srv.manager.last_error
                assert http("GET", srv.http_url + "/v1/models")[1]["active"]["version"] == version
            reply = client.call({"type": "infer", "id": 4, "obs": obs, "options": {"seed": 5}})
            assert reply["ok"] and reply["model"]["version"] == 3
        finally:
            client.close()
