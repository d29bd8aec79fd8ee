import argparse
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DPMLX = [sys.executable, str(ROOT / "dpmlx.py")]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DPMLX, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def start_serve(*args: str, until: str) -> tuple[subprocess.Popen, list[str]]:
    """``dpmlx serve ARGS`` and its log up to the first line containing ``until``."""
    proc = subprocess.Popen([*DPMLX, "serve", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log = []
    for line in proc.stderr:
        log.append(line)
        if until in line:
            break
    return proc, log


def test_info_reports_backend_memory_and_blas():
    result = run("info")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert fields["backend"] in {"CPU", "Metal", "CUDA"}
    assert fields["mlx"][0].isdigit()
    assert fields["memory_limit"].endswith("GiB")
    assert "cpu_blas" in fields


def test_bench_policy_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "policy", "--configs", "lowdim", "--samplers", "ddim10", "--iters", "2",
                 "--warmup", "1", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["config"] == "lowdim" and row["sampler"] == "ddim10" and row["n"] == 2
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert report["environment"]["backend"] in {"CPU", "Metal", "CUDA"}


def test_serve_finishes_in_flight_requests_on_sigterm(tmp_path):
    import signal
    import time

    import mlx.core as mx
    import zmq
    from helpers import observation, tiny_policy

    from policy_core import save_policy
    from proto.codec import pack, unpack

    mx.random.seed(0)
    policy = tiny_policy(image=True)
    save_policy(policy, tmp_path / "m.safetensors")
    endpoint = f"ipc://{tmp_path}/serve.ipc"
    proc, log = start_serve(
        "--checkpoint",
        str(tmp_path / "m.safetensors"),
        "--zmq",
        endpoint,
        "--http",
        "127.0.0.1:0",
        until="serving m v1",
    )
    try:
        assert any("control plane on http://127.0.0.1:" in line for line in log), log
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 60_000)
        sock.connect(endpoint)
        obs = {k: v[0] for k, v in observation(policy, batch=1).items()}
        n = 30  # enough DDPM-100 work to still be running when the signal arrives
        for i in range(n):
            sock.send(
                pack({"type": "infer", "id": i, "obs": obs, "options": {"scheduler": "ddpm", "seed": i}})
            )
        # The front end answers a ping in order after it has queued every request before it: then the
        # signal finds them all received, however busy the machine.
        sock.send(pack({"type": "ping", "id": "sync"}))
        replies = [unpack(sock.recv())]
        while replies[-1]["type"] != "ping":
            replies.append(unpack(sock.recv()))
        proc.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        replies = [r for r in replies if r["type"] == "infer"]
        replies += [unpack(sock.recv()) for _ in range(n - len(replies))]
        # The last reply was still being computed when the signal arrived, and it was not dropped.
        assert time.perf_counter() - signalled > 0.05
        assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
        assert proc.wait(timeout=60) == 0
        sock.close()
    finally:
        proc.kill()
        proc.wait()


def test_serve_exits_with_one_typed_line_when_its_checkpoint_cannot_be_loaded(tmp_path):
    import numpy as np

    missing = tmp_path / "missing.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    for path, error in ((missing, "CheckpointError"), (truncated, "CheckpointCorruptError"),
                        (random_bytes, "CheckpointCorruptError")):  # fmt: skip
        result = run(
            "serve", "--checkpoint", str(path), "--zmq", f"ipc://{tmp_path}/s.ipc", "--http", "127.0.0.1:0"
        )
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if " ERROR " in line or "Traceback" in line]
        assert len(errors) == 1 and f"cannot serve: {error}: {path}" in errors[0], result.stderr
        assert errors[0].count(str(path)) == 1 and " WARNING " not in result.stderr


def test_serve_waits_for_a_checkpoint_in_an_empty_watched_folder_and_says_so(tmp_path):
    import signal

    proc = subprocess.Popen(
        [*DPMLX, "serve", "--watch", str(tmp_path), "--zmq", f"ipc://{tmp_path}/s.ipc",
         "--http", "127.0.0.1:0"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = threading.Timer(120, proc.kill)  # never hang on a server that does not say it
    deadline.start()
    try:
        for line in proc.stderr:
            if "waiting for a checkpoint in" in line:
                break
        assert f"waiting for a checkpoint in {tmp_path}" in line and "/readyz answers 503" in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        deadline.cancel()
        proc.kill()
        proc.wait()


def test_demo_serves_the_shipped_policy_and_runs_episodes(tmp_path):
    result = run(
        "demo",
        "--episodes",
        "1",
        "--max-steps",
        "15",
        "--video",
        str(tmp_path),
        "--json",
        str(tmp_path / "d.json"),
    )
    assert result.returncode == 0, result.stderr
    assert "mean score" in result.stdout and "chunk round trip" in result.stdout
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["model"]["name"] == "pusht-keypoint-small" and report["episodes"] == 1
    assert len(list(tmp_path.glob("*.gif"))) == 1
    assert report["noise_seed"] == 0  # seeded by default: two runs print the same score
    lines = result.stdout.splitlines()
    assert (
        lines[0].startswith("loading the shipped PushT policy")
        and "episode 1/1  seed 100000" in result.stdout
    )
    assert f"GIFs in {tmp_path}/: pusht_seed100000.gif" in lines
    assert (tmp_path / "latency.png").is_file() and str(tmp_path / "latency.png") in lines[-1]


def test_shipped_policy_matches_its_config():
    import yaml

    from policy_core import read_checkpoint
    from policy_core.config import PolicyConfig
    from server.app import config_from_args
    from server.cli import add_arguments
    from server.models import SHIPPED_CHECKPOINT

    ckpt = read_checkpoint(SHIPPED_CHECKPOINT)
    shipped = yaml.safe_load((ROOT / "configs/pusht_keypoint_small.yaml").read_text())["policy"]
    assert PolicyConfig.from_dict(ckpt.metadata["config"]) == PolicyConfig.from_dict(shipped)
    assert SHIPPED_CHECKPOINT.stat().st_size < 20 * 10**6
    assert ckpt.metadata["training_step"] > 0
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).checkpoint == SHIPPED_CHECKPOINT
    assert config_from_args(parser.parse_args(["--watch", "runs"])).checkpoint is None


def test_serve_warms_up_lazily_unless_told_otherwise():
    from server.app import config_from_args
    from server.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args([])).batching.warmup == "lazy"
    assert config_from_args(parser.parse_args(["--warmup", "full"])).batching.warmup == "full"
    assert "--warmup {lazy,full}" in parser.format_help()


