import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import zmq
from helpers import TickEnv, tiny_policy
from server_helpers import running_server

from clients.policy_client import (
    ObservationHistory,
    PolicyClient,
    RequestTimeout,
    SchemaMismatch,
    ServerError,
)
from clients.runner import ActionChunkRunner
from policy_core import save_policy
from proto.codec import pack, unpack

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client")
    mx.random.seed(3)
    save_policy(tiny_policy(image=True), root / "m.safetensors")
    return root / "m.safetensors"


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint.parent, checkpoint) as srv:
        yield srv


def step_obs(value: float = 0.0) -> dict[str, np.ndarray]:
    return {"image": np.full((72, 72, 3), 7, np.uint8), "agent_pos": np.full(2, value, np.float32)}


def test_observation_history_pads_with_the_first_observation():
    history = ObservationHistory(3)
    history.append({"x": np.array([1.0])})
    assert history.stacked()["x"].tolist() == [[1.0], [1.0], [1.0]]
    history.append({"x": np.array([2.0])})
    history.append({"x": np.array([3.0])})
    history.append({"x": np.array([4.0])})
    assert history.stacked()["x"].tolist() == [[2.0], [3.0], [4.0]]
    history.reset()
    history.append({"x": np.array([9.0])})
    assert history.stacked()["x"].tolist() == [[9.0], [9.0], [9.0]]


def test_client_infers_with_history_and_reports_timing(server):
    with PolicyClient(server.zmq_endpoint) as client:
        assert client.server_info["n_obs_steps"] == 2
        assert client.ping() > 0
        client.reset()
        result = client.infer(step_obs(1.0), seed=3)
        assert result.actions.shape == (4, 2) and result.actions.dtype == np.float32
        assert result.model["version"] == 1
        assert result.round_trip_ms >= result.server_timing["server_ms"] > 0
        # The padded history is what was sent: same answer as an explicit (2, ...) stack.
        stacked = {k: np.stack([v, v]) for k, v in step_obs(1.0).items()}
        again = client.infer_stacked(stacked, seed=3)
        np.testing.assert_array_equal(result.actions, again.actions)
        with pytest.raises(SchemaMismatch, match="agent_pos"):
            client.infer({"image": step_obs()["image"], "agent_pos": np.zeros(3, np.float32)})
        with pytest.raises(ServerError, match="bad_request"):
            client.infer(step_obs(), scheduler="euler")


def test_expected_schema_mismatch_fails_at_hello(server):
    with pytest.raises(SchemaMismatch, match="server expects"):
        PolicyClient(server.zmq_endpoint, expected_schema={"state": {"shape": [2, 5], "dtype": "float32"}})


def test_timeout_is_typed_and_the_next_call_works(server):
    with PolicyClient(server.zmq_endpoint, timeout_s=10) as client:
        client.observe(step_obs())
        client.timeout_s = 0.001  # shorter than any DDPM-100 inference
        with pytest.raises(RequestTimeout):
            client.infer(scheduler="ddpm", num_inference_steps=100)
        client.timeout_s = 10
        result = client.infer(seed=1)  # the late reply of the timed-out call is never mistaken for this one
        assert result.actions.shape == (4, 2)


def test_unreachable_server_times_out():
    with pytest.raises(RequestTimeout, match="no connection"):
        PolicyClient("tcp://127.0.0.1:9", timeout_s=0.3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(checkpoint: Path, address: str) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "dpmlx.py"), "serve", "--checkpoint", str(checkpoint), "--zmq", address,
         "--http", "127.0.0.1:0"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stderr:
        if re.search(r"serving \S+ v1", line):
            return proc, time.monotonic()
    raise AssertionError("server did not start")


def test_client_recovers_after_server_restart(checkpoint):
    address = f"tcp://127.0.0.1:{_free_port()}"
    proc, _ = _start_server(checkpoint, address)
    successes: list[float] = []
    failures: list[str] = []
    stop = threading.Event()
    client = PolicyClient(address, timeout_s=0.5)
    client.observe(step_obs())

    def loop() -> None:
        while not stop.is_set():
            try:
                client.infer(seed=0)
                successes.append(time.monotonic())
            except (RequestTimeout, ServerError) as e:
                failures.append(type(e).__name__)
                time.sleep(0.02)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        assert _wait(lambda: len(successes) >= 3, 30)
        proc.kill()  # mid-loop, no goodbye
        proc.wait()
        killed = time.monotonic()
        time.sleep(1.0)
        assert not [t for t in successes if t > killed + 0.1]
        proc, ready = _start_server(checkpoint, address)
        assert _wait(lambda: any(t > ready for t in successes), 10)
        recovered = min(t for t in successes if t > ready) - ready
        assert recovered < 1.0, recovered
        assert "RequestTimeout" in failures
    finally:
        stop.set()
        thread.join()
        client.close()
        proc.kill()
        proc.wait()


