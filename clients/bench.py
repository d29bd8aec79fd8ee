"""``dpmlx bench latency``: request latency against a running server, as a robot sees it.

K concurrent clients send N timed requests in total (after warm-up), closed loop (each client waits for
its reply, then sends again) or open loop at a fixed rate per client. The observation is generated from
the server's ``hello`` schema. Reports round trip, the server's own ``server_ms`` (split into
``queue_ms``, receipt to the batch's start, and ``infer_ms``) and the difference (transport + encoding
overhead) as p50 / p90 / p99 / max; writes JSON and, with matplotlib, a CDF PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from clients.policy_client import ClientError, PolicyClient
from proto.latency import summarize
from proto.messages import SCHEDULERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="tcp://127.0.0.1:5555", help="ZeroMQ address of dpmlx serve")
    parser.add_argument("--clients", type=int, default=1, help="concurrent clients")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s per client (0: closed loop)")
    parser.add_argument("--requests", type=int, default=100, help="timed requests in total")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per client")
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: the model's)")
    parser.add_argument(
        "--scheduler", choices=SCHEDULERS, help="sampler (default: the model's; hello lists the model's)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s")
    parser.add_argument(
        "--connect-timeout", type=float, default=3.0, help="how long to wait for the server's hello, s"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("runs/latency.json"),
        help="write the report here (and the PNG beside)",
    )
    parser.add_argument("--png", type=Path, help="CDF plot (default: next to --json)")


def synthetic_observation(schema: dict[str, dict[str, Any]], seed: int = 0) -> dict[str, np.ndarray]:
    """One step of every key (no time axis), random but valid for the schema."""
    rng = np.random.default_rng(seed)
    obs = {}
    for key, spec in schema.items():
        shape = spec["shape"][1:]
        if spec["dtype"] == "uint8":
            obs[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            obs[key] = rng.uniform(-1, 1, shape).astype(np.float32)
    return obs


def run(args: argparse.Namespace) -> dict[str, Any]:
    options = {k: v for k, v in (("num_inference_steps", args.steps), ("scheduler", args.scheduler)) if v}
    per_client = [
        args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)
    ]
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    hello: dict[str, Any] = {}
    barrier = threading.Barrier(args.clients)

    def client_loop(index: int) -> None:
        try:
            client = PolicyClient(args.server, timeout_s=args.timeout, connect_timeout_s=args.connect_timeout)
        except ClientError as e:
            with lock:
                errors.append(f"client {index}: {e}")
            barrier.abort()
            return
        with client:
            hello.update(client.server_info)
            client.observe(synthetic_observation(client.server_info["obs_schema"], seed=index))
            try:
                for _ in range(args.warmup):
                    client.infer(**options)
            except ClientError as e:
                with lock:
                    errors.append(f"client {index} warm-up: {e}")
                barrier.abort()  # the others must not wait for this client forever
                return
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            next_send = time.perf_counter()
            for _ in range(per_client[index]):
                if args.rate > 0:
                    next_send += 1.0 / args.rate
                try:
                    result = client.infer(**options)
                except ClientError as e:
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    timing = result.server_timing
                    samples.append(
                        (result.round_trip_ms, timing["server_ms"], timing["queue_ms"], timing["infer_ms"])
                    )
                if args.rate > 0:
                    time.sleep(max(0.0, next_send - time.perf_counter()))

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    round_trip = [s[0] for s in samples]
    server = [s[1] for s in samples]
    report = {
        "server": args.server,
        "model": hello.get("model"),
        "clients": args.clients,
        "mode": f"open loop {args.rate} req/s per client" if args.rate > 0 else "closed loop",
        "options": options,
        "requests": len(samples),
        "errors": len(errors),
        "error_examples": errors[:5],
        "throughput_rps": len(samples) / elapsed if elapsed > 0 else 0.0,
        "round_trip_ms": summarize(round_trip),
        "server_ms": summarize(server),
        "queue_ms": summarize(s[2] for s in samples),
        "infer_ms": summarize(s[3] for s in samples),
        "overhead_ms": summarize(s[0] - s[1] for s in samples),
        "samples_ms": {"round_trip": round_trip, "server": server},
    }
    return report


def print_report(report: dict[str, Any]) -> None:
    print(
        f"model {report['model']}  clients {report['clients']}  {report['mode']}  options {report['options']}"
    )
    print(f"{report['requests']} requests, {report['errors']} errors, {report['throughput_rps']:.1f} req/s")
    print(f"{'':14s}{'p50':>10s}{'p90':>10s}{'p99':>10s}{'max':>10s}   (ms)")
    for name in ("round_trip_ms", "server_ms", "queue_ms", "infer_ms", "overhead_ms"):
        p = report[name]
        if p["n"]:
            print(f"{name:14s}{p['p50']:10.3f}{p['p90']:10.3f}{p['p99']:10.3f}{p['max']:10.3f}")


def plot_cdf(samples: dict[str, list[float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in samples.items():
        v = np.sort(values)
        ax.plot(v, np.arange(1, v.size + 1) / v.size, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(args: argparse.Namespace) -> int:
    report = run(args)
    if report["requests"]:
        print_report(report)
    for error in report["error_examples"]:  # the reasons, not only counted in the JSON
        print(f"dpmlx bench latency: {error}", file=sys.stderr)
    if report["errors"] > len(report["error_examples"]):
        print(f"dpmlx bench latency: {report['errors']} errors in all", file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    raw = report["samples_ms"]
    png = args.png or args.json.with_suffix(".png")
    overhead = [r - s for r, s in zip(raw["round_trip"], raw["server"], strict=True)]
    curves = {"round trip": raw["round_trip"], "server_ms": raw["server"], "overhead": overhead}
    if raw["round_trip"] and plot_cdf(curves, png):
        print(f"wrote {png}")
    return 0 if report["requests"] else 1
