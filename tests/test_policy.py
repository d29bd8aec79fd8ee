import threading
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import yaml
from helpers import observation, tiny_policy, training_batch
from mlx.utils import tree_flatten, tree_map

from policy_core import ConfigError, ObservationError, build_policy
from policy_core.backends import cuda
from policy_core.backends.base import Backend
from policy_core.backends.cuda.sampler import CudaSampler
from policy_core.nets.vision import RgbEncoder
from policy_core.policy import FILM_SCHEDULES_CACHED


def n_params(module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


@pytest.mark.parametrize(
    "path, expected",
    [
        ("configs/pusht_lowdim.yaml", 65_783_298),
        ("configs/pusht_image.yaml", 251_511_938 + 11_197_088),  # UNet + one ResNet18-GN encoder
    ],
)
def test_shipped_configs_build_with_upstream_sizes(path, expected):
    policy = build_policy(yaml.safe_load(Path(path).read_text())["policy"])
    assert n_params(policy) == expected


def test_every_parameter_gets_a_gradient_and_moves():
    """The earlier MLX port trained a quarter of its UNet: every parameter must learn."""
    policy = tiny_policy(image=True)
    batch = training_batch(policy)
    params = dict(tree_flatten(policy.trainable_parameters()))
    assert len(params) == len(tree_flatten(policy.parameters()))

    loss_and_grad = nn.value_and_grad(policy, lambda b: policy.compute_loss(b))
    loss, grads = loss_and_grad(batch)
    assert np.isfinite(loss.item())
    flat = dict(tree_flatten(grads))
    assert flat.keys() == params.keys()
    zero = [k for k, g in flat.items() if not mx.any(g != 0).item()]
    assert zero == []

    before = {k: np.array(v) for k, v in params.items()}
    opt = optim.AdamW(learning_rate=1e-3)
    opt.update(policy, grads)
    mx.eval(policy.parameters())
    after = dict(tree_flatten(policy.parameters()))
    unchanged = [k for k in before if np.array_equal(before[k], np.array(after[k]))]
    assert unchanged == []


def test_loss_decreases_on_a_fixed_batch():
    mx.random.seed(0)
    policy = tiny_policy(image=False)
    batch = training_batch(policy, batch=8)
    opt = optim.AdamW(learning_rate=3e-3)
    loss_and_grad = nn.value_and_grad(policy, lambda b: policy.compute_loss(b))
    losses = []
    for _ in range(300):
        loss, grads = loss_and_grad(batch)
        opt.update(policy, grads)
        mx.eval(policy.parameters(), opt.state)
        losses.append(loss.item())
    # Timesteps and noise are random per step, so compare averages over many steps.
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:50])


def test_predict_action_shapes_window_and_determinism():
    policy = tiny_policy(image=True)
    obs = observation(policy, batch=3)
    out = policy.predict_action(obs, seed=7)
    cfg = policy.config
    assert out["action"].shape == (3, cfg.n_action_steps, 2)
    assert out["action_pred"].shape == (3, cfg.horizon, 2)
    assert isinstance(out["action"], np.ndarray) and out["action"].dtype == np.float32
    start = cfg.n_obs_steps - 1
    assert np.array_equal(out["action"], out["action_pred"][:, start : start + cfg.n_action_steps])
    # Inference is deterministic for a seed: no random crop, no hidden RNG.
    again = policy.predict_action(obs, seed=7)
    assert np.array_equal(out["action_pred"], again["action_pred"])
    other = policy.predict_action(obs, seed=8)
    assert not np.array_equal(out["action_pred"], other["action_pred"])