def _wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


class SlowStubServer(threading.Thread):
    """Speaks the real protocol on a real socket, one request at a time; answers infer after `latency_s`
    with actions whose value is the tick they belong to (last observed tick + i), so alignment shows."""

    def __init__(self, latency_s: float, horizon: int = 16, n_action_steps: int = 8):
        super().__init__(daemon=True)
        self.latency_s, self.n_action_steps, self.horizon = latency_s, n_action_steps, horizon
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.stop = threading.Event()
        self.requests = 0

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
                    "action": {"dim": 1, "horizon": self.horizon, "n_action_steps": self.n_action_steps},
                    "n_obs_steps": 2,
                    "control_hz": 10.0,
                }
            elif msg["type"] == "infer":
                self.requests += 1
                time.sleep(self.latency_s)
                last_tick = float(msg["obs"]["tick"][-1, 0])
                n = msg.get("options", {}).get("n_action_steps", self.n_action_steps)
                actions = (last_tick + np.arange(n, dtype=np.float32))[:, None]
                timing = {"server_ms": self.latency_s * 1e3, "queue_ms": 0.0, "infer_ms": 0.0}
                reply |= {"action": actions, "model": {"name": "stub", "version": 1, "sha256": "0" * 64}}
                reply["timing"] = timing
            self.sock.send_multipart([*envelope, pack(reply)])
        self.sock.close()


def test_runner_hides_latency_of_60_percent_of_a_chunk():
    stub = SlowStubServer(latency_s=0.48)  # chunk = 8 actions at 10 Hz = 0.8 s
    stub.start()
    try:
        env = TickEnv()
        with PolicyClient(stub.endpoint, timeout_s=5) as client:
            runner = ActionChunkRunner(client, env, realtime=True)
            started = time.perf_counter()
            result = runner.run_episode(max_steps=40)
            elapsed = time.perf_counter() - started
        assert result.steps == 40
        assert result.starved_ticks == 0
        # Every tick executed the action planned for that very tick: stale actions were dropped.
        assert [float(a[0]) for a in env.executed] == [float(t) for t in range(40)]
        assert result.chunks >= 5 and result.dropped_actions > 0
        assert 3.9 * 0.9 < elapsed < 3.9 * 1.3 + 0.5  # a real 10 Hz loop (plus the first chunk's wait)
    finally:
        stub.stop.set()
        stub.join()


def test_runner_synchronous_mode_executes_whole_chunks():
    stub = SlowStubServer(latency_s=0.0)
    stub.start()
    try:
        env = TickEnv()
        with PolicyClient(stub.endpoint) as client:
            result = ActionChunkRunner(client, env, realtime=False).run_episode(max_steps=20)
        assert [float(a[0]) for a in env.executed] == [float(t) for t in range(20)]
        assert result.chunks == 3 and result.starved_ticks == 0  # ceil(20 / 8) requests, like upstream
    finally:
        stub.stop.set()
        stub.join()


def test_weighted_merge_blends_overlap():
    runner = ActionChunkRunner.__new__(ActionChunkRunner)
    runner.merge, runner.merge_weight = "weighted", 0.7
    queue = {5: np.array([0.0]), 6: np.array([0.0])}
    dropped = runner._merge(queue, np.full((4, 1), 10.0), first_tick=4, now_tick=5)
    assert dropped == 1
    assert queue[5][0] == pytest.approx(7.0) and queue[6][0] == pytest.approx(7.0) and queue[7][0] == 10.0


