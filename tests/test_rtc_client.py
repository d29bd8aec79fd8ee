"""The robot side of real-time chunking: ActionChunkRunner's merges under a simulated (or real) delay, and
the delayed PushT evaluator (clients/runner.py, clients/sim/eval_pusht.py)."""

import argparse
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
import zmq
from helpers import TickEnv, fitted_normalizer, tiny_config
from server_helpers import running_server

from clients.policy_client import PolicyClient
from clients.runner import ActionChunkRunner
from clients.sim.cli import add_eval_arguments
from clients.sim.eval_pusht import evaluate, main, second_differences
from policy_core import build_policy, save_policy
from proto.codec import pack, unpack


class ChunkStub(threading.Thread):
    """Speaks the protocol on a real socket; records each infer's options and answers with actions
    [tick, request number] (tick = the last observed tick + i), so alignment and sources show."""

    def __init__(self, latency_s: float = 0.0):
        super().__init__(daemon=True)
        self.latency_s = latency_s
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.stop = threading.Event()
        self.requests: list[dict] = []  # {"tick", "options"}

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            *envelope, payload = self.sock.recv_multipart()
            msg = unpack(payload)
            reply = {"type": msg["type"], "id": msg["id"], "ok": True}
            if msg["type"] == "hello":
                reply |= {
                    "protocol": 1,
                    "model": {"name": "stub", "version": 1, "sha256": "0" * 64},
                    "obs_schema": {"tick": {"shape": [2, 1], "dtype": "float32"}},
                    "action": {"dim": 2, "horizon": 16, "n_action_steps": 8},
                    "n_obs_steps": 2,
                    "control_hz": 10.0,
                }
            elif msg["type"] == "infer":
                time.sleep(self.latency_s)
                tick = float(msg["obs"]["tick"][-1, 0])
                options = msg.get("options", {})
                n = options.get("n_action_steps", 8)
                actions = np.stack([tick + np.arange(n), np.full(n, len(self.requests))], axis=1)
                self.requests.append({"tick": int(tick), "options": options})
                reply |= {
                    "action": actions.astype(np.float32),
                    "model": {"name": "stub", "version": 1, "sha256": "0" * 64},
                    "timing": {"server_ms": 0.0, "queue_ms": 0.0, "infer_ms": 0.0},
                }
            self.sock.send_multipart([*envelope, pack(reply)])
        self.sock.close()


@pytest.fixture
def stub():
    stub = ChunkStub()
    stub.start()
    yield stub
    stub.stop.set()
    stub.join()


def _run(stub, ticks: int = 30, **kwargs):
    env = TickEnv()
    with PolicyClient(stub.endpoint) as client:
        result = ActionChunkRunner(client, env, **kwargs).run_episode(max_steps=ticks)
    return np.stack(env.executed), result


def test_rtc_sends_the_queued_actions_and_switches_at_the_planned_tick(stub):
    executed, result = _run(stub, realtime=False, merge="rtc", delay_ticks=2)
    assert stub.requests[0]["options"] == {"n_action_steps": 15}  # nothing queued yet: a plain request
    switches = []
    for number, request in enumerate(stub.requests[1:], start=1):
        tick, options = request["tick"], request["options"]
        prefix = options["prefix"]
        # Every action still queued from the observation's tick on, in order (the old chunk's tail).
        assert prefix.dtype == np.float32 and prefix.shape == (
            15 - (tick - stub.requests[number - 1]["tick"]),
            2,
        )
        assert np.array_equal(prefix[:, 0], tick + np.arange(len(prefix)))
        assert np.all(prefix[:, 1] == number - 1) and options["delay"] == 2
        switches.append(tick + 2)
    # Each chunk's own actions run out as the next arrives: requests 6 ticks apart, switches 2 after.
    assert [r["tick"] for r in stub.requests] == [0, 6, 12, 18, 24]
    assert np.array_equal(executed[:, 0], np.arange(30))  # every action for its own tick
    source = executed[:, 1].astype(int)
    assert [t for t in range(1, 30) if source[t] != source[t - 1]] == switches[: len(set(source)) - 1]
    assert result.sources == source.tolist() and result.starved_ticks == 0


