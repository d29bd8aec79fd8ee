"""Consistency policies: distillation in the trainer, the consistency sampler, checkpoints and serving."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
import yaml
from helpers import (
    assert_data_parallel_matches_one_process,
    assert_resume_continues_exactly,
    observation,
    params,
    tiny_policy,
)
from server_helpers import RawClient, running_server

from policy_core import ConfigError, build_policy, load_policy, read_checkpoint
from policy_core.checkpoint import export_policy
from policy_core.consistency import Distillation, DistillationError
from policy_core.policy import SamplerError
from policy_core.schedulers import (
    ConsistencyConfig,
    ConsistencyScheduler,
    DDIMScheduler,
    boundary_coefficients,
)
from proto.messages import PROTOCOL_VERSION
from trainer.pusht_data import generate, save
from trainer.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
CHAINS = ((90,), (90, 50), (90, 60, 30))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    """A tiny keypoint diffusion policy trained for a few steps on a few expert episodes."""
    root = tmp_path_factory.mktemp("consistency")
    data = root / "pusht.zarr"
    save(generate(4, seed=30, progress=False)[0], data, with_images=False)
    Trainer(train_config(data, num_steps=40, lr=3e-3), root / "teacher").run(progress=False)
    return root / "teacher" / "latest.safetensors"


def train_config(data: Path, **train) -> dict:
    config = yaml.safe_load((ROOT / "configs/tiny_smoke.yaml").read_text())
    config["data"].update(path=str(data), val_ratio=0.25)
    config["train"].update(
        {"batch_size": 16, "warmup_steps": 5, "log_every": 5, "val_every": 1000, "checkpoint_every": 1000}
    )
    config["train"].update(train)
    return config


def distill_config(teacher: Path, data: Path | None = None, **train) -> dict:
    config = train_config(data or teacher.parent.parent / "pusht.zarr", **{"lr": 1e-3, **train})
    del config["policy"]  # the teacher's
    config["distill"] = {"teacher": str(teacher)}
    return config


def student_of(policy, chains=CHAINS):
    config = dataclasses.replace(
        policy.config,
        consistency=ConsistencyConfig(skip=10, chains=chains),
        sampler="consistency",
        num_inference_steps=1,
    )
    student = build_policy(config, policy.normalizer)
    student.update(policy.parameters())
    return student


def test_boundary_condition_holds_for_any_weights():
    c_skip, c_out = boundary_coefficients(np.arange(100), 100, 0.5, 10.0)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    assert (c_skip[1:] < 3e-3).all() and (c_out[10:] > 0.99999).all()
    teacher = tiny_policy(image=False, num_inference_steps=10)
    student = student_of(teacher)
    distillation = Distillation(student, teacher)
    x = mx.random.normal((3, 8, 2), key=mx.random.key(1)) * 3
    cond = student.encode_obs(student.normalize_obs(observation(student, 3)))
    assert np.array_equal(
        np.array(distillation.consistency_function(x, mx.zeros(3, mx.int32), cond)), np.array(x)
    )


def test_one_step_sample_is_the_consistency_function_at_the_top_of_the_grid():
    teacher = tiny_policy(image=False, num_inference_steps=10)
    student = student_of(teacher)
    obs = observation(student, 2)
    x_T = mx.random.normal((2, 8, 2), key=mx.random.key(2))
    out = student.predict_action(obs, noise=x_T, step_noise=mx.zeros((1, 2, 8, 2)))
    cond = student.encode_obs(student.normalize_obs(obs))
    f = Distillation(student, teacher).consistency_function(x_T, mx.full((2,), 90, mx.int32), cond)
    expected = student.normalizer.unnormalize("action", np.array(f))
    np.testing.assert_allclose(out["action_pred"], expected, rtol=1e-5, atol=1e-3)
    # A chain re-noises f to the next time with that step's noise: a 2-step sample is f(f(x_T) noised).
    scheduler = ConsistencyScheduler(student.config.noise_scheduler, student.config.consistency)
    scheduler.set_timesteps(2)
    assert scheduler.timesteps == [90, 50]
    sqrt_beta, sqrt_alpha, x0_coeff, sample_coeff, std = scheduler.coefficient_table()[0].tolist()
    a_50 = float(scheduler.alphas_cumprod[50])
    assert std == pytest.approx(np.sqrt(1 - a_50)) and x0_coeff == pytest.approx(np.sqrt(a_50), rel=1e-6)
    assert scheduler.coefficient_table()[1, 4].item() == 0.0  # no noise after the last time


def test_samplers_a_policy_does_not_offer_are_refused():
    teacher = tiny_policy(image=False, num_inference_steps=10)
    student = student_of(teacher)
    obs = observation(student, 1)
    assert student.config.samplers == {"consistency": 3} and teacher.config.samplers == {
        "ddpm": 100,
        "ddim": 100,
    }
    with pytest.raises(SamplerError, match="a consistency policy samples with"):
        student.predict_action(obs, scheduler="ddim")
    with pytest.raises(SamplerError, match=r"in \[1, 3\]"):
        student.predict_action(obs, num_inference_steps=4)
    with pytest.raises(SamplerError, match="a diffusion policy samples with"):
        teacher.predict_action(obs, scheduler="consistency")
    with pytest.raises(DistillationError, match="teacher is a consistency policy"):
        Distillation(student_of(teacher), student)
    for chains in (((99,),), ((90, 95),), ((90, 55),), ()):
        with pytest.raises(ConfigError, match="consistency"):
            student_of(teacher, chains)


def test_distillation_targets_follow_the_teachers_ddim_sampler():
    """The loss's teacher steps, chained down the grid 90 -> 80 -> .. -> 0, are the teacher's DDIM-10
    sampler's steps (diffusers' arithmetic, tests/test_schedulers.py): the student learns the
    trajectories the teacher samples."""
    teacher = tiny_policy(image=True, num_inference_steps=10)
    distillation = Distillation(student_of(teacher), teacher)
    _, cond, _ = distillation.conditioning({"obs": observation(teacher, 3)})
    scheduler = DDIMScheduler(teacher.config.noise_scheduler)
    scheduler.set_timesteps(10)
    x = expected = mx.random.normal((3, 8, 2), key=mx.random.key(4))
    for t in scheduler.timesteps[:-1]:  # 90 .. 10
        expected = scheduler.step(teacher.network(expected, mx.full((3,), t), cond), t, expected)
        x = distillation.teacher_step(x, mx.full((3,), t), mx.full((3,), t - 10), cond)
        np.testing.assert_allclose(np.array(x), np.array(expected), rtol=1e-5, atol=1e-5)


def test_consistency_loss_decreases_on_a_tiny_task():
    """A student from random weights learns the teacher's consistency (and its boundary) on a fixed
    batch: the loss at fixed noise and grid times falls, through the compiled gradient of the student
    only (the teacher and the stop-gradient target stay as they were)."""
    teacher = tiny_policy(image=False, num_inference_steps=10)
    mx.random.seed(7)
    student = build_policy(student_of(teacher).config, teacher.normalizer)
    distillation = Distillation(student, teacher)
    rng = np.random.default_rng(1)
    batch = {"obs": observation(teacher, 16), "action": rng.uniform(0, 512, (16, 8, 2)).astype(np.float32)}
    noise = mx.random.normal((16, 8, 2), key=mx.random.key(8))
    grid = mx.array(np.arange(16) % distillation.grid_size)
    teacher_before = params(teacher.parameters())
    optimizer = optim.Adam(learning_rate=1e-3)
    loss_and_grad = nn.value_and_grad(student, distillation.loss)
    first = distillation.loss(batch, noise, grid).item()
    for _ in range(100):
        loss, grads = loss_and_grad(batch, noise, grid)
        optimizer.update(student, grads)
        mx.eval(student.parameters(), optimizer.state)
    assert distillation.loss(batch, noise, grid).item() < 0.5 * first
    assert all(np.array_equal(v, teacher_before[k]) for k, v in params(teacher.parameters()).items())


def test_student_checkpoint_round_trips_and_resumes_exactly(teacher_path, tmp_path):
    n = 4
    config = distill_config(teacher_path, num_steps=2 * n, checkpoint_every=n, val_every=n)
    config["distill"].update(max_steps=2, default_steps=2)
    straight, _ = assert_resume_continues_exactly(config, tmp_path, n)

    loaded = load_policy(tmp_path / "straight" / "latest.safetensors", use_ema=False)
    assert loaded.config == straight.policy.config
    assert loaded.config.consistency == ConsistencyConfig(skip=10, chains=((90,), (90, 50)))
    assert loaded.config.sampler == "consistency" and loaded.config.default_inference_steps == 2
    for k, v in params(straight.policy.parameters()).items():
        assert np.array_equal(params(loaded.parameters())[k], v), k
    obs = observation(loaded, 2)
    for steps in (1, 2):
        a = loaded.predict_action(obs, num_inference_steps=steps, seed=5)["action_pred"]
        b = straight.policy.predict_action(obs, num_inference_steps=steps, seed=5)["action_pred"]
        assert np.array_equal(a, b)

    # dpmlx export: the served (EMA) weights only, the provenance kept.
    exported = tmp_path / "student.safetensors"
    sha = export_policy(tmp_path / "straight" / "latest.safetensors", exported, name="fast")
    ckpt = read_checkpoint(exported)
    assert ckpt.sha256 == sha and not ckpt.metadata["has_ema"] and not ckpt.group("train")
    assert ckpt.metadata["provenance"]["name"] == "fast" and "distill" in ckpt.metadata["provenance"]
    served = load_policy(exported)
    for k, v in params(straight.ema).items():
        assert np.array_equal(params(served.parameters())[k], v), k

    # A resume with another distillation, and a consistency policy as teacher, are refused.
    changed = {**config, "distill": {**config["distill"], "skip": 20}}
    with pytest.raises(ConfigError, match="distill"):
        Trainer(changed, tmp_path / "resumed", resume=True)
    twice = distill_config(
        tmp_path / "straight" / "latest.safetensors", teacher_path.parent.parent / "pusht.zarr"
    )
    with pytest.raises(ConfigError, match="is a consistency policy"):
        Trainer(twice, tmp_path / "twice")


def test_a_policy_section_must_describe_the_teacher(teacher_path, tmp_path):
    config = distill_config(teacher_path)
    config["policy"] = {
        **yaml.safe_load((ROOT / "configs/tiny_smoke.yaml").read_text())["policy"],
        "n_groups": 4,
    }
    with pytest.raises(ConfigError, match=r"\['n_groups'\] differ from the teacher's"):
        Trainer(config, tmp_path)
    config["policy"]["n_groups"] = 8
    Trainer(config, tmp_path)  # the teacher's own section (its sampler fields aside) is accepted


def test_train_cli_distill_flag(teacher_path, tmp_path):
    config = train_config(teacher_path.parent.parent / "pusht.zarr", num_steps=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "dpmlx.py"),
            "train",
            "--config",
            str(path),
            "--out",
            str(tmp_path / "run"),
            "--distill",
            str(teacher_path),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert load_policy(tmp_path / "run" / "latest.safetensors").config.sampler == "consistency"


def test_server_serves_a_consistency_policy_and_refuses_other_samplers(tmp_path):
    teacher = tiny_policy(image=False, num_inference_steps=10)
    student = student_of(teacher)
    from policy_core import save_policy

    save_policy(student, tmp_path / "fast.safetensors")
    with running_server(tmp_path, tmp_path / "fast.safetensors") as server:
        client = RawClient(server.zmq_endpoint)
        try:
            hello = client.call({"type": "hello", "id": 1, "protocol": PROTOCOL_VERSION})
            assert hello["samplers"] == {"consistency": {"max_steps": 3}}
            assert hello["default"] == {"scheduler": "consistency", "num_inference_steps": 1}
            obs = {k: v[0] for k, v in observation(student, 1).items()}
            reply = client.call({"type": "infer", "id": 2, "obs": obs})
            assert reply["ok"] and np.isfinite(reply["action"]).all(), reply
            reply = client.call(
                {"type": "infer", "id": 2, "obs": obs, "options": {"num_inference_steps": 3, "seed": 4}}
            )
            assert reply["ok"], reply
            batch = {k: v[None] for k, v in obs.items()}
            expected = student.predict_action(batch, num_inference_steps=3, seed=4)["action"][0]
            np.testing.assert_allclose(reply["action"], expected, rtol=1e-5, atol=1e-3)
            for options, code in (
                ({"scheduler": "ddim"}, "unsupported_sampler"),
                ({"num_inference_steps": 4}, "bad_request"),
            ):
                reply = client.call({"type": "infer", "id": 3, "obs": obs, "options": options})
                assert not reply["ok"] and reply["error"]["code"] == code, reply
            assert client.call({"type": "infer", "id": 4, "obs": obs})["ok"]  # still serving
        finally:
            client.close()


def test_distillation_data_parallel_matches_one_process(teacher_path, tmp_path):
    """2 local processes (mlx.launch, ring backend) distil as 1 process does on the combined batch."""
    assert_data_parallel_matches_one_process(
        distill_config(teacher_path, num_steps=100, warmup_steps=0), tmp_path
    )