def _reference_sample(policy, obs, kind, steps, x_init, step_noise):
    """Straightforward loop over the reference UNet forward: what the fast, compiled path must equal."""
    scheduler = policy.noise_scheduler.__class__(policy.config.noise_scheduler)
    if kind == "ddim":
        from policy_core.schedulers import DDIMScheduler

        scheduler = DDIMScheduler(policy.config.noise_scheduler)
    scheduler.set_timesteps(steps)
    global_cond = policy.encode_obs(policy.normalize_obs(obs))
    x = x_init
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(policy.unet(x, t, global_cond), t, x, noise=step_noise[i])
    return policy.normalizer.unnormalize("action", x)


# Pixels, actions span 0..512: float32 rounding over 10-13 steps reaches 1.2e-3 px on some weight draws on
# the CPU and 3.0e-3 px (50 ulps at 512) through the CUDA kernel on an H100 (DDIM-12 with eta 0.5, these
# seeded weights, before and after the packed weights); a wrong sampler is off by pixels.
REFERENCE_TOLERANCE_PX = 5e-3 if cuda.available() else 2e-3


def _error_to_reference(policy, obs, action_pred, kind="ddim", steps=None, seed=0) -> float:
    """Largest |action_pred - the reference loop's| for the noise ``predict_action(seed=seed)`` drew."""
    steps = steps or policy.config.default_inference_steps
    x_init, step_noise = policy.sample_noise(action_pred.shape[0], steps, seed)
    ref = _reference_sample(policy, obs, kind, steps, x_init, step_noise)
    return float(np.abs(action_pred - ref).max())


@pytest.mark.parametrize(
    "kind, steps, scheduler",
    [
        ("ddim", 5, {}),
        ("ddpm", 10, {}),
        # Chunks of 10 + 3 steps; DDPM's last step draws no noise.
        ("ddpm", 13, {"prediction_type": "sample", "variance_type": "fixed_small_log"}),
        ("ddim", 12, {"eta": 0.5, "clip_sample": False}),
    ],
)
def test_fast_path_matches_reference_loop(kind, steps, scheduler):
    mx.random.seed(0)  # the weights: not whatever state earlier tests left MLX's generator in
    policy = tiny_policy(image=True, noise_scheduler=scheduler)
    obs = observation(policy, batch=2)
    seed = 3
    out = policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=seed)
    assert _error_to_reference(policy, obs, out["action_pred"], kind, steps, seed) < REFERENCE_TOLERANCE_PX


def test_compiled_sampler_sees_new_weights():
    policy = tiny_policy(image=False)
    obs = observation(policy, batch=1)
    before = policy.predict_action(obs, seed=0)["action_pred"]
    other = tiny_policy(image=False, seed=1)
    other.update(tree_map(lambda p: p + 0.01 * mx.random.normal(p.shape), other.parameters()))
    policy.update(other.parameters())  # replaced in place, as an EMA copy or a hot load does
    after = policy.predict_action(obs, seed=0)["action_pred"]
    assert not np.allclose(before, after)
    assert _error_to_reference(policy, obs, after) < REFERENCE_TOLERANCE_PX


def _perturb(module: nn.Module) -> None:
    module.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape), module.parameters()))


REPLACEMENTS = {
    # The FiLM step rows are cached per schedule and weights.
    "step encoder": lambda policy: _perturb(policy.unet.diffusion_step_encoder[0]),
    "block cond_encoder": lambda policy: _perturb(policy.unet.residual_blocks()[-1].cond_encoder),
    # The compiled conditioning takes the encoders' arrays and the normalizer's statistics as inputs,
    # not as constants of its first trace.
    "image encoder": lambda policy: _perturb(policy.rgb_encoders["image"]),
    # A new dict, not the one the conditioning was first compiled for (new random weights).
    "image encoders dict": lambda policy: setattr(
        policy, "rgb_encoders", {"image": tiny_policy(image=True).rgb_encoders["image"]}
    ),
    "normalizer": lambda policy: setattr(policy, "normalizer", tiny_policy(image=True, seed=1).normalizer),
}


