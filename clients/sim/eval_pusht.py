"""``dpmlx eval pusht``: closed-loop PushT evaluation through the server, the path a real robot uses.

Each episode runs ``PushTEnv`` under ``ActionChunkRunner`` with a ``PolicyClient``. Scoring as upstream:
an episode's score is its maximum reward, the result is the mean over episodes, and the success rate is
the share of episodes that reached coverage > 0.95. By default episodes run synchronously (each chunk is
awaited, n_action_steps actions per inference, as upstream's evaluation); ``--realtime`` runs the real
10 Hz loop with latency hiding instead.

``--delay D --execution MODE`` simulates an inference delay of D control ticks deterministically (no wall
clock): a chunk computed from the observation of tick t is usable from tick t + D while the environment
keeps executing what is queued. ``sync`` waits for every chunk holding the last action (the robot pauses
D ticks per chunk); the others request the next chunk D ticks before the current chunk's own actions run
out and differ in how they switch (``ActionChunkRunner``'s merges): ``naive`` (latest), ``ensemble``,
``rtc`` (guided inpainting of the actions still to execute) and ``rtc-replace`` (replacement
inpainting). Besides the score, the report gives the chunk-boundary smoothness: the second difference
|a[t+1] - 2 a[t] + a[t-1]| of the executed actions (pixels) at switch ticks (the first tick whose action
comes from a newer chunk) and inside chunks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from clients.policy_client import PolicyClient
from clients.runner import ActionChunkRunner
from clients.sim.cli import EXECUTIONS
from clients.sim.pusht import PushTEnv
from proto.latency import summarize

MERGE_OF = {"sync": "latest", "naive": "latest", "ensemble": "ensemble", "rtc": "rtc", "rtc-replace": "rtc"}


def _save_gif(frames: list[np.ndarray], path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def second_differences(actions: list[np.ndarray], sources: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """|a[t+1] - 2 a[t] + a[t-1]| (Euclidean) of an episode's executed actions at the ticks t whose action
    comes from a newer chunk than t - 1's (switches), and at the other ticks (inside chunks)."""
    if len(actions) < 3:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(actions, np.float64)
    second = np.linalg.norm(a[2:] - 2 * a[1:-1] + a[:-2], axis=-1)
    switch = np.asarray(sources[1:-1]) != np.asarray(sources[:-2])
    return second[switch], second[~switch]


def _sums(place: str, values: np.ndarray) -> dict[str, float]:
    """What ``smoothness`` needs of an episode's second differences at ``place``."""
    return {
        f"{place}_n": len(values),
        f"{place}_sum": float(values.sum()),
        f"{place}_max": float(values.max(initial=0.0)),
    }


