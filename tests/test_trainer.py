import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from helpers import (
    assert_data_parallel_matches_one_process,
    assert_resume_continues_exactly,
    dead_pid,
    params,
)
from mlx.utils import tree_flatten
from server_helpers import running_server, wait_for

from policy_core import CheckpointCorruptError, ConfigError, load_policy, read_checkpoint
from policy_core.config import DENOISER_FIELDS
from trainer.data import BatchSpec, SequenceSampler, batches, prefetch
from trainer.pusht_data import generate, save
from trainer.train import Trainer, ema_decay

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pusht.zarr"
    episodes, _ = generate(4, seed=20, with_images=True, progress=False)
    save(episodes, path, with_images=True)
    return path


def tiny_config(dataset: Path, **train) -> dict:
    config = yaml.safe_load((ROOT / "configs/tiny_smoke.yaml").read_text())
    config["data"]["path"] = str(dataset)
    config["data"]["val_ratio"] = 0.25
    config["train"].update(
        {"batch_size": 16, "log_every": 5, "val_every": 1000, "checkpoint_every": 1000, **train}
    )
    return config


def test_sequence_sampler_pads_with_edge_rows():
    ends = np.array([5, 8])
    sampler = SequenceSampler(ends, horizon=4, pad_before=1, pad_after=2)
    # Episode of length L gives L - horizon + pad_before + pad_after + 1 windows.
    assert len(sampler) == (5 - 4 + 1 + 2 + 1) + (3 - 4 + 1 + 2 + 1)
    rows = {"x": np.arange(8)}
    first = sampler.sample(rows, 0, {})["x"]
    assert first.tolist() == [0, 0, 1, 2]  # one row of padding before: the first row repeated
    last_of_ep0 = sampler.sample(rows, 4, {})["x"]
    assert last_of_ep0.tolist() == [3, 4, 4, 4]  # padding after: the last row repeated
    assert sampler.sample(rows, 5, {})["x"].tolist() == [5, 5, 6, 7]  # never crosses into episode 0
    assert sampler.sample(rows, 0, {"x": 2})["x"].tolist() == [0, 0]


def test_batch_stream_resumes_at_any_step():
    sampler = SequenceSampler(np.array([30, 50]), horizon=4, pad_before=1, pad_after=3)
    rows = {"x": np.arange(50.0), "action": np.arange(50.0)}
    spec = BatchSpec(batch_size=8, seed=3, obs_steps={"x": 2})
    straight = batches(rows, sampler, spec)
    expected = [next(straight) for _ in range(12)]  # crosses an epoch boundary
    resumed = batches(rows, sampler, spec, start_step=7)
    for k in range(7, 12):
        got = next(resumed)
        assert np.array_equal(got["obs"]["x"], expected[k]["obs"]["x"])
        assert got["obs"]["x"].shape == (8, 2) and got["action"].shape == (8, 4)


def test_prefetch_passes_errors_to_the_consumer():
    def broken():
        yield 1
        raise ValueError("bad batch")

    stream = prefetch(broken())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad batch"):
        next(stream)


def test_ema_decay_matches_upstream():
    assert ema_decay(0, 0.75, 0.9999) == 0.0  # first update copies the weights
    assert ema_decay(1, 0.75, 0.9999) == 0.0
    assert ema_decay(2, 0.75, 0.9999) == pytest.approx(1 - 2**-0.75)
    assert ema_decay(10_001, 0.75, 0.9999) == pytest.approx(0.999, abs=2e-5)  # docstring: 0.999 at 10K steps
    assert ema_decay(10**7, 0.75, 0.9999) == 0.9999


