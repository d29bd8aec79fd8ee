import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DPMLX = [sys.executable, str(ROOT / "dpmlx.py")]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DPMLX, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


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
    proc = subprocess.Popen(
        [*DPMLX, "serve", "--checkpoint", str(tmp_path / "m.safetensors"), "--zmq", endpoint,
         "--http", "127.0.0.1:0"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        log = []
        for line in proc.stderr:
            log.append(line)
            if "serving m v1" in line:
                break
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
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        replies = [unpack(sock.recv()) for _ in range(n)]
        # The last reply was still being computed when the signal arrived, and it was not dropped.
        assert time.perf_counter() - signalled > 0.05
        assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
        assert proc.wait(timeout=60) == 0
        sock.close()
    finally:
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
    proc = subprocess.Popen(
        [*DPMLX, "serve", "--checkpoint", str(tmp_path / "m.safetensors"), "--zmq", endpoint,
         "--http", "127.0.0.1:0", "--max-batch", "1", "--max-queue", "256", "--shutdown-timeout", "1"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        log = []
        for line in proc.stderr:
            log.append(line)
            if "serving m v1" in line:
                break
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
