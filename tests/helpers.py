"""Tiny policies and observations shared by the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from policy_core import LinearNormalizer, build_policy
from policy_core.config import DENOISER_FIELDS
from policy_core.normalizer import fit_limits, image_range


def tiny_config(image: bool = True, **overrides) -> dict:
    obs = {"agent_pos": {"shape": [2], "type": "low_dim"}}
    if image:
        # Non-alphabetical key order on purpose: features are concatenated in shape_meta order.
        obs = {"image": {"shape": [3, 72, 72], "type": "rgb"}, **obs}
    config = {
        "shape_meta": {"obs": obs, "action": {"shape": [2]}},
        "horizon": 8,
        "n_obs_steps": 2,
        "n_action_steps": 4,
        "down_dims": [16, 32],
        "kernel_size": 3,
        "n_groups": 4,
        "diffusion_step_embed_dim": 16,
        "obs_encoder": {"crop_shape": [64, 64]},
        "sampler": "ddim",
        "num_inference_steps": 5,
    }
    config.update(overrides)
    return config


def tiny_transformer_config(image: bool = True, **overrides) -> dict:
    """``tiny_config`` with a two-layer transformer denoiser (dropout on, as upstream trains it)."""
    config = {k: v for k, v in tiny_config(image).items() if k not in DENOISER_FIELDS["diffusion_unet"]}
    config.update(type="diffusion_transformer", n_layer=2, n_head=2, n_emb=16, p_drop_attn=0.1)
    config.update(overrides)
    return config


def fitted_normalizer(config: dict, seed: int = 0) -> LinearNormalizer:
    rng = np.random.default_rng(seed)
    norm = LinearNormalizer({"action": fit_limits(rng.uniform(0, 512, (200, 2)))})
    for key, feat in config["shape_meta"]["obs"].items():
        if feat["type"] == "rgb":
            norm[key] = image_range(feat["shape"][0])
        else:
            norm[key] = fit_limits(rng.uniform(0, 512, (200, feat["shape"][0])))
    return norm


def tiny_policy(image: bool = True, seed: int = 0, **overrides):
    config = tiny_config(image, **overrides)
    return build_policy(config, fitted_normalizer(config, seed))


def tiny_transformer_policy(image: bool = True, seed: int = 0, **overrides):
    config = tiny_transformer_config(image, **overrides)
    return build_policy(config, fitted_normalizer(config, seed))


def observation(policy, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cfg = policy.config
    obs = {}
    for key, feat in cfg.obs.items():
        shape = (batch, cfg.n_obs_steps, *feat.hwc_shape)
        if feat.is_image:
            obs[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            obs[key] = rng.uniform(0, 512, shape).astype(np.float32)
    return obs


def training_batch(policy, batch: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cfg = policy.config
    return {
        "obs": observation(policy, batch, seed),
        "action": rng.uniform(0, 512, (batch, cfg.horizon, cfg.action_dim)).astype(np.float32),
    }


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class TickEnv:
    """gymnasium's step API; the observation is the tick number, each executed action is recorded."""

    def __init__(self):
        self.tick, self.executed = 0, []

    def reset(self, seed=None):
        self.tick, self.executed = 0, []
        return {"tick": np.array([0.0], np.float32)}, {}

    def step(self, action):
        self.executed.append(np.array(action))
        self.tick += 1
        return {"tick": np.array([self.tick], np.float32)}, 0.0, False, False, {}


def assert_data_parallel_matches_one_process(config: dict, tmp_path: Path, steps: int = 3) -> None:
    """Train ``config`` for ``steps`` steps in 2 local processes (mlx.launch, ring backend) and in 1: the
    ranks end identical, and as the single process (which moved the weights) up to summation order."""
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "config.json").write_text(json.dumps(config))
    worker = [
        str(root / "tests/distributed_worker.py"),
        str(tmp_path / "config.json"),
        str(tmp_path),
        str(steps),
    ]
    launch = Path(sys.executable).parent / "mlx.launch"
    two = subprocess.run(
        [str(launch), "-n", "2", "--backend", "ring", "--python", sys.executable, *worker],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, *worker], cwd=root, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    rank0, rank1 = (np.load(tmp_path / f"weights_2proc_rank{r}.npz") for r in (0, 1))
    single, init = np.load(tmp_path / "weights_1proc_rank0.npz"), np.load(tmp_path / "weights_init.npz")
    assert all(np.array_equal(rank0[k], rank1[k]) for k in rank0.files)
    moved = max(float(np.abs(single[k] - init[k]).max()) for k in single.files)
    apart = max(float(np.abs(rank0[k] - single[k]).max()) for k in single.files)
    assert moved > 1e-3 and apart < 1e-5, (moved, apart)


def params(tree) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(tree)}


def assert_resume_continues_exactly(config: dict, folder: Path, n: int):
    """Train ``config`` for 2n steps straight, and for n, then n more after ``--resume``: every weight,
    EMA weight, optimizer moment (and a distillation's target weight) bit for bit equal. Returns the
    straight and the resumed trainers."""
    from trainer.train import Trainer

    straight = Trainer(config, folder / "straight")
    straight.run(2 * n, progress=False)
    Trainer(config, folder / "resumed").run(n, progress=False)
    resumed = Trainer(config, folder / "resumed", resume=True)
    assert resumed.step == n
    resumed.run(2 * n, progress=False)
    states = [("weights", lambda t: t.policy.parameters()), ("ema", lambda t: t.ema),
              ("optimizer", lambda t: t.optimizer.state)]  # fmt: skip
    if straight.target is not None:
        states.append(("target", lambda t: t.target.parameters()))
    for name, state in states:
        a, b = params(state(straight)), params(state(resumed))
        assert a.keys() == b.keys(), name
        for k in a:
            assert np.array_equal(a[k], b[k]), (name, k)
    return straight, resumed
