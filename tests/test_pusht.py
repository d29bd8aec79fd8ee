import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import zarr
from helpers import fitted_normalizer, tiny_config
from server_helpers import running_server

from clients.sim.pusht import GOAL_POSE, PushTEnv, coverage
from policy_core import build_policy, save_policy
from trainer.pusht_data import generate, run_expert_episode, save
from trainer.replay_buffer import read_replay_buffer

ROOT = Path(__file__).resolve().parent.parent


def test_pd_controller_step_response():
    env = PushTEnv()
    env.reset(options={"reset_to_state": [100, 400, 400, 150, 0.0]})
    xs = []
    for _ in range(10):
        obs, *_ = env.step(np.array([160.0, 400.0]))
        xs.append(obs["state"][0])
    # Critically damped (k_p 100, k_v 20, natural frequency 10/s): x(t) = x0 + d (1 - (1 + 10 t) e^(-10 t)).
    t = 0.1 * np.arange(1, 11)
    analytic = 100 + 60 * (1 - (1 + 10 * t) * np.exp(-10 * t))
    np.testing.assert_allclose(xs, analytic, atol=2.0)
    assert all(b >= a for a, b in zip(xs, xs[1:], strict=False)) and max(xs) <= 160.0 + 1e-6
    assert abs(obs["state"][1] - 400.0) < 1e-9


def test_agent_pushes_the_block_only_on_contact():
    env = PushTEnv(legacy=False)
    # Bar x 196..316, y 256..286; stem x 241..271, y 286..376; centre of gravity (256, 301).
    env.reset(options={"reset_to_state": [150, 250, 256, 256, 0.0]})
    start = env.block_pose.copy()
    for _ in range(3):  # moving in free space does not disturb the block
        env.step(np.array([150.0, 301.0]))
    assert np.allclose(env.block_pose, start)
    for _ in range(8):  # push right through the centre of gravity: the T slides, barely turning
        env.step(np.array([300.0, 301.0]))
    moved = env.block_pose - start
    assert moved[0] > 20 and abs(moved[1]) < 2 and abs(moved[2]) < 0.06
    # Damping 0: once the agent stops pushing, the block stops.
    for _ in range(3):
        env.step(np.array([100.0, 100.0]))
    after = env.block_pose.copy()
    env.step(np.array([100.0, 100.0]))
    assert np.allclose(env.block_pose, after, atol=1e-6)


def test_coverage_and_reward():
    assert coverage(GOAL_POSE) == pytest.approx(1.0)
    assert coverage(GOAL_POSE + np.array([400.0, 0, 0])) == 0.0
    shifted = coverage(GOAL_POSE + np.array([0.0, 0.0, np.pi / 2]))
    assert 0.0 < shifted < 0.9
    env = PushTEnv(legacy=False)
    env.reset(options={"reset_to_state": [50, 50, *GOAL_POSE]})
    _, reward, terminated, truncated, info = env.step(np.array([50.0, 50.0]))
    assert reward == 1.0 and terminated and info["is_success"] and info["coverage"] > 0.999
    env.reset(options={"reset_to_state": [50, 50, 256 + 10, 256, np.pi / 4]})
    _, reward, terminated, _, info = env.step(np.array([50.0, 50.0]))
    assert reward == pytest.approx(min(info["coverage"] / 0.95, 1.0)) and 0.7 < info["coverage"] < 0.95
    assert not terminated


def test_reset_reproduces_upstreams_seeded_draw():
    # Upstream's draw for seed 0 (numpy RandomState): agent (222, 97), block (217, 292), angle 3.008.
    np.testing.assert_allclose(PushTEnv.initial_state(0), [222, 97, 217, 292, 3.008], atol=1e-3)
    env = PushTEnv(obs_keys=("state", "agent_pos", "keypoint"))
    for seed in (0, 1, 100000):
        expected = PushTEnv.initial_state(seed)
        obs, info = env.reset(seed=seed)
        np.testing.assert_allclose(obs["agent_pos"], expected[:2])
        assert obs["state"][4] == pytest.approx(expected[4] % (2 * np.pi))
        assert obs["keypoint"].shape == (20,) and np.array_equal(obs["keypoint"][18:], obs["agent_pos"])
        assert not info["is_success"]
    assert not np.allclose(PushTEnv.initial_state(1), PushTEnv.initial_state(2))


def test_image_observation_shape_and_colours():
    env = PushTEnv(obs_keys=("image",))
    obs, _ = env.reset(options={"reset_to_state": [400, 100, 150, 400, 0.0]})
    image = obs["image"]
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8

    def px(x, y):  # workspace coordinates -> pixel colour
        return image[int(y * 96 / 512), int(x * 96 / 512)].astype(int)

    assert (px(100, 250) == 255).all()  # white background
    r, g, b = px(214, 298)  # middle of the goal T's stem: light green
    assert g > 200 and r < 180 and b < 180
    r, g, b = px(400, 100)  # agent: blue
    assert b > 200 and r < 120
    r, g, b = px(150, 415)  # block: grey-blue
    assert 120 < r < 170 and r < g < b
    assert env.render(512).shape == (512, 512, 3)


