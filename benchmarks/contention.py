"""Batch-1 lowdim DDIM-10 on the CPU while other processes keep cores busy: the default BLAS thread pool
against one thread, side by side.

A robot computer runs other software. For each count of busy-loop processes (each pinned to one core),
the benchmark alternates two child processes that time ``predict_action`` of the untrained PushT lowdim
policy (float32, batch 1, DDIM-10): one with the default thread pool and one with
``OPENBLAS_NUM_THREADS=1``. A row's p50 is the median of its rounds' p50s and the ratio the median of the
ratios within each round, so a machine drifting over minutes weighs on both alike. Prints a table and
writes JSON; never fails on timing.

    python -m benchmarks.contention --busy 0,1,2 --rounds 3 --json benchmarks/results/contention_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"default": {}, "one thread": {"OPENBLAS_NUM_THREADS": "1"}}
BUSY_LOOP = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--busy", default="0,1,2", help="comma list of busy-loop process counts")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two modes per count")
    parser.add_argument("--iters", type=int, default=20, help="timed requests per child")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per child (compilation)")
    parser.add_argument("--json", type=Path, default=Path("runs/contention.json"), help="where to write")


def _child(iters: int, warmup: int) -> None:
    """Times ``iters`` requests after ``warmup`` and prints them as one JSON line."""
    import numpy as np

    from benchmarks.policy_latency import _observation, _policy

    policy = _policy("lowdim", "float32")
    obs = _observation(policy, 1)
    for i in range(warmup):
        policy.predict_action(obs, scheduler="ddim", num_inference_steps=10, seed=i)
    times = []
    for i in range(iters):
        start = time.perf_counter()
        policy.predict_action(obs, scheduler="ddim", num_inference_steps=10, seed=i)
        times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"times_ms": times, "p50_ms": float(np.percentile(times, 50))}))


def _measure(mode: str, iters: int, warmup: int) -> dict:
    env = {**os.environ, **MODES[mode]}
    if mode == "default":
        env.pop("OPENBLAS_NUM_THREADS", None)
    command = [sys.executable, "-m", "benchmarks.contention", "--child", str(iters), str(warmup)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    import numpy as np

    from policy_core.info import environment_report

    cores = sorted(os.sched_getaffinity(0))
    rows = []
    for busy in (int(b) for b in args.busy.split(",")):
        loops = [
            subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(cores[i % len(cores)])])
            for i in range(busy)
        ]
        try:
            rounds = []
            for r in range(args.rounds):
                order = list(MODES) if r % 2 == 0 else list(reversed(MODES))  # who goes first alternates
                rounds.append({mode: _measure(mode, args.iters, args.warmup) for mode in order})
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
        row = {"busy_processes": busy, "rounds": rounds}
        for mode in MODES:
            row[f"{mode} p50_ms"] = float(np.median([r[mode]["p50_ms"] for r in rounds]))
        row["ratio default / one thread"] = float(
            np.median([r["default"]["p50_ms"] / r["one thread"]["p50_ms"] for r in rounds])
        )
        rows.append(row)
        per_round = ", ".join(f"{r['default']['p50_ms']:.0f}/{r['one thread']['p50_ms']:.0f}" for r in rounds)
        print(
            f"busy {busy}: default p50 {row['default p50_ms']:8.1f} ms   "
            f"one thread {row['one thread p50_ms']:8.1f} ms   "
            f"ratio {row['ratio default / one thread']:.2f}  (rounds, default/one: {per_round})",
            flush=True,
        )
    report = {"environment": environment_report(), "cores": len(cores), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


def main(args: argparse.Namespace) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)

        _child(int(sys.argv[2]), int(sys.argv[3]))
        raise SystemExit(0)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
