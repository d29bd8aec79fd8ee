"""Real-time chunking in the sampler (policy_core/rtc.py, policy_core/backends/generic.py), tiny policies."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import observation, tiny_policy, tiny_transformer_policy
from test_backends import Recording

from policy_core.backends import matmul_unet
from policy_core.backends.generic import GenericBackend
from policy_core.rtc import ActionPrefix, prefix_weights
from policy_core.schedulers import make_scheduler

# Pixels (actions span 0..512). The compiled sampler against a loop of module calls: float32 rounding,
# with a backward pass per step, stays below 1e-2 px; a wrong sign or weight is off by pixels.
REFERENCE_TOLERANCE_PX = 1e-2
# Rows batched together against each alone: the same operations on other batch shapes.
BATCH_TOLERANCE_PX = 1e-2


def _policy(network: str = "unet", **overrides):
    mx.random.seed(0)  # the weights: not whatever state earlier tests left MLX's generator in
    build = tiny_transformer_policy if network == "transformer" else tiny_policy
    return build(image=False, **overrides)


def _prefix(k: int = 6) -> np.ndarray:
    """A smooth path across the action range, far from what the untrained policy samples."""
    return np.linspace([150.0, 200.0], [300.0, 260.0], k).astype(np.float32)


def _sample(policy, obs, prefixes=None, kind="ddim", steps=5, seed=3) -> np.ndarray:
    out = policy.predict_action(obs, scheduler=kind, num_inference_steps=steps, seed=seed, prefixes=prefixes)
    return out["action_pred"]


def test_prefix_weights_freeze_the_delay_and_decay_over_the_rest():
    exp = prefix_weights(6, 2, "exp")
    linear = prefix_weights(6, 2, "linear")
    assert exp.dtype == np.float32 and exp.shape == (6,)
    assert np.array_equal(exp[:2], [1, 1]) and np.array_equal(linear[:2], [1, 1])
    np.testing.assert_allclose(linear[2:], [4 / 5, 3 / 5, 2 / 5, 1 / 5])  # (k - i) / (k - d + 1)
    assert np.all(np.diff(exp[1:]) < 0) and np.all(exp[2:] < linear[2:]) and exp[-1] > 0
    assert np.array_equal(prefix_weights(6, 2, "hard"), [1, 1, 0, 0, 0, 0])
    assert np.array_equal(prefix_weights(3, 3, "exp"), [1, 1, 1])
    assert prefix_weights(0, 0, "exp").shape == (0,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"actions": np.zeros((3, 2, 1)), "delay": 0}, "prefix must be"),
        ({"actions": np.full((3, 2), np.nan), "delay": 0}, "NaN or Inf"),
        ({"actions": np.zeros((3, 2)), "delay": 4}, "delay must be"),
        ({"actions": np.zeros((3, 2)), "delay": -1}, "delay must be"),
        ({"actions": np.zeros((3, 2)), "delay": 1, "schedule": "cosine"}, "schedule must be"),
        ({"actions": np.zeros((3, 2)), "delay": 1, "method": "magic"}, "method must be"),
        ({"actions": np.zeros((3, 2)), "delay": 1, "max_guidance": 0.0}, "max_guidance must be"),
    ],
)
def test_action_prefix_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActionPrefix(**kwargs)


def test_prefixes_that_fit_no_chunk_are_refused():
    policy = _policy()
    obs = observation(policy, batch=1)
    reach = policy.config.horizon - policy.config.n_obs_steps + 1
    for actions in (np.zeros((reach + 1, 2), np.float32), np.zeros((3, 3), np.float32)):
        with pytest.raises(ValueError, match="prefix has shape"):
            _sample(policy, obs, [ActionPrefix(actions, 0)])
    with pytest.raises(ValueError, match="2 prefixes for a batch of 1"):
        _sample(policy, obs, [None, None])


def test_no_prefix_an_empty_one_or_nothing_frozen_is_a_plain_request():
    policy = _policy()
    obs = observation(policy, batch=1)
    plain = _sample(policy, obs)
    for prefixes in (
        [None],
        [ActionPrefix(np.zeros((0, 2), np.float32), 0)],
        [ActionPrefix(_prefix(), 0, method="replace")],  # replacement freezes the first d = 0 only
    ):
        assert np.array_equal(_sample(policy, obs, prefixes), plain)


@pytest.mark.parametrize("kind, steps", [("ddim", 5), ("ddpm", 10)])
@pytest.mark.parametrize("schedule", ["hard", "exp"])
def test_replacement_returns_the_frozen_actions_exactly(kind, steps, schedule):
    policy = _policy()
    obs = observation(policy, batch=1)
    prefix, delay, start = _prefix(), 3, policy.config.n_obs_steps - 1
    out = _sample(policy, obs, [ActionPrefix(prefix, delay, schedule, method="replace")], kind, steps)
    assert np.array_equal(out[0, start : start + delay], prefix[:delay])
    plain = _sample(policy, obs, None, kind, steps)
    assert not np.allclose(out[0, start + delay :], plain[0, start + delay :], atol=1.0)  # the rest moved


@pytest.mark.parametrize("kind, steps", [("ddim", 5), ("ddpm", 10)])
def test_guidance_brings_the_frozen_actions_to_the_prefix(kind, steps):
    """Within 3 px (of 512) with the default clip, which does not bind at the last step (the weight
    1 / sqrt(a (1 - a)) is 40 at t = 0 for this schedule: the step moves the denoised estimate all the
    way); with the paper's clip of 5, closer than the plain sample only."""
    policy = _policy()
    obs = observation(policy, batch=1)
    prefix, delay, start = _prefix(), 3, policy.config.n_obs_steps - 1
    frozen = slice(start, start + delay)

    def error(prefixes) -> float:
        return float(np.abs(_sample(policy, obs, prefixes, kind, steps)[0, frozen] - prefix[:delay]).max())

    plain = error(None)
    assert plain > 100  # the untrained policy samples elsewhere
    assert error([ActionPrefix(prefix, delay, "hard")]) < 3.0
    assert error([ActionPrefix(prefix, delay, max_guidance=5.0)]) < plain