@pytest.mark.parametrize("part", list(REPLACEMENTS))
def test_predict_action_sees_any_part_of_the_conditioning_replaced(part):
    policy = tiny_policy(image=True)
    obs = observation(policy, batch=1)
    policy.predict_action(obs, seed=0)  # traces (which swaps the weights' array objects) and caches
    before = policy.predict_action(obs, seed=0)["action_pred"]
    REPLACEMENTS[part](policy)
    after = policy.predict_action(obs, seed=0)["action_pred"]
    assert not np.allclose(before, after)
    assert _error_to_reference(policy, obs, after) < REFERENCE_TOLERANCE_PX


def test_schedules_beyond_the_film_cache_are_rebuilt():
    policy = tiny_policy(image=False)
    obs = observation(policy, batch=1)
    schedules = range(1, FILM_SCHEDULES_CACHED + 3)
    # Two passes: tracing a new chunk length gives the weights new array objects (the cache restarts),
    # so only the second pass shows the oldest schedules dropped.
    for _ in range(2):
        for steps in schedules:
            policy.predict_action(obs, scheduler="ddim", num_inference_steps=steps, seed=0)
    assert list(policy._film_cache[1]) == [("ddim", steps) for steps in schedules[-FILM_SCHEDULES_CACHED:]]
    for steps in (1, schedules[-1]):  # dropped, kept
        out = policy.predict_action(obs, scheduler="ddim", num_inference_steps=steps, seed=0)
        assert _error_to_reference(policy, obs, out["action_pred"], steps=steps) < REFERENCE_TOLERANCE_PX


def test_explicit_noise_is_used_and_scheduler_switch_needs_no_reload():
    policy = tiny_policy(image=False)
    obs = observation(policy, batch=1)
    noise = np.random.default_rng(0).normal(size=(1, 8, 2)).astype(np.float32)
    a = policy.predict_action(obs, scheduler="ddim", noise=noise, seed=1)
    b = policy.predict_action(obs, scheduler="ddim", noise=noise, seed=2)
    # DDIM with eta 0 is deterministic given x_T: the seed no longer matters.
    assert np.array_equal(a["action_pred"], b["action_pred"])
    c = policy.predict_action(obs, scheduler="ddpm", num_inference_steps=20, noise=noise, seed=1)
    assert not np.array_equal(a["action_pred"], c["action_pred"])
    with pytest.raises(ValueError, match="noise has shape"):
        policy.predict_action(obs, noise=noise[:, :4])
    # Explicit noise reproduces a seeded request exactly.
    x_init, step_noise = policy.sample_noise(1, 20, seed=5)
    seeded = policy.predict_action(obs, scheduler="ddpm", num_inference_steps=20, seed=5)
    explicit = policy.predict_action(
        obs, scheduler="ddpm", num_inference_steps=20, noise=x_init, step_noise=step_noise
    )
    assert np.array_equal(seeded["action_pred"], explicit["action_pred"])
    # The compiled draw gives MLX's plain draw for the seed's key, bit for bit.
    plain = mx.random.normal((21, 1, *x_init.shape[1:]), key=mx.random.key(5))
    assert mx.array_equal(mx.concatenate([x_init[None], step_noise]), plain).item()
    with pytest.raises(ValueError, match="scheduler"):
        policy.predict_action(obs, scheduler="euler")
    with pytest.raises(ValueError, match="num_inference_steps"):
        policy.predict_action(obs, num_inference_steps=1000)


def test_noise_draws_keep_their_shape_across_threads_and_many_shapes():
    # The server's model workers take turns on one process-wide compiled draw, with a shape per (steps,
    # rows): each draw must be its own shape's, as MLX's plain draw gives it, whichever thread asks.
    policy = tiny_policy(image=False)
    shapes = [(steps, rows) for steps in (4, 10, 16, 20, 50, 100) for rows in range(1, 8)]  # 42

    def check(steps: int, rows: int, wrong: list) -> None:
        x_init, step_noise = policy.sample_noise(rows, steps, seed=steps * 10 + rows)
        plain = mx.random.normal((1 + steps, *x_init.shape), key=mx.random.key(steps * 10 + rows))
        if step_noise.shape != plain[1:].shape or not mx.array_equal(step_noise, plain[1:]).item():
            wrong.append((steps, rows))

    wrong: list = []
    for steps, rows in shapes:
        check(steps, rows, wrong)
        worker = threading.Thread(target=check, args=(steps, rows, wrong))
        worker.start()
        worker.join()
    assert not wrong


