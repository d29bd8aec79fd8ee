"""Few-step sampling: PushT score against denoising steps for a consistency policy (1-3 steps) and its
teacher (DDIM at several step counts), and the latency of a request at each, side by side.

Each policy is served in this process (the server of ``dpmlx serve``, on loopback) and every episode runs
through ``PolicyClient`` and ``ActionChunkRunner`` as ``dpmlx eval pusht`` does (synchronous execution,
noise seed 0), so a cell is deterministic for its seeds. A cell covers ``--episodes`` seeds from
``--start-seed`` (upstream's 50 test seeds); the cells in ``--long`` are extended to ``--long-episodes``
seeds from the same start. Results are written after every cell and an interrupted run resumes where it
stopped. The timing runs both policies in-process, batch 1, each cell's request in turn within every
round, so a machine whose load drifts weighs on all alike; ratios are medians of the per-round ratios to
the teacher's default (DDIM-10).

    python -m benchmarks.few_steps --student runs/pusht_keypoint_fast.safetensors \\
        --out benchmarks/results/few_steps
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.rtc import _served
from clients.sim.cli import add_eval_arguments
from clients.sim.eval_pusht import evaluate, summary
from server.models import SHIPPED_CHECKPOINT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, default=SHIPPED_CHECKPOINT, help="a diffusion policy")
    parser.add_argument("--student", type=Path, required=True, help="its consistency policy")
    parser.add_argument("--teacher-steps", default="1,2,5,10,16,100", help="the teacher's DDIM step counts")
    parser.add_argument("--student-steps", default="1,2,3", help="the student's step counts")
    parser.add_argument("--episodes", type=int, default=50, help="seeds per cell")
    parser.add_argument("--start-seed", type=int, default=100000, help="upstream's test seeds start here")
    parser.add_argument("--long", default="teacher:10,student:1,student:2,student:3", help="cells to extend")
    parser.add_argument("--long-episodes", type=int, default=200, help="seeds of the extended cells")
    parser.add_argument("--timing-rounds", type=int, default=30, help="rounds of every cell's request")
    parser.add_argument("--skip", default="", help="cells (policy:steps) not to run, e.g. teacher:100")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/few_steps"), help="folder for the JSON and PNG"
    )


def _cell(endpoint: str, sampler: str, steps: int, start: int, episodes: int) -> list:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    argv = ["--server", endpoint, "--episodes", str(episodes), "--start-seed", str(start),
            "--scheduler", sampler, "--steps", str(steps), "--noise-seed", "0"]  # fmt: skip
    return evaluate(parser.parse_args(argv))["per_episode"]


def time_requests(paths: dict[str, Path], cells: list[tuple[str, int]], rounds: int) -> dict[str, Any]:
    """Median ms of a batch-1 request of every cell, and the median of its per-round ratio to the
    teacher's DDIM-10, with this process's BLAS threads."""
    import policy_core  # noqa: F401  (first: binds MLX to the optimised BLAS)
    from clients.sim.pusht import PushTEnv
    from policy_core import load_policy

    policies = {name: load_policy(path) for name, path in paths.items()}
    cfg = policies["teacher"].config
    first, _ = PushTEnv(obs_keys=tuple(cfg.obs)).reset(seed=0)
    obs = {k: np.stack([first[k]] * cfg.n_obs_steps)[None] for k in cfg.obs}
    times: dict[str, list[float]] = {f"{name}:{steps}": [] for name, steps in cells}
    for r in range(-2, rounds):  # two untimed rounds compile and warm up
        for name, steps in cells:
            started = time.perf_counter()
            policies[name].predict_action(obs, num_inference_steps=steps, seed=r + 2)
            if r >= 0:
                times[f"{name}:{steps}"].append((time.perf_counter() - started) * 1e3)
    reference = np.array(times["teacher:10"])
    return {
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "rounds": rounds,
        "median_ms": {cell: float(np.median(t)) for cell, t in times.items()},
        "ratio_to_teacher_ddim10": {
            cell: float(np.median(np.array(t) / reference)) for cell, t in times.items()
        },
    }


def _plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("teacher", "o-"), ("student", "s-")):
        points = sorted(
            (c["steps"], c["grid"]["mean_score"]) for c in report["cells"].values() if c["policy"] == name
        )
        if points:
            label = "teacher (DDIM)" if name == "teacher" else "consistency student"
            ax.plot(*zip(*points, strict=True), marker, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("denoising steps")
    ax.set_ylabel(f"mean score, seeds {report['start_seed']}+ (50)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    paths = {"teacher": args.teacher, "student": args.student}
    steps = {
        "teacher": [int(s) for s in args.teacher_steps.split(",") if s],
        "student": [int(s) for s in args.student_steps.split(",") if s],
    }
    samplers = {"teacher": "ddim", "student": "consistency"}
    skip = set(filter(None, args.skip.split(",")))
    long = set(filter(None, args.long.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "few_steps.json"
    report = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    report |= {"teacher": str(args.teacher), "student": str(args.student), "start_seed": args.start_seed,
               "noise_seed": 0}  # fmt: skip
    cells = report["cells"]

    def save() -> None:
        path.write_text(json.dumps(report, indent=1))

    for name in ("student", "teacher"):
        if not steps[name]:
            continue
        with _served(paths[name]) as endpoint:
            for n in steps[name]:
                key = f"{name}:{n}"
                if key in skip:
                    continue
                if key not in cells:
                    rows = _cell(endpoint, samplers[name], n, args.start_seed, args.episodes)
                    cells[key] = {"policy": name, "sampler": samplers[name], "steps": n, "rows": rows,
                                  "grid": summary(rows)}  # fmt: skip
                    save()
                missing = args.long_episodes - len(cells[key]["rows"]) if key in long else 0
                if missing > 0:
                    start = args.start_seed + len(cells[key]["rows"])
                    cells[key]["rows"] += _cell(endpoint, samplers[name], n, start, missing)
                    cells[key]["long"] = summary(cells[key]["rows"])
                    save()
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    timings = report.setdefault("timing", {})
    if threads not in timings and args.timing_rounds:
        timed = [("teacher", 10), ("teacher", 2), ("teacher", 1), *(("student", n) for n in steps["student"])]
        timings[threads] = time_requests(paths, timed, args.timing_rounds)
        save()
    _plot(report, args.out / "few_steps.png")
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{'policy':8} {'sampler':12} {'steps':>5} {'seeds':>5} {'score':>6} {'success':>7}")
    for cell in report["cells"].values():
        for part in ("grid", "long"):
            if part in cell:
                s = cell[part]
                print(f"{cell['policy']:8} {cell['sampler']:12} {cell['steps']:>5} {s['episodes']:>5} "
                      f"{s['mean_score']:6.3f} {s['success_rate']:7.3f}")  # fmt: skip
    for threads, timing in report.get("timing", {}).items():
        print(f"\nbatch 1, BLAS threads {threads}, {timing['rounds']} rounds: "
              + ", ".join(f"{cell} {ms:.1f} ms ({timing['ratio_to_teacher_ddim10'][cell]:.2f}x)"
                          for cell, ms in timing["median_ms"].items()))  # fmt: skip


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
