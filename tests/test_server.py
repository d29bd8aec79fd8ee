import argparse
import os
import re
import threading
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import zmq
from helpers import dead_pid, observation, tiny_policy
from server_helpers import RawClient, http, running_server, wait_for

from policy_core import load_policy, read_checkpoint, save_policy
from policy_core.checkpoint import write_safetensors_atomic
from policy_core.policy import DiffusionUnetPolicy
from proto.codec import pack
from proto.messages import PROTOCOL_VERSION, InferOptions, Request
from server import app, cli
from server import models as models_module
from server.app import ServeConfig
from server.metrics import Metrics
from server.models import BatchingConfig, LoadAborted, ModelInfo, ModelWorker, PendingInfer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for seed in (1, 2):
        mx.random.seed(seed)  # different weights per version
        save_policy(
            tiny_policy(image=True), root / f"v{seed}.safetensors", provenance={"name": f"tiny{seed}"}
        )
    data = (root / "v1.safetensors").read_bytes()
    (root / "corrupt.safetensors").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def server(models):
    with running_server(models, models / "v1.safetensors") as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(models):
    """In-process policies: what the server must answer."""
    return {v: load_policy(models / f"v{v}.safetensors") for v in (1, 2)}


def client_call(server, message: dict) -> dict:
    client = RawClient(server.zmq_endpoint)
    try:
        return client.call(message)
    finally:
        client.close()


def one_obs(policy, seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in observation(policy, batch=1, seed=seed).items()}


def expected_action(policy, obs: dict[str, np.ndarray], seed: int, **options) -> np.ndarray:
    out = policy.predict_action({k: v[None] for k, v in obs.items()}, seed=seed, **options)
    return out["action"][0]


@pytest.mark.parametrize("kind, delimiter", [(zmq.REQ, False), (zmq.DEALER, False), (zmq.DEALER, True)])
def test_hello_ping_reset_infer(server, reference, kind, delimiter):
    client = RawClient(server.zmq_endpoint, kind, delimiter)
    try:
        hello = client.call({"type": "hello", "id": 1, "protocol": PROTOCOL_VERSION})
        assert hello["ok"] and hello["id"] == 1 and hello["protocol"] == PROTOCOL_VERSION
        assert hello["model"]["name"] == "tiny1" and len(hello["model"]["sha256"]) == 64
        assert hello["obs_schema"] == {
            "image": {"shape": [2, 72, 72, 3], "dtype": "uint8"},
            "agent_pos": {"shape": [2, 2], "dtype": "float32"},
        }
        assert hello["action"] == {"dim": 2, "horizon": 8, "n_action_steps": 4}
        assert hello["n_obs_steps"] == 2 and hello["control_hz"] == 10.0 and hello["max_batch"] == 8
        assert client.call({"type": "ping", "id": "p"}) == {
            "type": "ping",
            "id": "p",
            "ok": True,
            "protocol": PROTOCOL_VERSION,
        }
        assert client.call({"type": "reset", "id": 2})["ok"]
        obs = one_obs(reference[1])
        for options in ({"seed": 5}, {"seed": 6, "scheduler": "ddpm", "num_inference_steps": 10}):
            reply = client.call({"type": "infer", "id": 3, "obs": obs, "options": options})
            assert reply["ok"], reply
            assert reply["type"] == "infer" and reply["id"] == 3
            assert reply["action"].shape == (4, 2) and reply["action"].dtype == np.float32
            assert reply["model"]["version"] == 1
            timing = reply["timing"]
            assert timing["server_ms"] >= timing["infer_ms"] > 0 and timing["queue_ms"] >= 0
            kwargs = {k: v for k, v in options.items() if k != "seed"}
            if "num_inference_steps" in kwargs:
                kwargs["scheduler"] = options["scheduler"]
            want = expected_action(reference[1], obs, options["seed"], **kwargs)
            np.testing.assert_allclose(reply["action"], want, rtol=1e-4, atol=1e-3)
    finally:
        client.close()


def test_batched_request(server, reference):
    client = RawClient(server.zmq_endpoint)
    obs = observation(reference[1], batch=3, seed=4)
    reply = client.call({"type": "infer", "id": 9, "obs": obs, "options": {"seed": 1}})
    client.close()
    assert reply["ok"], reply
    assert reply["action"].shape == (3, 4, 2)
    # More rows than max_batch (8 here) are refused: they would bound neither memory nor compiled graphs.
    big = observation(reference[1], batch=9, seed=4)
    assert client_call(server, {"type": "infer", "id": 10, "obs": big})["error"]["code"] == "too_large"
    x_init, step_noise = reference[1].sample_noise(3, 5, seed=1)  # a batched request draws for all rows
    want = reference[1].predict_action(obs, noise=x_init, step_noise=step_noise)["action"]
    np.testing.assert_allclose(reply["action"], want, rtol=1e-4, atol=1e-3)


