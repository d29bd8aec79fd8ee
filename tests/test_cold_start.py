"""Issue 34: a server is ready as soon as its weights are loaded and checked, compiles the rest in the
background while it answers, reuses its traces for a same-shape hot load, and says where the time went."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from helpers import observation, tiny_policy
from server_helpers import RawClient, http, running_server, wait_for

from policy_core import load_policy, save_policy
from policy_core.backends.generic import GenericBackend
from policy_core.policy import DiffusionUnetPolicy
from server import models as models_module
from server.kernel_cache import key_text, parse_key
from server.models import BatchingConfig


def _infer(client: RawClient, obs: dict, seed: int, rid: int, **options) -> np.ndarray:
    reply = client.call({"type": "infer", "id": rid, "obs": obs, "options": {"seed": seed, **options}})
    assert reply["ok"], reply
    return reply["action"]


def _fake_cache_filler(monkeypatch, script: str) -> list[list[str]]:
    """The server's kernel-cache filler replaced by ``python -c script``; returns the list that records
    the paths (``rows:sampler:steps``) of every filler it starts."""
    filled = []

    def filler(path: Path, keys: list, dtype: str | None) -> list[str]:
        filled.append([key_text(k) for k in keys])
        return [sys.executable, "-c", script]

    monkeypatch.setattr(models_module, "_cache_filler_command", filler)
    return filled


def _active_startup(srv) -> dict:
    status, stats = http("GET", srv.http_url + "/v1/stats")
    assert status == 200
    return stats["models"]["active"]


def test_a_lazy_start_serves_before_its_warm_up_ends_with_the_same_actions(tmp_path, monkeypatch):
    """The process filling the kernel cache takes its time (a sleep): /readyz says ready and requests are
    answered, uncompiled, meanwhile; once every path is traced, the same requests give the same actions."""
    mx.random.seed(3)
    policy = tiny_policy(image=False)
    save_policy(policy, tmp_path / "m.safetensors")
    filled = _fake_cache_filler(monkeypatch, "import time; time.sleep(3)")
    batching = BatchingConfig(max_batch=4, max_wait_ms=0, warmup="lazy")
    single = {k: v[0] for k, v in observation(policy, batch=1, seed=1).items()}
    batch = observation(policy, batch=3, seed=2)
    with running_server(tmp_path, tmp_path / "m.safetensors", batching=batching) as srv:
        assert http("GET", srv.http_url + "/readyz")[0] == 200
        startup = _active_startup(srv)
        assert startup["warmup_mode"] == "lazy" and startup["to_compile"], startup
        client = RawClient(srv.zmq_endpoint)
        before = [_infer(client, single, 7, 1), _infer(client, batch, 8, 2)]
        startup = _active_startup(srv)
        assert startup["uncompiled_batches"] >= 2 and startup["to_compile"], startup
        assert "compile_s" not in startup  # nothing traced yet: the filler still sleeps
        assert wait_for(lambda: not _active_startup(srv)["to_compile"], timeout=120)
        after = [_infer(client, single, 7, 3), _infer(client, batch, 8, 4)]
        client.close()
        startup = _active_startup(srv)
    for was, now in zip(before, after, strict=True):
        np.testing.assert_array_equal(was, now)
    want = load_policy(tmp_path / "m.safetensors").predict_action(
        {k: v[None] for k, v in single.items()}, seed=7
    )
    np.testing.assert_allclose(before[0], want["action"][0], rtol=1e-5, atol=1e-5)
    # The default sampler at every bucket (1, 2, 4), then the paths met first were traced.
    cfg = policy.config
    default = [f"{rows}:{cfg.sampler}:{cfg.default_inference_steps}" for rows in (1, 2, 4)]
    assert filled[0] == default, filled
    assert set(startup["compile_s"]) == set(default)
    assert startup["cache_fill_s"] >= 3 and startup["uncompiled_batches"] == 2
    for name in ("read_s", "verify_s", "weights_s", "ready_s"):
        assert startup[name] >= 0, name


def test_a_same_shape_hot_load_traces_nothing_and_the_stats_say_where_the_time_went(tmp_path, monkeypatch):
    """A checkpoint of the previous model's architecture takes over its compiled functions: counted by the
    Python functions MLX calls only while tracing (the conditioning and the sampler's chunk)."""
    for i in range(3):
        mx.random.seed(i)
        save_policy(tiny_policy(image=False, seed=i), tmp_path / f"m{i}.safetensors")
    traces = []
    for cls, name in ((DiffusionUnetPolicy, "_conditioning"), (GenericBackend, "_steps")):
        original = getattr(cls, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            traces.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
    policy = tiny_policy(image=False)
    obs = {k: v[0] for k, v in observation(policy, batch=1, seed=0).items()}
    path = f"{policy.config.sampler}:{policy.config.default_inference_steps}"
    batching = BatchingConfig(max_batch=2, max_wait_ms=0, warmup="full")
    with running_server(tmp_path, tmp_path / "m0.safetensors", batching=batching) as srv:
        first = _active_startup(srv)
        assert first["warmup_mode"] == "full" and first["graphs"] == "built"
        assert set(first["warmup_s"]) == {f"1:{path}", f"2:{path}"} and not first["to_compile"]
        srv.manager.load(tmp_path / "m1.safetensors")  # another thread: a policy of its own, traced
        assert srv.manager.wait_for_load(120) and srv.manager.last_error is None
        client = RawClient(srv.zmq_endpoint)
        _infer(client, obs, 0, 1)
        traced = len(traces)
        assert traced > 0
        srv.manager.load(tmp_path / "m2.safetensors")  # on v1's thread, into v1's policy
        assert srv.manager.wait_for_load(120) and srv.manager.last_error is None
        answer = _infer(client, obs, 5, 2)
        client.close()
        third = _active_startup(srv)
        assert len(traces) == traced, traces[traced:]
    assert third["version"] == 3 and third["graphs"] == "reused"
    assert set(third["warmup_s"]) == {f"1:{path}"}  # the finite check only
    want = load_policy(tmp_path / "m2.safetensors").predict_action(
        {k: v[None] for k, v in obs.items()}, seed=5
    )
    np.testing.assert_allclose(answer, want["action"][0], rtol=1e-4, atol=1e-4)


def test_a_sampler_first_met_after_a_full_warm_up_is_compiled_in_the_background(tmp_path, monkeypatch):
    policy = tiny_policy(image=False)
    save_policy(policy, tmp_path / "m.safetensors")
    filled = _fake_cache_filler(monkeypatch, "pass")
    obs = {k: v[0] for k, v in observation(policy, batch=1, seed=0).items()}
    batching = BatchingConfig(max_batch=2, max_wait_ms=0, warmup="full")
    with running_server(tmp_path, tmp_path / "m.safetensors", batching=batching) as srv:
        assert not _active_startup(srv)["to_compile"]
        client = RawClient(srv.zmq_endpoint)
        first = _infer(client, obs, 4, 1, scheduler="ddpm", num_inference_steps=3)
        assert _active_startup(srv)["uncompiled_batches"] == 1
        assert wait_for(lambda: "compile_s" in _active_startup(srv), timeout=60)
        second = _infer(client, obs, 4, 2, scheduler="ddpm", num_inference_steps=3)
        client.close()
        startup = _active_startup(srv)
    assert filled == [["1:ddpm:3"]] and set(startup["compile_s"]) == {"1:ddpm:3"}
    assert startup["uncompiled_batches"] == 1 and not startup["to_compile"]
    np.testing.assert_array_equal(first, second)


def test_a_failing_background_compilation_leaves_the_paths_uncompiled(tmp_path, monkeypatch):
    policy = tiny_policy(image=False)
    save_policy(policy, tmp_path / "m.safetensors")
    monkeypatch.setattr(models_module.ModelWorker, "_compile_next", lambda self: 1 / 0)
    obs = {k: v[0] for k, v in observation(policy, batch=1, seed=0).items()}
    with running_server(tmp_path, tmp_path / "m.safetensors") as srv:
        client = RawClient(srv.zmq_endpoint)
        first = _infer(client, obs, 1, 1)
        assert wait_for(lambda: not srv.manager.active._compiling, timeout=30)
        second = _infer(client, obs, 1, 2)
        client.close()
        startup = _active_startup(srv)
    assert startup["uncompiled_batches"] == 2 and startup["to_compile"]
    np.testing.assert_array_equal(first, second)


def test_compile_keys_read_back():
    for text in ("1:ddim:10", "8:ddpm:100:guided", "2:ddim:16:replace"):
        assert key_text(parse_key(text)) == text