def _reference(policy, obs, kind, steps, seed, prefix: ActionPrefix) -> np.ndarray:
    """Guided or replacement sampling as a plain loop of module calls: each step's denoised estimate x0,
    g = J^T W (y - x0) by mx.vjp, the model output moved by -sqrt(a) w g (epsilon) or +sqrt(1 - a) w g
    (sample), w = min(max_guidance, 1 / sqrt(a (1 - a)))."""
    cfg = policy.config
    scheduler = make_scheduler(kind, cfg.noise_scheduler)
    scheduler.set_timesteps(steps)
    epsilon = cfg.noise_scheduler.prediction_type == "epsilon"
    x, step_noise = policy.sample_noise(1, steps, seed)
    cond = policy.encode_obs(policy.normalize_obs({k: mx.array(v) for k, v in obs.items()}))
    start, k, action = cfg.n_obs_steps - 1, len(prefix.actions), policy.normalizer["action"]
    y = np.zeros((1, cfg.horizon, cfg.action_dim), np.float32)
    y[0, start : start + k] = prefix.actions * action.scale + action.offset
    mask = np.zeros((1, cfg.horizon, 1), np.float32)
    if prefix.method == "guided":
        mask[0, start : start + k, 0] = prefix.weights()
    else:
        mask[0, start : start + prefix.delay, 0] = 1.0
    y, mask = mx.array(y), mx.array(mask)
    for i, t in enumerate(scheduler.timesteps):
        sqrt_beta, sqrt_alpha = scheduler._lookup(t)[:2]
        if prefix.method == "replace":
            x = mx.where(mask > 0, sqrt_alpha * y + sqrt_beta * step_noise[i], x)
            output = policy.network(x, t, cond)
        else:

            def x0_of(x, t=t, level=(sqrt_beta, sqrt_alpha)):
                out = policy.network(x, t, cond)
                return (x - level[0] * out) / level[1] if epsilon else out

            x0 = x0_of(x)
            _, (g,) = mx.vjp(x0_of, [x], [mask * (y - x0)])
            weight = min(prefix.max_guidance, 1 / (sqrt_alpha * sqrt_beta))
            output = policy.network(x, t, cond)
            output = output - sqrt_alpha * weight * g if epsilon else output + sqrt_beta * weight * g
        x = scheduler.step(output, t, x, noise=step_noise[i])
    out = policy.normalizer.unnormalize("action", np.array(x))
    if prefix.method == "replace":
        out[0, start : start + prefix.delay] = prefix.actions[: prefix.delay]
    return out