def test_bench_latency_against_a_live_server(server, tmp_path):
    out = tmp_path / "lat.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "dpmlx.py"), "bench", "latency", "--server", server.zmq_endpoint,
         "--clients", "2", "--requests", "20", "--warmup", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["requests"] == 20 and report["errors"] == 0
    for key in ("round_trip_ms", "server_ms", "queue_ms", "infer_ms", "overhead_ms"):
        assert report[key]["p50"] <= report[key]["p99"] <= report[key]["max"]
    assert report["round_trip_ms"]["p50"] >= report["server_ms"]["p50"] >= report["infer_ms"]["p50"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "round_trip_ms" in result.stdout


def test_bench_latency_without_a_server_says_why_and_writes_under_runs(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "dpmlx.py"), "bench", "latency", "--server", f"tcp://127.0.0.1:{port}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"no connection to tcp://127.0.0.1:{port} within 3.00 s" in result.stderr, result.stderr
    assert time.monotonic() - start < 30  # the connection timeout, not the 60 s request timeout
    assert json.loads((tmp_path / "runs/latency.json").read_text())["errors"] == 1
    assert not (tmp_path / "benchmarks").exists()


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"mlx", "fastapi", "uvicorn", "pymunk", "yaml"}:
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_client_imports_without_mlx_fastapi_or_pymunk():
    code = BLOCKER + (
        "import clients.policy_client, clients.runner, clients.bench, proto.codec, proto.messages\n"
        "import numpy as np\n"
        "from proto.codec import pack, unpack\n"
        "assert unpack(pack({'a': np.ones(3, np.float32)}))['a'].sum() == 3\n"
        "assert not {'mlx', 'fastapi', 'pymunk', 'policy_core', 'server', 'trainer'} & set(sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # The CLI says what is missing instead of a traceback.
    cli = subprocess.run(
        [sys.executable, "-c", BLOCKER + "import dpmlx; sys.exit(dpmlx.main(['info']))"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert cli.returncode == 2 and "diffusion-policy-mlx[server]" in cli.stderr
    # Training needs more than the server: the hint names the extra that brings all of it.
    for argv in (["train", "--config", "configs/tiny_smoke.yaml"], ["data", "pusht", "--episodes", "1",
                 "--out", "x.zarr"]):  # fmt: skip
        cli = subprocess.run(
            [sys.executable, "-c", BLOCKER + f"import dpmlx; sys.exit(dpmlx.main({argv!r}))"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        assert cli.returncode == 2 and "pip install -e '.[train]'" in cli.stderr, (argv, cli.stderr)
        assert "Traceback" not in cli.stderr


# What the client-only wheel leaves out (see pyproject.toml): the full product's packages.
PRODUCT_BLOCKER = BLOCKER.replace('"yaml"}', '"yaml", "policy_core", "server", "trainer", "benchmarks"}')


def test_cli_of_the_client_only_install_lists_and_explains_the_full_products_commands():
    def dpmlx(*argv: str) -> subprocess.CompletedProcess:
        code = PRODUCT_BLOCKER + f"import dpmlx; sys.exit(dpmlx.main({list(argv)!r}))"
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)

    listed = dpmlx("--help")
    assert listed.returncode == 0 and "serve" in listed.stdout and "client-only" in listed.stdout
    assert dpmlx("bench", "latency", "--help").returncode == 0
    for argv, extra in ((["serve", "--checkpoint", "m.safetensors"], "server"), (["info"], "server"),
                        (["train", "--config", "c.yaml"], "train"), (["demo"], "server,sim"),
                        (["bench", "policy", "--help"], "server")):  # fmt: skip
        result = dpmlx(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert "part of the full product" in result.stderr and f"pip install -e '.[{extra}]'" in result.stderr
        assert "Traceback" not in result.stderr


def test_dockerfile_client_install_steps_in_a_fresh_venv(tmp_path):
    """The Dockerfile's steps (its COPY lines, within .dockerignore; pip install '.[plot,sim]') in a new
    venv: only the client is copied and installed."""
    dockerfile = (ROOT / "Dockerfile.client").read_text()
    assert "pip install --no-cache-dir '.[plot,sim]'" in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M), "the client must not run as root"
    # .dockerignore is an allowlist: "*", then "!name" for what the build context may hold.
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    src = tmp_path / "src"
    src.mkdir()
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    for name in (name for sources in copies for name in sources):
        assert name in allowed, f"{name} is copied but .dockerignore keeps it out of the context"
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy(ROOT / name, src / name)
    assert not {"server", "policy_core", "trainer", "data", "runs"} & {p.name for p in src.iterdir()}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-cache-dir", ".[plot,sim]"]
    subprocess.run(
        pip, cwd=src, check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, timeout=900
    )
    # What the project itself installs: the client's modules, tens of kB (17 MB with the server's weights).
    (record,) = venv.glob("lib/python*/site-packages/diffusion_policy_mlx-*.dist-info/RECORD")
    ours = [line.split(",")[0] for line in record.read_text().splitlines()]
    assert {p.split("/")[0] for p in ours if not p.startswith(("diffusion_policy_mlx-", "../"))} == {
        "clients", "proto", "dpmlx.py", "__pycache__"
    }  # fmt: skip
    size = sum(
        (record.parent.parent / p).stat().st_size for p in ours if (record.parent.parent / p).is_file()
    )
    assert size < 500_000, size
    assert not list(venv.rglob("*.safetensors"))
    freeze = subprocess.run([str(venv / "bin/python"), "-m", "pip", "freeze"], capture_output=True, text=True)
    installed = {line.split("==")[0].lower() for line in freeze.stdout.splitlines()}
    assert {"numpy", "pyzmq", "msgpack", "matplotlib", "pymunk", "gymnasium"} <= installed
    assert not {"mlx", "mlx-cpu", "fastapi", "uvicorn", "zarr"} & installed
    help_text = subprocess.run(
        [str(venv / "bin/dpmlx"), "bench", "latency", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert help_text.returncode == 0 and "--clients" in help_text.stdout
    eval_help = subprocess.run(
        [str(venv / "bin/dpmlx"), "eval", "pusht", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert eval_help.returncode == 0 and "--start-seed" in eval_help.stdout