def test_a_few_steps_lower_the_loss(dataset, tmp_path):
    trainer = Trainer(tiny_config(dataset, num_steps=60, warmup_steps=5, lr=3e-3), tmp_path)
    trainer.run(progress=False)
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < 0.6 * losses[0], losses
    # Update k (0-based) uses diffusers' warm-up + cosine value at k; the last of 60 is k = 59.
    expected_lr = 3e-3 * 0.5 * (1 + np.cos(np.pi * (59 - 5) / (60 - 5)))
    assert trainer.optimizer.learning_rate.item() == pytest.approx(expected_lr, rel=1e-4)
    policy = load_policy(tmp_path / "latest.safetensors")  # the EMA weights, ready to serve
    assert policy.predict_action({"keypoint": np.zeros((1, 2, 20), np.float32)}, seed=0)["action"].shape == (
        1,
        8,
        2,
    )
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 60 and "val_loss" in metrics[-1] and metrics[-1]["samples_per_s"] > 0
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_continues_exactly(dataset, tmp_path):
    n = 6
    config = tiny_config(dataset, num_steps=2 * n, val_every=n, checkpoint_every=n)
    straight, second = assert_resume_continues_exactly(config, tmp_path, n)
    assert straight.history[-1]["loss"] == second.history[-1]["loss"]


def test_latest_is_never_seen_half_written(dataset, tmp_path):
    trainer = Trainer(tiny_config(dataset, num_steps=25, checkpoint_every=1, log_every=1), tmp_path)
    done = threading.Event()
    reads, corrupt = [], []

    def reader() -> None:
        while not done.is_set():
            try:
                reads.append(read_checkpoint(tmp_path / "latest.safetensors").metadata["training_step"])
            except FileNotFoundError:
                continue
            except CheckpointCorruptError as e:
                corrupt.append(e)
            except Exception as e:  # noqa: BLE001 - "cannot read" before the first file exists
                if "cannot read" not in str(e):
                    corrupt.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    trainer.run(progress=False)
    done.set()
    thread.join()
    assert corrupt == []
    assert len(reads) > 5 and reads == sorted(reads)  # every read saw a complete, newer-or-equal file