def test_a_loaded_server_exits_0_on_every_stop(tmp_path):
    """20 starts and stops of ``dpmlx serve`` with a model loaded, SIGINT and SIGTERM in turn: every one
    exits 0. A model worker's MLX state freed by its thread's exit handlers while the interpreter
    finalized aborted 6 of 13 shutdowns ("terminate called without an active exception", exit 134)."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    # The shipped policy with its four batch buckets' traces: a tiny model's are freed too quickly to
    # show the race.
    def start_and_stop(i: int) -> tuple[int, str]:
        proc, log = start_serve(
            "--zmq",
            f"ipc://{tmp_path}/{i}.ipc",
            "--http",
            "127.0.0.1:0",
            until="serving pusht-keypoint-small v1",
        )
        proc.send_signal(signal.SIGINT if i % 2 else signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
        return proc.returncode, "".join(log) + rest

    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: as many as the CI machine's cores
        results = list(pool.map(start_and_stop, range(20)))
    failed = [(rc, log[-300:]) for rc, log in results if rc != 0]
    assert not failed, failed


def _commands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}".strip())
    yield prefix, parser


def test_every_flag_has_help_and_serve_shows_its_defaults():
    import dpmlx

    for command, parser in _commands(dpmlx.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), (command, action.dest)
    serve = dict(_commands(dpmlx.build_parser()))["serve"].format_help()
    flat = " ".join(serve.split())
    for flag, default in (("--max-batch", "8"), ("--max-queue", "64"), ("--max-message-mb", "16.0"),
                          ("--max-wait-ms", "2.0"), ("--zmq", "tcp://127.0.0.1:5555")):  # fmt: skip
        assert re.search(rf"{flag} \S+ [^-]*\(default: {re.escape(default)}\)", flat), (flag, flat)
    assert "(default: None)" not in flat


def test_serve_stops_by_its_deadline_during_a_hot_load_with_a_backlog(tmp_path):
    """SIGTERM while a load warms up and a queue waits: the batch in flight finishes, the queue is served
    until --shutdown-timeout and then answered `shutting_down`, and the process exits 0 (it took over
    20 s, or aborted on the way out)."""
    import re
    import signal
    import time
    import urllib.request

    import mlx.core as mx
    import zmq
    from helpers import observation, tiny_policy

    from policy_core import save_policy
    from proto.codec import pack, unpack

    mx.random.seed(0)
    policy = tiny_policy(image=True)
    save_policy(policy, tmp_path / "m.safetensors")
    save_policy(tiny_policy(image=False), tmp_path / "other.safetensors")
    endpoint = f"ipc://{tmp_path}/serve.ipc"
    proc, log = start_serve(
        "--checkpoint", str(tmp_path / "m.safetensors"), "--zmq", endpoint, "--http", "127.0.0.1:0",
        "--model-root", str(tmp_path), "--max-batch", "1", "--max-queue", "256", "--shutdown-timeout", "1",
        until="serving m v1",
    )  # fmt: skip
    try:
        url = next(m.group(1) for line in log if (m := re.search(r"control plane on (http://\S+)", line)))
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 60_000)
        sock.connect(endpoint)
        obs = {k: v[0] for k, v in observation(policy, batch=1).items()}
        n = 200  # DDPM-100, one at a time: minutes of work
        for i in range(n):
            sock.send(
                pack({"type": "infer", "id": i, "obs": obs, "options": {"scheduler": "ddpm", "seed": i}})
            )
        load = urllib.request.Request(
            url + "/v1/models/load", data=b'{"path": "other.safetensors"}', method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert urllib.request.urlopen(load, timeout=30).status == 202
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        replies = [unpack(sock.recv()) for _ in range(n)]
        assert proc.wait(timeout=60) == 0
        elapsed = time.perf_counter() - signalled
        sock.close()
        codes = {r["error"]["code"] if not r["ok"] else "ok" for r in replies}
        assert codes == {"ok", "shutting_down"}, codes
        assert elapsed < 10, elapsed  # 1 s of deadline, the batch in flight, the process's exit
        assert "terminate called" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