def test_expert_succeeds_on_a_few_seeds():
    for seed in (0, 1, 2):
        episode = run_expert_episode(seed)
        assert episode.success, seed
        assert episode.length < 300


def test_zarr_layout_and_replay(tmp_path):
    episodes, attempts = generate(2, seed=5, with_images=True, progress=False)
    path = tmp_path / "pusht.zarr"
    save(episodes, path, with_images=True)
    root = zarr.open_group(str(path), mode="r")
    n = sum(e.length for e in episodes)
    expected = {
        "state": (n, 5),
        "action": (n, 2),
        "keypoint": (n, 9, 2),
        "img": (n, 96, 96, 3),
        "n_contacts": (n, 1),
    }
    for key, shape in expected.items():
        assert root["data"][key].shape == shape and root["data"][key].dtype == np.float32, key
    ends = root["meta"]["episode_ends"]
    assert ends.dtype == np.int64 and list(ends[...]) == list(np.cumsum([e.length for e in episodes]))
    assert json.loads((path / ".zgroup").read_text())["zarr_format"] == 2  # upstream's zarr v2 layout
    data, episode_ends = read_replay_buffer(path)
    assert data["img"].min() >= 0 and data["img"].max() <= 255 and data["img"].max() > 1
    # Row t of state is the observation the action of row t was taken on: replaying reproduces it.
    env = PushTEnv(obs_keys=("state",))
    obs, _ = env.reset(seed=episodes[0].seed)
    for t in range(int(episode_ends[0])):
        np.testing.assert_allclose(obs["state"], data["state"][t], atol=1e-3)
        obs, *_ = env.step(data["action"][t].astype(np.float64))
    assert np.all(data["n_contacts"] >= 0) and data["n_contacts"].max() > 0


def test_eval_runs_end_to_end_through_the_server(tmp_path):
    config = tiny_config(image=False)
    config["shape_meta"]["obs"] = {"keypoint": {"shape": [20], "type": "low_dim"}}
    mx.random.seed(0)
    save_policy(build_policy(config, fitted_normalizer(config)), tmp_path / "m.safetensors")
    with running_server(tmp_path, tmp_path / "m.safetensors") as srv:
        out = tmp_path / "eval.json"
        result = subprocess.run(
            [sys.executable, str(ROOT / "dpmlx.py"), "eval", "pusht", "--server", srv.zmq_endpoint,
             "--episodes", "2", "--max-steps", "12", "--video", str(tmp_path / "video"), "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["episodes"] == 2 and 0.0 <= report["mean_score"] <= 1.0
    assert 0.0 <= report["success_rate"] <= 1.0
    assert [e["seed"] for e in report["per_episode"]] == [100000, 100001]
    assert all(0 < e["steps"] <= 12 for e in report["per_episode"])
    assert report["mean_score"] == pytest.approx(np.mean([e["max_reward"] for e in report["per_episode"]]))
    assert len(list((tmp_path / "video").glob("*.gif"))) == 2
    # Progress per episode as it goes; at the end where the GIFs and the latency plot are.
    lines = result.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith("episode ")] == [
        "episode 1/2",
        "episode 2/2",
    ]
    assert f"GIFs in {tmp_path / 'video'}/: pusht_seed100000.gif, pusht_seed100001.gif" in lines
    assert (tmp_path / "video/latency.png").stat().st_size > 1000
    assert lines[-1] == f"latency plot (CDF of chunk round trips): {tmp_path / 'video/latency.png'}"


def test_seeded_noise_makes_episodes_reproducible(tmp_path):
    from clients.policy_client import PolicyClient
    from clients.runner import ActionChunkRunner

    config = tiny_config(image=False)
    config["shape_meta"]["obs"] = {"keypoint": {"shape": [20], "type": "low_dim"}}
    mx.random.seed(0)
    save_policy(build_policy(config, fitted_normalizer(config)), tmp_path / "m.safetensors")

    def episode(client: PolicyClient, noise_seed: int) -> list[np.ndarray]:
        actions: list[np.ndarray] = []
        env = PushTEnv(obs_keys=("keypoint",), max_episode_steps=12)
        record = lambda _, action, *__: actions.append(np.array(action))  # noqa: E731
        runner = ActionChunkRunner(client, env, realtime=False, noise_seed=noise_seed, on_step=record)
        runner.run_episode(seed=100000, max_steps=12)
        return actions

    with (
        running_server(tmp_path, tmp_path / "m.safetensors") as srv,
        PolicyClient(srv.zmq_endpoint) as client,
    ):
        first, again, other = episode(client, 0), episode(client, 0), episode(client, 1)
    assert len(first) == 12 and np.array_equal(np.stack(first), np.stack(again))
    assert not np.allclose(np.stack(first), np.stack(other))