def test_batched_request_equals_single_requests():
    policy = tiny_policy(image=True)
    obs = observation(policy, batch=2)
    noise = np.random.default_rng(1).normal(size=(2, 8, 2)).astype(np.float32)
    both = policy.predict_action(obs, noise=noise)["action_pred"]
    for i in range(2):
        one = policy.predict_action({k: v[i : i + 1] for k, v in obs.items()}, noise=noise[i : i + 1])
        assert np.abs(both[i] - one["action_pred"][0]).max() < 1e-3


def test_observation_errors_name_the_problem():
    policy = tiny_policy(image=True)
    obs = observation(policy, batch=2)
    with pytest.raises(ObservationError, match="missing observation key"):
        policy.predict_action({"agent_pos": obs["agent_pos"]})
    with pytest.raises(ObservationError, match="obs\\['image'\\] has shape"):
        policy.predict_action({**obs, "image": obs["image"][:, :, :60]})
    with pytest.raises(ObservationError, match="batch size"):
        policy.predict_action({**obs, "agent_pos": obs["agent_pos"][:1]})


def test_training_crops_randomly_and_inference_centrally(monkeypatch):
    calls = []
    original = RgbEncoder.crop

    def spy(self, images, random_crop):
        calls.append(random_crop)
        return original(self, images, random_crop)

    monkeypatch.setattr(RgbEncoder, "crop", spy)
    policy = tiny_policy(image=True)
    mx.eval(policy.compute_loss(training_batch(policy)))
    assert calls == [True]
    calls.clear()
    policy.predict_action(observation(policy), seed=0)
    assert calls == [False]
    # And the random crops really differ between calls.
    nobs = policy.normalize_obs(observation(policy, batch=1))
    a, b = policy.encode_obs(nobs, random_crop=True), policy.encode_obs(nobs, random_crop=True)
    assert not mx.array_equal(a, b).item()


def test_bfloat16_weights():
    policy = tiny_policy(image=True, dtype="bfloat16")
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(policy.parameters()))
    out = policy.predict_action(observation(policy), seed=0)
    assert out["action"].dtype == np.float32
    assert np.isfinite(out["action_pred"]).all()
    loss = policy.compute_loss(training_batch(policy))
    assert loss.dtype == mx.float32 and np.isfinite(loss.item())


def test_shared_rgb_encoder_for_two_cameras():
    cams = {
        "left": {"shape": [3, 72, 72], "type": "rgb"},
        "right": {"shape": [3, 72, 72], "type": "rgb"},
        "agent_pos": {"shape": [2], "type": "low_dim"},
    }
    from helpers import fitted_normalizer, tiny_config

    for shared, n_encoders in ((False, 2), (True, 1)):
        cfg = tiny_config(image=False, obs_encoder={"crop_shape": [64, 64], "share_rgb_model": shared})
        cfg["shape_meta"]["obs"] = cams
        policy = build_policy(cfg, fitted_normalizer(cfg))
        assert len(policy.rgb_encoders) == n_encoders
        # global cond = n_obs_steps * (64 + 64 + 2)
        assert policy.unet.mid_modules[0].cond_encoder.weight.shape[1] == 16 + 2 * 130
        assert policy.predict_action(observation(policy), seed=0)["action"].shape == (2, 4, 2)