def smoothness(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and max second difference (px) at switches and inside chunks over episodes' rows."""
    out = {}
    for where in ("switch", "inside"):
        n = sum(r[f"{where}_n"] for r in rows)
        total = sum(r[f"{where}_sum"] for r in rows)
        top = max((r[f"{where}_max"] for r in rows), default=0.0)
        out[where] = {"mean": total / n if n else 0.0, "max": top, "n": n}
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean score (each episode's maximum reward), success rate and smoothness of episodes' rows."""
    return {
        "episodes": len(rows),
        "mean_score": float(np.mean([r["max_reward"] for r in rows])) if rows else 0.0,
        "success_rate": float(np.mean([r["success"] for r in rows])) if rows else 0.0,
        "second_difference_px": smoothness(rows),
    }


def runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """``ActionChunkRunner`` arguments and request options for --execution / --delay / --realtime."""
    execution, delay = args.execution, args.delay
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}")
    if delay < 0 or (args.realtime and delay):
        raise ValueError("--delay must be >= 0 and is simulated: not with --realtime (which measures it)")
    options = {k: v for k, v in (("num_inference_steps", args.steps), ("scheduler", args.scheduler)) if v}
    if execution.startswith("rtc"):
        rtc = {"method": "replace" if execution == "rtc-replace" else "guided"}
        for key, value in (("schedule", args.rtc_schedule), ("max_guidance", args.rtc_max_guidance)):
            if value is not None:
                rtc[key] = value
        options["rtc"] = rtc
    merge = MERGE_OF[execution]
    if args.realtime:
        return {"realtime": True, "merge": merge, "infer_options": options}
    return {
        "realtime": False,
        "merge": merge,
        "delay_ticks": delay,
        "prefetch": execution != "sync",
        "infer_options": options,
    }


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    settings = runner_options(args)
    options = settings.pop("infer_options")
    client = PolicyClient(args.server, timeout_s=args.timeout)
    schema, model = client.server_info["obs_schema"], client.server_info["model"]
    env = PushTEnv(obs_keys=tuple(schema), max_episode_steps=args.max_steps)
    if args.video:
        args.video.mkdir(parents=True, exist_ok=True)
    rows = []
    round_trip: list[float] = []
    gifs: list[Path] = []
    execution, delay = args.execution, args.delay
    print(f"{model['name']} v{model['version']} on {args.server}: {args.episodes} episodes of up to "
          f"{args.max_steps} steps, {execution} execution, delay {delay}", flush=True)  # fmt: skip
    with client:
        for i in range(args.episodes):
            started = time.perf_counter()
            seed = args.start_seed + i
            frames: list[np.ndarray] = []
            record = args.video is not None and i < args.video_episodes
            on_step = (lambda *_, frames=frames: frames.append(env.render(256))) if record else None
            runner = ActionChunkRunner(
                client, env, infer_options=options, on_step=on_step, noise_seed=args.noise_seed, **settings
            )
            result = runner.run_episode(seed=seed, max_steps=args.max_steps)
            success = any(info.get("is_success", False) for info in result.infos)
            at_switch, inside = second_differences(result.actions, result.sources)
            rows.append(
                {"seed": seed, "max_reward": result.max_reward, "steps": result.steps, "success": success,
                 "starved_ticks": result.starved_ticks, "chunks": result.chunks,
                 **_sums("switch", at_switch), **_sums("inside", inside)}
            )  # fmt: skip
            round_trip += result.round_trip_ms
            print(f"episode {i + 1}/{args.episodes}  seed {seed}  max reward {result.max_reward:.3f}  "
                  f"steps {result.steps:3d}  {time.perf_counter() - started:5.1f} s"
                  f"{'  success' if success else ''}", flush=True)  # fmt: skip
            if record and frames:
                gifs.append(args.video / f"pusht_seed{seed}.gif")
                _save_gif(frames, gifs[-1], fps=env.metadata["render_fps"])
    return {
        "server": args.server,
        "model": model,
        **summary(rows),
        "start_seed": args.start_seed,
        "realtime": args.realtime,
        "execution": execution,
        "delay": delay,
        "options": options,
        "noise_seed": args.noise_seed,
        "gifs": [str(g) for g in gifs],
        "round_trip_ms": summarize(round_trip),
        "round_trip_samples_ms": round_trip,
        "per_episode": rows,
    }


def main(args: argparse.Namespace) -> int:
    try:
        runner_options(args)
    except ValueError as e:  # contradictory arguments
        print(f"dpmlx eval pusht: {e}", file=sys.stderr)
        return 2
    report = evaluate(args)
    print(
        f"\nPushT over {report['episodes']} episodes from seed {report['start_seed']}: "
        f"mean score {report['mean_score']:.3f}, success rate {report['success_rate']:.3f}"
    )
    smooth = report["second_difference_px"]
    print(
        f"second difference of executed actions (px): at {smooth['switch']['n']} chunk switches mean "
        f"{smooth['switch']['mean']:.2f} max {smooth['switch']['max']:.2f}; inside chunks mean "
        f"{smooth['inside']['mean']:.2f} max {smooth['inside']['max']:.2f}"
    )
    latency = report["round_trip_ms"]
    if latency["n"]:
        print(
            f"chunk round trip over {latency['n']} requests: p50 {latency['p50']:.1f} ms, "
            f"p90 {latency['p90']:.1f} ms, p99 {latency['p99']:.1f} ms, max {latency['max']:.1f} ms"
        )
    if report["gifs"]:
        print(f"GIFs in {args.video}/: {', '.join(Path(g).name for g in report['gifs'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    plot_folder = args.video or (args.json.parent if args.json else None)
    if latency["n"] and plot_folder is not None:
        from clients.bench import plot_cdf

        png = plot_folder / "latency.png"
        if plot_cdf({"chunk round trip": report["round_trip_samples_ms"]}, png):  # needs matplotlib
            print(f"latency plot (CDF of chunk round trips): {png}")
    return 0
