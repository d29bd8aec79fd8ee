"""Soak test of ``dpmlx serve``: K clients at R Hz for T minutes while the model is hot-swapped N times.

Starts the server as a separate process on two copies of a checkpoint (the shipped PushT policy by
default) in a temporary model root, runs K robot-like clients (``PolicyClient``, open loop at R Hz each,
a fresh observation per request within the policy's training range) and swaps between the copies N times
through ``POST /v1/models/load`` (warm-up included), evenly spread over the run. Prints per minute: requests,
failures, round-trip p50 / p99, the server's RSS and OS threads; then the latency in the swap windows (a
load's request until one second after it is served) next to the steady state, and how long SIGTERM takes.
Writes everything to JSON. A benchmark: it reports, it never fails on timing.

    python -m benchmarks.soak --clients 4 --rate 10 --minutes 10 --swaps 6 \\
        --json benchmarks/results/soak_cpu_shipped.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.policy_client import ClientError, PolicyClient, ServerError  # noqa: E402
from proto.latency import summarize  # noqa: E402
from server.models import SHIPPED_CHECKPOINT  # noqa: E402

SWAP_TAIL_S = 1.0  # a swap window lasts until this long after the new model serves


def proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MB, OS threads) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def http(method: str, url: str, body: dict | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def observation_source(checkpoint: Path):
    """Observations a robot could send: uniform within the normalizer's fitted range of every key."""
    from policy_core import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    schema = ckpt.metadata["obs_schema"]
    limits = {
        key: (
            np.array(ckpt.tensors[f"normalizer.{key}.min"]),
            np.array(ckpt.tensors[f"normalizer.{key}.max"]),
        )
        for key, spec in schema.items()
        if spec["dtype"] != "uint8"
    }

    def draw(rng: np.random.Generator) -> dict[str, np.ndarray]:
        obs = {}
        for key, spec in schema.items():
            shape = spec["shape"][1:]
            if key in limits:
                obs[key] = rng.uniform(*limits[key], size=shape).astype(np.float32)
            else:
                obs[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        return obs

    return draw


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="dpmlx-soak-"))
    copies = [work / "a.safetensors", work / "b.safetensors"]
    for copy in copies:
        shutil.copyfile(args.checkpoint, copy)
    endpoint = f"ipc://{work}/soak.ipc"
    server = subprocess.Popen(
        [sys.executable, str(args.server_root / "dpmlx.py"), "serve", "--checkpoint", str(copies[0]),
         "--zmq", endpoint, "--http", "127.0.0.1:0", "--model-root", str(work), *args.serve_args],
        cwd=args.server_root, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log: list[str] = []
    url = None
    for line in server.stderr:
        log.append(line)
        found = re.search(r"control plane on (http://\S+)", line)
        url = url or (found.group(1) if found else None)
        if " serving " in line:
            break
    if url is None or server.poll() is not None:
        server.kill()
        raise SystemExit("the server did not start:\n" + "".join(log[-20:]))
    threading.Thread(target=lambda: log.extend(server.stderr), daemon=True).start()

    draw = observation_source(args.checkpoint)
    duration = args.minutes * 60
    stop = threading.Event()
    lock = threading.Lock()
    samples: list[tuple[float, float, str, int | None]] = []  # (sent, round trip ms, outcome, version)
    status: list[tuple[float, float, int]] = []  # (t, RSS MB, threads)
    swaps: list[dict[str, Any]] = []
    start = time.perf_counter() + 1.0

    def client_loop(index: int) -> None:
        rng = np.random.default_rng(index)
        client = PolicyClient(endpoint, timeout_s=args.timeout)
        period = 1.0 / args.rate
        tick = start + index * period / args.clients  # clients spread over the period
        try:
            while not stop.is_set() and tick < start + duration:
                time.sleep(max(0.0, tick - time.perf_counter()))
                sent = time.perf_counter()
                try:
                    result = client.infer(draw(rng))
                    sample = (sent - start, result.round_trip_ms, "ok", result.model["version"])
                except ServerError as e:
                    sample = (sent - start, (time.perf_counter() - sent) * 1e3, e.code, None)
                except ClientError as e:
                    sample = (sent - start, (time.perf_counter() - sent) * 1e3, type(e).__name__, None)
                with lock:
                    samples.append(sample)
                tick = max(tick + period, time.perf_counter())  # no burst to catch up after a slow reply
        finally:
            client.close()

    def swapper() -> None:
        for i in range(args.swaps):
            at = start + duration * (i + 1) / (args.swaps + 1)
            if stop.wait(max(0.0, at - time.perf_counter())):
                return
            target = copies[(i + 1) % 2]
            requested = time.perf_counter()
            version = http("POST", url + "/v1/models/load", {"path": target.name})["loading"]["version"]
            while (state := http("GET", url + "/v1/models"))["loading"] is not None:
                time.sleep(0.05)
            served = time.perf_counter()
            rss, threads = proc_status(server.pid)
            swaps.append(
                {
                    "at_s": requested - start,
                    "load_s": served - requested,
                    "version": version,
                    "ok": (state["active"] or {}).get("version") == version,
                    "rss_mb": rss,
                    "threads": threads,
                }
            )
            print(
                f"  swap {i + 1}: v{version} served after {served - requested:.2f} s; RSS {rss:.1f} MB, "
                f"{threads} threads",
                flush=True,
            )

    def monitor() -> None:
        while not stop.wait(1.0):
            try:
                rss, threads = proc_status(server.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            status.append((time.perf_counter() - start, rss, threads))

    minutes: list[dict[str, Any]] = []

    def report_minute(m: int) -> None:
        with lock:
            window = [s for s in samples if m * 60 <= s[0] < (m + 1) * 60]
        points = [s for s in status if m * 60 <= s[0] < (m + 1) * 60]
        ok = [ms for _, ms, outcome, _ in window if outcome == "ok"]
        lat = summarize(ok)
        row = {
            "minute": m + 1,
            "requests": len(window),
            "failures": len(window) - len(ok),
            "p50_ms": lat.get("p50"),
            "p99_ms": lat.get("p99"),
            "rss_mb": points[-1][1] if points else None,
            "threads": points[-1][2] if points else None,
        }
        minutes.append(row)
        print(
            f"minute {row['minute']:3d}: {row['requests']:6d} requests, {row['failures']:4d} failed, "
            f"p50 {row['p50_ms'] or 0:7.1f} ms, p99 {row['p99_ms'] or 0:7.1f} ms, "
            f"RSS {row['rss_mb'] or 0:6.1f} MB, {row['threads']} threads",
            flush=True,
        )

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
    threads += [threading.Thread(target=swapper, daemon=True), threading.Thread(target=monitor, daemon=True)]
    for t in threads:
        t.start()
    for m in range(int(np.ceil(args.minutes))):
        time.sleep(max(0.0, start + min((m + 1) * 60, duration) - time.perf_counter()))
        report_minute(m)
    stop.set()
    for t in threads:
        t.join(timeout=args.timeout + 5)

    rss_before, threads_before = proc_status(server.pid)
    server.send_signal(signal.SIGTERM)
    signalled = time.perf_counter()
    try:
        exit_code = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        exit_code = None
    shutdown_s = time.perf_counter() - signalled
    shutil.rmtree(work, ignore_errors=True)

    def in_swap(t: float) -> bool:
        return any(s["at_s"] <= t <= s["at_s"] + s["load_s"] + SWAP_TAIL_S for s in swaps)

    ok = [(t, ms) for t, ms, outcome, _ in samples if outcome == "ok"]
    steady = summarize(ms for t, ms in ok if not in_swap(t))
    during = summarize(ms for t, ms in ok if in_swap(t))
    failures: dict[str, int] = {}
    for _, _, outcome, _ in samples:
        if outcome != "ok":
            failures[outcome] = failures.get(outcome, 0) + 1
    report = {
        "config": {
            "checkpoint": str(args.checkpoint),
            "clients": args.clients,
            "rate_hz": args.rate,
            "minutes": args.minutes,
            "swaps": args.swaps,
            "timeout_s": args.timeout,
            "serve_args": args.serve_args,
            "server_root": str(args.server_root),
        },
        "environment": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
        },
        "requests": len(samples),
        "failures": failures,
        "latency_ms": {"all": summarize(ms for _, ms in ok), "steady": steady, "during_swaps": during},
        "p99_during_swaps_over_steady": (during["p99"] / steady["p99"])
        if during.get("n") and steady.get("n")
        else None,
        "minutes": minutes,
        "swaps": swaps,
        "rss_mb": {
            "first": status[0][1] if status else None,
            "last": rss_before,
            "max": max(s[1] for s in status),
        },
        "threads": {
            "first": status[0][2] if status else None,
            "last": threads_before,
            "min": min(s[2] for s in status),
            "max": max(s[2] for s in status),
        },  # fmt: skip
        "status_every_s": [{"t": round(t, 1), "rss_mb": rss, "threads": n} for t, rss, n in status],
        "shutdown": {"seconds": shutdown_s, "exit_code": exit_code},
        "server_log_tail": log[-10:],
    }
    print(
        f"{report['requests']} requests, failures {failures or 0}; round trip p50/p99 steady "
        f"{steady.get('p50', 0):.1f}/{steady.get('p99', 0):.1f} ms, during swaps "
        f"{during.get('p50', 0):.1f}/{during.get('p99', 0):.1f} ms; RSS {report['rss_mb']['first']:.0f} -> "
        f"{rss_before:.0f} MB, threads {report['threads']['first']} -> {threads_before}; SIGTERM: exit "
        f"{exit_code} after {shutdown_s:.2f} s"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s per client")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--swaps", type=int, default=6, help="hot loads, alternating between two copies")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout per request, s")
    parser.add_argument("--json", type=Path, default=Path("runs/soak.json"))
    parser.add_argument(
        "--server-root", type=Path, default=ROOT, help="source tree whose dpmlx.py serves (A/B comparisons)"
    )
    parser.add_argument("serve_args", nargs="*", help="extra `dpmlx serve` arguments (after --)")
    args = parser.parse_args(argv)
    report = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
