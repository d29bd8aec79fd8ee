"""How soon a fresh ``dpmlx serve`` answers: process start -> /readyz 200, -> first answered request,
-> every default path compiled, for ``--warmup lazy`` and ``full``, alternated run by run.

Each run starts ``dpmlx serve`` (the shipped policy) on free ports, polls /readyz every 20 ms, says
``hello`` until a model answers and then sends batch-1 requests one after another (zero observations,
seed 0) until the server's /v1/stats says no path is left to compile, timing each. ``--cache cold`` gives
each run an empty MLX kernel cache (a fresh TMPDIR: MLX keeps its compiled CPU kernels under the
temporary directory), as on a new machine; ``warm`` leaves the machine's cache as it is. Prints one line
per run and writes JSON with the machine's load average; never fails on timing.

    python -m benchmarks.cold_start --runs 3 --cache cold,warm --json benchmarks/results/cold_start_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from proto.codec import pack, unpack

ROOT = Path(__file__).resolve().parent.parent
DPMLX = Path(sys.executable).with_name("dpmlx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except OSError:
        return 0, {}


def _run(mode: str, cold: bool, timeout_s: float) -> dict:
    zmq_port, http_port = _free_port(), _free_port()
    base = f"http://127.0.0.1:{http_port}"
    env = dict(os.environ)
    cache = tempfile.mkdtemp(prefix="dpmlx-cold-start-") if cold else None
    if cache:
        env["TMPDIR"] = cache
    command = [str(DPMLX), "serve", "--warmup", mode, "--zmq", f"tcp://127.0.0.1:{zmq_port}"]
    command += ["--http", f"127.0.0.1:{http_port}", "--model-root", str(ROOT)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    result: dict = {"mode": mode, "cache": "cold" if cold else "warm"}
    deadline = started + timeout_s

    def poll_ready() -> None:
        while time.monotonic() < deadline and process.poll() is None:
            if _get(base + "/readyz")[0] == 200:
                result["readyz_s"] = time.monotonic() - started
                return
            time.sleep(0.02)

    poller = threading.Thread(target=poll_ready)
    poller.start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{zmq_port}")
    request_ms: list[float] = []
    try:
        hello = None
        while hello is None and time.monotonic() < deadline:
            sock.send(pack({"type": "hello", "id": 0}))
            if sock.poll(50):
                reply = unpack(sock.recv())
                hello = reply if reply.get("ok") else None
        obs = {k: np.zeros(spec["shape"], spec["dtype"]) for k, spec in hello["obs_schema"].items()}
        i = 0
        while time.monotonic() < deadline:
            i += 1
            sent = time.monotonic()
            sock.send(pack({"type": "infer", "id": i, "obs": obs, "options": {"seed": 0}}))
            while sock.poll(int(timeout_s * 1000)):
                reply = unpack(sock.recv())
                if reply.get("id") == i:
                    break
            assert reply.get("ok"), reply
            request_ms.append((time.monotonic() - sent) * 1e3)
            result.setdefault("first_answer_s", time.monotonic() - started)
            stats = _get(base + "/v1/stats")[1]
            model = stats.get("models", {}).get("active", {})
            if model and not model.get("to_compile"):
                result["all_compiled_s"] = time.monotonic() - started
                result["startup"] = model
                break
            time.sleep(0.05)  # a robot's control loop, not a flood
    finally:
        poller.join()
        sock.close()
        context.term()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    result["request_ms"] = request_ms
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode and cache")
    parser.add_argument("--modes", default="lazy,full", help="comma list of --warmup modes, alternated")
    parser.add_argument("--cache", default="cold,warm", help="comma list: cold (empty kernel cache), warm")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take")
    parser.add_argument("--json", type=Path, default=Path("runs/cold_start.json"), help="where to write")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    runs = []
    for run in range(args.runs):
        for cache in args.cache.split(","):
            for mode in args.modes.split(","):
                r = _run(mode, cache == "cold", args.timeout)
                r["run"] = run
                runs.append(r)
                nan = float("nan")
                times = r["request_ms"] or [nan]
                print(
                    f"run {run} {cache:4} {mode:4}: readyz {r.get('readyz_s', nan):6.2f} s, first answer "
                    f"{r.get('first_answer_s', nan):6.2f} s, all compiled "
                    f"{r.get('all_compiled_s', nan):6.2f} s; requests: first {times[0]:.0f} ms, "
                    f"last {times[-1]:.0f} ms, {len(r['request_ms'])} in all",
                    flush=True,
                )
    summary = {}
    for cache in args.cache.split(","):
        for mode in args.modes.split(","):
            mine = [r for r in runs if r["cache"] == cache and r["mode"] == mode]
            summary[f"{cache} {mode}"] = {
                name: statistics.median(r[name] for r in mine if name in r)
                for name in ("readyz_s", "first_answer_s", "all_compiled_s")
                if any(name in r for r in mine)
            }
    out = {
        "command": " ".join(["python -m benchmarks.cold_start", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "summary_median": summary,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
