"""Generate tests/golden/schedulers.npz: reference DDPM/DDIM trajectories from HuggingFace diffusers.

CI never runs this; it needs torch + diffusers, installed outside the repo, e.g.:

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 diffusers numpy
    /tmp/refenv/bin/python tests/golden/make_scheduler_golden.py

Each case runs a FULL sampling trajectory with diffusers on CPU in float32:
  x_T (seeded numpy) -> for every timestep k: model_output = 0.5 * tanh(x) + r[k] -> scheduler.step.
The pseudo model output depends on the current sample, so any scheduler error feeds back into later steps
(as with a real denoiser); r[k] is a stored random array.

Stochastic terms:
  * DDIM (eta > 0): explicit seeded-numpy noise passed as `variance_noise`.
  * DDPM (t > 0): diffusers' DDPM step only accepts a `generator` and draws the noise itself with
    `randn_tensor(model_output.shape, generator=..., dtype=model_output.dtype)`. Before each step we clone the
    generator's state into a second generator and make the identical `randn_tensor` call on it; that is the
    exact tensor the step is about to draw. After the step both generators must be in the same state
    (asserted), which proves the step consumed exactly that draw (and nothing at t == 0).

The npz holds only numeric arrays plus one unicode array `meta` (a JSON document with versions and the case
list), so it loads with allow_pickle=False. Keys are "<case>__<field>".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

OUT = Path(__file__).with_name("schedulers.npz")
SHAPE = (2, 16, 2)  # (batch, horizon, action_dim), like a diffusion-policy action chunk

# Mirrors policy_core.schedulers.SchedulerConfig defaults; every case stores its full config so the test
# rebuilds it with SchedulerConfig.from_dict.
BASE_CONFIG = {
    "num_train_timesteps": 100,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "eta": 0.0,
}

# Constructor arguments each diffusers class takes (eta is a DDIM step() argument, not config).
DIFFUSERS_KEYS = {
    "ddpm": [
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "variance_type",
        "clip_sample",
        "clip_sample_range",
        "prediction_type",
        "steps_offset",
    ],
    "ddim": [
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "clip_sample",
        "clip_sample_range",
        "prediction_type",
        "set_alpha_to_one",
        "steps_offset",
    ],
}


def case_list() -> list[dict]:
    cases = []

    def add(kind: str, T: int, n: int, tag: str = "", **overrides) -> None:
        name = f"{kind}_T{T}_n{n}" + (f"_{tag}" if tag else "")
        config = {**BASE_CONFIG, "num_train_timesteps": T, **overrides}
        cases.append({"name": name, "kind": kind, "num_inference_steps": n, "config": config})

    for kind in ("ddpm", "ddim"):
        for T, n in [(100, 100), (100, 10), (100, 16), (1000, 50)]:
            add(kind, T, n)
        add(kind, 100, 10, "linear", beta_schedule="linear")
        add(kind, 100, 10, "scaled_linear", beta_schedule="scaled_linear")
        add(kind, 100, 10, "pred_sample", prediction_type="sample")
        add(kind, 100, 16, "noclip", clip_sample=False)
        add(kind, 100, 10, "offset1", steps_offset=1)
        # offset == step ratio: the last timestep is 6, and diffusers' DDPM (timestep-list lookup) steps to
        # "-1" while t - T//n would be 0; DDIM uses t - T//n. Pins down both rules.
        add(kind, 100, 16, "offset6", steps_offset=6)
    add("ddpm", 100, 10, "fixed_small_log", variance_type="fixed_small_log")
    add("ddim", 100, 10, "eta0.5", eta=0.5)
    add("ddim", 100, 10, "no_alpha_one", set_alpha_to_one=False)
    add("ddim", 100, 10, "no_alpha_one_offset1", set_alpha_to_one=False, steps_offset=1)
    add("ddim", 100, 16, "eta1_linear", eta=1.0, beta_schedule="linear", clip_sample=False)
    return cases


def make_diffusers(kind: str, config: dict):
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    return cls(**{k: config[k] for k in DIFFUSERS_KEYS[kind]})


def run_case(index: int, case: dict) -> dict[str, np.ndarray]:
    kind, n, config = case["kind"], case["num_inference_steps"], case["config"]
    sched = make_diffusers(kind, config)
    sched.set_timesteps(n)
    timesteps = [int(t) for t in sched.timesteps]

    rng = np.random.default_rng(1000 + index)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    r = (0.5 * rng.standard_normal((n, *SHAPE))).astype(np.float32)
    noise = np.zeros((n, *SHAPE), np.float32)  # rows stay zero where the step uses no noise
    generator = torch.Generator().manual_seed(2000 + index)

    x = torch.from_numpy(x_T.copy())
    traj = []
    for k, t in enumerate(timesteps):
        model_output = 0.5 * torch.tanh(x) + torch.from_numpy(r[k])
        if kind == "ddim":
            if config["eta"] > 0:
                noise[k] = rng.standard_normal(SHAPE).astype(np.float32)
                x = sched.step(
                    model_output, t, x, eta=config["eta"], variance_noise=torch.from_numpy(noise[k])
                ).prev_sample
            else:
                x = sched.step(model_output, t, x, eta=0.0).prev_sample
        else:
            twin = torch.Generator().set_state(generator.get_state())
            if t > 0:
                drawn = randn_tensor(
                    model_output.shape, generator=twin, device=model_output.device, dtype=model_output.dtype
                )
                noise[k] = drawn.numpy()
            x = sched.step(model_output, t, x, generator=generator).prev_sample
            assert torch.equal(generator.get_state(), twin.get_state()), "noise draw mismatch"
        traj.append(x.numpy().copy())

    return {
        "timesteps": np.asarray(timesteps, np.int64),
        "alphas_cumprod": sched.alphas_cumprod.numpy().astype(np.float32),
        "x_T": x_T,
        "r": r,
        "noise": noise,
        "traj": np.stack(traj).astype(np.float32),
    }


def add_noise_cases() -> tuple[list[dict], dict[str, np.ndarray]]:
    """Forward-process outputs for a few schedules/timesteps (diffusers' DDPM and DDIM share the formula)."""
    cases, arrays = [], {}
    variants = [
        (100, "squaredcos_cap_v2"),
        (1000, "squaredcos_cap_v2"),
        (100, "linear"),
        (100, "scaled_linear"),
    ]
    for i, (T, schedule) in enumerate(variants):
        name = f"add_noise_T{T}_{schedule}"
        config = {**BASE_CONFIG, "num_train_timesteps": T, "beta_schedule": schedule}
        rng = np.random.default_rng(3000 + i)
        timesteps = np.array([0, 1, T // 2, T - 1], np.int64)
        x0 = rng.standard_normal((len(timesteps), *SHAPE[1:])).astype(np.float32)
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        out = make_diffusers("ddpm", config).add_noise(
            torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(timesteps)
        )
        arrays.update(
            {
                f"{name}__timesteps": timesteps,
                f"{name}__x0": x0,
                f"{name}__noise": eps,
                f"{name}__out": out.numpy().astype(np.float32),
            }
        )
        cases.append({"name": name, "config": config})
    return cases, arrays


def main() -> None:
    torch.manual_seed(0)  # nothing should use the global RNG; pin it anyway
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    arrays: dict[str, np.ndarray] = {}
    cases = case_list()
    for i, case in enumerate(cases):
        for field, value in run_case(i, case).items():
            arrays[f"{case['name']}__{field}"] = value
    noise_cases, noise_arrays = add_noise_cases()
    arrays.update(noise_arrays)
    meta = {
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "generator": "tests/golden/make_scheduler_golden.py",
        "trajectory_cases": cases,
        "add_noise_cases": noise_cases,
    }
    np.savez_compressed(OUT, meta=np.array(json.dumps(meta)), **arrays)
    print(
        f"wrote {OUT} ({OUT.stat().st_size / 1024:.1f} KiB, {len(cases)} trajectory cases, "
        f"{len(noise_cases)} add_noise cases)"
    )


if __name__ == "__main__":
    main()
