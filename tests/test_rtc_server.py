"""Real-time chunking over the wire: options.prefix, delay and rtc against a real server (PROTOCOL.md)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import observation, tiny_policy
from server_helpers import RawClient, running_server

from policy_core import load_policy, save_policy
from policy_core.rtc import DEFAULT_MAX_GUIDANCE, ActionPrefix
from proto.codec import pack
from proto.messages import PROTOCOL_VERSION, RTC_DEFAULTS, RTC_METHODS, RTC_SCHEDULES

# Pixels: the server's batch against the in-process policy alone (float32 rounding of other shapes).
TOLERANCE_PX = 1e-2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rtc")
    mx.random.seed(0)
    save_policy(tiny_policy(image=False), root / "m.safetensors")
    return root / "m.safetensors"


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint.parent, checkpoint) as srv:
        yield srv


@pytest.fixture(scope="module")
def policy(checkpoint):
    return load_policy(checkpoint)


@pytest.fixture
def client(server):
    client = RawClient(server.zmq_endpoint)
    yield client
    client.close()


def _obs(policy, seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in observation(policy, batch=1, seed=seed).items()}


def _prefix(k: int = 6) -> np.ndarray:
    return np.linspace([150.0, 200.0], [300.0, 260.0], k).astype(np.float32)


def _infer(obs: dict, rid: int = 1, **options) -> dict:
    return {"type": "infer", "id": rid, "protocol": PROTOCOL_VERSION, "obs": obs, "options": options}


def _expected(policy, obs, seed, prefixes, n_actions=None) -> np.ndarray:
    out = policy.predict_action({k: v[None] for k, v in obs.items()}, seed=seed, prefixes=prefixes)
    start = policy.config.n_obs_steps - 1
    return out["action_pred"][0, start : start + (n_actions or policy.config.n_action_steps)]


def test_wire_choices_and_defaults_are_the_samplers():
    assert RTC_SCHEDULES == ("exp", "linear", "hard") and RTC_METHODS == ("guided", "replace")
    assert RTC_DEFAULTS == {"schedule": "exp", "max_guidance": DEFAULT_MAX_GUIDANCE, "method": "guided"}
    assert ActionPrefix(_prefix(), 1).schedule == RTC_DEFAULTS["schedule"]


def test_hello_advertises_real_time_chunking(client):
    hello = client.call({"type": "hello", "id": 1})
    assert hello["protocol"] == PROTOCOL_VERSION == 1
    assert hello["capabilities"]["rtc"] == {
        "schedules": ["exp", "linear", "hard"],
        "methods": ["guided", "replace"],
        "defaults": RTC_DEFAULTS,
        "max_prefix": 7,  # horizon 8 - n_obs_steps 2 + 1
    }


def test_prefix_round_trip(client, policy):
    obs = _obs(policy)
    prefix = _prefix()
    # Replacement: the frozen actions come back exactly, the rest as the in-process policy samples it.
    reply = client.call(_infer(obs, seed=4, prefix=prefix, delay=2, rtc={"method": "replace"}))
    assert reply["ok"], reply
    assert np.array_equal(reply["action"][:2], prefix[:2])
    expected = _expected(policy, obs, 4, [ActionPrefix(prefix, 2, method="replace")])
    np.testing.assert_allclose(reply["action"], expected, atol=TOLERANCE_PX, rtol=0)
    # Guided, with the defaults spelled out or not, and the whole reach.
    for rtc in ({}, {"schedule": "exp", "max_guidance": 40.0}):
        reply = client.call(_infer(obs, seed=4, prefix=prefix, delay=3, rtc=rtc, n_action_steps=7))
        assert reply["ok"], reply
        expected = _expected(policy, obs, 4, [ActionPrefix(prefix, 3)], n_actions=7)
        np.testing.assert_allclose(reply["action"], expected, atol=TOLERANCE_PX, rtol=0)
    # d = 0 with an empty prefix, or no prefix with rtc options: a plain request.
    plain = client.call(_infer(obs, seed=4))["action"]
    empty = client.call(_infer(obs, seed=4, prefix=np.zeros((0, 2), np.float32), delay=0))
    assert np.array_equal(empty["action"], plain)
    assert np.array_equal(client.call(_infer(obs, seed=4, rtc={"schedule": "hard"}))["action"], plain)


def test_a_batched_request_carries_one_prefix_per_row(client, policy):
    obs = observation(policy, batch=2, seed=1)
    prefixes = np.stack([_prefix(), _prefix()[::-1]])
    reply = client.call(_infer(obs, seed=6, prefix=prefixes, delay=1, rtc={"schedule": "linear"}))
    assert reply["ok"], reply
    out = policy.predict_action(obs, seed=6, prefixes=[ActionPrefix(p, 1, "linear") for p in prefixes])[
        "action"
    ]
    np.testing.assert_allclose(reply["action"], out, atol=TOLERANCE_PX, rtol=0)


def test_requests_with_and_without_prefixes_batch_together(server, policy):
    """Queued together, each request gets what it gets alone."""
    cases = [
        ({}, None),
        ({"prefix": _prefix(), "delay": 2}, ActionPrefix(_prefix(), 2)),
        (
            {"prefix": _prefix(5), "delay": 1, "rtc": {"method": "replace"}},
            ActionPrefix(_prefix(5), 1, method="replace"),
        ),
        (
            {"prefix": _prefix(), "delay": 0, "rtc": {"max_guidance": 20.0}},
            ActionPrefix(_prefix(), 0, max_guidance=20.0),
        ),
    ]
    before = server.metrics.stats()["max_batch_size"]
    client = RawClient(server.zmq_endpoint)
    try:
        for _ in range(3):  # until some requests shared a batch
            for i, (options, _) in enumerate(cases):
                client.send(_infer(_obs(policy, seed=i), rid=i, seed=10 + i, **options))
            replies = {r["id"]: r for r in (client.recv() for _ in cases)}
            for i, (_, prefix) in enumerate(cases):
                assert replies[i]["ok"], replies[i]
                expected = _expected(policy, _obs(policy, seed=i), 10 + i, [prefix])
                np.testing.assert_allclose(replies[i]["action"], expected, atol=TOLERANCE_PX, rtol=0)
            if server.metrics.stats()["max_batch_size"] > 1:
                break
    finally:
        client.close()
    assert max(before, server.metrics.stats()["max_batch_size"]) > 1


BAD_OPTIONS = [
    ({"prefix": _prefix().astype(np.float64)}, "must be float32"),
    ({"prefix": np.zeros(4, np.float32)}, "must be a float32 array"),
    ({"prefix": [[1.0, 2.0]]}, "must be a float32 array"),
    ({"prefix": np.full((3, 2), np.nan, np.float32)}, "NaN or Inf"),
    ({"prefix": np.array([[np.inf, 0]], np.float32)}, "NaN or Inf"),
    ({"prefix": _prefix(3), "delay": 4}, "delay 4 > k = 3"),
    ({"delay": 1}, "no options.prefix"),
    ({"prefix": _prefix(), "delay": -1}, "options.delay must be"),
    ({"prefix": _prefix(), "delay": True}, "options.delay must be"),
    ({"prefix": _prefix(8)}, "k <= 7"),  # longer than a chunk
    ({"prefix": np.zeros((3, 3), np.float32)}, "action_dim must be 2"),
    ({"prefix": np.zeros((1, 3, 2), np.float32)}, "expected [k, action_dim]"),  # batch axis, obs has none
    ({"prefix": _prefix(), "rtc": "exp"}, "options.rtc must be a map"),
    ({"prefix": _prefix(), "rtc": {"schedule": "cosine"}}, "options.rtc.schedule"),
    ({"prefix": _prefix(), "rtc": {"method": "magic"}}, "options.rtc.method"),
    ({"prefix": _prefix(), "rtc": {"max_guidance": 0}}, "max_guidance"),
    ({"prefix": _prefix(), "rtc": {"max_guidance": float("nan")}}, "max_guidance"),
    ({"prefix": _prefix(), "rtc": {"horizon": 4}}, "unknown options.rtc key"),
    ({"prev_actions": _prefix()}, "unknown option"),
]


def test_bad_prefixes_get_typed_errors_and_the_server_keeps_serving(client, policy):
    obs = _obs(policy)
    for options, message in BAD_OPTIONS:
        client.send_raw(pack(_infer(obs, **options)))
        reply = client.recv()
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (options, reply)
        assert message in reply["error"]["message"], (message, reply["error"]["message"])
    batched = observation(policy, batch=2)
    for prefix in (_prefix(), np.zeros((3, 6, 2), np.float32)):  # no batch axis; 3 rows for 2
        reply = client.call(_infer(batched, prefix=prefix))
        assert reply["error"]["code"] == "bad_request" and "[B, k, action_dim]" in reply["error"]["message"]
    reply = client.call(_infer(obs, seed=1, prefix=_prefix(), delay=2))
    assert reply["ok"] and np.isfinite(reply["action"]).all()
