"""Parity of policy_core.schedulers with HuggingFace diffusers, via golden trajectories.

tests/golden/schedulers.npz is produced by tests/golden/make_scheduler_golden.py (torch + diffusers, not
needed here). Each case is replayed in closed loop: the pseudo model output 0.5 * tanh(x) + r[k] is computed
from OUR current sample, so scheduler errors compound through the trajectory as with a real denoiser.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from policy_core.schedulers import DDIMScheduler, DDPMScheduler, SchedulerConfig, make_scheduler

TOL = 1e-5  # max abs error, fp32
GOLDEN = np.load(Path(__file__).parent / "golden" / "schedulers.npz", allow_pickle=False)
META = json.loads(str(GOLDEN["meta"]))
CASES = {c["name"]: c for c in META["trajectory_cases"]}
NOISE_CASES = META["add_noise_cases"]


def golden(case: dict, field: str) -> np.ndarray:
    return GOLDEN[f"{case['name']}__{field}"]


def build(case: dict) -> DDPMScheduler | DDIMScheduler:
    scheduler = make_scheduler(case["kind"], SchedulerConfig.from_dict(case["config"]))
    scheduler.set_timesteps(case["num_inference_steps"])
    return scheduler


def replay(scheduler: DDPMScheduler | DDIMScheduler, case: dict) -> np.ndarray:
    """Run the golden case's trajectory with our scheduler; returns all samples after each step."""
    r, noise = mx.array(golden(case, "r")), mx.array(golden(case, "noise"))
    x = mx.array(golden(case, "x_T"))
    traj = []
    for k, t in enumerate(scheduler.timesteps):
        x = scheduler.step(0.5 * mx.tanh(x) + r[k], t, x, noise=noise[k])
        traj.append(x)
    return np.array(mx.stack(traj))


def max_traj_error(scheduler: DDPMScheduler | DDIMScheduler, case: dict) -> float:
    return float(np.abs(replay(scheduler, case) - golden(case, "traj")).max())


def test_golden_metadata() -> None:
    assert META["diffusers_version"] and META["torch_version"]
    assert len(CASES) >= 20 and {c["kind"] for c in CASES.values()} == {"ddpm", "ddim"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_matches_diffusers(name: str) -> None:
    case = CASES[name]
    scheduler = build(case)
    assert scheduler.timesteps == golden(case, "timesteps").tolist()
    assert all(type(t) is int for t in scheduler.timesteps)
    # Bit-exact for the cosine schedule; linear ones may differ by 1 ulp (torch's SIMD float32 linspace).
    np.testing.assert_allclose(scheduler.alphas_cumprod, golden(case, "alphas_cumprod"), rtol=0, atol=2e-7)
    if case["config"]["beta_schedule"] == "squaredcos_cap_v2":
        np.testing.assert_array_equal(scheduler.alphas_cumprod, golden(case, "alphas_cumprod"))
    ours, ref = replay(scheduler, case), golden(case, "traj")
    assert ours.shape == ref.shape and ours.dtype == np.float32
    errors = np.abs(ours - ref).reshape(len(ref), -1).max(axis=1)
    assert errors.max() <= TOL, f"step errors {errors}"


@pytest.mark.parametrize("case", NOISE_CASES, ids=[c["name"] for c in NOISE_CASES])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_add_noise_matches_diffusers(cls: type, case: dict) -> None:
    scheduler = cls(SchedulerConfig.from_dict(case["config"]))
    arrays = {f: mx.array(GOLDEN[f"{case['name']}__{f}"]) for f in ("x0", "noise", "timesteps")}
    out = scheduler.add_noise(arrays["x0"], arrays["noise"], arrays["timesteps"])
    assert out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), GOLDEN[f"{case['name']}__out"], rtol=0, atol=1e-6)