def test_avg_pool_encoder_variant():
    policy = tiny_policy(image=True, obs_encoder={"crop_shape": [64, 64], "pool": "avg"})
    assert policy.unet.mid_modules[0].cond_encoder.weight.shape[1] == 16 + 2 * (512 + 2)
    assert policy.predict_action(observation(policy), seed=0)["action"].shape == (2, 4, 2)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"horizon": 9}, "horizon"),
        ({"n_action_steps": 9}, "n_action_steps"),
        ({"sampler": "euler"}, "sampler"),
        ({"dtype": "int8"}, "dtype"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
        ({"obs_encoder": {"pool": "max"}}, "pool"),
        ({"noise_scheduler": {"beta_schedule": "cosine"}}, "beta_schedule"),
        ({"down_dim": [16]}, "unknown policy config field"),
        ({"shape_meta": {"obs": {"observation.state": {"shape": [2]}}, "action": {"shape": [2]}}}, "no '.'"),
    ],
)
def test_config_errors_name_the_field(change, match):
    from helpers import tiny_config

    with pytest.raises(ConfigError, match=match):
        build_policy(tiny_config(image=True, **change))


def test_inference_conditioning_runs_image_trunks_in_the_preferred_backends_form(monkeypatch):
    policy = tiny_policy(image=True)
    nobs = policy.normalize_obs(observation(policy, batch=2))
    calls = []

    def cuda_trunk(module, images):  # stands in for the kernels: records, then computes as the modules
        calls.append(images.shape)
        return module(images)

    # As the CUDA backend offers its trunk kernel.
    monkeypatch.setattr(policy._backends[0], "image_trunk", lambda module: partial(cuda_trunk, module))
    training = policy.encode_obs(nobs)
    assert calls == []  # training and the default path keep the modules (gradients)
    inference = policy.encode_obs(nobs, inference=True)
    assert calls and all(shape[0] == 2 * policy.config.n_obs_steps for shape in calls)
    assert mx.array_equal(inference, training)
    # The inference conditioning asks for it.
    calls.clear()
    obs = {k: mx.array(v) for k, v in observation(policy, batch=2).items()}
    policy._conditioning(obs, policy._obs_affines(), *policy._loop_tables("ddim", 2))
    assert calls


def test_unpadded_batch_sizes_are_the_batches_the_sampler_kernel_takes(monkeypatch):
    policy = tiny_policy(image=False)
    if not cuda.available():
        assert policy.unpadded_batch_sizes(8) == []
        h100_shared_bytes = 227 * 1024  # a block's most, as a device would report it
        monkeypatch.setattr(CudaSampler, "supports", lambda self, b, h, s: self.fits(b, h, h100_shared_bytes))
        policy._backends.insert(0, CudaSampler(policy.unet))  # as on a CUDA device
    sizes = policy.unpadded_batch_sizes(8)
    assert len(sizes) > 2 and sizes == list(range(1, len(sizes) + 1))  # from 1, no gaps
    assert policy.unpadded_batch_sizes(2) == [1, 2]


class _SlowToBuild(Backend):
    """A backend whose kernels are not built yet: ``supports`` ("here and now") declines until ``built``."""

    name = "slow to build"

    def __init__(self, generic: Backend):
        self.generic, self.built, self.calls = generic, False, 0

    def supports(self, batch, horizon, scheduler) -> bool:
        return self.built

    def sample(self, scheduler, x, conditioning, step_noise) -> np.ndarray:
        self.calls += 1
        return self.generic.sample(scheduler, x, conditioning, step_noise)


def test_a_backend_that_is_not_ready_is_skipped():
    policy = tiny_policy(image=False)
    slow = _SlowToBuild(policy._backends[-1])
    policy._backends.insert(0, slow)
    obs = observation(policy, batch=1, seed=0)
    before = policy.predict_action(obs, seed=1)["action"]
    assert slow.calls == 0
    slow.built = True
    after = policy.predict_action(obs, seed=1)["action"]
    assert slow.calls == 1
    np.testing.assert_array_equal(before, after)