def test_concurrent_clients_get_their_own_answers_in_batches(server, reference):
    n_clients, per_client = 8, 6
    results: dict[int, list] = {}
    errors: list = []

    def run(cid: int) -> None:
        client = RawClient(server.zmq_endpoint)
        obs = one_obs(reference[1], seed=100 + cid)
        out = []
        try:
            for i in range(per_client):
                seed = cid * 1000 + i
                reply = client.call(
                    {"type": "infer", "id": f"{cid}-{i}", "obs": obs, "options": {"seed": seed}}
                )
                out.append((obs, seed, reply))
        except Exception as e:
            errors.append(e)
        finally:
            client.close()
        results[cid] = out

    before = server.metrics.stats()["max_batch_size"]
    threads = [threading.Thread(target=run, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for cid, out in results.items():
        assert len(out) == per_client
        for i, (obs, seed, reply) in enumerate(out):
            assert reply["ok"] and reply["id"] == f"{cid}-{i}", reply
            np.testing.assert_allclose(
                reply["action"], expected_action(reference[1], obs, seed), rtol=1e-4, atol=1e-3
            )
    assert max(before, server.metrics.stats()["max_batch_size"]) > 1


BAD_MESSAGES = [
    (b"\xc1garbage", "bad_request"),
    (pack([1, 2, 3]), "bad_request"),
    (pack({"type": "fly", "id": 1}), "bad_request"),
    (pack({"type": "infer", "id": 1}), "bad_request"),
    (pack({"type": "hello", "id": 1, "protocol": 99}), "unsupported_protocol"),
    # Found by the fuzzer: arrays where scalars belong must not reach a truth-value test.
    (pack({"type": np.zeros(0, np.uint8), "id": 1}), "bad_request"),
    (pack({"type": "hello", "id": 1, "protocol": np.ones(2)}), "unsupported_protocol"),
    (pack({"type": "infer", "id": 1, "obs": {"x": 1}, "options": {"scheduler": np.ones(2)}}), "bad_request"),
    (pack({"type": "infer", "id": {"x": 1}, "obs": {"a": 1}}), "bad_request"),
    (pack({"type": "infer", "id": 1, "obs": {"agent_pos": np.zeros((2, 2), np.float32)}}), "schema_mismatch"),
    (pack({"type": "infer", "id": 1, "obs": {"image": 1}, "options": {"scheduler": "euler"}}), "bad_request"),
    (pack({"type": "infer", "id": 1, "obs": {"x": 1}, "options": {"prev_actions": []}}), "bad_request"),
]


def test_bad_input_gets_typed_errors_and_server_keeps_serving(server, reference):
    client = RawClient(server.zmq_endpoint)
    good = one_obs(reference[1])
    cases = list(BAD_MESSAGES)
    for key, value in (
        ("image", good["image"].astype(np.float32)),  # images must be uint8
        ("image", good["image"][:, :10]),
        ("agent_pos", np.full((2, 2), np.nan, np.float32)),
        ("agent_pos", np.array([[1e39, 0], [0, 0]])),  # overflows float32
        ("agent_pos", np.zeros((3, 2, 2), np.float32)),  # batch axis on one key only
    ):
        code = "bad_request" if key == "agent_pos" and value.ndim == 2 else "schema_mismatch"
        cases.append((pack({"type": "infer", "id": 1, "obs": {**good, key: value}}), code))
    cases.append(
        (
            pack({"type": "infer", "id": 1, "obs": good, "options": {"num_inference_steps": 1000}}),
            "bad_request",
        )
    )
    for payload, code in cases:
        client.send_raw(payload)
        reply = client.recv()
        assert reply["ok"] is False and reply["error"]["code"] == code, (payload[:60], reply)
        assert reply["error"]["message"]
    # Malformed array encodings: wrong byte count, object dtype, absurd shape.
    for arr in (
        {"__ndarray__": True, "data": b"\0" * 3, "dtype": "<f4", "shape": [2]},
        {"__ndarray__": True, "data": b"\0" * 8, "dtype": "|O", "shape": [1]},
        {"__ndarray__": True, "data": b"", "dtype": "<f4", "shape": [-1]},
    ):
        reply = client.call({"type": "infer", "id": 2, "obs": {"agent_pos": arr}})
        assert reply["error"]["code"] == "bad_request"
    # Extra frames: a reply, not a crash.
    client.send_raw(b"a", b"b", b"c")
    assert client.recv()["error"]["code"] == "bad_request"
    assert client.call({"type": "infer", "id": 3, "obs": good})["ok"]
    client.close()


def test_oversized_message_is_refused(models):
    with running_server(models, models / "v1.safetensors", max_message_bytes=50_000) as srv:
        client = RawClient(srv.zmq_endpoint)
        obs = one_obs(load_policy(models / "v1.safetensors"))  # 2 x 72 x 72 x 3 = 31 KB: fits
        assert client.call({"type": "infer", "id": 1, "obs": obs})["ok"]
        big = {**obs, "image": np.zeros((2, 2, 72, 72, 3), np.uint8)}  # batch of two: 62 KB
        reply = client.call({"type": "infer", "id": 2, "obs": big})
        assert reply["error"]["code"] == "too_large"
        assert client.call({"type": "ping", "id": 3})["ok"]
        client.close()


def test_not_ready_before_a_model_is_loaded(models):
    with running_server(models) as srv:
        client = RawClient(srv.zmq_endpoint)
        assert client.call({"type": "hello", "id": 1})["error"]["code"] == "not_ready"
        assert client.call({"type": "ping", "id": 2})["ok"]
        assert http("GET", srv.http_url + "/healthz")[0] == 200
        assert http("GET", srv.http_url + "/readyz")[0] == 503
        client.close()


def test_a_checkpoint_with_non_finite_actions_is_refused_and_the_model_in_place_keeps_serving(tmp_path):
    good = tiny_policy(image=False)
    save_policy(good, tmp_path / "good.safetensors")
    weight = np.array(good.unet.final_conv[1].weight)
    weight.flat[0] = np.nan
    good.unet.final_conv[1].weight = mx.array(weight)
    save_policy(good, tmp_path / "nan.safetensors")
    with running_server(tmp_path, tmp_path / "good.safetensors") as srv:
        srv.manager.load(tmp_path / "nan.safetensors")
        assert srv.manager.wait_for_load(120)
        assert "not finite" in srv.manager.last_error
        client = RawClient(srv.zmq_endpoint)
        reply = client.call({"type": "infer", "id": 0, "obs": one_obs(good)})
        assert reply["ok"] and reply["model"]["version"] == 1 and np.isfinite(reply["action"]).all()
        client.close()


def test_non_finite_actions_are_never_sent(tmp_path):
    # Finite observations far outside the training range overflow to NaN actions: they must not reach a
    # robot (nor would the NaN output of a CUDA sampler that aborted unnoticed). With the front end's range
    # check off, the worker's own check of the actions is what stops them.
    policy = tiny_policy(image=False)
    save_policy(policy, tmp_path / "lowdim.safetensors")
    with running_server(tmp_path, tmp_path / "lowdim.safetensors", max_normalized_obs=0) as srv:
        client = RawClient(srv.zmq_endpoint)
        extreme = {k: np.full_like(v, 3e38) for k, v in one_obs(policy).items()}
        for i in range(2):  # the second proves the model's worker kept serving
            reply = client.call({"type": "infer", "id": i, "obs": extreme, "options": {"seed": i}})
            assert reply["ok"] is False and reply["id"] == i and "action" not in reply, reply
            assert reply["error"] == {
                "code": "invalid_observation",
                "message": "the policy produced non-finite actions for this observation",
            }
        assert srv.metrics.stats()["errors"] == {"invalid_observation": 2}
        reply = client.call({"type": "infer", "id": 2, "obs": one_obs(policy)})
        assert reply["ok"] and np.isfinite(reply["action"]).all()
        client.close()


def test_one_robots_extreme_observation_fails_its_own_request_only(tmp_path, monkeypatch):
    """The issue's case: a keypoint of 1e30 made non-finite actions and failed every request of its batch
    with `internal`. Each request now succeeds or fails on its own, checked before and after inference."""
    execute = ModelWorker._execute

    def slow_ddpm(self, batch: list[PendingInfer]) -> None:
        # A sampler first met runs uncompiled, no longer slowed by its compilation: held here instead.
        if batch[0].request.options.scheduler == "ddpm":
            time.sleep(0.5)
        execute(self, batch)

    monkeypatch.setattr(ModelWorker, "_execute", slow_ddpm)
    policy = tiny_policy(image=False)
    save_policy(policy, tmp_path / "lowdim.safetensors")
    good = [one_obs(policy, seed=s) for s in (1, 2)]
    bad = {"agent_pos": np.array([[1e30, 0.0], [0.0, 0.0]], np.float32)}
    assert not np.isfinite(policy.predict_action({"agent_pos": bad["agent_pos"][None]})["action"]).all()
    for limit in (100.0, 0.0):  # the front end's range check on, then off (only the worker's check)
        with running_server(tmp_path, tmp_path / "lowdim.safetensors", max_normalized_obs=limit) as srv:
            clients = [RawClient(srv.zmq_endpoint) for _ in range(4)]
            # A slow request of other options keeps the worker busy, so the next three queue and share a
            # batch (they have the same options).
            clients[0].send({"type": "infer", "id": "slow", "obs": good[0], "options": {"scheduler": "ddpm"}})
            time.sleep(0.05)
            for i, (client, obs) in enumerate(zip(clients[1:], [good[0], bad, good[1]], strict=True)):
                client.send({"type": "infer", "id": i, "obs": obs, "options": {"seed": i}})
            assert clients[0].recv()["ok"]
            replies = [client.recv() for client in clients[1:]]
            for client in clients:
                client.close()
            for i in (0, 2):
                assert replies[i]["ok"], replies[i]
                want = expected_action(policy, good[i // 2], seed=i)
                np.testing.assert_allclose(replies[i]["action"], want, rtol=1e-4, atol=1e-3)
            assert replies[1]["ok"] is False and replies[1]["error"]["code"] == "invalid_observation"
            message = replies[1]["error"]["message"]
            if limit:
                assert "obs['agent_pos'] dimension 0 = 1e+30 is outside the range" in message, message
                assert srv.metrics.stats()["max_batch_size"] == 2  # never joined the batch
            else:
                assert "non-finite actions" in message and srv.metrics.stats()["max_batch_size"] == 3
            assert "internal" not in srv.metrics.stats()["errors"]


def test_the_range_check_names_the_row_of_a_batched_request(server, reference):
    client = RawClient(server.zmq_endpoint)
    obs = observation(reference[1], batch=3, seed=4)
    obs["agent_pos"][2, 1, 0] = -1e6  # normalized: ~ -3900
    reply = client.call({"type": "infer", "id": 1, "obs": obs})
    client.close()
    assert reply["error"]["code"] == "invalid_observation"
    assert "obs['agent_pos'] row 2 dimension 0 = -1e+06" in reply["error"]["message"]


def _pending(i: int, steps: int | None = None) -> PendingInfer:
    request = Request("infer", i, options=InferOptions(num_inference_steps=steps))
    return PendingInfer(request, {"x": np.zeros((1, 2))}, False, time.perf_counter(), print)


def test_worker_batches_what_queued_in_arrival_order():
    worker = ModelWorker(Path("unused.safetensors"), 1, BatchingConfig(), Metrics(), print, print)
    for i, steps in enumerate([None, None, 5, None]):
        worker.submit(_pending(i, steps))
    assert [p.request.id for p in worker._next_batch()] == [0, 1, 3]
    assert [p.request.id for p in worker._next_batch()] == [2]
    assert worker._next_batch() == []


def test_worker_waits_only_for_the_company_the_last_batch_had():
    wait = 0.3
    batching = BatchingConfig(max_wait_ms=wait * 1e3)
    worker = ModelWorker(Path("unused.safetensors"), 1, batching, Metrics(), print, print)

    def batch_seconds(requests: int) -> float:
        for i in range(requests):
            worker.submit(_pending(i))
        start = time.perf_counter()
        assert len(worker._next_batch()) == requests
        return time.perf_counter() - start

    assert batch_seconds(1) < wait / 3  # a lone robot: no wait
    worker._note_batch([_pending(1), _pending(2)])  # the last batch had two requests
    assert batch_seconds(2) < wait / 3  # both here: no wait either
    assert batch_seconds(1) >= wait * 0.9  # one missing: waited for it
    worker._note_batch([_pending(3)])  # alone again, nobody waiting when it finished
    assert batch_seconds(1) < wait / 3
    worker.submit(_pending(4))
    worker._note_batch([_pending(5)])  # alone, but request 4 was waiting: two clients
    start = time.perf_counter()
    assert [p.request.id for p in worker._next_batch()] == [4]
    assert time.perf_counter() - start >= wait * 0.9
    worker._note_batch([_pending(6), _pending(7)])
    worker.submit(_pending(8, steps=5))  # other options than the last batch's: nobody can join it
    start = time.perf_counter()
    assert [p.request.id for p in worker._next_batch()] == [8]
    assert time.perf_counter() - start < wait / 3


def test_worker_counts_its_company_before_replying():
    # A lone client sends its next request as soon as it has the reply: that request is not company.
    worker = ModelWorker(Path("unused.safetensors"), 1, BatchingConfig(), Metrics(), print, print)
    worker.policy = tiny_policy(image=False)
    worker.info = ModelInfo("tiny", 1, "0" * 64, "unused.safetensors", {}, {"ddim": 100}, ("ddim", 10))
    obs = observation(worker.policy, batch=1)

    def pending(i: int, reply=print) -> PendingInfer:
        return PendingInfer(
            Request("infer", i, options=InferOptions()), obs, True, time.perf_counter(), reply
        )

    replies = []
    worker._execute([pending(0, lambda reply: (replies.append(reply), worker.submit(pending(1))))])
    assert replies[0]["ok"] and worker.depth() == 1
    assert worker._company[1] == 1
    worker._execute([pending(2), pending(3)])  # two requests, and request 1 waiting
    assert worker._company[1] == 3


def test_batch_buckets_add_the_sizes_a_model_runs_unpadded():
    assert BatchingConfig(max_batch=8).buckets() == [1, 2, 4, 8]
    assert BatchingConfig(max_batch=8).buckets([1, 2, 3]) == [1, 2, 3, 4, 8]
    assert BatchingConfig(max_batch=6).buckets(range(1, 9)) == [1, 2, 3, 4, 5, 6]
    assert BatchingConfig(max_batch=1).buckets([1]) == [1]


def test_worker_runs_the_sizes_of_the_models_kernel_unpadded(tmp_path, monkeypatch):
    # As on a CUDA device whose sampler kernel takes batches up to 3: a padded row would cost its full time.
    policy = tiny_policy(image=False)
    save_policy(policy, tmp_path / "lowdim.safetensors")
    monkeypatch.setattr(DiffusionUnetPolicy, "unpadded_batch_sizes", lambda self, max_batch: [1, 2, 3])
    rows_run = []
    predict_action = DiffusionUnetPolicy.predict_action

    def recording(self, obs, **options):
        rows_run.append(next(iter(obs.values())).shape[0])
        return predict_action(self, obs, **options)

    monkeypatch.setattr(DiffusionUnetPolicy, "predict_action", recording)
    batching = BatchingConfig(warmup="full")
    worker = ModelWorker(tmp_path / "lowdim.safetensors", 1, batching, Metrics(), print, print)
    worker._load()
    assert rows_run == [1, 2, 3, 4, 8]  # the warm-up
    replies = []
    for rows in (3, 5):
        rows_run.clear()
        obs = observation(policy, batch=rows)
        request = Request("infer", rows, options=InferOptions(seed=rows))
        worker._execute([PendingInfer(request, obs, True, time.perf_counter(), replies.append)])
        assert rows_run == [rows if rows == 3 else 8]
        assert replies[-1]["ok"] and replies[-1]["action"].shape[0] == rows


def test_overloaded_queue_answers_instead_of_growing(models):
    batching = BatchingConfig(max_batch=1, max_wait_ms=0, max_queue=2)
    with running_server(models, models / "v1.safetensors", batching=batching) as srv:
        client = RawClient(srv.zmq_endpoint)
        obs = one_obs(load_policy(models / "v1.safetensors"))
        n = 30
        for i in range(n):
            client.send({"type": "infer", "id": i, "obs": obs, "options": {"scheduler": "ddpm", "seed": i}})
        replies = [client.recv() for _ in range(n)]
        codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
        assert "overloaded" in codes and "ok" in codes
        assert set(codes) <= {"ok", "overloaded"}
        assert sorted(r["id"] for r in replies) == list(range(n))
        client.close()


def test_metrics_and_stats(server):
    status, text = http("GET", server.http_url + "/metrics")
    assert status == 200
    for name in (
        "dpmlx_requests_total",
        "dpmlx_errors_total",
        "dpmlx_server_latency_ms_bucket",
        "dpmlx_batch_size_bucket",
        "dpmlx_queue_depth",
        "dpmlx_model_swaps_total",
    ):
        assert name in text
    status, stats = http("GET", server.http_url + "/v1/stats")
    assert status == 200 and stats["requests"]["infer"] > 0
    assert stats["latency_ms"]["server_ms"]["p50"] > 0


def test_api_docs_load_nothing_from_outside(server):
    # Robot networks are often offline: the docs pages must not depend on a CDN.
    for page in ("/docs", "/redoc"):
        status, html = http("GET", server.http_url + page)
        assert status == 200 and isinstance(html, str), page
        assert not re.findall(r"(?:https?:)?//[\w.-]+\.\w+/", html.replace("http://www.w3.org/", "")), html
        assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
        assert any(a.endswith(".js") for a in assets), html
        for asset in assets:
            with urllib.request.urlopen(server.http_url + asset, timeout=30) as response:
                assert response.status == 200 and len(response.read()) > 0, asset
    assert http("GET", server.http_url + "/openapi.json")[1]["info"]["title"] == "dpmlx control plane"


def test_control_plane_auth_and_path_confinement(models, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((models / "v1.safetensors").read_bytes())
    link = models / "link.safetensors"
    link.symlink_to(outside)
    try:
        with running_server(models, models / "v1.safetensors", token="s3cret") as srv:
            url = srv.http_url + "/v1/models/load"
            assert http("POST", url, {"path": "v2.safetensors"})[0] == 401
            assert http("POST", url, {"path": "v2.safetensors"}, token="wrong")[0] == 401
            assert http("POST", srv.http_url + "/v1/models/rollback")[0] == 401
            for path, status in (
                ("../outside.safetensors", 403),
                (str(outside), 403),
                ("link.safetensors", 403),
                ("/etc/passwd", 403),
                ("missing.safetensors", 404),
                ("v1.txt", 400),
            ):
                assert http("POST", url, {"path": path}, token="s3cret")[0] == status, path
            status, body = http("POST", url, {"path": "v2.safetensors"}, token="s3cret")
            assert status == 202 and body["loading"]["version"] == 2
            assert srv.manager.wait_for_load(120)
            assert http("GET", srv.http_url + "/v1/models")[1]["active"]["version"] == 2
            # Reads stay open.
            assert http("GET", srv.http_url + "/readyz")[0] == 200
    finally:
        link.unlink()
    with pytest.raises(ValueError, match="without --token"):
        ServeConfig(http_host="0.0.0.0")
    ServeConfig(http_host="0.0.0.0", token="t")


def test_a_refused_load_names_the_model_root_and_the_flag(models, tmp_path):
    with running_server(models) as srv:
        status, body = http(
            "POST", srv.http_url + "/v1/models/load", {"path": str(tmp_path / "m.safetensors")}
        )
        assert status == 403
        assert (
            f"outside the model root {models.resolve()}" in body["detail"]
            and "--model-root" in body["detail"]
        )


def test_the_default_model_root_is_the_current_directory(monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    monkeypatch.chdir(tmp_path)
    for argv in ([], ["--checkpoint", "runs/a/latest.safetensors"], ["--watch", "runs/a"]):
        assert app.config_from_args(parser.parse_args(argv)).model_root == tmp_path.resolve(), argv
    assert app.config_from_args(parser.parse_args(["--model-root", "runs"])).model_root == tmp_path / "runs"


def test_a_failed_load_is_one_typed_line_and_takes_no_version(models):
    with running_server(models, models / "v1.safetensors") as srv:
        failed = srv.manager.load(models / "corrupt.safetensors")
        assert failed.loaded.wait(120) and failed.version == 2
        error = srv.manager.describe()["last_error"]
        assert error.startswith("CheckpointCorruptError: ") and error.count(str(models / "corrupt")) == 1
        assert "\n" not in error
        status, body = http("POST", srv.http_url + "/v1/models/load", {"path": "v2.safetensors"})
        assert status == 202 and body["loading"]["version"] == 2
        assert srv.manager.wait_for_load(120) and srv.manager.active.version == 2


def test_hot_swap_under_load_drops_nothing(models, reference):
    """Clients send continuously while the model is swapped 5 times and once to a corrupt file."""
    with running_server(models, models / "v1.safetensors") as srv:
        obs = one_obs(reference[1], seed=42)
        seeds = list(range(8))
        expected = {
            (path, s): expected_action(reference[v], obs, s)
            for v, path in ((1, "v1"), (2, "v2"))
            for s in seeds
        }
        version_path = {1: "v1"}
        replies: list = []
        errors: list = []
        stop = threading.Event()

        def client_loop(cid: int) -> None:
            client = RawClient(srv.zmq_endpoint, timeout_s=60)
            i = 0
            try:
                while not stop.is_set():
                    seed = seeds[(cid + i) % len(seeds)]
                    start = time.perf_counter()
                    reply = client.call({"type": "infer", "id": i, "obs": obs, "options": {"seed": seed}})
                    replies.append((seed, reply, (time.perf_counter() - start) * 1e3))
                    i += 1
            except Exception as e:
                errors.append(e)
            finally:
                client.close()

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        plan = ["v2", "v1", "corrupt", "v2", "v1", "v2"]
        for name in plan:
            status, body = http("POST", srv.http_url + "/v1/models/load", {"path": f"{name}.safetensors"})
            assert status == 202, body
            version_path[body["loading"]["version"]] = name
            assert srv.manager.wait_for_load(120)
            time.sleep(0.3)
        state = http("GET", srv.http_url + "/v1/models")[1]
        stop.set()
        for t in threads:
            t.join()

        assert not errors
        assert len(replies) > 20
        failed = [r for _, r, _ in replies if not r["ok"]]
        assert failed == []
        versions_seen = set()
        for seed, reply, _ in replies:
            version = reply["model"]["version"]
            versions_seen.add(version)
            # The reply names the version that computed it: its action is that model's action.
            want = expected[(version_path[version], seed)]
            np.testing.assert_allclose(reply["action"], want, rtol=1e-4, atol=1e-3)
        assert versions_seen - {1} and len(versions_seen) >= 4
        assert "corrupt" in state["last_error"]
        # The failed load did not take a version: v2, v1, (corrupt), v2, v1, v2 are versions 2..6.
        assert state["active"]["version"] == 6 and state["previous"]["version"] == 5
        assert srv.metrics.stats()["swaps"] == 5 and srv.metrics.stats()["failed_loads"] == 1
        # Rollback returns to the previous model.
        status, body = http("POST", srv.http_url + "/v1/models/rollback")
        assert status == 200 and body["active"]["version"] == 5
        client = RawClient(srv.zmq_endpoint)
        assert client.call({"type": "infer", "id": 1, "obs": obs})["model"]["version"] == 5
        client.close()
        lat = np.array([ms for _, _, ms in replies])
        print(
            f"\nhot-swap latency over {lat.size} requests: p50 {np.percentile(lat, 50):.1f} ms, "
            f"p90 {np.percentile(lat, 90):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, "
            f"max {lat.max():.1f} ms"
        )


def test_watch_folder_hot_loads_new_checkpoints(models, tmp_path):
    watch = tmp_path / "run"
    watch.mkdir()
    with running_server(watch, watch=watch, watch_interval_s=0.1) as srv:
        assert srv.manager.active is None
        save_policy(load_policy(models / "v1.safetensors"), watch / "latest.safetensors")
        assert wait_for(lambda: srv.manager.active is not None, 120)
        first = srv.manager.active.info.sha256
        save_policy(load_policy(models / "v2.safetensors"), watch / "latest.safetensors")  # atomic replace
        assert wait_for(lambda: srv.manager.active.info.sha256 != first, 120)
        assert srv.manager.active.version == 2


def test_serve_launches_mlx_kernels_directly_unless_told_otherwise(monkeypatch):
    class Started(Exception):
        pass

    seen = []

    def record_environment(config):
        seen.append(os.environ.get("MLX_USE_CUDA_GRAPHS"))
        raise Started  # the environment is what matters; no server is started

    monkeypatch.setattr(app, "Server", record_environment)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for setting in (None, "1"):
        if setting is None:
            monkeypatch.delenv("MLX_USE_CUDA_GRAPHS", raising=False)
        else:
            monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", setting)
        with pytest.raises(Started):
            app.serve_main(parser.parse_args([]))
    assert seen == ["0", "1"]


def test_every_path_problem_is_a_4xx_with_a_message(models, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "loop.safetensors").symlink_to("loop.safetensors")
    (root / "a.safetensors").symlink_to("b.safetensors")  # a two-link cycle
    (root / "b.safetensors").symlink_to("a.safetensors")
    (root / "dangling.safetensors").symlink_to("gone.safetensors")
    (root / "folder.safetensors").mkdir()
    os.mkfifo(root / "fifo.safetensors")
    (root / "file.txt").write_text("x")
    with running_server(root) as srv:
        url = srv.http_url + "/v1/models/load"
        for path in (
            "loop.safetensors",
            "a.safetensors",
            "loop.safetensors/x.safetensors",
            "dangling.safetensors",
            "folder.safetensors",
            "fifo.safetensors",
            "file.txt/x.safetensors",
            "x" * 5000 + ".safetensors",
            "sub/" * 2000 + "x.safetensors",
            "",
            "bad\0.safetensors",
        ):
            status, body = http("POST", url, {"path": path})
            assert 400 <= status < 500, (path[:40], status, body)
            assert isinstance(body, dict) and body["detail"], (path[:40], body)
        assert srv.manager.loading is None and srv.manager.last_error is None


def test_a_req_client_that_sends_two_frames_gets_an_error_it_can_receive(server):
    # Outside the protocol, but a REQ socket whose reply never comes is wedged for good.
    for kind, delimiter in ((zmq.REQ, False), (zmq.DEALER, True), (zmq.DEALER, False)):
        client = RawClient(server.zmq_endpoint, kind, delimiter, timeout_s=10)
        try:
            frames = [pack({"type": "ping", "id": 1}), b"second frame"]
            client.send_raw(*([b""] if delimiter else []), *frames)
            reply = client.recv()
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
            assert "one payload frame" in reply["error"]["message"]
            assert client.call({"type": "ping", "id": 2})["ok"]  # the socket is usable again
        finally:
            client.close()


def test_watching_a_folder_removes_temporary_files_of_killed_writers(tmp_path):
    stale = tmp_path / f".latest.safetensors.{dead_pid()}.tmp"
    stale.write_bytes(b"partial")
    with running_server(tmp_path, watch=tmp_path, watch_interval_s=0.1):
        assert wait_for(lambda: not stale.exists(), 10)


def test_a_checkpoint_with_inconsistent_metadata_never_takes_traffic(tmp_path):
    policy = tiny_policy(image=False)
    save_policy(policy, tmp_path / "good.safetensors")
    ckpt = read_checkpoint(tmp_path / "good.safetensors")
    doc = {k: v for k, v in ckpt.metadata.items() if k != "content_sha256"}
    doc["control_hy"] = doc.pop("control_hz")  # loaded before; then every hello failed with `internal`
    write_safetensors_atomic(tmp_path / "renamed.safetensors", ckpt.tensors, doc)
    with running_server(tmp_path, tmp_path / "good.safetensors") as srv:
        srv.manager.load(tmp_path / "renamed.safetensors")
        assert srv.manager.wait_for_load(120)
        assert "invalid metadata" in srv.manager.last_error and "control_hz" in srv.manager.last_error
        client = RawClient(srv.zmq_endpoint)
        hello = client.call({"type": "hello", "id": 1})
        assert hello["ok"] and hello["model"]["version"] == 1 and hello["control_hz"] == 10.0
        client.close()


def _process_status() -> tuple[float, int]:
    """(RSS in MB, OS threads) of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("architectures", [1, 3])
def test_hot_swaps_leak_neither_memory_nor_threads(tmp_path, monkeypatch, architectures):
    """Each swap grew the server by an OS thread and ~5 MB (tiny models; 30-50 MB with the shipped one):
    a thread per model, and MLX's stream thread and malloc arena for each. 22 swaps: between two
    checkpoints of one architecture (the new weights go into the previous model's compiled graphs:
    nothing is built; compared with after the first two swaps, as the issue asks), and around three
    architectures (every swap builds a policy and releases the old one; compared with after six swaps,
    once each architecture has run on both model threads and MLX's kernels for it are loaded)."""
    dims = [[16, 32], [16, 32, 64], [32, 64]] if architectures == 3 else [[16, 32], [16, 32]]
    for i, down_dims in enumerate(dims):
        mx.random.seed(i)
        save_policy(tiny_policy(image=False, seed=i, down_dims=down_dims), tmp_path / f"m{i}.safetensors")
    reference = [load_policy(tmp_path / f"m{i}.safetensors") for i in range(len(dims))]
    built = []
    init = DiffusionUnetPolicy.__init__

    def counting_init(self, *args, **kwargs) -> None:
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionUnetPolicy, "__init__", counting_init)
    obs = one_obs(reference[0])

    def batch(i: int) -> dict[str, np.ndarray]:
        return {k: np.repeat(v[None], 1 + i % 3, axis=0) for k, v in obs.items()}  # buckets 1, 2, 4

    with running_server(tmp_path, tmp_path / "m0.safetensors") as srv:
        stop = threading.Event()
        replies: list = []

        def client_loop() -> None:
            client = RawClient(srv.zmq_endpoint)
            i = 0
            while not stop.is_set():
                i += 1
                request = {"type": "infer", "id": i, "obs": batch(i), "options": {"seed": i}}
                replies.append((i, client.call(request)))
                time.sleep(0.01)  # a robot's control loop, not a flood: the model is idle at times
            client.close()

        clients = [threading.Thread(target=client_loop) for _ in range(2)]
        for t in clients:
            t.start()
        status, built_at = {}, {}
        for swap in range(1, 23):
            srv.manager.load(tmp_path / f"m{swap % len(dims)}.safetensors")
            assert srv.manager.wait_for_load(120) and srv.manager.last_error is None, srv.manager.last_error
            time.sleep(0.1)
            status[swap], built_at[swap] = _process_status(), len(built)
        stop.set()
        for t in clients:
            t.join()
    first = 2 if architectures == 1 else 6
    (rss_0, threads_0), (rss_22, threads_22) = status[first], status[22]
    print(f"\n{architectures}: RSS {rss_0:.1f} -> {rss_22:.1f} MB, threads {threads_0} -> {threads_22}")
    assert threads_22 == threads_0 == status[2][1]
    assert rss_22 <= 1.10 * rss_0, (rss_0, rss_22)
    # One architecture: only the first two loads built a policy. Three: every load did.
    assert built_at[22] == (2 if architectures == 1 else 23)
    for i, reply in replies:
        assert reply["ok"], reply
        version = reply["model"]["version"]
        want = reference[(version - 1) % len(dims)].predict_action(batch(i), seed=i)["action"]
        np.testing.assert_allclose(reply["action"], want, rtol=1e-4, atol=1e-3)


def test_a_failed_load_into_the_previous_models_graphs_leaves_that_model_intact(tmp_path):
    mx.random.seed(1)
    save_policy(tiny_policy(image=False), tmp_path / "m1.safetensors")
    mx.random.seed(2)
    nan = tiny_policy(image=False)
    save_policy(nan, tmp_path / "m2.safetensors")
    weight = np.array(nan.unet.final_conv[1].weight)
    weight.flat[0] = np.nan
    nan.unet.final_conv[1].weight = mx.array(weight)
    save_policy(nan, tmp_path / "nan.safetensors")
    obs = one_obs(nan)
    with running_server(tmp_path, tmp_path / "m1.safetensors") as srv:
        srv.manager.load(tmp_path / "m2.safetensors")
        assert srv.manager.wait_for_load(120)
        # The previous model (v1) hosts the load: the same architecture, so its policy takes the weights.
        srv.manager.load(tmp_path / "nan.safetensors")
        assert srv.manager.wait_for_load(120) and "not finite" in srv.manager.last_error
        assert srv.manager.describe()["previous"]["version"] == 1
        srv.manager.rollback()
        client = RawClient(srv.zmq_endpoint)
        reply = client.call({"type": "infer", "id": 1, "obs": obs, "options": {"seed": 4}})
        client.close()
        assert reply["ok"] and reply["model"]["version"] == 1
        want = expected_action(load_policy(tmp_path / "m1.safetensors"), obs, seed=4)
        np.testing.assert_allclose(reply["action"], want, rtol=1e-4, atol=1e-3)


def test_a_rollback_waits_for_the_load_in_progress(models):
    with running_server(models, models / "v1.safetensors") as srv:
        srv.manager.load(models / "v2.safetensors")
        assert srv.manager.wait_for_load(120)
        srv.manager.load(models / "v1.safetensors")  # runs on the previous model's thread
        status, body = http("POST", srv.http_url + "/v1/models/rollback")
        assert status == 409 and "roll back once the load is done" in body["detail"]
        assert srv.manager.wait_for_load(120)
        assert http("POST", srv.http_url + "/v1/models/rollback")[0] == 200


class _Busy:
    """A serving model that stays busy until ``until`` (time.monotonic())."""

    def __init__(self, seconds: float):
        self.until = time.monotonic() + seconds

    def idle(self) -> bool:
        return time.monotonic() >= self.until


def test_warm_up_steps_wait_until_the_serving_model_is_idle(tmp_path, monkeypatch):
    # A trace holds the GIL (~0.25 s for the shipped policy on a 2-core box): no step while requests run.
    policy = tiny_policy(image=False)
    schema = {"agent_pos": {"shape": [2, 2], "dtype": "float32"}}
    starts = []
    predict_action = DiffusionUnetPolicy.predict_action
    monkeypatch.setattr(
        DiffusionUnetPolicy,
        "predict_action",
        lambda self, obs, **kw: (starts.append(time.monotonic()), predict_action(self, obs, **kw))[1],
    )
    worker = ModelWorker(Path("unused.safetensors"), 1, BatchingConfig(), Metrics(), print, print)
    begin = time.monotonic()
    worker._check_finite(policy, schema, [1, 2], yield_to=_Busy(0.3))
    assert len(starts) == 2 and starts[0] - begin >= 0.3
    # A model that is never idle cannot keep a load out forever: each step waits at most WARMUP_YIELD_S.
    monkeypatch.setattr(models_module, "WARMUP_YIELD_S", 0.2)
    starts.clear()
    begin = time.monotonic()
    worker._check_finite(policy, schema, [1, 2], yield_to=_Busy(60))
    assert 0.4 <= starts[1] - begin < 5
    # Shutdown stops a load between steps.
    worker.abort_load()
    with pytest.raises(LoadAborted):
        worker._check_finite(policy, schema, [1], yield_to=_Busy(60))


def test_shutdown_has_a_deadline(tmp_path):
    """In-flight batches finish, requests still queued at the deadline get `shutting_down`, every model
    thread ends, and a load in progress is stopped."""
    policy = tiny_policy(image=True)
    save_policy(policy, tmp_path / "m.safetensors")
    save_policy(tiny_policy(image=False), tmp_path / "other.safetensors")
    batching = BatchingConfig(max_batch=1, max_wait_ms=0, max_queue=64)
    server = app.Server(
        ServeConfig(zmq="tcp://127.0.0.1:*", http_port=0, model_root=tmp_path, batching=batching)
    )
    server.start()
    try:
        server.manager.load(tmp_path / "m.safetensors")
        assert server.manager.wait_for_load(120)
        client = RawClient(server.zmq_endpoint)
        obs = one_obs(policy)
        n = 40  # DDPM-100 one at a time: far more work than the deadline allows
        for i in range(n):
            client.send({"type": "infer", "id": i, "obs": obs, "options": {"scheduler": "ddpm", "seed": i}})
        time.sleep(0.3)
        server.manager.load(tmp_path / "other.safetensors")  # a load in progress (another architecture)
        manager = server.manager
        threads = [w.thread for w in (manager.active, manager.previous, manager.loading) if w and w.thread]
        started = time.monotonic()
        assert server.shutdown(timeout=1.0)
        elapsed = time.monotonic() - started
        replies = [client.recv() for _ in range(n)]
        client.close()
    finally:
        server.shutdown(timeout=0)
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    assert sorted(r["id"] for r in replies) == list(range(n))
    assert set(codes) == {"ok", "shutting_down"}, codes
    assert codes.index("shutting_down") > 0 and "ok" not in codes[codes.index("shutting_down") :]
    assert elapsed < 1.0 + 5, elapsed  # the deadline plus the batch in flight
    assert threads and not any(t.is_alive() for t in threads)
