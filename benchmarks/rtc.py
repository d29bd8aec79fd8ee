"""Real-time chunking under a simulated inference delay: PushT with a served policy, the grid of delays D
and executions (``dpmlx eval pusht --delay D --execution MODE``), and the cost of an RTC request against
a plain one.

The policy is served in this process (the server of ``dpmlx serve``, on loopback) and every episode runs
through ``PolicyClient`` and ``ActionChunkRunner`` in simulated time, so a cell is deterministic for its
seeds and D and does not depend on how fast this machine is. Each cell covers ``--episodes`` seeds from
``--start-seed`` (upstream's 50 test seeds by default); the cells named in ``--long`` are extended to
``--long-episodes`` seeds from the same start. Results are written after every cell and an interrupted
run resumes where it stopped. The timing runs the policy in-process: batch-1 requests of the default
sampler, plain, guided RTC and replacement RTC in turn, with a prefix of the length and delay the grid's
D = 3 uses; ratios are medians of the ratios within each turn, so a machine whose load drifts weighs on
all three alike.

    python -m benchmarks.rtc --out benchmarks/results/rtc
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from clients.sim.cli import EXECUTIONS, add_eval_arguments
from clients.sim.eval_pusht import evaluate, summary
from server.models import SHIPPED_CHECKPOINT

TIMING_DELAY = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT, help="the policy to serve")
    parser.add_argument("--delays", default="0,1,2,3,4", help="comma list of delays in ticks")
    parser.add_argument("--executions", default=",".join(EXECUTIONS), help="comma list of executions")
    parser.add_argument("--episodes", type=int, default=50, help="seeds per cell")
    parser.add_argument("--start-seed", type=int, default=100000, help="upstream's test seeds start here")
    parser.add_argument("--long", default="sync:0,naive:3,rtc:3", help="cells (execution:D) to extend")
    parser.add_argument(
        "--clip-cells", default="rtc:3:5", help="extra rtc cells with another max_guidance (execution:D:clip)"
    )
    parser.add_argument("--long-episodes", type=int, default=200, help="seeds of the extended cells")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the policy's noise")
    parser.add_argument("--timing-rounds", type=int, default=30, help="turns of plain / guided / replace")
    parser.add_argument("--out", type=Path, default=Path("runs/rtc"), help="folder for rtc.json and rtc.png")


@contextmanager
def _served(checkpoint: Path):
    """A server of ``checkpoint`` in this process; yields its ZeroMQ endpoint."""
    from server.app import ServeConfig, Server

    server = Server(
        ServeConfig(checkpoint=checkpoint, zmq="tcp://127.0.0.1:*", http_port=0, model_root=checkpoint.parent)
    )
    server.start()
    try:
        load = server.initial_load
        if not load.loaded.wait(600) or load.error is not None:
            raise RuntimeError(f"cannot serve {checkpoint}: {server.manager.last_error or 'timed out'}")
        yield server.zmq_endpoint
    finally:
        server.shutdown()


def _cell(
    endpoint: str, execution: str, delay: int, start: int, episodes: int, noise_seed: int, clip: str | None
) -> list:
    """Per-episode rows of ``episodes`` seeds from ``start``."""
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    argv = ["--server", endpoint, "--episodes", str(episodes), "--start-seed", str(start),
            "--delay", str(delay), "--execution", execution, "--noise-seed", str(noise_seed)]  # fmt: skip
    if clip:
        argv += ["--rtc-max-guidance", clip]
    return evaluate(parser.parse_args(argv))["per_episode"]


def time_requests(checkpoint: Path, rounds: int) -> dict[str, Any]:
    """Median ms of batch-1 plain, guided and replacement requests, and the medians of their ratios, with
    this process's BLAS threads."""
    import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)
    from clients.sim.pusht import PushTEnv
    from policy_core.checkpoint import policy_from_checkpoint, read_checkpoint
    from policy_core.rtc import ActionPrefix

    policy = policy_from_checkpoint(read_checkpoint(checkpoint))
    cfg = policy.config
    env = PushTEnv(obs_keys=tuple(cfg.obs))
    first, _ = env.reset(seed=0)
    obs = {k: np.stack([first[k]] * cfg.n_obs_steps)[None] for k in cfg.obs}
    # The prefix the grid's rtc sends at this delay: the actions after the current chunk's own.
    chunk = policy.predict_action(obs, seed=0)["action_pred"][0, cfg.n_obs_steps - 1 :]
    prefix = chunk[cfg.n_action_steps - TIMING_DELAY :]
    kinds = {
        "plain": None,
        "guided": [ActionPrefix(prefix, TIMING_DELAY)],
        "replace": [ActionPrefix(prefix, TIMING_DELAY, method="replace")],
    }
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(-2, rounds):  # two untimed turns compile and warm up
        for kind, prefixes in kinds.items():
            started = time.perf_counter()
            policy.predict_action(obs, seed=r + 2, prefixes=prefixes)
            if r >= 0:
                times[kind].append((time.perf_counter() - started) * 1e3)
    plain = np.array(times["plain"])
    return {
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "sampler": f"{cfg.sampler}-{cfg.default_inference_steps}",
        "prefix": {"k": len(prefix), "delay": TIMING_DELAY},
        "rounds": rounds,
        "median_ms": {kind: float(np.median(t)) for kind, t in times.items()},
        "ratio_to_plain": {
            kind: float(np.median(np.array(times[kind]) / plain)) for kind in ("guided", "replace")
        },
    }