def test_server_hot_loads_what_the_trainer_writes(dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with running_server(run, watch=run, watch_interval_s=0.1) as srv:
        # With validation on, the trainer also keeps top-k copies (step_*.safetensors) beside latest.
        trainer = Trainer(tiny_config(dataset, num_steps=4, checkpoint_every=2, val_every=2), run)
        trainer.run(2, progress=False)
        assert wait_for(lambda: srv.manager.active is not None, 120)
        first = srv.manager.active.info.sha256
        assert srv.manager.active.info.metadata["training_step"] == 2
        trainer.run(4, progress=False)
        assert wait_for(lambda: srv.manager.active.info.sha256 != first, 120)
        assert srv.manager.active.info.metadata["training_step"] == 4
        assert list(run.glob("step_*.safetensors"))
        time.sleep(0.5)  # several watch intervals: the top-k copies are not loaded again
        assert srv.manager.active.version == 2 and srv.manager.loading is None


def test_image_policy_trains(dataset, tmp_path):
    config = yaml.safe_load((ROOT / "configs/pusht_image.yaml").read_text())
    config["policy"].update(
        down_dims=[32, 64], diffusion_step_embed_dim=32, obs_encoder={"crop_shape": [84, 84]}
    )
    config["data"].update(path=str(dataset), val_ratio=0.25)
    config["train"].update(
        batch_size=4, num_steps=3, log_every=1, val_every=3, val_batches=1, checkpoint_every=3
    )
    trainer = Trainer(config, tmp_path)
    trainer.run(progress=False)
    assert np.isfinite(trainer.history[-1]["loss"]) and np.isfinite(trainer.history[-1]["val_loss"])
    ckpt = read_checkpoint(tmp_path / "latest.safetensors")
    assert ckpt.metadata["obs_schema"]["image"] == {"shape": [2, 96, 96, 3], "dtype": "uint8"}


def transformer_config(dataset: Path, image: bool = False, **train) -> dict:
    """``tiny_config`` with a tiny transformer denoiser (dropout on), lowdim or image."""
    config = tiny_config(dataset, **train)
    policy = {k: v for k, v in config["policy"].items() if k not in DENOISER_FIELDS["diffusion_unet"]}
    policy.update(type="diffusion_transformer", horizon=10, n_layer=2, n_head=2, n_emb=16, p_drop_attn=0.1)
    if image:
        policy["shape_meta"]["obs"] = {
            "image": {"shape": [3, 96, 96], "type": "rgb"},
            "agent_pos": {"shape": [2], "type": "low_dim"},
        }
        policy["obs_encoder"] = {"crop_shape": [84, 84]}
        config["data"]["task"] = "pusht_image"
    config["policy"] = policy
    return config


def test_transformer_policy_trains_and_resumes_exactly(dataset, tmp_path):
    """Dropout, EMA and the decay groups through the compiled step; resuming reproduces it bit for bit."""
    n = 4
    config = transformer_config(dataset, num_steps=2 * n, val_every=n, checkpoint_every=n, lr=3e-3)
    config["train"].update(betas=[0.9, 0.95], weight_decay=0.1, warmup_steps=2)
    straight = Trainer(config, tmp_path / "straight")
    straight.run(progress=False)
    first = Trainer(config, tmp_path / "resumed")
    first.run(n, progress=False)
    second = Trainer(config, tmp_path / "resumed", resume=True)
    second.run(progress=False)
    for a, b in (
        (params(straight.policy.parameters()), params(second.policy.parameters())),
        (params(straight.ema), params(second.ema)),
        (params(straight.optimizer.state), params(second.optimizer.state)),
    ):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.isfinite(straight.history[-1]["val_loss"])
    policy = load_policy(tmp_path / "straight" / "latest.safetensors")
    assert policy.config.type == "diffusion_transformer"
    assert policy.predict_action({"keypoint": np.zeros((1, 2, 20), np.float32)}, seed=0)["action"].shape == (
        1,
        8,
        2,
    )


def test_weight_decay_by_upstreams_groups(dataset, tmp_path):
    config = transformer_config(dataset, image=True, weight_decay=1e-3, obs_encoder_weight_decay=1e-6)
    decays = dict(tree_flatten(Trainer(config, tmp_path)._weight_decays()))
    assert decays["transformer.decoder.layers.0.multihead_attn.in_proj_weight"] == 1e-3
    assert decays["transformer.decoder.layers.0.norm1.weight"] == 0.0
    assert decays["transformer.pos_emb"] == decays["transformer.head.bias"] == 0.0
    assert decays["rgb_encoders.image.trunk.conv1.weight"] == 1e-6
    # The UNet's AdamW decays every parameter, its image encoder included unless told otherwise.
    unet = tiny_config(dataset, weight_decay=1e-4)
    assert set(dict(tree_flatten(Trainer(unet, tmp_path / "unet")._weight_decays())).values()) == {1e-4}


def test_adamw_groups_with_one_decay_is_mlx_adamw():
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    from trainer.optim import AdamWGroups
    from trainer.train import cosine_with_warmup

    mx.random.seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)) for _ in range(2)]
    models[1].update(models[0].parameters())
    schedule = cosine_with_warmup(1e-2, 2, 10)
    kwargs = {"learning_rate": schedule, "betas": [0.9, 0.95], "bias_correction": True}
    optimizers = [
        optim.AdamW(weight_decay=0.1, **kwargs),
        AdamWGroups(weight_decay=tree_map(lambda _: 0.1, models[1].parameters()), **kwargs),
    ]
    x = mx.random.normal((16, 4))
    for model, optimizer in zip(models, optimizers, strict=True):
        loss_and_grad = nn.value_and_grad(model, lambda x, m=model: (m(x) ** 2).mean())
        for _ in range(5):
            optimizer.update(model, loss_and_grad(x)[1])
            mx.eval(model.parameters(), optimizer.state)
    a, b = params(models[0].parameters()), params(models[1].parameters())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert params(optimizers[0].state).keys() == params(optimizers[1].state).keys()