@pytest.mark.parametrize(
    "network, kind, steps, scheduler, method",
    [
        ("unet", "ddim", 5, {}, "guided"),
        ("unet", "ddpm", 13, {}, "guided"),  # chunks of 10 + 3 steps
        ("unet", "ddpm", 10, {"prediction_type": "sample"}, "guided"),
        ("unet", "ddim", 12, {"eta": 0.5, "clip_sample": False}, "guided"),
        ("unet", "ddpm", 10, {}, "replace"),
        ("transformer", "ddim", 5, {}, "guided"),
        ("transformer", "ddpm", 10, {}, "replace"),
    ],
)
def test_compiled_inpainting_matches_a_loop_of_module_calls(network, kind, steps, scheduler, method):
    policy = _policy(network, noise_scheduler=scheduler)
    obs = observation(policy, batch=1)
    prefix = ActionPrefix(_prefix(), 2, max_guidance=20.0, method=method)
    out = _sample(policy, obs, [prefix], kind, steps, seed=5)
    ref = _reference(policy, obs, kind, steps, 5, prefix)
    assert np.abs(out - ref).max() < REFERENCE_TOLERANCE_PX


def test_rows_with_and_without_prefixes_get_what_each_gets_alone():
    policy = _policy()
    obs = observation(policy, batch=4)
    rows = [
        None,
        ActionPrefix(_prefix(), 2),
        ActionPrefix(_prefix(4)[::-1].copy(), 1, "linear", 20.0),
        ActionPrefix(_prefix(), 3, method="replace"),
    ]
    noise = policy.sample_noise(4, 5, seed=9)
    batched = policy.predict_action(
        obs, num_inference_steps=5, noise=noise[0], step_noise=noise[1], prefixes=rows
    )
    for row, prefix in enumerate(rows):
        alone = policy.predict_action(
            {k: v[row : row + 1] for k, v in obs.items()},
            num_inference_steps=5,
            noise=noise[0][row : row + 1],
            step_noise=noise[1][:, row : row + 1],
            prefixes=[prefix],
        )
        assert np.abs(batched["action_pred"][row] - alone["action_pred"][0]).max() < BATCH_TOLERANCE_PX
    # A batch of replacement and plain rows only needs no backward pass, and gives the same.
    cheap = [rows[0], rows[3]]
    two = policy.predict_action(
        {k: v[[0, 3]] for k, v in obs.items()},
        num_inference_steps=5,
        noise=noise[0][mx.array([0, 3])],
        step_noise=noise[1][:, mx.array([0, 3])],
        prefixes=cheap,
    )
    assert np.abs(two["action_pred"] - batched["action_pred"][[0, 3]]).max() < BATCH_TOLERANCE_PX


def test_inpainting_is_deterministic_for_a_seed():
    policy = _policy()
    obs = observation(policy, batch=1)
    for prefix in (ActionPrefix(_prefix(), 2), ActionPrefix(_prefix(), 2, method="replace")):
        first = _sample(policy, obs, [prefix], "ddpm", 10, seed=4)
        assert np.array_equal(first, _sample(policy, obs, [prefix], "ddpm", 10, seed=4))
        assert not np.allclose(first, _sample(policy, obs, [prefix], "ddpm", 10, seed=5))


def test_backends_that_do_not_inpaint_hand_such_requests_on():
    policy = _policy()
    obs = observation(policy, batch=1)
    recording = Recording(policy.unet, max_batch=8)  # an interface-only backend: no ``inpaints``
    assert not recording.inpaints and isinstance(policy._backends[-1], GenericBackend)
    policy._backends.insert(0, recording)
    _sample(policy, obs, [ActionPrefix(_prefix(), 2)])
    assert recording.batches == []
    _sample(policy, obs)
    assert recording.batches == [1]


def test_the_guided_trunk_has_the_modules_values_and_vector_jacobian_product():
    unet = _policy().unet
    x = mx.random.normal((2, 8, 2), key=mx.random.key(1))
    films = [mx.random.normal((2, b.cond_encoder.weight.shape[0])) for b in unet.residual_blocks()]
    cotangent = mx.random.normal((2, 8, 2), key=mx.random.key(2))
    fast = mx.vjp(lambda x: matmul_unet.denoise_for_gradients(unet, x, films), [x], [cotangent])
    reference = mx.vjp(lambda x: unet.forward_film(x, films), [x], [cotangent])
    for got, want in zip((fast[0][0], fast[1][0]), (reference[0][0], reference[1][0]), strict=True):
        assert mx.abs(got - want).max().item() < 1e-5 * max(1.0, mx.abs(want).max().item())