def _plot(cells: dict[str, Any], delays: list[int], executions: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (score_ax, smooth_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for execution in executions:
        done = [d for d in delays if f"{execution}@{d}" in cells]
        grid = [cells[f"{execution}@{d}"]["grid"] for d in done]
        score_ax.plot(done, [g["mean_score"] for g in grid], marker="o", label=execution)
        switch = [g["second_difference_px"]["switch"]["max"] for g in grid]
        smooth_ax.plot(done, switch, marker="o", label=execution)
    for cell in (c for key, c in cells.items() if ":" in key):  # other clips: one point each
        score_ax.plot([cell["delay"]], [cell["grid"]["mean_score"]], "x", label=cell["execution"])
        smooth_ax.plot([cell["delay"]], [cell["grid"]["second_difference_px"]["switch"]["max"]], "x")
    score_ax.set(xlabel="inference delay (control ticks at 10 Hz)", ylabel="mean score", xticks=delays)
    smooth_ax.set(xlabel="inference delay (control ticks at 10 Hz)", xticks=delays)
    smooth_ax.set_ylabel("max second difference at chunk switches (px)")
    for ax in (score_ax, smooth_ax):
        ax.grid(True, alpha=0.3)
    score_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    delays = [int(d) for d in args.delays.split(",")]
    executions = args.executions.split(",")
    long = [(c.split(":")[0], int(c.split(":")[1])) for c in args.long.split(",") if c]
    clips = [c.split(":") for c in args.clip_cells.split(",") if c]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rtc.json"
    report = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    report |= {
        "checkpoint": str(args.checkpoint),
        "start_seed": args.start_seed,
        "noise_seed": args.noise_seed,
    }
    cells = report["cells"]

    def save() -> None:
        path.write_text(json.dumps(report, indent=1))

    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    timings = report.setdefault("timing", {})
    if threads not in timings and args.timing_rounds:
        timings[threads] = time_requests(args.checkpoint, args.timing_rounds)
        save()
    with _served(args.checkpoint) as endpoint:
        for delay in delays:
            for execution in executions:
                key = f"{execution}@{delay}"
                if key not in cells:
                    rows = _cell(
                        endpoint, execution, delay, args.start_seed, args.episodes, args.noise_seed, None
                    )
                    cells[key] = {"execution": execution, "delay": delay, "rows": rows, "grid": summary(rows)}
                    save()
        for execution, delay, clip in clips:
            key = f"{execution}@{delay}:max_guidance={clip}"
            if key not in cells:
                rows = _cell(
                    endpoint, execution, int(delay), args.start_seed, args.episodes, args.noise_seed, clip
                )
                cells[key] = {"execution": f"{execution} (max_guidance {clip})", "delay": int(delay),
                              "rows": rows, "grid": summary(rows)}  # fmt: skip
                save()
        for execution, delay in long:
            cell = cells[f"{execution}@{delay}"]
            missing = args.long_episodes - len(cell["rows"])
            if missing > 0:
                start = args.start_seed + len(cell["rows"])
                cell["rows"] += _cell(endpoint, execution, delay, start, missing, args.noise_seed, None)
                cell["long"] = summary(cell["rows"])
                save()
    _plot(cells, delays, executions, args.out / "rtc.png")
    return report


def print_report(report: dict[str, Any]) -> None:
    for threads, timing in report["timing"].items():
        print(f"\n{timing['sampler']}, batch 1, BLAS threads {threads}, prefix k={timing['prefix']['k']} "
              f"d={timing['prefix']['delay']}: "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in timing["median_ms"].items()) + "; "
              + ", ".join(f"{k} {v:.2f}x plain" for k, v in timing["ratio_to_plain"].items()))  # fmt: skip
    print(f"\n{'seeds':>5} {'D':>2} {'execution':12} {'score':>6} {'success':>7} "
          f"{'switch mean/max px':>19} {'inside mean/max px':>19}")  # fmt: skip
    for cell in report["cells"].values():
        for part in ("grid", "long"):
            if part in cell:
                s = cell[part]
                sw, ins = s["second_difference_px"]["switch"], s["second_difference_px"]["inside"]
                print(f"{s['episodes']:>5} {cell['delay']:>2} {cell['execution']:12} {s['mean_score']:6.3f} "
                      f"{s['success_rate']:7.2f} {sw['mean']:9.2f}/{sw['max']:<9.2f} "
                      f"{ins['mean']:9.2f}/{ins['max']:<9.2f}")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    print_report(run(args))
    return 0


if __name__ == "__main__":
    import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