def test_train_cli(dataset, tmp_path):
    out = tmp_path / "cli"
    smoke = str(ROOT / "configs/tiny_smoke.yaml")
    result = subprocess.run(
        [sys.executable, str(ROOT / "dpmlx.py"), "train", "--config", smoke,
         "--out", str(out), "--set", f"data.path={dataset}", "--set", "train.num_steps=10",
         "--set", "train.batch_size=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_checkpoint(out / "latest.safetensors").metadata["training_step"] == 10
    # The first step's compilation is announced, then timed; the last line is a sentence.
    assert "compiling the train step…" in result.stderr
    assert re.search(r"compiled the train step in \d+\.\d s", result.stderr), result.stderr
    assert re.fullmatch(
        r"Trained to step 10 \(10 steps in \d+ s, [\d.]+ steps/s at the end\): loss \d\.\d{4}, "
        r"validation loss \d\.\d{4}; the policy to serve is .*latest\.safetensors\.",
        result.stdout.strip().splitlines()[-1],
    ), result.stdout
    bench = subprocess.run(
        [sys.executable, str(ROOT / "dpmlx.py"), "bench", "train", "--config", smoke,
         "--steps", "3", "--set", f"data.path={dataset}", "--set", "train.batch_size=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    assert "steps/s" in bench.stdout and "samples/s" in bench.stdout


def test_data_parallel_matches_one_process_on_the_combined_batch(dataset, tmp_path):
    """2 local processes (mlx.launch, ring backend) vs 1 process: identical ranks, same weights."""
    assert_data_parallel_matches_one_process(tiny_config(dataset, num_steps=100, warmup_steps=0), tmp_path)
    assert (tmp_path / "run2" / "metrics.jsonl").exists()  # only rank 0 writes


def test_rollouts_rank_checkpoints(dataset, tmp_path):
    config = tiny_config(
        dataset, num_steps=4, checkpoint_every=2, keep_top_k=1, rollout_every=2, rollout_episodes=1
    )
    trainer = Trainer(config, tmp_path)
    trainer.run(progress=False)
    scores = {h["step"]: h["rollout_score"] for h in trainer.history if "rollout_score" in h}
    assert set(scores) == {2, 4} and all(0.0 <= s <= 1.0 for s in scores.values())
    kept = sorted(p.name for p in tmp_path.glob("step_*.safetensors"))
    best_step = max(scores, key=lambda k: (scores[k], -k))  # ties keep the earlier checkpoint
    assert kept == [f"step_{best_step:07d}.safetensors"]
    top = read_checkpoint(tmp_path / "latest.safetensors").metadata["provenance"]["top_k"]
    assert top[0]["rank_by"] == pytest.approx(-scores[best_step])


def test_bfloat16_training(dataset, tmp_path):
    config = tiny_config(dataset, num_steps=30, warmup_steps=2, lr=3e-3)
    config["policy"]["dtype"] = "bfloat16"
    trainer = Trainer(config, tmp_path)
    trainer.run(progress=False)
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(trainer.policy.parameters()))
    losses = [h["loss"] for h in trainer.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (
        read_checkpoint(tmp_path / "latest.safetensors").tensors["model.unet.final_conv.1.bias"].dtype
        == mx.bfloat16
    )


def test_ctrl_c_saves_latest_and_resume_continues_from_there(dataset, tmp_path):
    out = tmp_path / "run"
    total = 10**6  # never reached: each run is stopped by Ctrl-C once its first step has run
    train = [sys.executable, str(ROOT / "dpmlx.py"), "train", "--config",
             str(ROOT / "configs/tiny_smoke.yaml"), "--out", str(out), "--set", f"data.path={dataset}",
             "--set", "train.batch_size=8", "--set", f"train.num_steps={total}",
             "--set", f"train.checkpoint_every={total}"]  # fmt: skip

    def interrupted(argv: list[str]) -> tuple[str, str]:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = threading.Timer(240, proc.kill)
        deadline.start()
        try:
            seen = ""
            while "compiled the train step" not in seen:  # tqdm ends lines with \r: read characters
                char = proc.stderr.read(1)
                assert char, seen
                seen += char
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            deadline.cancel()
            proc.kill()
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr
        return stdout, seen + stderr

    stdout, _ = interrupted(train)
    step = read_checkpoint(out / "latest.safetensors").metadata["training_step"]
    assert step > 0 and stdout.strip() == (
        f"Interrupted at step {step} of {total}: saved {out / 'latest.safetensors'}; continue with --resume."
    )
    stdout, stderr = interrupted([*train, "--resume"])
    assert f"| {step}/{total} [" in stderr  # the bar starts where the first run stopped
    assert read_checkpoint(out / "latest.safetensors").metadata["training_step"] > step
    assert stdout.startswith("Interrupted at step ")


def test_resume_refuses_a_changed_schedule(dataset, tmp_path):
    Trainer(tiny_config(dataset, num_steps=4, checkpoint_every=2), tmp_path).run(2, progress=False)
    with pytest.raises(ConfigError, match=r"train\.num_steps=4.*says 8.*schedule"):
        Trainer(tiny_config(dataset, num_steps=8, checkpoint_every=2), tmp_path, resume=True)
    with pytest.raises(ConfigError, match=r"train\.lr=0\.001, train\.warmup_steps=20.*says 0\.002, 3"):
        Trainer(tiny_config(dataset, num_steps=4, lr=2e-3, warmup_steps=3), tmp_path, resume=True)
    # What does not shape the optimisation may change.
    resumed = Trainer(tiny_config(dataset, num_steps=4, log_every=1, val_every=2), tmp_path, resume=True)
    assert resumed.step == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "missing.yaml"], "no config file missing.yaml"),
        (["--set", "data.path=/nonexistent/data.zarr"], "data.path: /nonexistent/data.zarr does not exist"),
        (["--set", "train.num_step=5"], "unknown train config field(s): ['num_step']"),
        (["--set", "train.num_steps=abc"], "train.num_steps must be an integer, got 'abc'"),
        (["--set", "train.lr=fast"], "train.lr must be a number, got 'fast'"),
        (["--set", "train.log_every=0"], "train.log_every must be at least 1, got 0"),
        (["--set", "data.task=pusht_3d"], "data.task must be one of"),
        (["--set", "policy.horizon=sixteen"], "policy: a field has the wrong type"),
        (["--set", "policy.horizn=16"], "unknown policy config field(s): ['horizn']"),
        (["--set", "trian.lr=1e-4"], "a config has sections policy, data and train"),
        (["--set", "train.lr.x=1"], "--set train.lr.x=1: train.lr is not a section"),
        (["--set", "train.lr"], "--set expects KEY=VALUE, got 'train.lr'"),
        (["--resume"], "--resume: there is no"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(dataset, tmp_path, capsys, argv, message):
    import dpmlx

    args = ["train", "--config", str(ROOT / "configs/tiny_smoke.yaml"), "--out", str(tmp_path / "run"),
            "--set", f"data.path={dataset}", *argv]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        dpmlx.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dpmlx train: error: ") and message in err and err.count("\n") == 1, err


def test_a_missing_config_is_one_line_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "dpmlx.py"), "train", "--config", "missing.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "dpmlx train: error: no config file missing.yaml\n"


def test_a_new_run_removes_temporary_files_of_a_killed_one(dataset, tmp_path):
    stale = tmp_path / f".latest.safetensors.{dead_pid()}.tmp"
    stale.write_bytes(b"partial")
    Trainer(tiny_config(dataset), tmp_path)
    assert not stale.exists()
