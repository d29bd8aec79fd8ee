"""Property-based fuzzing of the server's input: every message gets a typed answer, the server lives on."""

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_policy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import RawClient, running_server

from policy_core import save_policy
from proto.codec import pack
from proto.messages import ErrorCode

CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    mx.random.seed(0)
    save_policy(tiny_policy(image=False), root / "m.safetensors")
    with running_server(root, root / "m.safetensors") as srv:
        c = RawClient(srv.zmq_endpoint, timeout_s=30)
        yield c
        c.close()


def assert_typed_reply(reply) -> None:
    assert isinstance(reply, dict) and "ok" in reply
    if not reply["ok"]:
        assert reply["error"]["code"] in CODES and isinstance(reply["error"]["message"], str)
        # Bad input is the client's fault: "internal" here would mean validation missed a case.
        assert reply["error"]["code"] != ErrorCode.INTERNAL, reply


def assert_alive(client) -> None:
    assert client.call({"type": "ping", "id": "alive"})["ok"]


@FUZZ
@given(frames=st.lists(st.binary(max_size=512), min_size=1, max_size=4))
def test_raw_frames(client, frames):
    client.send_raw(*frames)
    assert_typed_reply(client.recv())
    assert_alive(client)


def _array(dtype: str, shape: tuple, fill: float) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.full(shape, fill).astype(dtype)


arrays = st.builds(
    _array,
    st.sampled_from(["uint8", "int64", "float16", "float32", "float64", "bool"]),
    st.lists(st.integers(0, 4), max_size=4).map(tuple),
    st.sampled_from([0, 1, -1, 1e9, np.nan, np.inf]),
)
leaves = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=8) | arrays
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
obs_maps = st.dictionaries(st.sampled_from(["agent_pos", "image", "state", ""]), values, max_size=3)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["infer", "hello", "ping", "reset", "bogus"]) | values},
    optional={
        "id": values,
        "obs": obs_maps | values,
        "options": st.fixed_dictionaries(
            {},
            optional={
                "seed": values,
                "scheduler": st.sampled_from(["ddim", "ddpm", "x"]) | values,
                "num_inference_steps": st.integers(-5, 200) | values,
            },
        )
        | values,
        "protocol": st.sampled_from([1, 2]) | values,
    },
)


@FUZZ
@given(message=messages)
def test_well_formed_but_wrong_messages(client, message):
    client.send_raw(pack(message))
    assert_typed_reply(client.recv())
    assert_alive(client)


@FUZZ
@given(
    dtype=st.text(max_size=12) | st.sampled_from(["|O", "<c8", "|V4", "<U2", "<f4", "|u1"]),
    shape=st.lists(st.integers(-2, 2**40), max_size=10) | values,
    data=st.binary(max_size=64),
)
def test_malformed_array_encodings(client, dtype, shape, data):
    arr = {"__ndarray__": True, "data": data, "dtype": dtype, "shape": shape}
    client.send_raw(pack({"type": "infer", "id": 1, "obs": {"agent_pos": arr}}))
    reply = client.recv()
    assert_typed_reply(reply)
    assert reply["ok"] is False
    assert_alive(client)