def test_replay_detects_ddpm_stepping_to_t_minus_1(monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES["ddpm_T100_n10"]
    assert max_traj_error(build(case), case) <= TOL
    monkeypatch.setattr(DDPMScheduler, "_previous_timesteps", lambda self, ts, ratio: [t - 1 for t in ts])
    assert max_traj_error(build(case), case) > 100 * TOL


def test_replay_pins_previous_timestep_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    # With steps_offset == T // n, "t - T//n" and "next schedule entry" differ on the last step; diffusers
    # uses the former for DDIM and the latter for DDPM. Swapping the rules must break parity.
    ddpm, ddim = CASES["ddpm_T100_n16_offset6"], CASES["ddim_T100_n16_offset6"]
    monkeypatch.setattr(DDPMScheduler, "_previous_timesteps", DDIMScheduler._previous_timesteps)
    monkeypatch.setattr(DDIMScheduler, "_previous_timesteps", lambda self, ts, ratio: ts[1:] + [-1])
    assert max_traj_error(build(ddpm), ddpm) > 100 * TOL
    assert max_traj_error(build(ddim), ddim) > 100 * TOL


@pytest.mark.parametrize("name", ["ddpm_T100_n10", "ddim_T100_n10_eta0.5"])
def test_step_traces_under_compile(name: str) -> None:
    case = CASES[name]
    scheduler = build(case)
    r, noise = mx.array(golden(case, "r")), mx.array(golden(case, "noise"))

    def sample(x: mx.array, r: mx.array, noise: mx.array) -> mx.array:
        for k, t in enumerate(scheduler.timesteps):
            x = scheduler.step(0.5 * mx.tanh(x) + r[k], t, x, noise=noise[k])
        return x

    x_T = mx.array(golden(case, "x_T"))
    compiled = np.array(mx.compile(sample)(x_T, r, noise))
    np.testing.assert_allclose(compiled, golden(case, "traj")[-1], rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_step_computes_in_sample_dtype(kind: str) -> None:
    scheduler = make_scheduler(kind, SchedulerConfig(eta=0.5))
    scheduler.set_timesteps(10)
    x32 = mx.array(np.random.default_rng(0).standard_normal((2, 16, 2)).astype(np.float32))
    eps, noise = 0.3 * x32, -0.2 * x32
    t = scheduler.timesteps[0]
    ref = scheduler.step(eps, t, x32, noise)
    half = scheduler.step(eps, t, x32.astype(mx.float16), noise.astype(mx.float16))
    assert ref.dtype == mx.float32 and half.dtype == mx.float16
    np.testing.assert_allclose(np.array(half.astype(mx.float32)), np.array(ref), atol=1e-2)


def test_missing_noise_raises() -> None:
    x = mx.zeros((1, 4, 2))
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="noise"):
        ddpm.step(x, ddpm.timesteps[0], x)
    assert ddpm.step(x, 0, x).shape == x.shape  # t == 0 draws no noise
    ddim = DDIMScheduler(eta=0.5)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="noise"):
        ddim.step(x, ddim.timesteps[0], x)
    deterministic = DDIMScheduler()
    deterministic.set_timesteps(10)
    assert deterministic.step(x, deterministic.timesteps[0], x).shape == x.shape


def test_step_needs_schedule_timestep() -> None:
    x = mx.zeros((1, 4, 2))
    scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 0, x, x)
    scheduler.set_timesteps(10)
    for bad in (5, mx.array(90), 90.0):
        with pytest.raises(ValueError, match="timestep"):
            scheduler.step(x, bad, x, x)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_train_timesteps", 0),
        ("num_train_timesteps", 10.0),
        ("beta_schedule", "sigmoid"),
        ("variance_type", "fixed_large"),
        ("variance_type", "learned_range"),
        ("prediction_type", "v_prediction"),
        ("clip_sample", "yes"),
        ("clip_sample_range", 0.0),
        ("beta_start", None),
        ("beta_end", 1.5),
        ("set_alpha_to_one", 1),
        ("steps_offset", -1),
        ("eta", -0.1),
        ("eta", 1.5),
        ("eta", None),
    ],
)
def test_bad_config_values_raise(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        SchedulerConfig.from_dict({field: value})
    with pytest.raises(ValueError, match=field):
        DDPMScheduler(**{field: value})


def test_config_dict_round_trip_and_unknown_key() -> None:
    config = SchedulerConfig(num_train_timesteps=50, beta_schedule="linear", eta=1)
    assert SchedulerConfig.from_dict(config.to_dict()) == config
    assert isinstance(config.eta, float)
    with pytest.raises(ValueError, match="timestep_spacing"):
        SchedulerConfig.from_dict({**config.to_dict(), "timestep_spacing": "leading"})
    scheduler = DDIMScheduler(config, eta=0.5)
    assert scheduler.config == SchedulerConfig(num_train_timesteps=50, beta_schedule="linear", eta=0.5)


def test_set_timesteps_validation() -> None:
    scheduler = DDPMScheduler(num_train_timesteps=100)
    for bad in (0, 101, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)
    with pytest.raises(ValueError, match="steps_offset"):
        DDIMScheduler(steps_offset=1).set_timesteps(100)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps == [0]


def test_make_scheduler_kinds() -> None:
    config = SchedulerConfig()
    assert type(make_scheduler("ddpm", config)) is DDPMScheduler
    assert type(make_scheduler("ddim", config)) is DDIMScheduler
    with pytest.raises(ValueError, match="kind"):
        make_scheduler("pndm", config)