def test_naive_switches_when_the_chunk_arrives_and_sync_waits_for_it(stub):
    executed, result = _run(stub, realtime=False, merge="latest", delay_ticks=3)
    assert [r["tick"] for r in stub.requests] == [0, 5, 10, 15, 20, 25]
    assert np.array_equal(executed[:, 0], np.arange(30)) and result.starved_ticks == 0
    source = executed[:, 1].astype(int)
    assert [t for t in range(1, 30) if source[t] != source[t - 1]] == [8, 13, 18, 23, 28]
    stub.requests.clear()
    executed, result = _run(stub, ticks=24, realtime=False, prefetch=False, delay_ticks=3)
    # Synchronous: 8 actions, then 3 ticks holding the last one while the next chunk is computed; the
    # chunk starts where it arrives (the robot waited), with the action for its observation's tick.
    assert [r["tick"] for r in stub.requests] == [0, 8, 19]
    assert all(r["options"] == {} for r in stub.requests)
    assert executed[:, 0].tolist() == [*range(8), 7, 7, 7, *range(8, 16), 15, 15, 15, 19, 20]
    assert result.starved_ticks == 6 and result.chunks == 3


def test_ensemble_averages_every_chunks_action_for_a_tick():
    runner = ActionChunkRunner.__new__(ActionChunkRunner)
    runner.merge, runner.ensemble_decay, runner._ensemble = "ensemble", 0.5, {}
    queue: dict[int, np.ndarray] = {}
    sources: dict[int, int] = {}
    runner._merge(queue, np.full((3, 1), 2.0), first_tick=0, now_tick=0, sources=sources, index=0)
    runner._merge(queue, np.full((3, 1), 8.0), first_tick=1, now_tick=1, sources=sources, index=1)
    w = np.exp(-0.5)  # the second prediction of a tick weighs exp(-m)
    assert queue[0][0] == 2.0 and queue[3][0] == 8.0
    assert queue[1][0] == pytest.approx((2.0 + 8.0 * w) / (1 + w)) == queue[2][0]
    assert sources == {0: 0, 1: 1, 2: 1, 3: 1}


def test_realtime_rtc_plans_the_measured_delay_and_never_switches_early():
    stub = ChunkStub(latency_s=0.25)  # 2.5 ticks at 10 Hz: a delay of 3
    stub.start()
    try:
        executed, result = _run(stub, ticks=25, realtime=True, merge="rtc")
    finally:
        stub.stop.set()
        stub.join()
    assert result.starved_ticks == 0 and np.array_equal(executed[:, 0], np.arange(25))
    source = executed[:, 1].astype(int)
    planned = {n: r["tick"] + r["options"]["delay"] for n, r in enumerate(stub.requests) if n}
    assert planned and all(r["options"]["delay"] >= 3 for r in stub.requests[1:])
    for t in range(1, 25):
        if source[t] != source[t - 1]:
            assert t >= planned[source[t]]


def test_second_differences_split_switches_from_the_inside_of_chunks():
    actions = [np.array([x, 0.0]) for x in (0, 1, 2, 3, 10, 11, 12)]
    at_switch, inside = second_differences(actions, [0, 0, 0, 0, 1, 1, 1])
    assert at_switch.tolist() == [6.0]  # |a[5] - 2 a[4] + a[3]| = |11 - 20 + 3|
    assert inside.tolist() == [0.0, 0.0, 6.0, 0.0]


def _eval(endpoint: str, execution: str, delay: int) -> dict:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        ["--server", endpoint, "--episodes", "2", "--max-steps", "25", "--delay", str(delay),
         "--execution", execution]
    )  # fmt: skip
    return evaluate(args)


def test_the_delayed_evaluator_is_deterministic_for_a_seed_and_delay(tmp_path):
    config = tiny_config(image=False)
    config["shape_meta"]["obs"] = {"keypoint": {"shape": [20], "type": "low_dim"}}
    mx.random.seed(0)
    save_policy(build_policy(config, fitted_normalizer(config)), tmp_path / "m.safetensors")
    with running_server(tmp_path, tmp_path / "m.safetensors") as srv:
        for execution, delay in (("rtc", 2), ("ensemble", 1), ("sync", 2)):
            first, again = (
                _eval(srv.zmq_endpoint, execution, delay),
                _eval(srv.zmq_endpoint, execution, delay),
            )
            assert first["per_episode"] == again["per_episode"], execution
            assert first["second_difference_px"] == again["second_difference_px"]
            assert first["execution"] == execution and first["delay"] == delay
            assert first["second_difference_px"]["switch"]["n"] > 0
        assert all(e["starved_ticks"] > 0 for e in first["per_episode"])  # sync holds while it waits
        other = _eval(srv.zmq_endpoint, "rtc", 1)
        assert other["per_episode"] != _eval(srv.zmq_endpoint, "rtc", 2)["per_episode"]


def test_a_delay_with_the_wall_clock_is_refused_before_any_connection(capsys):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--server", "tcp://127.0.0.1:1", "--realtime", "--delay", "2"])
    assert main(args) == 2
    assert "--delay must be >= 0 and is simulated: not with --realtime" in capsys.readouterr().err
